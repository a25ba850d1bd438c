"""dictionary_learning (saprmarks, PyPI `dictionary-learning`): `trainSAE(data=iterator, trainer_configs=[...])`,
its real loop, with TopKTrainer / BatchTopKTrainer / JumpReluTrainer. warmup_steps (and JumpReLU's
sparsity_warmup_steps) = 1, because its lr schedule needs the warm-up to be shorter than the run.
The trainer class is subclassed only to record the loss its own `update` returns."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    args = common.parse_args()
    pool = common.setup(args)
    from dictionary_learning.trainers import BatchTopKTrainer, JumpReluTrainer, TopKTrainer
    from dictionary_learning.training import trainSAE

    base = {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer, "jumprelu": JumpReluTrainer}[args.arch]
    losses: list[float] = []

    class Recording(base):
        def update(self, step, x):
            loss = super().update(step, x)
            losses.append(float(loss))
            return loss

    steps = common.total_steps(args)
    cfg = {"trainer": Recording, "steps": steps, "activation_dim": pool.shape[1], "dict_size": args.n_latents,
           "layer": 0, "lm_name": "fk-bench-stub", "lr": args.lr, "warmup_steps": 1, "seed": args.seed, "device": "cpu"}
    if args.arch == "jumprelu":
        cfg["sparsity_warmup_steps"] = 1
    else:
        cfg["k"] = args.k
    timer = common.TimedBatches(pool, args.batch)
    # trainSAE requests one batch past the last step (then breaks), which ends the last timed step
    trainSAE(data=timer, trainer_configs=[cfg], steps=steps, device="cpu")
    common.report(args, "dictionary_learning", version("dictionary-learning"), timer, losses)


if __name__ == "__main__":
    main()
