"""`featurekit bench frontier`: FVU and spliced loss against L0 for every method, on a real model.

One activation cache is harvested from the model (the main job's model, site and corpus by default),
then every method of the `METHODS` registry is trained on it at the same token budget, once per
sparsity setting, with the one trainer (`pipeline.run_train`): k ∈ `ks` for the k-methods (`FIXED_SWEEPS`
for MP-SAE); for the methods whose L0 follows a penalty, a target frequency or an initialisation
(`CALIBRATED`: ReLU, JumpReLU, GBA, top-AFA) the knob is searched for each target L0 in `ks` by
measurement (`next_trial`: a secant search in log-log space, every trial a full training and a point of
the frontier, up to `Knob.max_trials` per method) until a point lands within `l0_tolerance` of each
target or the knob stops moving L0 (`frontier_calibration`). Each dictionary is scored on the same held-out
tokens with its inference rule: FVU, L0, dead fraction (`evaluate.splice.reconstruction_eval`) and, spliced into
the model, loss recovered, ΔCE and KL (`frontier_splice.CachedSplice`, equal to `evaluate.splice.splice_eval`).

Output in the chosen folder: results.json (rewritten after every row, so an interrupted run resumes
where it stopped: rows already there are kept), results.md and frontier.png / frontier.svg (`frontier_report`).
A method that fails becomes an error row. Dictionaries are deleted after scoring unless `keep`.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import pipeline
from .._io import atomic_write_json, atomic_write_text, read_json
from ..config import DictionaryConfig, RunConfig
from ..data.harvest import harvest
from ..dictionaries import METHODS, load
from ..errors import FeaturekitError
from ..evaluate.splice import reconstruction_eval
from .frontier_calibration import CALIBRATED, next_trial, sweep
from .frontier_report import markdown, plot, progress_line
from .frontier_splice import CachedSplice, transcoder_splice
from .frontier_suite import SuiteSettings, matched_points, run_suite


@dataclass
class FrontierConfig:
    model: str = "smollm2-135m"
    site: str = "resid_post.6"
    output_site: str | None = None  #: set: a transcoder frontier (site → output_site), the splice replaces output_site
    source: str = "bbc"
    train_tokens: int = 150_000  #: harvested training tokens (each method sees epochs × this)
    epochs: int = 2
    latents: int = 2304
    batch_size: int = 2048
    lr: float = 2e-3
    ks: list[int] = field(default_factory=lambda: [16, 32, 64])  #: k of the k-methods, and the target L0s of `CALIBRATED`
    l0_tolerance: float = 0.15  #: a calibrated point within this relative distance of a target L0 is on target
    methods: list[str] | None = None  #: None: every registered method that reconstructs its site (not transcoders)
    eval_tokens: int = 32_768
    splice_contexts: int = 32
    seed: int = 0
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_methods(transcoders: bool = False) -> list[str]:
    """Every registered method that reconstructs the frontier's site, or with `transcoders` every single-layer
    transcoder (the cross-layer transcoder spans layers and has no place on one site's frontier)."""
    return sorted(m for m, cls in METHODS.items() if cls.transcodes == transcoders and m != "clt")


#: options a rerun may change in a results folder: the points are keyed by (method, setting), so more methods, other
#: sparsities or targets add points beside the finished ones (e.g. k = 32 for every method first, then 16 and 64)
GROWING = ("methods", "ks", "l0_tolerance", "threads")


def same_config(stored: dict, fc: FrontierConfig) -> bool:
    """Whether results.json's config is `fc`'s, up to the `GROWING` options (a key the stored config lacks counts as
    its default: files written before the key existed resume)."""
    defaults = FrontierConfig().to_dict()
    return all(stored.get(key, defaults[key]) == value for key, value in fc.to_dict().items() if key not in GROWING)


def run_config(fc: FrontierConfig, out: Path, name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of one frontier point (the shared harvest when `overrides` is None)."""
    cfg = RunConfig(name=name, out_dir=str(out), site=fc.site)
    cfg.output_site = fc.output_site
    cfg.model.name, cfg.data.source, cfg.data.train_tokens = fc.model, fc.source, fc.train_tokens
    methods = fc.methods or default_methods(fc.output_site is not None)
    cfg.data.gradients = any(METHODS[m].needs_gradient for m in methods if m in METHODS)
    cfg.dictionary.n_latents = fc.latents
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = fc.epochs, fc.batch_size, fc.lr
    cfg.train.seed, cfg.train.threads = fc.seed, fc.threads
    overrides = dict(overrides or {"method": methods[0]})  # the harvest: a config its methods validate
    if "method" in overrides:  # the method's own keys start from its defaults
        cfg.dictionary = DictionaryConfig(overrides.pop("method"), fc.latents)
    for key, value in overrides.items():
        if not hasattr(cfg.dictionary.params, key):
            raise FeaturekitError(f"{cfg.dictionary.method} has no setting {key!r}: give it a sweep in "
                                  f"frontier_calibration.FIXED_SWEEPS or a knob in CALIBRATED")
        setattr(cfg.dictionary.params, key, value)
    return pipeline.resolve(cfg)


def run_frontier(fc: FrontierConfig, out: str | Path, progress: bool = False, keep: bool = False,
                 log: Callable[[str], None] | None = None, suite: SuiteSettings | None = None) -> dict:
    """Train and score every point (module docstring); with `suite`, the evaluation suite at matched L0 on each
    method's point nearest suite.target_l0 (`frontier_suite`; the dictionaries are then kept)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    methods = list(fc.methods or default_methods(fc.output_site is not None))
    wrong = [m for m in methods if m in METHODS and METHODS[m].transcodes != (fc.output_site is not None)]
    if wrong:
        raise FeaturekitError(f"{wrong} " + ("do not predict another site: leave out --output-site" if fc.output_site else
                              "predict another site: give --output-site (e.g. --site mlp_in.6 --output-site mlp_out.6)"))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FeaturekitError(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
    results_path = out / "results.json"
    previous = read_json(results_path) if results_path.is_file() else {}
    if previous and not same_config(previous.get("config", {}), fc):
        raise FeaturekitError(f"{results_path} holds a frontier run with other options (only {', '.join(GROWING)} may change "
                              f"between runs in one folder); use another --out folder")
    rows: list[dict] = previous.get("rows", [])
    done = {(r["method"], str(r["value"])) for r in rows if "error" not in r}
    rows = [r for r in rows if (r["method"], str(r["value"])) in done]

    base = run_config(fc, out, "harvest")
    loaded = pipeline.open_model(base)
    log(f"harvest: {fc.train_tokens} tokens of {fc.site} ({fc.model}, {fc.source})")
    cache = pipeline.run_harvest(base, loaded, progress)
    ids, mask = pipeline.contexts(loaded, base, "test", fc.eval_tokens)
    sites = [fc.site] + ([fc.output_site] if fc.output_site else [])
    heldout = [(b.acts[fc.site], b.acts[fc.output_site]) if fc.output_site else b.acts[fc.site]
               for b in harvest(loaded.model, ids, sites, batch_size=16, mask=mask, progress=False,
                                max_norm_multiple=base.data.max_norm_multiple)]
    n_splice = min(fc.splice_contexts, len(ids))
    errors: list[dict] = []  # failed calibration trials, listed after the rest
    cached: list[CachedSplice] = []  # the clean and ablated splice passes, made at the first point that needs them

    def point(method: str, key: str, value: Any, extra: dict) -> dict:
        name = point_name({"method": method, "param": key, "value": value})
        start = time.time()
        try:
            cfg = run_config(fc, out, name, {"method": method, key: value})
            sae = pipeline.run_train(cfg, progress=progress, loaded=loaded, cache_dir=cache.dir)
            row = {"method": method, "param": key, "value": value, **extra, "train_seconds": round(time.time() - start, 1)}
            recon = reconstruction_eval(sae, heldout)
            recon.pop("density")
            row.update(recon)
            if fc.output_site:
                row.update(transcoder_splice(loaded.model, sae, fc.site, fc.output_site, ids[:n_splice], mask[:n_splice],
                                             base.data.max_norm_multiple))
            else:
                if not cached:
                    cached.append(CachedSplice(loaded.model, fc.site, ids[:n_splice], mask[:n_splice], base.data.max_norm_multiple))
                row.update(cached[0](sae))
            row["seconds"] = round(time.time() - start, 1)
        except Exception as err:  # one failing method is a row of the table, not the end of the run
            row = {"method": method, "param": key, "value": value, **extra, "error": f"{type(err).__name__}: {err}"}
        if not keep and suite is None:
            shutil.rmtree(out / name, ignore_errors=True)
        rows.append(row)
        log(progress_line(row))
        atomic_write_json(results_path, {"config": fc.to_dict(), "rows": rows})
        return row

    for method in methods:
        if method in CALIBRATED:
            knob, failed = CALIBRATED[method], 0
            while failed < 2:
                tried = [r for r in rows if r["method"] == method]
                if len(tried) + failed >= knob.max_trials:
                    break
                nxt = next_trial(knob, [(r["value"], r["l0"]) for r in tried], fc.ks, fc.l0_tolerance, fc.latents)
                if nxt is None:
                    break
                row = point(method, knob.name, nxt[1], {"target_l0": nxt[0], "trial": len(tried) + failed + 1})
                if "error" in row:
                    rows.remove(row)
                    failed += 1
                    errors.append(row)
            continue
        key, values = sweep(method, fc.ks)
        for value in values:
            if (method, str(value)) not in done:
                point(method, key, value, {})
    rows.extend(errors)
    atomic_write_json(results_path, {"config": fc.to_dict(), "rows": rows})
    result = {"config": fc.to_dict(), "rows": rows}
    if suite is not None and not fc.output_site:
        folders = {point_name(r): out for r in rows}
        result["suite"] = suite_on_points(fc, out, rows, folders, suite, loaded, base, ids, torch.cat(heldout), n_splice, log)
    atomic_write_text(out / "results.md", markdown(result))
    plot(result, out)
    return result


def suite_on_points(fc: FrontierConfig, out: Path, rows: list[dict], folders: dict[str, Path], suite: SuiteSettings, loaded,
                    base: RunConfig, ids: torch.Tensor, heldout: torch.Tensor, n_splice: int, log: Callable[[str], None]) -> dict:
    """`frontier_suite.run_suite` on each method's row nearest suite.target_l0, its dictionary read from
    folders[point_name(row)]/point_name(row); results in out/suite.json. `ids`: the held-out contexts, whose last
    ones (after the spliced ones) are the steering prompts; `heldout`: (N, d) held-out activations at the site."""
    matched = matched_points(rows, suite.target_l0)
    dictionaries = {m: load(folders[point_name(r)] / point_name(r) / "dictionary") for m, r in matched.items()
                    if (folders[point_name(r)] / point_name(r) / "dictionary" / "model.safetensors").is_file()}
    for m in sorted(set(matched) - set(dictionaries)):
        log(f"suite: {m}'s point {point_name(matched[m])} was not kept (run with --keep or --suite), left out")
    n_prompts = suite.steering_prompts
    prompts = ids[-n_prompts:, :suite.steering_prompt_tokens] if len(ids) > n_splice + n_prompts else ids[:n_prompts]
    policy = {"exclude_first": base.data.exclude_first, "exclude_special": base.data.exclude_special,
              "max_norm_multiple": base.data.max_norm_multiple}
    state = run_suite(out / "suite.json", dictionaries, loaded, fc.site, heldout, prompts, suite, policy, log)
    return {"settings": state["settings"], "seconds": state["seconds"],
            "points": {m: {"row": matched[m], **state["results"].get(m, {})} for m in dictionaries},
            "random": state["results"].get("random", {})}


def point_name(row: dict) -> str:
    """The folder of a point's run (its dictionary, when kept)."""
    return f"{row['method']}-{row['param']}{row['value']}"


def combine(folders: list[Path], out: Path, suite: SuiteSettings | None = None, log: Callable[[str], None] | None = None) -> dict:
    """One table and plot from several frontier folders run with the same options but different methods (e.g. a
    method that needs the gradient harvest run apart): rows in folder order, a (method, setting) already listed
    kept from its first folder; suites merged. With `suite`, the suite runs once over every method's matched
    point of all folders instead (one set of model passes; out/suite.json). Writes out/results.json, results.md,
    frontier.png/.svg."""
    settings = suite
    results = [read_json(Path(f) / "results.json") for f in folders]
    first = {k: v for k, v in results[0]["config"].items() if k != "methods"}
    for folder, r in zip(folders, results):
        other = {k: v for k, v in r["config"].items() if k != "methods"}
        if not same_config({**other, "methods": None}, FrontierConfig(**{**first, "methods": None})):
            raise FeaturekitError(f"{folder} was run with other options than {folders[0]}: only --methods may differ to combine")
    rows, seen = [], set()
    suite = {}
    for folder, r in zip(folders, results):
        for row in r["rows"]:
            key = (row["method"], str(row["value"]))
            if key not in seen:
                seen.add(key)
                rows.append({**row, "folder": Path(folder).name})
        if (Path(folder) / "suite.json").is_file():
            state = read_json(Path(folder) / "suite.json")
            matched = matched_points(r["rows"], state["settings"]["target_l0"])
            if suite and suite["settings"] != state["settings"]:
                raise FeaturekitError(f"{folder}'s suite.json has other settings than the folders before it")
            suite.setdefault("settings", state["settings"])
            suite.setdefault("seconds", {})[Path(folder).name] = state["seconds"]
            for m, res in state["results"].items():
                if m == "random":
                    suite.setdefault("random", res)
                elif m in matched and m not in suite.setdefault("points", {}):
                    suite["points"][m] = {"row": matched[m], **res}
    result = {"config": {**first, "methods": sorted({r["method"] for r in rows})}, "rows": rows, "folders": [str(f) for f in folders]}
    if settings is not None:
        log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        fc = FrontierConfig(**{**first, "methods": None})
        base = run_config(fc, Path(folders[0]), "harvest")
        loaded = pipeline.open_model(base)
        ids, mask = pipeline.contexts(loaded, base, "test", fc.eval_tokens)
        n_splice = min(fc.splice_contexts, len(ids))
        n_heldout = -(-settings.steering_tokens // ids.shape[1]) + 1  # contexts enough for the steering tokens
        heldout = torch.cat([b.acts[fc.site] for b in harvest(loaded.model, ids[:n_heldout], [fc.site], batch_size=16,
                                                               mask=mask[:n_heldout], progress=False,
                                                               max_norm_multiple=base.data.max_norm_multiple)])
        place = {point_name(r): Path(folders[[Path(f).name for f in folders].index(r["folder"])]) for r in rows}
        out.mkdir(parents=True, exist_ok=True)
        result["suite"] = suite_on_points(fc, out, [r for r in rows if "folder" in r], place, settings, loaded, base, ids, heldout,
                                          n_splice, log)
        suite = {}
    if suite:
        suite["seconds"] = {f"{e} ({folder})": v for folder, per in suite["seconds"].items() for e, v in per.items()}
        result["suite"] = suite
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", markdown(result))
    plot(result, out)
    return result


def main_config(**options: Any) -> FrontierConfig:
    """FrontierConfig from CLI options (None means the default)."""
    fc = FrontierConfig(**{k: v for k, v in options.items() if v is not None})
    if min(fc.train_tokens, fc.epochs, fc.latents, fc.batch_size, fc.eval_tokens, fc.splice_contexts, *fc.ks) <= 0:
        raise FeaturekitError("bench frontier sizes and k values must be positive")
    return copy.deepcopy(fc)
