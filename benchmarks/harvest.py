"""Harvest benchmark: featurekit's harvest (capture + sharded safetensors cache) against a bare HF forward pass.

On the model `featurekit run` uses by default (the embedded SmolLM2-135M, dtype "auto" → bfloat16 on a CPU
with AVX512-BF16), site resid_post.6, embedded BBC text packed into 128-token contexts, 16 contexts per
forward pass (the defaults of `featurekit.config`), it measures tokens/s (tokens run through the model) of

  bare-trunc   the HF body model with its `layers` cut after the deepest needed block (same batches, same dtype)
  bare-full    the full HF causal-LM forward, LM head included (what a harvest without early stop would pay)
  featurekit   `data.harvest.harvest` (early stop, mask, norm-outlier filter, selection) streamed into
               `data.cache.write_cache` (safetensors shards, sha256, manifest) in a temporary directory

for each torch thread count asked for (default: 1 and torch's default). Variants are interleaved and
repeated (the full forward `--full-repeats` times); the table reports the best and the median run, and the
overhead = tok/s(bare-trunc) / tok/s(featurekit) − 1 (against the faster of the no_grad / inference_mode forms)
for both. On a shared machine the best run is the better estimate of the cost; the median shows the noise.
"peak ΔRSS" is the largest resident-set growth seen (sampled every 5 ms) while a variant ran.

    python benchmarks/harvest.py [--tokens 16384] [--repeats 3] [--threads 1 0]   (0 = torch's default)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

from featurekit.config import RunConfig
from featurekit.data.cache import write_cache
from featurekit.data.harvest import choose_dtype, harvest
from featurekit.data.sources import load_texts
from featurekit.data.tokens import pack, token_mask
from featurekit.models import load_model
from featurekit.models.sites import blocks, body_model, parse_site


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest RSS growth over the value at entry, sampled by a thread every `period` seconds."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.period)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


@contextlib.contextmanager
def truncated(model, last_layer: int):
    """The body model's `layers` cut to blocks 0..last_layer for the duration (a plain HF forward, nothing hooked)."""
    body = body_model(model)
    layers = body.layers
    body.layers = torch.nn.ModuleList(list(layers)[:last_layer + 1])
    try:
        yield body
    finally:
        body.layers = layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16_384, help="tokens per measurement (rounded to whole batches)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full-repeats", type=int, default=1, help="repeats of the (slow) full forward")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch thread counts; 0 = torch's default")
    ap.add_argument("--model", default=None, help="model (default: the config default, the embedded SmolLM2-135M)")
    ap.add_argument("--site", default=None, help="site (default: the config default, resid_post.6)")
    ap.add_argument("--dtype", default=None, help="dtype (default: the config default, auto)")
    ap.add_argument("--shard-tokens", type=int, default=None, help="cache shard size (default: the config default)")
    args = ap.parse_args()

    cfg = RunConfig()
    model_name, site = args.model or cfg.model.name, args.site or cfg.site
    dtype = choose_dtype(args.dtype or cfg.model.dtype, "cpu")
    batch, ctx = cfg.data.harvest_batch, cfg.data.context_len
    shard_tokens = args.shard_tokens or cfg.data.shard_tokens
    default_threads = torch.get_num_threads()

    loaded = load_model(model_name, dtype=dtype)
    model = loaded.model
    deepest = parse_site(site).layer
    n_ctx = max(batch, args.tokens // ctx // batch * batch)
    ids = pack(load_texts(cfg.data.source, "train"), loaded.tokenizer, ctx, max_contexts=n_ctx)
    mask = token_mask(ids, loaded.tokenizer, exclude_first=cfg.data.exclude_first, exclude_special=cfg.data.exclude_special)
    n_tokens = ids.numel()
    print(f"# featurekit harvest benchmark  {time.strftime('%Y-%m-%d %H:%M')}  python {platform.python_version()}  "
          f"torch {torch.__version__}  {platform.processor() or platform.machine()}  cpus {os.cpu_count()}")
    print(f"# model {model_name} ({dtype}, {len(blocks(model))} blocks), site {site} (stop after block {deepest}), "
          f"{ids.shape[0]} contexts × {ctx} tokens = {n_tokens} tokens ({int(mask.sum())} kept), batch {batch} contexts, "
          f"shard {shard_tokens} tokens, max_norm_multiple {cfg.data.max_norm_multiple}")

    def bare_trunc(grad_mode: Callable) -> Callable[[], None]:
        def run() -> None:
            with truncated(model, deepest) as body, grad_mode():
                for i in range(0, len(ids), batch):
                    body(input_ids=ids[i:i + batch], use_cache=False)
        return run

    def bare_full() -> None:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                model(input_ids=ids[i:i + batch], use_cache=False)

    def featurekit_harvest() -> None:
        with tempfile.TemporaryDirectory(prefix="fk-harvest-bench-") as tmp:
            stream = harvest(model, ids, [site], batch_size=batch, mask=mask, progress=False,
                             max_norm_multiple=cfg.data.max_norm_multiple)
            write_cache(tmp, stream, {"bench": True}, shard_tokens)

    variants = {"bare-trunc no_grad": bare_trunc(torch.no_grad), "bare-trunc inference_mode": bare_trunc(torch.inference_mode),
                "bare-full no_grad": bare_full, "featurekit harvest+cache": featurekit_harvest}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        with torch.inference_mode():  # warm-up (allocator, oneDNN kernels)
            body_model(model)(input_ids=ids[:batch], use_cache=False)
        secs: dict[str, list[float]] = {name: [] for name in variants}
        peak: dict[str, int] = dict.fromkeys(variants, 0)
        for rep in range(args.repeats):
            for name, fn in variants.items():
                if name.startswith("bare-full") and rep >= args.full_repeats:
                    continue
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    fn()
                    secs[name].append(time.perf_counter() - t0)
                peak[name] = max(peak[name], mem.peak)
        trunc = [*secs["bare-trunc no_grad"], *secs["bare-trunc inference_mode"]]
        base_min = min(trunc)
        base_med = min(statistics.median(secs["bare-trunc no_grad"]), statistics.median(secs["bare-trunc inference_mode"]))
        for name in variants:
            med, lo = statistics.median(secs[name]), min(secs[name])
            rows.append((torch.get_num_threads(), name, n_tokens / lo, n_tokens / med, lo, med, max(secs[name]),
                         lo / base_min - 1, med / base_med - 1, peak[name] / 2**20))
        print(f"# threads {torch.get_num_threads()} done", file=sys.stderr)
    print("| threads | variant | tok/s best | tok/s median | s min / median / max | time vs bare-trunc, best | median | peak ΔRSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for threads, name, best, tps, lo, med, hi, over_lo, over_med, mib in rows:
        print(f"| {threads} | {name} | {best:,.0f} | {tps:,.0f} | {lo:.2f} / {med:.2f} / {hi:.2f} | {over_lo:+.1%} | {over_med:+.1%} "
              f"| {mib:.0f} |")
    print(f"# process peak RSS (ru_maxrss) {_maxrss_mib():.0f} MiB")


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
