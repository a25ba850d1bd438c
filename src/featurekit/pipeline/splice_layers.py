"""Several dictionaries of one model spliced into one forward pass, with per-layer curves
(evaluate/splice_layers.py) → OUT/splice_all.json in SAEBench's result format and OUT/splice_all.png.

    featurekit eval RUN_OR_SET [RUN_OR_SET ...] --suite splice_all

Each input is a run folder (config.json + dictionary/), a dictionary folder (featurekit.json), a transcoder set
folder (transcoder_set.json, as `featurekit circuits train-set` writes it: every layer of it) or a set folder
still being trained (its finished layer_L folders, no manifest yet). Every dictionary must come from the same
model (by the digest of its weights where the files record one, else by name) and no two may write the same
site. The text, token policy and settings are the first run's config (data.*, eval.*; `--set` changes them),
or the defaults with the dictionaries' model and context length when no run is given. The tokens are the held-out
split's first eval.splice_contexts contexts; the baseline is eval.splice_ablation ("zero" or "mean"); eval.splice_curves
says which curves are scored beside all at once (each alone, layers 0..L cumulatively; both by default).
OUT = FIRST/evals (FIRST the first input) or FIRST/evals/LABEL with --label.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from .._io import atomic_write_json
from ..circuits import transcoder_set
from ..config import RunConfig, load_config
from ..config.checks import splice_curves
from ..dictionaries import Dictionary, fileformat
from ..errors import FeaturekitError
from ..evaluate.plots import write_plot
from ..evaluate.saebench import eval_output
from ..evaluate.splice_layers import CURVES, Splice, layer_curves, ordered
from ..models.loading import LoadedModel
from .evaluation import OTHER_TEXT_KEYS
from .setup import contexts, dtype_name, load_run_config, open_model, token_policy

EVAL_TYPE = "splice_all"


def read_splices(paths: list[Path]) -> list[Splice]:
    """The dictionaries of every input (module docstring), checked: one model, one dictionary per site."""
    splices: list[Splice] = []
    for path in map(Path, paths):
        for name, dictionary in _dictionaries(path):
            source = dictionary.metadata.get("source", {}) or {}
            if not source.get("site"):
                raise FeaturekitError(f"{name}: its featurekit.json names no source site, so where to splice it is unknown; "
                                      "save it with metadata source.site (featurekit's runs and sets do)")
            splices.append(Splice(name, source["site"], source.get("output_site") or source["site"], dictionary))
    _same_model(splices)
    return ordered(splices)


def _dictionaries(path: Path) -> list[tuple[str, Dictionary]]:
    if (path / "config.json").is_file() and (path / "dictionary").is_dir():
        return [(str(path), fileformat.load(path / "dictionary"))]
    if (path / fileformat.META).is_file():
        return [(str(path), fileformat.load(path))]
    if (path / transcoder_set.MANIFEST).is_file():
        tset = transcoder_set.load(path)
        if isinstance(tset, transcoder_set.CrossLayerSet):
            raise FeaturekitError(f"{path} is a cross-layer transcoder: its layers write into each other, so they cannot be "
                                  f"spliced one at a time; `featurekit circuits quality {path}` scores it whole")
        return [(tset.paths.get(layer, f"{path}/layer_{layer}"), tc) for layer, tc in tset.transcoders.items()]
    layers = sorted((p for p in path.glob("layer_*") if re.fullmatch(r"layer_\d+", p.name) and (p / fileformat.WEIGHTS).is_file()
                     and (p / fileformat.META).is_file()), key=lambda p: int(p.name.split("_")[1])) if path.is_dir() else []
    if layers:  # a set still being trained: the finished layers
        return [(str(p), fileformat.load(p)) for p in layers]
    raise FeaturekitError(f"{path} holds no dictionary: pass a run folder (config.json + dictionary/), a dictionary folder "
                          f"({fileformat.META}), or a transcoder set folder ({transcoder_set.MANIFEST} or layer_L folders)")


def _same_model(splices: list[Splice]) -> None:
    def ident(s: Splice) -> tuple[str | None, str | None]:
        source = s.dictionary.metadata.get("source", {}) or {}
        return source.get("model"), (source.get("identity") or {}).get("model_digest")

    first = splices[0]
    for s in splices[1:]:
        (name_a, digest_a), (name_b, digest_b) = ident(first), ident(s)
        if (digest_a and digest_b and digest_a != digest_b) or (not (digest_a and digest_b) and name_a != name_b):
            raise FeaturekitError(f"{first.name} was trained on {name_a} and {s.name} on {name_b}"
                                  + (" (other weights)" if name_a == name_b else "") +
                                  "; splice together only dictionaries of one model")


def splice_config(paths: list[Path], splices: list[Splice], overrides: list[str]) -> RunConfig:
    """The first run's config with `overrides` (data.*, eval.*), or the defaults for the dictionaries' model."""
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(OTHER_TEXT_KEYS)]
    if bad:
        raise FeaturekitError(f"splice_all may change only {', '.join(k + '*' for k in OTHER_TEXT_KEYS)}, not {', '.join(bad)}")
    runs = [p for p in map(Path, paths) if (p / "config.json").is_file() and (p / "dictionary").is_dir()]
    if runs:
        cfg = load_run_config(runs[0])
        return load_config(runs[0] / "config.json", overrides) if overrides else cfg
    source = splices[0].dictionary.metadata.get("source", {}) or {}
    base = [f"model.name={source.get('model')}", f"site={splices[0].site}"]
    if source.get("context_len"):
        base.append(f"data.context_len={source['context_len']}")
    return load_config(None, base + overrides)


def run_splice_all(paths: list[Path], overrides: list[str] | None = None, label: str | None = None,
                   loaded: LoadedModel | None = None, progress: bool = True) -> tuple[dict, Path]:
    """Splice every dictionary of `paths` at once, each alone and layer by layer; write the JSON. Returns (result, path)."""
    paths = [Path(p) for p in paths]
    splices = read_splices(paths)
    cfg = splice_config(paths, splices, list(overrides or []))
    out = paths[0] / "evals" / label if label else paths[0] / "evals"
    loaded = loaded or open_model(cfg)
    device = next(loaded.model.parameters()).device
    splices = [Splice(s.name, s.site, s.output_site, s.dictionary.to(device).float().eval()) for s in splices]
    ids, mask = contexts(loaded, cfg, "test", cfg.eval.tokens)
    ids, mask = ids[:cfg.eval.splice_contexts], mask[:cfg.eval.splice_contexts]
    start = time.perf_counter()
    curves = layer_curves(loaded.model, splices, ids, mask, cfg.eval.splice_ablation, cfg.eval.batch_contexts, progress,
                          cfg.data.max_norm_multiple, splice_curves(cfg.eval.splice_curves))
    seconds = time.perf_counter() - start
    details = [{"name": s.name, "site": s.site, "output_site": s.output_site, "layer": s.layer, "method": s.dictionary.method,
                "n_latents": s.dictionary.n_latents, **{curve: curves[curve][i] for curve in CURVES if curve in curves}}
               for i, s in enumerate(splices)]
    metrics = {"all": {k: curves["all"][k] for k in ("ce_clean", "ce_spliced", "ce_ablated", "delta_ce", "kl_clean_spliced",
                                                     "loss_recovered")}}
    config = {"model_name": cfg.model.name, "dtype": dtype_name(loaded.model.dtype), "text": cfg.data.source, "split": "test",
              "context_len": cfg.data.context_len, "contexts": len(ids), "scored_tokens": curves["all"]["splice_tokens"],
              "ablation": curves["ablation"], "curves_scored": [c for c in CURVES if c in curves],
              "sites": [f"{s.site} -> {s.output_site}" if s.transcodes else s.site for s in splices],
              "token_policy": token_policy(cfg), "curves": "alone: each dictionary spliced by itself; cumulative: the "
              "dictionaries of layers 0..L (in this order) spliced together; all: every one at once"}
    metadata = {"method": ",".join(sorted({s.dictionary.method for s in splices})),
                "n_latents": sum(s.dictionary.n_latents for s in splices),
                "source": {"model": cfg.model.name, "site": ",".join(s.output_site for s in splices)}}
    result = eval_output(EVAL_TYPE, config, metrics, details, {"seconds": round(seconds, 2), "all": curves["all"]}, metadata)
    atomic_write_json(out / f"{EVAL_TYPE}.json", result)
    write_plot(result, out / EVAL_TYPE)
    return result, out / f"{EVAL_TYPE}.json"
