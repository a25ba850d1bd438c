"""Feature stores for every layer of a per-layer transcoder set from ONE pass of the model
(`featurekit circuits features SET_DIR`).

The held-out text (as `featurekit features`: the held-out split of the set's training text, then training text to
fill `tokens`; or every document of `text`) runs through the model once; every chosen layer's MLP input
(`mlp_in.L`) is captured in the same forward, encoded by that layer's transcoder and fed to its own store
(`features.build.build_stores`: statistics, top and quantile examples, histograms, logit effects of the decoder rows
written at `mlp_out.L`, decoder neighbours — the text runs' schema). Each layer's store is a run folder

    OUT/layer_L/config.json       a run config (the set's model and text, site mlp_in.L, output_site mlp_out.L)
    OUT/layer_L/features.sqlite   the store, written atomically; its meta's `transcoder_set.dictionary_dir` names the
                                  layer's dictionary folder (a path relative to OUT/layer_L): the run has no
                                  dictionary/ of its own and nothing is copied

with OUT = SET/stores by default (`transcoder_set.store_folder`), so `featurekit serve` reads each layer as a run
whose dictionary is the set's `layer_L` folder and links a graph's feature nodes of layer L to it (`serve --graphs`
finds SET/stores by itself). A layer whose store already describes its transcoder (weights digest) with these
settings is skipped, so a killed command redoes only the layers it had not written; when every chosen layer is
done, the model is not loaded. A token whose norm is an outlier (`data.max_norm_multiple`) at any chosen layer is
left out at all of them (the pass keeps the same tokens everywhere).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .._io import sha256_file
from ..circuits import transcoder_set
from ..config import load_config
from ..dictionaries import fileformat, load, read_meta
from ..errors import FeaturekitError
from ..features.build import StoreJob, build_stores
from ..features.store import FILENAME, FeatureStore
from ..models import load_model
from .circuit_sets import parse_layers
from .features import store_contexts
from .setup import read_run_json, save_config, token_policy


def set_store_config(set_dir: Path, layers: dict[int, Path], text: str | None, tokens: int, overrides: Sequence[str] = ()):
    """The RunConfig of the stores: the set's model, text and token policy (from its first layer's file), with
    features.tokens = `tokens` and the `features.*` overrides."""
    meta = read_meta(next(iter(layers.values())))
    source, special = meta.get("source", {}) or {}, meta.get("special_tokens", {}) or {}
    model = source.get("model")
    if not model:
        raise FeaturekitError(f"{set_dir}: the transcoders do not name their model (source.model); re-save the set with it")
    values = {"model.name": model, "model.dtype": "float32", "data.source": text or source.get("corpus"),
              "data.context_len": source.get("context_len"), "data.exclude_first": special.get("exclude_first"),
              "data.exclude_special": special.get("exclude_special"), "features.tokens": tokens}
    sets = [f"{key}={value}" for key, value in values.items() if value is not None]
    if "max_norm_multiple" in special:
        value = special["max_norm_multiple"]
        sets.append(f"data.max_norm_multiple={'null' if value is None else value}")
    return load_config(None, sets + list(overrides))


def layer_run_config(cfg, run_dir: Path, layer_dir: Path, layer: int):
    """The run config of layer L's store run: the stores' config with the layer's sites and dictionary settings."""
    meta = read_meta(layer_dir)
    k = (meta.get("hyperparams") or {}).get("k")
    return load_config(None, [f"{key}={value}" for key, value in {
        "model.name": cfg.model.name, "model.dtype": cfg.model.dtype, "data.source": cfg.data.source,
        "data.context_len": cfg.data.context_len, "data.exclude_first": cfg.data.exclude_first,
        "data.exclude_special": cfg.data.exclude_special,
        "data.max_norm_multiple": "null" if cfg.data.max_norm_multiple is None else cfg.data.max_norm_multiple,
        "site": f"mlp_in.{layer}", "output_site": f"mlp_out.{layer}", "dictionary.method": meta.get("method"),
        "dictionary.n_latents": meta.get("n_latents"), "dictionary.k": k, "name": run_dir.name,
        "out_dir": run_dir.parent}.items() if value is not None]
        + [f"features.{key}={value}" for key, value in dataclasses.asdict(cfg.features).items()])


