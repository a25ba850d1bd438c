"""Side-by-side SAE training-step benchmark: featurekit against the peer libraries, on this CPU.

    python benchmarks/peers/run.py                       # full grid (see the defaults below)
    python benchmarks/peers/run.py --sizes 8192 --ks 32 --archs topk --libs featurekit,sparsify
    python benchmarks/peers/run.py --report results/a.jsonl results/b.jsonl   # markdown from saved rows only
    python3 benchmarks/peers/run.py --device cuda --python python3 --d 2304 --sizes 65536 --ks 64 \
        --archs topk --libs sparsify,featurekit --precision bf16 --gemm-size 8192     # a GPU machine (README.md)

Run it with featurekit's interpreter (.venv/bin/python). The peers live in their own virtualenvs made by
setup_venv.sh (default ${XDG_CACHE_HOME:-~/.cache}/featurekit/bench-peers/<peer>; --venvs or
FEATUREKIT_BENCH_PEERS_DIR to move them). A peer whose venv is missing, or that fails, is skipped with
the reason printed (and recorded in the jsonl).

Every library trains on the same data: a pool of synthetic activations (rows of 32-sparse combinations of
random unit directions, plus a constant offset and noise; deterministic from --seed), written once to a
temporary .npy file. One subprocess per (library, arch, n_latents, k) runs drivers/<lib>.py in that
library's venv: the library's own SAE and its own training loop, fed by an iterator that stamps every
batch request (drivers/common.py). Warm-up steps are discarded; tokens/s is batch / median step time.
A 2048^3 torch.mm calibration (GFLOP/s) is taken right before and after each run, because this VM's
speed drifts (shared/research/perf-baseline-cpu.md §3). With --device cuda the data, every library's SAE and
the calibration (in the run's precision) are on the GPU; featurekit and sparsify run there (the others are
skipped), and --python names one interpreter for all of them (a GPU machine with the peers installed beside
featurekit, no venvs).

Output: results/<stamp>-threads<T>.jsonl (one row per run, appended as runs finish), and the markdown
table in results/<stamp>-threads<T>.md and results/latest.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DRIVERS = HERE / "drivers"
RESULT_PREFIX = "FKBENCH "
PEERS = ("saelens", "sparsify", "dictionary_learning", "overcomplete")
LIBS = PEERS + ("featurekit",)  # featurekit last: with lib as the outer loop it measures the newest code
#: archs each library implements (others are skipped without starting a process)
SUPPORTS = {
    "featurekit": {"topk", "batchtopk", "jumprelu"},
    "saelens": {"topk", "batchtopk", "jumprelu"},
    "sparsify": {"topk"},
    "dictionary_learning": {"topk", "batchtopk", "jumprelu"},
    "overcomplete": {"topk", "batchtopk"},
}
DRIVER_FILE = {lib: DRIVERS / f"{lib}_driver.py" for lib in LIBS}
#: libraries run with --precision bf16 (featurekit's train.precision=bf16; sparsify's Trainer.fit under a CPU bf16
#: autocast — its own autocast is CUDA-only) and with --device cuda (drivers/common.py)
BF16_LIBS = {"featurekit", "sparsify"}
GPU_LIBS = {"featurekit", "sparsify"}


def default_venvs() -> Path:
    env = os.environ.get("FEATUREKIT_BENCH_PEERS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "featurekit" / "bench-peers"


def make_pool(path: Path, rows: int, d: int, seed: int, n_dirs: int = 16384, active: int = 32) -> None:
    """Synthetic activations: each row a sum of `active` random unit directions with random positive
    coefficients, plus a constant offset and small noise. Deterministic from `seed`."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_dirs, d, generator=g), dim=1)
    idx = torch.randint(0, n_dirs, (rows, active), generator=g)
    coef = torch.rand(rows, active, generator=g) * 2.0
    x = F.embedding_bag(idx, dirs, per_sample_weights=coef, mode="sum")
    offset = torch.randn(d, generator=g) * 0.5
    x += offset + 0.05 * torch.randn(rows, d, generator=g)
    np.save(path, x.numpy().astype(np.float32))


