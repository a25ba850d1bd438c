"""`featurekit bench frontier`: FVU and spliced loss against L0 for every method, on a real model.

One activation cache is harvested from the model (the main job's model, site and corpus by default),
then every method of the `METHODS` registry is trained on it at the same token budget, once per
sparsity setting (`sweep`: k for the k-methods, the penalty coefficient for ReLU and JumpReLU), with
the one trainer (`pipeline.run_train`). Each dictionary is scored on the same held-out tokens with its
inference rule: FVU, L0, dead fraction (`evaluate.splice.reconstruction_eval`) and, spliced into the
model, loss recovered, ΔCE and KL (`evaluate.splice.splice_eval`).

Output in the chosen folder: results.json (rewritten after every row, so an interrupted run resumes
where it stopped: rows already there are kept), results.md and frontier.png / frontier.svg.
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

from .. import pipeline
from .._io import atomic_write, atomic_write_json, atomic_write_text, read_json
from ..config import DictionaryConfig, RunConfig
from ..data.harvest import harvest
from ..dictionaries import METHODS
from ..errors import FeaturekitError
from ..evaluate.splice import reconstruction_eval, splice_eval

#: the knob that sets each method's sparsity, and its values; methods not listed sweep `k` over `ks`.
#: MP-SAE runs k full pursuit steps per token (k encoder-sized matmuls), so its k stops at 32 on CPU;
#: top-AFA chooses k per token (one point, at the paper's coefficient).
PENALTY_SWEEPS: dict[str, tuple[str, list[float]]] = {
    "relu": ("l1_coefficient", [2.0, 5.0, 12.0]),
    "jumprelu": ("l0_coefficient", [1.0, 3.0, 10.0]),
    "gba": ("freq_high", [0.025, 0.05, 0.1]),
    "mpsae": ("k", [8, 16, 32]),
    "topafa": ("afa_coefficient", [1 / 64]),
}


@dataclass
class FrontierConfig:
    model: str = "smollm2-135m"
    site: str = "resid_post.6"
    source: str = "bbc"
    train_tokens: int = 150_000  #: harvested training tokens (each method sees epochs × this)
    epochs: int = 2
    latents: int = 2304
    batch_size: int = 2048
    lr: float = 2e-3
    ks: list[int] = field(default_factory=lambda: [16, 32, 64])
    methods: list[str] | None = None  #: None: every registered method that reconstructs its site (not transcoders)
    eval_tokens: int = 32_768
    splice_contexts: int = 32
    seed: int = 0
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_methods() -> list[str]:
    """Every registered method that reconstructs the frontier's site (transcoders predict another site)."""
    return sorted(m for m, cls in METHODS.items() if not cls.transcodes)


def sweep(method: str, ks: list[int]) -> tuple[str, list[Any]]:
    """(config field, values) that set `method`'s sparsity."""
    return PENALTY_SWEEPS.get(method, ("k", list(ks)))


