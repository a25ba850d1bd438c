"""The feature store's build cost: the whole build against the harvest + encode of the same tokens.

    .venv/bin/python benchmarks/feature_store.py runs/default [--tokens 200000] [--repeats 2]

On the run's own store contexts (the held-out split, then training text, `features.tokens` tokens), in
alternating rounds so a slow spell of the machine hits both alike:

* `pass`: harvest to the site + the dictionary's codes made sparse (what any store needs: the floor);
* `build`: `pipeline.run_features` into a scratch copy (the pass + statistics + the code spill + the
  examples, logit effects, neighbours and the SQLite write).

Prints the medians, their ratio (the issue's target: build ≤ 1.3 × pass) and the store's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from featurekit import pipeline
from featurekit.data.harvest import harvest
from featurekit.dictionaries import load
from featurekit.features.build import sparse_codes
from featurekit.pipeline.features import store_contexts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = pipeline.load_run_config(args.run_dir)
    cfg.features = dataclasses.replace(cfg.features, tokens=args.tokens)
    loaded = pipeline.open_model(cfg)
    sae = load(cfg.run_dir / "dictionary")
    ids, mask, sources = store_contexts(loaded, cfg)
    print(f"{cfg.run_dir}: {sae.method}, {sae.n_latents} latents, site {cfg.site}; {int(mask.sum())} tokens in {len(ids)} contexts "
          f"({sources}); torch threads {torch.get_num_threads()}")
    times = {"pass": [], "build": []}
    with tempfile.TemporaryDirectory(prefix="fk-store-bench-") as tmp:
        scratch = Path(tmp) / cfg.run_dir.name
        shutil.copytree(cfg.run_dir / "dictionary", scratch / "dictionary")
        shutil.copy(cfg.run_dir / "config.json", scratch / "config.json")
        bench_cfg = pipeline.load_run_config(scratch)
        bench_cfg.features = cfg.features
        for _ in range(args.repeats):
            start = time.perf_counter()
            for batch in harvest(loaded.model, ids, [cfg.site], batch_size=cfg.features.batch_contexts, mask=mask, progress=False,
                                 max_norm_multiple=cfg.data.max_norm_multiple):
                sparse_codes(sae, batch.acts[cfg.site])
            times["pass"].append(time.perf_counter() - start)
            start = time.perf_counter()
            path = pipeline.run_features(bench_cfg, loaded, progress=False)
            times["build"].append(time.perf_counter() - start)
        size = path.stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"pass (harvest + encode): {med['pass']:.1f} s  {times['pass']}")
    print(f"build (whole store):     {med['build']:.1f} s  {times['build']}")
    print(f"ratio build / pass: {med['build'] / med['pass']:.2f}   store {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