def gemm_gflops(threads: int, n: int = 2048, reps: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`reps` torch.mm n×n×n (on CPU MKL sgemm, the path every library's dense GEMMs take; on a GPU
    cuBLAS in `dtype`, timed to the end of its kernel)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return round(2 * n**3 / best / 1e9, 1)


def calibrate(args: argparse.Namespace) -> float:
    """The GEMM calibration of a run: fp32 on CPU (as in every earlier result), the run's precision on a GPU."""
    gpu_bf16 = args.device == "cuda" and args.precision == "bf16"
    return gemm_gflops(args.threads, args.gemm_size, device=args.device, dtype=torch.bfloat16 if gpu_bf16 else torch.float32)


def cpu_model() -> str:
    """`model name` from /proc/cpuinfo, with family/model and the widest SIMD flag (they tell Zen generations apart)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    flags = info.get("flags", "").split()
    simd = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no AVX")
    return f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}, {simd})"


def interpreter(lib: str, venvs: Path, python: str | None = None) -> Path | None:
    if lib == "featurekit":
        return Path(sys.executable)
    if python:
        return Path(python)
    py = venvs / lib / "bin" / "python"
    return py if py.exists() else None


def run_one(lib: str, arch: str, n: int, k: int | None, args: argparse.Namespace, data: Path) -> dict:
    base = {"library": lib, "arch": arch, "n_latents": n, "k": k, "threads": args.threads, "precision": args.precision}
    if arch == "jumprelu" and args.jumprelu_l0 is not None:
        base["jumprelu_l0"] = args.jumprelu_l0
    if arch not in SUPPORTS[lib]:
        return {**base, "skipped": f"{lib} has no {arch} SAE"}
    if args.precision != "fp32" and lib not in BF16_LIBS:
        return {**base, "skipped": f"bf16 runs cover {' and '.join(sorted(BF16_LIBS))} only"}
    if args.device != "cpu" and lib not in GPU_LIBS:
        return {**base, "skipped": f"GPU runs cover {' and '.join(sorted(GPU_LIBS))} only"}
    py = interpreter(lib, args.venvs, args.python)
    if py is None:
        return {**base, "skipped": f"no venv at {args.venvs / lib} (run benchmarks/peers/setup_venv.sh)"}
    cmd = [str(py), str(DRIVER_FILE[lib]), "--data", str(data), "--arch", arch, "--n-latents", str(n),
           "--k", str(k if k is not None else 32), "--batch", str(args.batch), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads), "--lr", str(args.lr), "--seed", str(args.seed),
           "--precision", args.precision, "--device", args.device]
    cmd += ["--jumprelu-l0", str(args.jumprelu_l0)] if "jumprelu_l0" in base else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if not args.python:  # venvs: nothing of this interpreter's path may leak into a peer's
        env.pop("PYTHONPATH", None)
    load_before = os.getloadavg()[0]
    gemm_before = calibrate(args)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "skipped": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - t0
    gemm_after = calibrate(args)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {**base, "skipped": f"driver failed (exit {proc.returncode}): {tail[-400:]}"}
    row = json.loads(lines[-1][len(RESULT_PREFIX):])
    return {**base, **row, "gemm_gflops_before": gemm_before, "gemm_gflops_after": gemm_after, "wall_s": round(wall, 1),
            "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)}


# -- report ---------------------------------------------------------------------------------------

def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}".replace(",", " ")


def _sec(x: float) -> str:
    """Seconds with 3 decimals, 4 below 0.1 s (GPU steps take milliseconds)."""
    return f"{x:.3f}" if x >= 0.1 else f"{x:.4f}"


def _base(arch: str) -> str:
    return arch.split("@")[0]


def markdown(rows: list[dict], machine: dict) -> str:
    """Summary (tok/s per library and featurekit's ratio to each), then every run in detail."""
    latest: dict[tuple, dict] = {}
    # JumpReLU started at a trained operating point is its own workload ("jumprelu@L0 64": `--jumprelu-l0`)
    rows = [{**r, "arch": f"{r['arch']}@L0 {r['jumprelu_l0']:g}"} if r.get("jumprelu_l0") is not None else r for r in rows]
    for r in rows:  # a later row for the same run replaces an earlier one (re-runs, merged files)
        latest[(r["library"], r["arch"], r["n_latents"], r.get("k"), r.get("threads"))] = r
    rows = list(latest.values())
    arch_order = {"topk": 0, "batchtopk": 1, "jumprelu": 2}
    workloads = sorted({(r["n_latents"], r["arch"], r.get("k") or 0, r.get("threads")) for r in rows},
                       key=lambda w: (w[3] or 0, w[0], arch_order.get(_base(w[1]), 9), w[1], w[2]))
    libs = [lib for lib in ("featurekit",) + PEERS if any(r["library"] == lib for r in rows)]
    ok = {(r["library"], r["n_latents"], r["arch"], r.get("k") or 0, r.get("threads")): r for r in rows if "skipped" not in r}

    by_size: dict[int, set] = {}
    for r in ok.values():
        by_size.setdefault(r["n_latents"], set()).add((r["warmup"], r["steps"]))
    if len({x for v in by_size.values() for x in v}) <= 1:
        schedule = f"{machine.get('warmup', '?')} warm-up + {machine.get('steps', '?')} measured steps"
    else:
        schedule = "warm-up + measured steps: " + ", ".join(
            f"{'/'.join(f'{w}+{m}' for w, m in sorted(v))} at n = {n}" for n, v in sorted(by_size.items()))
    gpu = machine.get("device") == "cuda"
    out = [f"# featurekit vs peer SAE libraries: training-step throughput ({machine.get('gpu', 'GPU') if gpu else 'CPU'})", ""]
    out += [f"- date: {machine.get('date', '?')}", f"- CPU: {machine.get('cpu', '?')} ({machine.get('nproc', '?')} logical CPUs)",
            f"- torch: {machine.get('torch', '?')}, python {machine.get('python', '?')}",
            f"- torch threads per run: {machine.get('threads', '?')}",
            f"- workload: d = {machine.get('d', '?')}, batch = {machine.get('batch', '?')} tokens, {machine.get('precision', 'fp32')}, "
            f"Adam lr {machine.get('lr', '?')}, "
            f"pool of {machine.get('rows', '?')} synthetic rows; {schedule} (median step time; tokens/s = batch / median)"]
    versions = sorted({(r["library"], r.get("version")) for r in rows if r.get("version")})
    out.append("- library versions: " + ", ".join(f"{lib} {v}" for lib, v in versions))
    out += ["", "Each library runs its own SAE and its own training loop (featurekit: `Trainer.fit`); the LM is not involved.",
            f"GEMM calibration = {machine.get('gemm_size', 2048)}³ `torch.mm` GFLOP/s taken just before / after each run "
            "(this VM's speed drifts).", ""]

    out += ["## Tokens/s (higher is better); ×: featurekit ÷ that library", ""]
    head = ["n_latents", "arch", "k"] + [lib for lib in libs] + [f"fk ÷ {lib}" for lib in libs if lib != "featurekit"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, arch, k, thr in workloads:
        cells = [str(n), arch, str(k) if k else "–"]
        fk = ok.get(("featurekit", n, arch, k, thr))
        for lib in libs:
            r = ok.get((lib, n, arch, k, thr))
            cells.append(_fmt(r["tokens_per_s"]) if r else ("n/a" if _base(arch) not in SUPPORTS.get(lib, set()) else "skipped"))
        for lib in libs:
            if lib == "featurekit":
                continue
            r = ok.get((lib, n, arch, k, thr))
            cells.append(f"{fk['tokens_per_s'] / r['tokens_per_s']:.2f}×" if fk and r else "–")
        out.append("| " + " | ".join(cells) + " |")

    out += ["", "## Every run", ""]
    head = ["n_latents", "arch", "k", "library", "tok/s", "step s (median)", "step s min–max", "steps", "fk ÷ this", "peak RSS MiB",
            *(["peak GPU MiB"] if gpu else []), "loss first → last", "L0 last", "GEMM GF/s before/after", "CPU share",
            "load 1m before/after"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, arch, k, thr in workloads:
        fk = ok.get(("featurekit", n, arch, k, thr))
        for lib in libs:
            r = ok.get((lib, n, arch, k, thr))
            if r is None:
                continue
            ratio = f"{fk['tokens_per_s'] / r['tokens_per_s']:.2f}×" if fk else "–"
            loss = f"{r['loss_first']:.4g} → {r['loss_last']:.4g}" if r.get("loss_first") is not None else "–"
            out.append("| " + " | ".join([
                str(n), arch, str(k) if k else "–", lib, _fmt(r["tokens_per_s"]), _sec(r["step_s_median"]),
                f"{_sec(r['step_s_min'])}–{_sec(r['step_s_max'])}", f"{r['warmup']}+{r['steps']}", ratio, _fmt(r["peak_rss_mib"]),
                *([_fmt(r.get("peak_gpu_mib"))] if gpu else []), loss,
                _fmt(r.get("l0_last"), 1),
                f"{_fmt(r.get('gemm_gflops_before'))}/{_fmt(r.get('gemm_gflops_after'))}", _fmt(r.get("cpu_share"), 2),
                f"{_fmt(r.get('loadavg_1m_before'), 1)}/{_fmt(r.get('loadavg_1m_after'), 1)}"]) + " |")
    skipped = [r for r in rows if "skipped" in r and _base(r["arch"]) in SUPPORTS.get(r["library"], set())]
    if skipped:
        out += ["", "## Skipped", ""]
        out += [f"- {r['library']} {r['arch']} n={r['n_latents']} k={r.get('k')}: {r['skipped']}" for r in skipped]
    na = sorted({(r["library"], r["arch"]) for r in rows if "skipped" in r and _base(r["arch"]) not in SUPPORTS.get(r["library"], set())})
    if na:
        out += ["", "n/a (not implemented by the library): " + ", ".join(f"{lib} {arch}" for lib, arch in na)]
    out += ["", "Losses are each library's own training loss (their definitions and scales differ); they show that training "
            "ran, not which library is better. JumpReLU ignores k."]
    return "\n".join(out) + "\n"


def load_rows(paths: list[Path]) -> tuple[list[dict], dict]:
    rows, machine = [], {}
    for p in paths:
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("kind") == "machine":  # merged files: the dates of all, the rest from the last
                dates = [x for x in (machine.get("date"), r.get("date")) if x]
                machine = {**machine, **r, "date": " + ".join(dict.fromkeys(" + ".join(dates).split(" + ")))}
            else:
                rows.append(r)
    return rows, machine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8192,32768", help="n_latents values, comma-separated")
    p.add_argument("--ks", default="32,128", help="k values (TopK, BatchTopK), comma-separated")
    p.add_argument("--archs", default="topk,batchtopk,jumprelu")
    p.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, run in this order (outer loop); of {','.join(LIBS)}")
    p.add_argument("--steps", type=int, default=4, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2, help="discarded warm-up steps per run")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every driver (this VM: 1 is the stable choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the data and every SAE on the GPU; featurekit and sparsify only (sparsify's Triton decoder when "
                        "Triton is there; at fp32 its built-in bf16 autocast is turned off)")
    p.add_argument("--python", default=None,
                   help="one interpreter for every peer, its PYTHONPATH kept, instead of the venvs (a GPU machine with the "
                        "peers installed beside featurekit)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=576, help="activation width")
    p.add_argument("--rows", type=int, default=4 * 4096, help="rows in the shared pool (batches cycle over it)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: featurekit with train.precision=bf16 and sparsify under a CPU bf16 autocast (other peers skipped)")
    p.add_argument("--jumprelu-l0", type=float, default=None,
                   help="JumpReLU only: every library starts at the operating point of a trained dictionary with this L0 "
                        "(each latent firing on a share L0 / n_latents of the first batch) instead of its own initialisation, "
                        "where featurekit's sparse path runs; e.g. --archs jumprelu --jumprelu-l0 64")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n×n×n torch.mm calibration")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run before it is skipped")
    p.add_argument("--venvs", type=Path, default=default_venvs(), help="folder holding the peers' venvs (setup_venv.sh)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--tag", default="", help="file stem for the results (default: UTC date-time)")
    p.add_argument("--report", type=Path, nargs="+", help="only rebuild the markdown from these jsonl files")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.report:
        rows, machine = load_rows(args.report)
        md = markdown(rows, machine)
        (args.out / "latest.md").write_text(md)
        print(md)
        return 0

    libs = [s for s in args.libs.split(",") if s]
    archs = [s for s in args.archs.split(",") if s]
    bad = [x for x in libs if x not in LIBS] + [a for a in archs if a not in SUPPORTS["featurekit"]]
    if bad:
        p.error(f"unknown library/arch: {bad}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ks = [int(s) for s in args.ks.split(",") if s]
    stamp = args.tag or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    where = f"threads{args.threads}" if args.device == "cpu" else args.device
    jsonl = args.out / f"{stamp}-{where}{'' if args.precision == 'fp32' else '-' + args.precision}.jsonl"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    machine = {"kind": "machine", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
               "device": args.device, **({"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {}),
               "nproc": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
               "d": args.d, "batch": args.batch, "rows": args.rows, "lr": args.lr, "warmup": args.warmup, "steps": args.steps,
               "seed": args.seed, "gemm_size": args.gemm_size, "precision": args.precision, "jumprelu_l0": args.jumprelu_l0}
    with open(jsonl, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(machine) + "\n")
    print(f"# {machine['cpu']}, torch {machine['torch']}, {args.threads} thread(s); results -> {jsonl}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="fk-peer-bench-"))
    try:
        data = tmp / "pool.npy"
        make_pool(data, args.rows, args.d, args.seed)
        rows = []
        for lib in libs:
            for n in sizes:
                for arch in archs:
                    for k in ([None] if arch == "jumprelu" else ks):
                        row = run_one(lib, arch, n, k, args, data)
                        rows.append(row)
                        with open(jsonl, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(row) + "\n")
                        what = f"{lib:20s} {arch:9s} n={n:<6d} k={k if k else '-':<4}"
                        if "skipped" in row:
                            print(f"{what} SKIPPED: {row['skipped']}", flush=True)
                        else:
                            print(f"{what} {row['tokens_per_s']:>9.1f} tok/s  {row['step_s_median']:.3f} s/step  "
                                  f"RSS {row['peak_rss_mib']:.0f} MiB  GEMM {row['gemm_gflops_before']}/{row['gemm_gflops_after']} GF/s",
                                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = markdown(rows, machine)
    jsonl.with_suffix(".md").write_text(md)
    (args.out / "latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