def run_config(fc: FrontierConfig, out: Path, name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of one frontier point (the shared harvest when `overrides` is None)."""
    cfg = RunConfig(name=name, out_dir=str(out), site=fc.site)
    cfg.model.name, cfg.data.source, cfg.data.train_tokens = fc.model, fc.source, fc.train_tokens
    methods = fc.methods or default_methods()
    cfg.data.gradients = any(METHODS[m].needs_gradient for m in methods if m in METHODS)
    cfg.dictionary.n_latents = fc.latents
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = fc.epochs, fc.batch_size, fc.lr
    cfg.train.seed, cfg.train.threads = fc.seed, fc.threads
    overrides = dict(overrides or {})
    if "method" in overrides:  # the method's own keys start from its defaults
        cfg.dictionary = DictionaryConfig(overrides.pop("method"), fc.latents)
    for key, value in overrides.items():
        setattr(cfg.dictionary.params, key, value)
    return pipeline.resolve(cfg)


def run_frontier(fc: FrontierConfig, out: str | Path, progress: bool = False, keep: bool = False,
                 log: Callable[[str], None] | None = None) -> dict:
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    methods = list(fc.methods or default_methods())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FeaturekitError(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
    results_path = out / "results.json"
    previous = read_json(results_path) if results_path.is_file() else {}
    if previous and previous.get("config") != fc.to_dict():
        raise FeaturekitError(f"{results_path} holds a frontier run with other options; use another --out folder")
    rows: list[dict] = previous.get("rows", [])
    done = {(r["method"], str(r["value"])) for r in rows if "error" not in r}
    rows = [r for r in rows if (r["method"], str(r["value"])) in done]

    base = run_config(fc, out, "harvest")
    loaded = pipeline.open_model(base)
    log(f"harvest: {fc.train_tokens} tokens of {fc.site} ({fc.model}, {fc.source})")
    cache = pipeline.run_harvest(base, loaded, progress)
    ids, mask = pipeline.contexts(loaded, base, "test", fc.eval_tokens)
    heldout = [b.acts[fc.site] for b in harvest(loaded.model, ids, [fc.site], batch_size=16, mask=mask, progress=False,
                                                max_norm_multiple=base.data.max_norm_multiple)]
    n_splice = min(fc.splice_contexts, len(ids))

    for method in methods:
        key, values = sweep(method, fc.ks)
        for value in values:
            if (method, str(value)) in done:
                continue
            name = f"{method}-{key}{value}"
            start = time.time()
            try:
                cfg = run_config(fc, out, name, {"method": method, key: value})
                sae = pipeline.run_train(cfg, progress=progress, loaded=loaded, cache_dir=cache.dir)
                row = {"method": method, "param": key, "value": value, "train_seconds": round(time.time() - start, 1)}
                recon = reconstruction_eval(sae, heldout)
                recon.pop("density")
                row.update(recon)
                row.update(splice_eval(loaded.model, sae, fc.site, ids[:n_splice], mask[:n_splice], 16, progress=False,
                                       max_norm_multiple=base.data.max_norm_multiple))
            except Exception as err:  # one failing method is a row of the table, not the end of the run
                row = {"method": method, "param": key, "value": value, "error": f"{type(err).__name__}: {err}"}
            if not keep:
                shutil.rmtree(out / name, ignore_errors=True)
            rows.append(row)
            log(_line(row))
            atomic_write_json(results_path, {"config": fc.to_dict(), "rows": rows})
    result = {"config": fc.to_dict(), "rows": rows}
    atomic_write_text(out / "results.md", markdown(result))
    plot(result, out)
    return result


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['method']:<14} {row['param']}={row['value']:<6} ERROR {row['error']}"
    return (f"{row['method']:<14} {row['param']}={row['value']:<6} L0 {row['l0']:7.2f}  FVU {row['fvu']:.4f}  "
            f"dead {100 * row['dead_fraction']:5.2f}%  loss recovered {row['loss_recovered']:.4f}  KL {row['kl_clean_spliced']:.4f}  "
            f"({row['train_seconds']} s)")


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# FVU against L0 on {cfg['model']} `{cfg['site']}` ({cfg['source']})", "",
             f"{cfg['latents']} latents, {cfg['train_tokens']:,} harvested tokens × {cfg['epochs']} epochs per point, "
             f"held-out {cfg['eval_tokens']:,} tokens (splice: {cfg['splice_contexts']} contexts).", "",
             "| method | setting | L0 | FVU | dead % | loss recovered | ΔCE | KL | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['param']}={r['value']} | error: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['param']}={r['value']} | {r['l0']:.2f} | {r['fvu']:.4f} | {100 * r['dead_fraction']:.2f} | "
                     f"{r['loss_recovered']:.4f} | {r['delta_ce']:.4f} | {r['kl_clean_spliced']:.4f} | {r['train_seconds']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    """frontier.png and frontier.svg: FVU and loss recovered against L0, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["l0"], r["fvu"], r["loss_recovered"]) for r in rows if r["method"] == method)
        l0 = [p[0] for p in pts]
        axes[0].plot(l0, [p[1] for p in pts], marker="o", label=method)
        axes[1].plot(l0, [p[2] for p in pts], marker="o", label=method)
    for ax, label in zip(axes, ("FVU (lower is better)", "loss recovered (higher is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    cfg = result["config"]
    fig.suptitle(f"{cfg['model']} {cfg['site']}: {cfg['latents']} latents, {cfg['train_tokens'] * cfg['epochs']:,} tokens per point")
    fig.tight_layout()
    for ext in ("png", "svg"):
        atomic_write(out / f"frontier.{ext}", lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=120))
    plt.close(fig)


def main_config(**options: Any) -> FrontierConfig:
    """FrontierConfig from CLI options (None means the default)."""
    fc = FrontierConfig(**{k: v for k, v in options.items() if v is not None})
    if min(fc.train_tokens, fc.epochs, fc.latents, fc.batch_size, fc.eval_tokens, fc.splice_contexts, *fc.ks) <= 0:
        raise FeaturekitError("bench frontier sizes and k values must be positive")
    return copy.deepcopy(fc)
