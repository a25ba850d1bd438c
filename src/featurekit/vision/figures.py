"""A picture of one image feature: its top views with the feature's activation as a heat-map over the patch
grid, and a crop around each view's most active patch (a PNG, drawn with PIL; no browser).

`feature_figure(vm, dictionary, site, views, latent, view_ids)`: for each view in ``view_ids`` (e.g. the
distinct views of the latent's top examples, `pipeline.vision.top_patches`) the view is run to ``site``,
encoded, and the latent's code at every patch is drawn over the image (red, opacity ∝ code / the figure's
largest code; nearest-neighbour upsampling, so each patch is a square). Below it: the 3 × 3-patch crop
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
        heat = (maps[i] / top).clamp(0, 1).repeat_interleave(cell, 0).repeat_interleave(cell, 1).numpy()
        overlay = np.asarray(image, dtype=np.float32)
        overlay = overlay * (1 - 0.6 * heat[..., None]) + np.array([255.0, 0, 0]) * 0.6 * heat[..., None]
        x0 = 8 + i * (TILE + 8)
        sheet.paste(Image.fromarray(overlay.astype(np.uint8)).resize((TILE, TILE)), (x0, 36))
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
