"""`featurekit bench synthetic`: every registered method, trained at one budget on synthetic data with
known features, scored against the ground truth.

For each dataset (`default`, `hierarchical`, `bidirectional`; `evaluate.ground_truth.dataset_config`)
and each method of the `METHODS` registry, the one `Trainer` trains a fresh dictionary on the same
deterministic token stream with the same budget (tokens, batch size, learning rate, latents, seed);
the dictionary is then scored on held-out tokens of that dataset with its inference rule
(`Dictionary.encode`): FVU, L0, dead fraction, MMCS both ways, recovered fraction, absorption
(hierarchical) and bidirectional coverage (`evaluate.recovery`). A method that fails becomes an
error row. `METHOD_SETTINGS` holds the few per-method settings a fair comparison needs (penalty
coefficients calibrated to ≈ the true k); every other method runs with its `DictionaryConfig`
defaults and k = the true k. The qualitative claims of the papers are checked on the same results
(`bench.claims`). Output: results.json (depends only on the options: CPU, one thread, fixed
seeds), results.md, bench.png / bench.svg, and timings.json (wall-clock, kept apart so that
results.json stays reproducible).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, atomic_write_text
from ..config import DictionaryConfig, TrainConfig
from ..data.batch import ActivationBatch
from ..dictionaries import METHODS, Dictionary, build_from_config
from ..dictionaries.registry import param_names
from ..errors import FeaturekitError
from ..evaluate import metrics
from ..evaluate.ground_truth import DATASETS, SyntheticData, dataset_config
from ..evaluate.recovery import score
from ..train import Trainer
from ..train.fit import fit_stream
from .claims import evaluate_claims
from .synthetic_tables import markdown, plot

TRAIN_STREAM, HELDOUT_STREAM = 1, 2
INIT_TOKENS = 8192
SITE = "synthetic"  #: the site name the fitters' ActivationBatches carry

#: Per-method settings (the method's Params fields), measured at the default sizes on the default dataset.
#: relu, jumprelu: the penalty that gives L0 ≈ the true k (jumprelu with its own ε and θ_init defaults,
#: which since the centred encoder and the firing-rate b_enc init train θ in short runs: L0 3.5, MMCS 0.94).
#: vsae: β = 0.01 (β = 1 switched every code off: L0 0.004, FVU 1.0). gba: 4 groups with target
#: frequencies 0.08 … 0.01 (Σ over latents ≈ the true k) and a bias update every 5 steps (the default
#: 50 gives ten updates in a 512-step run). snmf: no winner-take-all on the features (s = 1; the paper's
#: s = 0.01 keeps ⌈0.01·d⌉ = 1 coordinate of each feature, meant for MLP neurons, while the true
#: features here are dense). Every other method: its defaults with k = the true k.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "relu": {"l1_coefficient": 4.0},
    "jumprelu": {"l0_coefficient": 1.5},
    "vsae": {"kl_coefficient": 0.01},
    "gba": {"groups": 4, "freq_high": 0.08, "freq_low": 0.01, "every": 5},
    "snmf": {"sparsity": 1.0},
}


@dataclass
class BenchConfig:
    """Sizes, budget and selection of one benchmark run; results depend only on these."""

    seed: int = 0
    d: int = 32
    n_features: int = 96
    k: int = 4  #: true mean number of active features per token, and every method's k
    latents: int = 128
    tokens: int = 524_288  #: training tokens per method and dataset
    batch_size: int = 1024
    lr: float = 1e-2
    eval_tokens: int = 16_384
    methods: list[str] | None = None  #: None: every registered method except transcoders
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    threshold: float = 0.9  #: cosine above which a true feature counts as recovered
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: the --quick setting (tests, smoke runs); explicit options still override it.
QUICK = {"d": 24, "n_features": 48, "k": 3, "latents": 64, "tokens": 131_072, "batch_size": 512, "eval_tokens": 4096}


def make_config(quick: bool = False, **options: Any) -> BenchConfig:
    """Defaults (or the quick setting), then every option that is not None."""
    base = {**(QUICK if quick else {}), **{k: v for k, v in options.items() if v is not None}}
    cfg = BenchConfig(**base)
    for name in cfg.datasets:
        if name not in DATASETS:
            raise FeaturekitError(f"unknown synthetic dataset {name!r}; choose from {list(DATASETS)} or 'all'")
    for name in cfg.methods or []:
        if name not in METHODS:
            raise FeaturekitError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    if min(cfg.d, cfg.n_features, cfg.k, cfg.latents, cfg.tokens, cfg.batch_size, cfg.eval_tokens) <= 0:
        raise FeaturekitError("bench sizes (d, n_features, k, latents, tokens, batch size, eval tokens) must be positive")
    if cfg.tokens < cfg.batch_size:
        raise FeaturekitError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    return cfg


def run_benchmark(cfg: BenchConfig, out: str | Path, log: Callable[[str], None] | None = None, figures: bool = True) -> dict:
    """Train and score every (dataset, method); write results.json, results.md, timings.json and (with
    `figures`) the plot. `log` receives one progress line per run (default: stderr)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    methods = list(cfg.methods) if cfg.methods else default_methods()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        rows, timings, datasets = _run_all(cfg, methods, log)
    finally:
        torch.set_num_threads(threads)
    results = {
        "benchmark": "synthetic",
        "config": cfg.to_dict(),
        "methods": methods,
        "method_settings": {m: METHOD_SETTINGS.get(m, {}) for m in methods},
        "datasets": datasets,
        "rows": rows,
        "claims": evaluate_claims(rows, cfg.datasets, set(methods), set(METHODS)),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    atomic_write_json(out / "timings.json", {"threads": cfg.threads, "runs": timings})
    try:
        if figures:
            plot(results, out)
    except ImportError:
        log("plot skipped: matplotlib is not installed (pip install 'featurekit[plot]')")
    return results


def _run_all(cfg: BenchConfig, methods: list[str], log: Callable[[str], None]) -> tuple[list[dict], list[dict], dict]:
    rows, timings, datasets = [], [], {}
    for name in cfg.datasets:
        data = SyntheticData(dataset_config(name, d=cfg.d, n_features=cfg.n_features, k=float(cfg.k), seed=cfg.seed))
        datasets[name] = data.cfg.to_dict()
        x, true_codes = data.tokens(cfg.eval_tokens, HELDOUT_STREAM)
        for method in methods:
            start, cpu = time.time(), time.process_time()
            try:
                row = run_method(method, data, x, true_codes, cfg)
            except Exception as err:  # a failing method is a row of the table, not the end of the benchmark
                row = {"error": f"{type(err).__name__}: {err}"}
            seconds, cpu = time.time() - start, time.process_time() - cpu
            row = {"dataset": name, "method": method, **row}
            rows.append(row)
            timings.append({"dataset": name, "method": method, "wall_s": round(seconds, 2), "cpu_s": round(cpu, 2)})
            summary = row.get("error") or f"fvu={row['fvu']:.4f} l0={row['l0']:.2f} mmcs={row['mmcs_true_to_learned']:.3f}"
            log(f"[{name}] {method}: {summary} ({seconds:.1f} s)")
    return rows, timings, datasets


def run_method(method: str, data: SyntheticData, x: torch.Tensor, true_codes: torch.Tensor, cfg: BenchConfig) -> dict:
    """Train `method` on the dataset's training stream and score it on the held-out (x, true_codes)."""
    sae = train(method, data, cfg)
    sae.eval()
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        row = score(data, x, true_codes, codes, x_hat, sae.W_dec, signed=sae.signed, threshold=cfg.threshold)
        row["inference_rule"] = sae.inference_rule()
        if getattr(sae, "needs_gradient", False):
            row["note"] = "synthetic data has no LM-loss gradient: trained and scored by its gradient-free path"
        curve = topk_curve(sae, x)
        if curve:
            row["l0_fvu_curve"] = curve
    return row


def default_methods() -> list[str]:
    """Every registered method that reconstructs its input (transcoders predict another site: not here)."""
    return sorted(m for m, cls in METHODS.items() if not getattr(cls, "transcodes", False))


def train(method: str, data: SyntheticData, cfg: BenchConfig) -> Dictionary:
    """One dictionary trained on the dataset's training stream, the same tokens for every method: by the one
    Trainer, or, for methods with a `Dictionary.fitter` (ITDA, SNMF), by `train.fit.fit_stream` over the
    same `tokens` (each of the fitter's passes reads them again, in order)."""
    torch.manual_seed(cfg.seed)
    own = {"k": cfg.k} if "k" in param_names(method) else {}  # the methods with a k get the true k
    dcfg = DictionaryConfig.of(method, cfg.latents, **own, **METHOD_SETTINGS.get(method, {}))
    steps = cfg.tokens // cfg.batch_size
    tc = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=max(1, steps // 50),
                     dead_tokens=max(cfg.batch_size, cfg.tokens // 8), log_every=10 ** 9, checkpoint_every=10 ** 9, seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="featurekit-bench-") as tmp:
        if METHODS[method].fitter is not None:
            fitter = METHODS[method].fitter.from_config(dcfg, cfg.d, seed=cfg.seed, batch_size=cfg.batch_size)
            passes = (_activation_batches(data, cfg.batch_size, steps) for _ in range(fitter.passes))
            fit_stream(fitter, itertools.chain.from_iterable(passes), SITE, Path(tmp), tc, progress=False)
            return fitter.finish()
        sae = build_from_config(dcfg, cfg.d, seed=cfg.seed)
        trainer = Trainer(sae, tc, Path(tmp), steps)
        trainer.init_from_data(data.tokens(INIT_TOKENS, TRAIN_STREAM, cfg.batch_size)[0])
        trainer.fit((batch for batch, _ in data.stream(cfg.batch_size, TRAIN_STREAM)), progress=False)
    return sae


def _activation_batches(data: SyntheticData, batch_size: int, n_batches: int) -> Iterator[ActivationBatch]:
    """The training stream as ActivationBatches for the fitters: every token its own context, position 0."""
    for i, (x, _) in zip(range(n_batches), data.stream(batch_size, TRAIN_STREAM)):
        index = torch.arange(i * batch_size, (i + 1) * batch_size)
        yield ActivationBatch(acts={SITE: x}, token_ids=torch.zeros_like(index), context_idx=index, position=torch.zeros_like(index))


def topk_curve(sae: Dictionary, x: torch.Tensor, spread: int = 2) -> list[list[float]]:
    """(L0, FVU) of a per-token TopK dictionary at inference k − spread … k + spread (for matched-L0
    comparisons); empty for any other inference rule."""
    if sae.inference_rule().get("activation") != "topk" or not hasattr(sae, "k"):
        return []
    k, curve = sae.k, []
    try:
        for k_inf in range(max(1, k - spread), min(sae.n_latents, k + spread) + 1):
            sae.k = k_inf
            codes = sae.encode(x)
            curve.append([metrics.l0(codes), metrics.fvu(x, sae.decode(codes))])
    finally:
        sae.k = k
    return curve
