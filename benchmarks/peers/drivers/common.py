"""Shared by every driver of the peer benchmark (benchmarks/peers/run.py).

Each driver runs in its library's own virtualenv, so this module needs only the standard library,
torch and numpy. It parses the common options, loads the shared activation pool, hands out batches
through `TimedBatches` (which stamps the time of every batch request: step time is the interval
between consecutive requests, so it covers everything the library's loop does per step) and prints
the one JSON result line that run.py reads (the last stdout line starting with RESULT_PREFIX).

With --device cuda the pool lives on the GPU (no host-to-device copy inside the timed steps, for any library),
every stamp waits for the GPU's queued work first (`torch.cuda.synchronize`), so a step's time covers its
kernels, and the peak is the CUDA allocator's (`torch.cuda.max_memory_allocated`) beside the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch

RESULT_PREFIX = "FKBENCH "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help=".npy file of float32 activations, shape (rows, d)")
    p.add_argument("--arch", required=True, choices=["topk", "batchtopk", "jumprelu"])
    p.add_argument("--n-latents", type=int, required=True)
    p.add_argument("--k", type=int, default=32, help="TopK / BatchTopK (mean) active latents per token; unused by JumpReLU")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2, help="steps discarded before measuring")
    p.add_argument("--steps", type=int, default=4, help="measured steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the library's training step under a bf16 autocast (featurekit: train.precision=bf16)")
    p.add_argument("--jumprelu-l0", type=float, default=None,
                   help="JumpReLU: start at the operating point of a trained dictionary with this L0 (each latent fires on a "
                        "share L0 / n_latents of the first batch: `thresholds_for_l0`); default: the library's own initialisation")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    if args.jumprelu_l0 is not None and not 0 < args.jumprelu_l0 < args.n_latents:
        p.error("--jumprelu-l0 must lie in (0, n_latents)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    return args


def thresholds_for_l0(pre: torch.Tensor, l0: float) -> torch.Tensor:
    """Per-latent JumpReLU thresholds under which each latent fires on m = round(N·l0/n) of the N rows of
    the pre-activations `pre` (N, n), so that L0 ≈ l0: the cut halfway between each column's m-th and
    (m + 1)-th largest value (featurekit's `init_firing_rate` places its cut the same way)."""
    rows, n = pre.shape
    m = min(max(round(rows * l0 / n), 1), rows - 1)
    return pre.topk(m + 1, dim=0).values[-2:].mean(0)


def mean_l0(pre: torch.Tensor, threshold: torch.Tensor) -> float:
    """Mean number of latents above their threshold per row."""
    return float((pre > threshold).sum(1, dtype=torch.float64).mean())


def setup(args: argparse.Namespace) -> torch.Tensor:
    """Fix threads and seed, load the pool (float32, in memory; on the GPU with --device cuda)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pool = torch.from_numpy(np.load(args.data)).float().contiguous().to(args.device)
    if pool.shape[0] < args.batch:
        raise SystemExit(f"pool has {pool.shape[0]} rows < batch {args.batch}")
    return pool


def total_steps(args: argparse.Namespace) -> int:
    """Steps each library's loop is told to run: warm-up + measured + 1, because the last measured
    step ends only when the next batch is requested (the final step's own end is not observable in
    every library's loop, and it may include end-of-training work such as a final checkpoint)."""
    return args.warmup + args.steps + 1


class TimedBatches:
    """An endless iterator over `batch`-row slices of the pool (cycled), stamping each request.

    Every batch is a fresh copy, so a library that modifies its input in place cannot corrupt the pool;
    the copy (a few ms) is the same for every library."""

    def __init__(self, pool: torch.Tensor, batch: int):
        self.pool, self.batch = pool, batch
        self.n_batches = pool.shape[0] // batch
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # process CPU time at the same moments: CPU share = Δcpu / Δwall

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pool.is_cuda:  # the previous step's kernels are part of the previous step
            torch.cuda.synchronize(self.pool.device)
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        i = (len(self.stamps) - 1) % self.n_batches
        return self.pool[i * self.batch:(i + 1) * self.batch].clone()

    def __len__(self) -> int:  # some loops ask for a length (progress bars); the stream is endless
        return 10**9

    def step_times(self, warmup: int, steps: int) -> list[float]:
        """Durations of steps warmup .. warmup+steps-1 (step i runs from request i to request i+1)."""
        if len(self.stamps) < warmup + steps + 1:
            raise RuntimeError(f"the loop requested {len(self.stamps)} batches; {warmup + steps + 1} are needed to time "
                               f"{steps} steps after {warmup} warm-up steps")
        return [self.stamps[i + 1] - self.stamps[i] for i in range(warmup, warmup + steps)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def report(args: argparse.Namespace, library: str, version: str, timer: TimedBatches, losses: list[float],
           **extra: object) -> dict:
    """Print (and return) the result line."""
    times = timer.step_times(args.warmup, args.steps)
    med = statistics.median(times)
    first, last = args.warmup, args.warmup + args.steps
    # CPU seconds the process got per wall second over the measured steps: about `threads` when it ran
    # unhindered, less when other processes took the CPU (an SMT sibling's load does not show here)
    cpu_share = (timer.cpu_stamps[last] - timer.cpu_stamps[first]) / (timer.stamps[last] - timer.stamps[first])
    row = {
        "library": library,
        "version": version,
        "arch": args.arch,
        "n_latents": args.n_latents,
        "k": None if args.arch == "jumprelu" else args.k,
        "d": int(timer.pool.shape[1]),
        "batch": args.batch,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "step_s_median": round(med, 6),
        "step_s_mean": round(statistics.fmean(times), 6),
        "step_s_min": round(min(times), 6),
        "step_s_max": round(max(times), 6),
        "tokens_per_s": round(args.batch / med, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "device": args.device,
        **({"gpu": torch.cuda.get_device_name(), "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
           if args.device == "cuda" else {}),
        "cpu_share": round(cpu_share, 3),
        "loss_first": None if not losses else float(losses[0]),
        "loss_last": None if not losses else float(losses[-1]),
        "precision": args.precision,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **extra,
    }
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return row


def fail(args: argparse.Namespace, library: str, reason: str) -> None:
    """Report a clean skip (an arch the library does not implement) and exit 0."""
    row = {"library": library, "arch": args.arch, "n_latents": args.n_latents,
           "k": None if args.arch == "jumprelu" else args.k, "skipped": reason}
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    sys.exit(0)
