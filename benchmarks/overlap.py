"""Producer/consumer overlap of the streamed training path (`data.cache=false`): harvest + shuffle in a
background thread (`featurekit.data.prefetch.Prefetcher`) while the trainer steps, against the same work run
one after the other.

On the default model and site (embedded SmolLM2-135M, resid_post.6, dtype auto) and the default TopK
dictionary (or --n-latents), for one pass over --tokens training tokens it times

  H   producer alone: harvest → ShuffleBuffer → (batch_size, d) batches, collected
  T   consumer alone: `Trainer.fit` on those collected batches
  seq the streamed job as one thread runs it: `Trainer.fit(harvest → shuffle)` (what run_train did before)
  pre the same through a Prefetcher (queue depth = one shuffle burst + 1), threads split by `split_threads`

for a thread budget of 1 and of torch's default. Ideal overlap: pre ≈ max(H, T); no overlap: seq ≈ H + T.

    python benchmarks/overlap.py [--tokens 65536] [--buffer-tokens 16384] [--n-latents 4608] [--budgets 1 0]
                                                                                         (0 = torch's default)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import torch

from featurekit import pipeline
from featurekit.config import RunConfig
from featurekit.data.harvest import harvest
from featurekit.data.prefetch import Prefetcher, split_threads
from featurekit.data.shuffle import ShuffleBuffer
from featurekit.dictionaries import build_from_config
from featurekit.models.sites import site_dim
from featurekit.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--n-latents", type=int, default=None)
    ap.add_argument("--buffer-tokens", type=int, default=None, help="shuffle buffer (default: the config's, 131,072); overlap "
                    "starts once the buffer first fills, so use several buffers' worth of --tokens")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 0], help="total torch threads; 0 = torch's default")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    cfg = RunConfig()
    if args.n_latents:
        cfg.dictionary.n_latents = args.n_latents
    cfg.data.train_tokens = args.tokens
    if args.buffer_tokens:
        cfg.train.buffer_tokens = args.buffer_tokens
    tc = cfg.train
    loaded = pipeline.open_model(cfg)
    ids, mask = pipeline.contexts(loaded, cfg, "train", cfg.data.train_tokens)
    d = site_dim(loaded.model, cfg.site)
    steps = int(0.99 * int(mask.sum())) // tc.batch_size
    depth = max(tc.batch_size, tc.buffer_tokens // 2 // tc.batch_size * tc.batch_size) // tc.batch_size + 1

    def produce():
        batches = harvest(loaded.model, ids, [cfg.site], batch_size=cfg.data.harvest_batch, mask=mask, progress=False,
                          max_norm_multiple=cfg.data.max_norm_multiple)
        return itertools.islice(ShuffleBuffer(batches, [cfg.site], tc.buffer_tokens, tc.batch_size, tc.seed), steps)

    sample = next(iter(produce()))

    def train(batches) -> float:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(build_from_config(cfg.dictionary, d, seed=0), tc, run_dir, steps)
            trainer.init_from_data(sample)
            t0 = time.perf_counter()
            trainer.fit(batches, progress=False)
            return time.perf_counter() - t0

    print(f"# overlap benchmark {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}; {cfg.model.name} "
          f"{loaded.model.dtype} {cfg.site}; {cfg.dictionary.method} n={cfg.dictionary.n_latents} k={cfg.dictionary.params.k}; "
          f"{steps} steps × {tc.batch_size} tokens; buffer {tc.buffer_tokens}, queue depth {depth}")
    print("| thread budget | producer/consumer threads | H s | T s | seq s | pre s | H+T | max(H,T) | speed-up seq/pre |")
    print("|---|---|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        total = budget or default_threads
        torch.set_num_threads(total)
        t0 = time.perf_counter()
        collected = list(produce())
        h = time.perf_counter() - t0
        t = train(iter(collected))
        del collected
        seq = train(produce())
        prod, cons = split_threads(total)
        torch.set_num_threads(cons)
        pre = train(Prefetcher(produce(), depth=depth, threads=prod))
        torch.set_num_threads(total)
        print(f"| {total} | {prod}/{cons} | {h:.1f} | {t:.1f} | {seq:.1f} | {pre:.1f} | {h + t:.1f} | {max(h, t):.1f} | {seq / pre:.2f}× |",
              flush=True)


if __name__ == "__main__":
    main()
