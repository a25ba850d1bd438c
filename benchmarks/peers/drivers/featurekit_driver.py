"""featurekit: the real training loop, `Trainer(...).fit(batches)`, on a TopK / BatchTopK / JumpReLU SAE.
With --jumprelu-l0, JumpReLU's `init_firing_rate` is L0 / n_latents: b_enc set so that each latent fires on
that share of the init sample (the first batch), as the peers' thresholds are set by `common.thresholds_for_l0`.

Runs with featurekit's own interpreter. TrainConfig defaults except lr (shared with the peers) and
log_every=1 (so the loss of every step lands in metrics.jsonl; the row is computed every step anyway).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import featurekit  # noqa: E402
from featurekit.config import TrainConfig  # noqa: E402
from featurekit.dictionaries.fileformat import METHODS  # noqa: E402
from featurekit.train.memory import keep_freed_memory  # noqa: E402
from featurekit.train.trainer import Trainer  # noqa: E402


def main() -> None:
    args = common.parse_args()
    pool = common.setup(args)
    d = pool.shape[1]
    params = {"k": args.k}
    if args.arch == "jumprelu":
        params = {} if args.jumprelu_l0 is None else {"init_firing_rate": args.jumprelu_l0 / args.n_latents}
    sae = METHODS[args.arch](d, args.n_latents, seed=args.seed, **params).to(args.device)
    cfg = TrainConfig(batch_size=args.batch, lr=args.lr, log_every=1, threads=args.threads, seed=args.seed,
                      precision=args.precision, device=args.device)
    if cfg.keep_freed_memory:  # as the featurekit command does for a training run
        keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix="fk-bench-") as tmp:
        trainer = Trainer(sae, cfg, Path(tmp) / "run", total_steps=common.total_steps(args))
        trainer.init_from_data(pool[: args.batch])  # input scale + b_dec (geometric median): before timing
        timer = common.TimedBatches(pool, args.batch)
        trainer.fit(timer, progress=False)
        rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    l0 = rows[-1].get("l0")
    common.report(args, "featurekit", featurekit.__version__, timer, losses, l0_last=l0)


if __name__ == "__main__":
    main()