def store_done(run_dir: Path, layer_dir: Path, cfg) -> bool:
    """Whether run_dir's store describes the transcoder in layer_dir with these settings."""
    try:
        store = FeatureStore(run_dir / FILENAME)
    except FeaturekitError:
        return False
    try:
        return (store.meta.get("dictionary_sha256") == sha256_file(layer_dir / fileformat.WEIGHTS)
                and store.meta.get("settings") == dataclasses.asdict(cfg.features)
                and [s["source"] for s in store.meta.get("sources", [])][:1] == [cfg.data.source])
    finally:
        store.close()


def build_set_stores(set_dir: str | Path, layers: str | Sequence[int] | None = "all", tokens: int = 20_000,
                     text: str | None = None, out: str | Path | None = None, overrides: Sequence[str] = (),
                     progress: bool = True, log: Callable[[str], None] = print) -> dict[int, Path]:
    """Build (or complete) the stores of the chosen layers of the set in `set_dir` (module docstring); `out`: the
    folder of the layer_L store runs (default SET/stores). Returns layer → store run folder."""
    set_dir = Path(set_dir)
    folders = transcoder_set.layer_folders(set_dir)
    chosen = sorted(folders) if layers in (None, "all") else parse_layers(layers, 1 << 20)  # checked against the set below
    missing = [layer for layer in chosen if layer not in folders]
    if missing:
        raise FeaturekitError(f"the set in {set_dir} has no transcoder for layers {missing} (it has {sorted(folders)}); "
                              "choose among those with --layers")
    cfg = set_store_config(set_dir, folders, text, tokens, overrides)
    runs = {layer: (Path(out) / folders[layer].name if out else transcoder_set.store_folder(folders[layer])) for layer in chosen}
    for layer in chosen:                     # the run configs first (cheap; brings an older store run's up to date)
        run_cfg = layer_run_config(cfg, runs[layer], folders[layer], layer)
        if read_run_json(runs[layer] / "config.json") != run_cfg.to_dict():
            runs[layer].mkdir(parents=True, exist_ok=True)
            save_config(run_cfg)
    todo = [layer for layer in chosen if not store_done(runs[layer], folders[layer], cfg)]
    if len(todo) < len(chosen):
        log(f"layers {[x for x in chosen if x not in todo]}: their stores are complete, skipped")
    if not todo:
        return runs
    loaded = load_model(cfg.model.name, device=cfg.model.device)
    ids, mask, sources = store_contexts(loaded, cfg, text)
    jobs = []
    for layer in todo:
        run_dir, layer_dir = runs[layer], folders[layer]
        rel = os.path.relpath(layer_dir.resolve(), run_dir.resolve())
        site, output_site = f"mlp_in.{layer}", f"mlp_out.{layer}"
        meta = {"model": cfg.model.name, "site": site, "output_site": output_site, "sources": sources,
                "token_policy": token_policy(cfg), "dictionary_sha256": sha256_file(layer_dir / fileformat.WEIGHTS),
                "settings": dataclasses.asdict(cfg.features), "transcoder_set": {"layer": layer, "dictionary_dir": rel}}
        jobs.append(StoreJob(load(layer_dir).eval(), run_dir / FILENAME, site, meta))
    fc = cfg.features
    log(f"one pass over {int(mask.sum()):,} tokens for layers {todo}")
    build_stores(loaded.model, loaded.tokenizer, jobs, ids, mask, max_norm_multiple=cfg.data.max_norm_multiple,
                 batch_contexts=fc.batch_contexts, top_n=fc.top_n, band_n=fc.band_n, cofire_tokens=fc.cofire_tokens,
                 progress=progress)
    return runs
