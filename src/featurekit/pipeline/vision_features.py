"""The feature store of a vision run: `featurekit features RUN_DIR` and the store step of `featurekit run` when
the model is a vision transformer.

The same store file and schema as a text run's (`features/store.py`), built by the same `build_store` from
the held-out views (the evaluation's views, seed train.seed + 1, as many as `features.tokens` kept tokens
fill; view v is the same view in eval, top_patches.json and the store). What the text columns hold here:

* a context is a view (`contexts.token_ids`: each token's kind), a position the token's index in the
  sequence (0 = CLS where the model has one; patch (r, c) of the g × g grid at n_prefix + r·g + c);
* the "tokens" are the two token kinds (id 0 = "CLS", 1 = "patch"): `top_tokens` is each latent's firing
  count and mean code on CLS tokens and on patches; there is no token search for images;
* `extra` = {"kind": "cls" | "patch" | "dead", "cls_fires", "patch_fires"}: "cls" where the latent fires more
  often on CLS tokens than on patches (the explorer's CLS-token vs patch features);
* no logit effects (a vision model has no vocabulary); decoder neighbours and co-firing as for text;
* meta: modality "vision", the preprocessing, grid, n_prefix, n_views, view_seed and each view's image name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from .._io import sha256_file
from ..config import RunConfig
from ..data.batch import ActivationBatch
from ..dictionaries import load
from ..errors import FeaturekitError
from ..features.build import build_store
from ..features.store import FILENAME
from ..vision.harvest import CLS, harvest_views, token_kinds, token_mask
from ..vision.models import VisionModel

KIND_NAMES = ("CLS", "patch")  # token ids of a vision store: the harvest's CLS = 0, PATCH = 1


class TokenKinds:
    """The store's "tokenizer" for a vision run: token id → the token kind's name."""

    def __len__(self) -> int:
        return len(KIND_NAMES)

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [KIND_NAMES[i[0]] for i in ids]


def run_image_features(cfg: RunConfig, vm: VisionModel | None = None, progress: bool = True) -> Path:
    """Build RUN_DIR/features.sqlite of a vision run (module docstring); returns its path."""
    from .setup import open_model
    from .vision import preprocess, views

    weights = cfg.run_dir / "dictionary" / "model.safetensors"
    if not weights.is_file():
        raise FeaturekitError(f"{cfg.run_dir} has no trained dictionary yet: run `featurekit run --config "
                              f"{cfg.run_dir / 'config.json'}` first")
    vm = vm or open_model(cfg)
    sae = load(cfg.run_dir / "dictionary", device=next(vm.model.parameters()).device)
    sae.eval()
    test = views(cfg, vm, "test", cfg.features.tokens)
    size = test.preprocess.size
    kinds, keep = token_kinds(vm, size), token_mask(vm, size, cfg.images.tokens)
    ids, mask = kinds.repeat(test.n_views, 1), keep.repeat(test.n_views, 1)
    fires = torch.zeros(2, sae.n_latents, dtype=torch.long)  # [CLS, patch] firings of each latent

    def batches() -> Iterator[ActivationBatch]:
        for batch in harvest_views(vm, test, [cfg.site], batch_size=cfg.features.batch_contexts, tokens=cfg.images.tokens,
                                   progress=progress):
            with torch.no_grad():
                on = sae.encode(batch.acts[cfg.site].to(next(vm.model.parameters()).device).float()) != 0
            is_cls = (batch.token_ids == CLS).to(on.device)
            fires[0] += on[is_cls].sum(0).cpu()
            fires[1] += on[~is_cls].sum(0).cpu()
            yield batch

    def extra(f: int) -> dict:
        c, p = int(fires[0, f]), int(fires[1, f])
        return {"kind": "dead" if c + p == 0 else "cls" if c > p else "patch", "cls_fires": c, "patch_fires": p}

    meta = {"model": cfg.model.name, "site": cfg.site, "output_site": None, "modality": "vision",
            "sources": [{"source": cfg.data.source, "split": "test", "tokens": int(mask.sum())}],
            "token_policy": f"images.tokens={cfg.images.tokens}", "dictionary_sha256": sha256_file(weights),
            "settings": dataclasses.asdict(cfg.features), "images": preprocess(cfg).to_dict(), "tokens": cfg.images.tokens,
            "grid": vm.grid(size), "n_prefix": vm.n_prefix, "n_views": test.n_views, "view_seed": test.seed,
            "views": [test.name(v) for v in range(test.n_views)], "token_kinds": list(KIND_NAMES)}
    fc = cfg.features
    return build_store(None, TokenKinds(), sae, ids, mask, cfg.run_dir / FILENAME, site=cfg.site, meta=meta,
                       batch_contexts=fc.batch_contexts, top_n=fc.top_n, band_n=fc.band_n, cofire_tokens=fc.cofire_tokens,
                       progress=progress, extra=extra, batches=batches())
