"""A picture of one image feature: its top views with the feature's activation as a heat-map over the patch
grid, and a crop around each view's most active patch (a PNG, drawn with PIL; no browser).

`feature_figure(vm, dictionary, site, views, latent, view_ids)`: for each view in ``view_ids`` (e.g. the
distinct views of the latent's top examples, `pipeline.vision.top_patches`) the view is run to ``site``,
encoded, and the latent's code at every patch is drawn over the image (`heat_overlay`: the view in dimmed grey,
red with opacity ∝ code / the figure's largest code, each patch a square, and a yellow frame around the
hottest patch — a red overlay on a colour photo vanishes on red objects, e.g. the coffee photo's saucer). Below it: the 3 × 3-patch crop
centred on the view's most active patch, enlarged, and the CLS token's code for that view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from featurekit._io import atomic_write
from featurekit.dictionaries import Dictionary
from featurekit.vision.harvest import capture_pixels
from featurekit.vision.images import Views
from featurekit.vision.models import VisionModel

TILE = 224


@torch.no_grad()
def latent_maps(vm: VisionModel, dictionary: Dictionary, site: str, views: Views, latent: int,
                view_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, g, g) the latent's code at each patch of each view, and (n,) its code at the CLS token (0 without one)."""
    acts = capture_pixels(vm, views.pixels(view_ids), [site])[site].float()
    codes = dictionary.encode(acts.flatten(0, 1)).view(len(view_ids), acts.shape[1], -1)[..., latent].cpu()
    g = vm.grid(views.preprocess.size)
    cls = codes[:, 0] if vm.n_prefix else torch.zeros(len(view_ids))
    return codes[:, vm.n_prefix:].reshape(-1, g, g), cls


def denormalised(views: Views, v: int) -> Image.Image:
    pre = views.preprocess
    x = views.pixels([v])[0].permute(1, 2, 0) * torch.tensor(pre.std) + torch.tensor(pre.mean)
    return Image.fromarray((x.clamp(0, 1).numpy() * 255).astype(np.uint8))


HEAT_ALPHA = 0.75
FRAME = (255, 220, 0)


def heat_overlay(image: Image.Image, codes: np.ndarray, size: int, top: float | None = None) -> Image.Image:
    """The (g, g) patch ``codes`` over ``image`` at size × size: the image in grey at 80 % brightness (so that only
    the heat is coloured), red with opacity HEAT_ALPHA · code / ``top`` (default: the largest code; codes ≤ 0 add
    nothing) and a FRAME-coloured square around the hottest patch when it is > 0."""
    codes = np.asarray(codes, dtype=np.float32)
    g = codes.shape[0]
    top = float(codes.max()) if top is None else float(top)
    heat = np.clip(codes / (top if top > 0 else 1.0), 0, 1)
    cells = np.arange(size) * g // size  # the patch under each output pixel (nearest neighbour)
    heat = heat[cells][:, cells][..., None]
    grey = np.asarray(image.convert("L").resize((size, size), Image.BICUBIC), dtype=np.float32)[..., None] * 0.8
    out = grey * (1 - HEAT_ALPHA * heat) + np.array([255.0, 0, 0]) * HEAT_ALPHA * heat  # (size, size, 3)
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if codes.max() > 0:
        r, c = divmod(int(codes.argmax()), g)
        x0, y0 = c * size // g, r * size // g
        x1, y1 = (c + 1) * size // g - 1, (r + 1) * size // g - 1
        ImageDraw.Draw(picture).rectangle((x0, y0, x1, y1), outline=FRAME, width=max(1, size // (8 * g)))
    return picture


def feature_figure(vm: VisionModel, dictionary: Dictionary, site: str, views: Views, latent: int, view_ids: list[int],
                   path: str | Path, title: str = "") -> Path:
    """Write the figure (module docstring) to ``path`` (PNG, atomically); returns the path."""
    maps, cls = latent_maps(vm, dictionary, site, views, latent, view_ids)
    top = float(maps.max()) or 1.0
    g = maps.shape[-1]
    cell = TILE // g
    sheet = Image.new("RGB", (len(view_ids) * (TILE + 8) + 8, 36 + TILE + 8 + TILE // 2 + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), title or f"latent {latent} at {site}", fill="black")
    for i, v in enumerate(view_ids):
        image = denormalised(views, v).resize((g * cell, g * cell))
        x0 = 8 + i * (TILE + 8)
        sheet.paste(heat_overlay(image, maps[i].numpy(), TILE, top), (x0, 36))
        r, c = divmod(int(maps[i].argmax()), g)
        if float(maps[i].max()) > 0:  # the crop around the top patch (none when no patch fires)
            r0, c0 = min(max(r - 1, 0), g - 3), min(max(c - 1, 0), g - 3)
            crop = image.crop((c0 * cell, r0 * cell, (c0 + 3) * cell, (r0 + 3) * cell)).resize((TILE // 2, TILE // 2), Image.NEAREST)
            sheet.paste(crop, (x0, 36 + TILE + 8))
            label = f"patch max {float(maps[i].max()):.2f}\nat ({r},{c})"
        else:
            label = "no patch fires"
        draw.text((x0 + TILE // 2 + 6, 36 + TILE + 12), f"{label}\nCLS {float(cls[i]):.2f}", fill="black")
        draw.text((x0, 36 + TILE + 8 + TILE // 2 + 4), views.name(v)[:34], fill="black")
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
