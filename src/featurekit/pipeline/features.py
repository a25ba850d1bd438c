"""The feature store of a run: `featurekit features RUN_DIR`, and the last step of `featurekit run`.

The store (`RUN_DIR/features.sqlite`, `features/store.py`) is built from `features.tokens` tokens: the
held-out split of the run's text first, then training text to fill the budget (or, with `text=`, any text
source, all its documents). `store_complete` tells a rerun whether the store already describes the
dictionary now in the run with these settings. A vision run's store: `vision_features.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .._io import sha256_file
from ..config import RunConfig
from ..dictionaries import load
from ..errors import FeaturekitError
from ..features.build import build_store
from ..features.heads import head_shares
from ..features.store import FILENAME, FeatureStore
from ..models.loading import LoadedModel
from ..models.sites import n_heads, parse_site
from ..train import distributed
from .setup import contexts, is_vision, open_model, token_policy


def store_contexts(loaded: LoadedModel, cfg: RunConfig, text: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(ids, mask, sources) of the store's pass: the held-out split, then training text, up to features.tokens tokens;
    or every document of `text`."""
    budget = cfg.features.tokens
    if text is not None:
        other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=text, holdout="documents"))
        ids, mask = contexts(loaded, other, "all", budget)
        return ids, mask, [{"source": text, "split": "all", "tokens": int(mask.sum())}]
    ids, mask = contexts(loaded, cfg, "test", budget)
    sources = [{"source": cfg.data.source, "split": "test", "tokens": int(mask.sum())}]
    rest = budget - int(mask.sum())
    if rest > cfg.data.context_len:
        more_ids, more_mask = contexts(loaded, cfg, "train", rest)
        ids, mask = torch.cat([ids, more_ids]), torch.cat([mask, more_mask])
        sources.append({"source": cfg.data.source, "split": "train", "tokens": int(more_mask.sum())})
    return ids, mask, sources


def run_features(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True, text: str | None = None,
                 shard: bool = True) -> Path | None:
    """Build RUN_DIR/features.sqlite (module docstring). Under torchrun with `shard`, every rank takes a share of the
    contexts and rank 0 writes (without: this process builds it alone). Returns the store's path (None on the
    other ranks)."""
    if is_vision(cfg):  # the held-out image views (pipeline/vision_features.py)
        from .vision_features import run_image_features

        if text is not None:
            raise FeaturekitError(f"{cfg.run_dir} is a vision run: its store is built from its held-out images, not from "
                                  f"--text (drop --text)")
        return run_image_features(cfg, loaded, progress)
    loaded = loaded or open_model(cfg)
    weights = cfg.run_dir / "dictionary" / "model.safetensors"
    if not weights.is_file():
        raise FeaturekitError(f"{cfg.run_dir} has no trained dictionary yet: run `featurekit train` (or `featurekit run`) first")
    sae = load(cfg.run_dir / "dictionary", device=next(loaded.model.parameters()).device)
    ids, mask, sources = store_contexts(loaded, cfg, text)
    extra = None
    if parse_site(cfg.site).kind == "attn_z":  # per-head attribution of attention-output features
        shares = head_shares(sae.W_dec, n_heads(loaded.model))

        def extra(f: int) -> dict:
            return {"head_shares": [round(float(v), 4) for v in shares[f]]}

    meta = {"model": cfg.model.name, "site": cfg.site, "output_site": cfg.output_site, "sources": sources,
            "token_policy": token_policy(cfg), "dictionary_sha256": sha256_file(weights),
            "settings": dataclasses.asdict(cfg.features)}
    fc = cfg.features
    return build_store(loaded.model, loaded.tokenizer, sae, ids, mask, cfg.run_dir / FILENAME, site=cfg.site, meta=meta,
                       max_norm_multiple=cfg.data.max_norm_multiple, batch_contexts=fc.batch_contexts, top_n=fc.top_n,
                       band_n=fc.band_n, cofire_tokens=fc.cofire_tokens, progress=progress, extra=extra,
                       distributed=distributed if shard and distributed.is_initialized() else None)


def store_complete(cfg: RunConfig) -> bool:
    """Whether RUN_DIR/features.sqlite is complete and describes the dictionary now in the run, with these settings."""
    weights = cfg.run_dir / "dictionary" / "model.safetensors"
    try:
        store = FeatureStore(cfg.run_dir / FILENAME)
    except FeaturekitError:
        return False
    try:
        return (weights.is_file() and store.meta.get("dictionary_sha256") == sha256_file(weights)
                and store.meta.get("settings") == dataclasses.asdict(cfg.features)
                and [s["source"] for s in store.meta.get("sources", [])][:1] == [cfg.data.source])
    finally:
        store.close()
