"""Vision runs in the explorer: a run whose eval.json says ``"modality": "vision"``. Its pages come from what
`pipeline.vision` wrote (features/top_patches.json, token_kinds.json, figures.json) and, where the run has
one (`featurekit features RUN`, `pipeline.vision_features`), from its feature store: then every latent has a
feature page, and the feature list (sorted) and the search by id work as for text (no token search). Its
pictures are drawn on request, never written into the run folder:

* the overview lists the features firing mostly on the CLS token apart from the patch features;
* a feature page shows each top example as a crop around its patch (3 × 3 patches) and as a heat-map of the
  feature's code over the whole held-out view (`vision.figures.latent_maps`, drawn by `heat_overlay`; the model
  and the dictionary are loaded on the first picture, the held-out views rebuilt from the saved config);
* "try an image": a held-out view chosen from a list, its top features (where each fires most), and the
  heat-map of one of them (any latent) over it; or an uploaded PNG/JPEG (`decode_upload`: size-limited,
  decoded by PIL from those two formats only), preprocessed as the run's plain views.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import FeaturekitError
from ..features.store import FILENAME, FeatureStore

HEAT_SIZE = 224
CROP_SIZE = 112
MAX_VIEWS = 200  # the held-out views offered on the try page
MAX_UPLOAD = 4 * 2**20  # bytes of an uploaded image
MAX_PIXELS = 16_000_000  # pixels of an uploaded image (PIL's own bomb check warns at 89 M)


def is_vision_run(path: Path) -> bool:
    data = _read_json(path / "eval.json")
    return isinstance(data, dict) and data.get("modality") == "vision"


class VisionRun:
    """One vision run folder (the attributes the shared page frame reads, as on `runs.Run`)."""

    vision = True
    signed = False
    output_site = None

    def __init__(self, index: int, name: str, path: Path) -> None:
        self.index, self.name, self.path = index, name, path
        self.config = _read_json(path / "config.json") or {}
        self.eval = _read_json(path / "eval.json") or {}
        features = path / "features"
        tops, kinds = _read_json(features / "top_patches.json"), _read_json(features / "token_kinds.json")
        if not isinstance(tops, list) or not isinstance(kinds, dict):
            raise FeaturekitError(f"{path} is a vision run without features/top_patches.json and token_kinds.json: finish it "
                                  f"with `featurekit run --config {path / 'config.json'}` (it continues where it stopped)")
        self.tops = {int(f["latent"]): f for f in tops}
        self.cls_fires = [int(v) for v in kinds.get("cls_fires", [])]
        self.patch_fires = [int(v) for v in kinds.get("patch_fires", [])]
        self.n_cls_tokens, self.n_patch_tokens = int(kinds.get("n_cls_tokens", 0)), int(kinds.get("n_patch_tokens", 0))
        self.meta: dict[str, Any] = {}
        self.store = None
        if (path / FILENAME).is_file():
            self.store = FeatureStore(path / FILENAME)
            self.meta = self.store.meta
            if self.meta.get("modality") != "vision":
                raise FeaturekitError(f"{path / FILENAME} is not a vision run's feature store: rebuild it with "
                                      f"`featurekit features {path}`")
        self._lock = threading.Lock()
        self._loaded: tuple | None = None
        self._cache: dict[str, Any] = {}

    site = property(lambda self: str(self.eval.get("site") or self.config.get("site", "?")))
    decoder_site = site
    model = property(lambda self: str(self.eval.get("model") or self.config.get("model", {}).get("name", "?")))
    method = property(lambda self: str(self.config.get("dictionary", {}).get("method", "?")))
    n_latents = property(lambda self: len(self.patch_fires))

    # -- the feature store, as `runs.Run` offers it to the feature list and search (`queries`) -------------------
    def query(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.store is None:
            raise _bad_request(f"{self.name} is a vision run without a feature store: build it with "
                               f"`featurekit features {self.path}` for the feature list and a page for every feature")
        with self._lock:
            return fn(self.store, *args, **kwargs)

    def n_live(self) -> int:
        if "n_live" not in self._cache:
            self._cache["n_live"] = self.query(FeatureStore.count_features, live_only=True)
        return self._cache["n_live"]

    def has_explanations(self) -> bool:
        return False

    def kind(self, latent: int) -> str:
        """The latent's kind (`kind_of`) from its firings on the evaluation's views (features/token_kinds.json)."""
        return kind_of(self.cls_fires[latent], self.patch_fires[latent])

    def store_feature(self, latent: int) -> dict:
        """A latent's record from the store, in the shape of a top_patches.json entry (top examples as view, image,
        token, kind, row, col, value) plus its store statistics (fires, mean, max, the histogram, its CLS / patch
        firings and kind, all over the store's n_views views)."""
        if not 0 <= latent < self.n_latents:
            raise _not_found(f"feature {latent} does not exist: this dictionary has {self.n_latents} (0 to {self.n_latents - 1})")
        page = self.query(FeatureStore.feature, latent)
        names, g, prefix = self.meta.get("views", []), int(self.meta.get("grid", 1)), int(self.meta.get("n_prefix", 1))
        tops = []
        for e in page["examples"].get("top", []):
            view, token = int(e["context"]), int(e["position"])
            patch = token - prefix
            tops.append({"value": e["value"], "view": view, "image": names[view] if view < len(names) else f"view {view}",
                         "token": token, **({"kind": "cls"} if patch < 0 else {"kind": "patch", "row": patch // g, "col": patch % g})})
        extra = page.get("extra") or {}
        c, p = int(extra.get("cls_fires", 0)), int(extra.get("patch_fires", 0))
        return {"latent": latent, "density": page["density"], "top": tops, "fires": page["fires"], "mean": page["mean"],
                "max": page["max"], "hist": page["hist"], "kind": kind_of(c, p), "cls_fires": c, "patch_fires": p,
                "n_views": int(self.meta.get("n_views", 0)), "counted_on": "feature store"}

    def overview(self) -> dict:
        """The features with top examples, CLS-token and patch features apart, each with its firing counts."""
        groups: dict[str, list[dict]] = {"cls": [], "patch": [], "dead": []}
        for latent, f in sorted(self.tops.items()):
            groups[self.kind(latent)].append({"latent": latent, "density": f.get("density", 0.0), "n_top": len(f.get("top", [])),
                                              "cls_fires": self.cls_fires[latent], "patch_fires": self.patch_fires[latent]})
        counts = {k: sum(self.kind(i) == k for i in range(self.n_latents)) for k in groups}
        return {"groups": groups, "counts": counts}

    def feature(self, latent: int) -> dict:
        """The feature page's record: with a store, the store's (`store_feature`: its top examples, statistics and
        firing counts, all over the store's views); without one, the report's (top_patches.json, its firing counts
        and kind over the evaluation's views, token_kinds.json). Never a mix: `fires`, `cls_fires`, `patch_fires`,
        `kind` and `density` are counted over the same `n_views` views (`counted_on` names them)."""
        if self.store is not None:
            f = self.cached_feature(latent)
            return {**f, "views": list(dict.fromkeys(int(t["view"]) for t in f["top"]))}
        if latent not in self.tops:
            listed = ", ".join(map(str, sorted(self.tops)))
            raise _not_found(f"latent {latent} has no top patches in this run (the run kept those of latents {listed}; "
                                   f"report.n_features sets how many)")
        f = self.tops[latent]
        c, p = self.cls_fires[latent], self.patch_fires[latent]
        return {**f, "kind": kind_of(c, p), "fires": c + p, "cls_fires": c, "patch_fires": p,
                "n_views": self.eval.get("views"), "counted_on": "evaluation",
                "views": list(dict.fromkeys(int(t["view"]) for t in f.get("top", [])))}

    def cached_feature(self, latent: int) -> dict:
        key = f"f{latent}"
        if key not in self._cache:
            self._cache[key] = self.store_feature(latent)
        return self._cache[key]

    # -- pictures (drawn on request) -----------------------------------------------------------------------------
    def _model(self) -> tuple:
        with self._lock:
            if self._loaded is None:
                from ..dictionaries import load
                from ..pipeline.setup import load_run_config, open_model
                from ..pipeline.vision import views

                cfg = load_run_config(self.path)
                vm = open_model(cfg)
                sae = load(self.path / "dictionary")
                sae.eval()
                test = views(cfg, vm, "test", cfg.eval.tokens)
                if int(self.meta.get("n_views", 0)) > test.n_views:  # the store's views: the same seed, more of them
                    test = dataclasses.replace(test, n_views=int(self.meta["n_views"]))
                self._loaded = (cfg, vm, sae, test)
            return self._loaded

    def _view(self, latent: int, view: int, views: Any = None) -> tuple[Image.Image, np.ndarray, float]:
        """The view's image, the latent's (g, g) patch codes on it, and its code at the CLS token."""
        from ..vision.figures import denormalised, latent_maps

        cfg, vm, sae, test = self._model()
        test = views or test
        if not 0 <= view < test.n_views:
            raise _not_found(f"view {view} is not one of this run's {test.n_views} held-out views")
        if not 0 <= latent < sae.n_latents:
            raise _not_found(f"feature {latent} does not exist: this dictionary has {sae.n_latents} (0 to {sae.n_latents - 1})")
        with self._lock:
            maps, cls = latent_maps(vm, sae, cfg.site, test, latent, [view])
            image = denormalised(test, view)
        return image, maps[0].numpy(), float(cls[0])

    def views(self) -> list[tuple[int, str]]:
        """(index, image name) of the held-out views (the first MAX_VIEWS)."""
        test = self._model()[3]
        return [(v, test.name(v)) for v in range(min(test.n_views, MAX_VIEWS))]

    @torch.no_grad()
    def top_on_view(self, view: int, k: int = 10, views: Any = None) -> list[dict]:
        """The k features with the largest code on any token of the view: where (the patch, or CLS), how much.
        `views`: another `vision.images.Views` (an uploaded image) instead of the held-out ones."""
        from ..vision.harvest import capture_pixels

        cfg, vm, sae, test = self._model()
        test = views or test
        if not 0 <= view < test.n_views:
            raise _not_found(f"view {view} is not one of this run's {test.n_views} held-out views")
        with self._lock:
            acts = capture_pixels(vm, test.pixels([view]), [cfg.site])[cfg.site][0].float()
            codes = sae.encode(acts).cpu()
        peak, where = codes.max(0)
        g = vm.grid(test.preprocess.size)
        out = []
        for latent in peak.argsort(descending=True)[:k].tolist():
            if peak[latent] <= 0:
                break
            patch = int(where[latent]) - vm.n_prefix
            out.append({"latent": latent, "value": float(peak[latent]), "kind": self.kind(latent),
                        "where": "CLS token" if patch < 0 else f"patch ({patch // g}, {patch % g})"})
        return out

    def upload(self, data: bytes, feature: int | None) -> dict:
        """An uploaded PNG or JPEG (at most MAX_UPLOAD bytes and MAX_PIXELS pixels), preprocessed as the run's plain
        views: its top features and the heat-map of `feature` (default: the top one) as a data: URL."""
        import base64

        from ..vision.images import NamedImage, Views

        image = decode_upload(data)
        test = self._model()[3]
        views = Views((NamedImage("upload", image),), test.preprocess, 1, test.seed)
        top = self.top_on_view(0, views=views)
        feature = feature if feature is not None else (top[0]["latent"] if top else None)
        heat = None
        if feature is not None:
            heat = "data:image/png;base64," + base64.b64encode(self.heat_png(feature, 0, top_only=False, views=views)).decode()
        return {"size": list(image.size), "top": top, "feature": feature, "heat": heat}

    def heat_png(self, latent: int, view: int, top_only: bool = True, views: Any = None) -> bytes:
        """The view (grey) with the latent's code over each patch in red (opacity ∝ code / the map's largest code) and
        the hottest patch framed (`vision.figures.heat_overlay`);
        `top_only`: only the views of the latent's top examples."""
        if top_only and view not in self.feature(latent)["views"]:
            raise _not_found(f"view {view} is not among latent {latent}'s top examples")
        from ..vision.figures import heat_overlay

        image, codes, _ = self._view(latent, view, views)
        return _png(heat_overlay(image, codes, HEAT_SIZE))

    def crop_png(self, latent: int, index: int) -> bytes:
        """The 3 × 3 patches around the index-th top example's patch (the whole view for a CLS example), enlarged."""
        top = self.feature(latent).get("top", [])
        if not 0 <= index < len(top):
            raise _not_found(f"latent {latent} has {len(top)} top examples, not {index + 1}")
        t = top[index]
        image, codes, _ = self._view(latent, int(t["view"]))
        if t.get("kind") != "patch":
            return _png(image.resize((CROP_SIZE, CROP_SIZE)))
        g = codes.shape[0]
        cell = image.size[0] / g
        r0, c0 = min(max(int(t["row"]) - 1, 0), g - 3), min(max(int(t["col"]) - 1, 0), g - 3)
        box = tuple(round(v) for v in (c0 * cell, r0 * cell, (c0 + 3) * cell, (r0 + 3) * cell))
        return _png(image.crop(box).resize((CROP_SIZE, CROP_SIZE), Image.NEAREST))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def kind_of(cls_fires: int, patch_fires: int) -> str:
    """"cls" where a latent fires more often on CLS tokens than on patches, "patch" where on patches, "dead" where never
    (the rule of the store's `extra` kind, `pipeline.vision_features`)."""
    return "dead" if cls_fires + patch_fires == 0 else "cls" if cls_fires > patch_fires else "patch"


def decode_upload(data: bytes) -> Image.Image:
    """The RGB image in `data`, or a clear error: only PNG and JPEG, at most MAX_UPLOAD bytes and MAX_PIXELS pixels
    (checked from the header before anything is decompressed)."""
    from .live import TooLarge
    from .queries import BadRequest

    if len(data) > MAX_UPLOAD:
        raise TooLarge(f"the image is larger than {MAX_UPLOAD // 2**20} MiB: send a smaller PNG or JPEG")
    if not data:
        raise BadRequest("no image was sent: choose a PNG or JPEG file")
    bad = "the file is not a PNG or JPEG image that can be read ({}): send a PNG or JPEG"
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadRequest(bad.format(type(err).__name__)) from None
    if image.width * image.height > MAX_PIXELS:  # from the header: nothing decompressed yet
        raise TooLarge(f"the image has {image.width} × {image.height} pixels, more than {MAX_PIXELS:,}: send a smaller one")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadRequest(bad.format(type(err).__name__)) from None


def _bad_request(message: str) -> FeaturekitError:
    from .queries import BadRequest

    return BadRequest(message)


def _not_found(message: str) -> FeaturekitError:
    from .queries import NotFound  # queries imports runs, which imports this module

    return NotFound(message)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
