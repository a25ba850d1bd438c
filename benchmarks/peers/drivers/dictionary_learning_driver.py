"""dictionary_learning (saprmarks, PyPI `dictionary-learning`): `trainSAE(data=iterator, trainer_configs=[...])`,
its real loop, with TopKTrainer / BatchTopKTrainer / JumpReluTrainer. warmup_steps (and JumpReLU's
sparsity_warmup_steps) = 1, because its lr schedule needs the warm-up to be shorter than the run.
The trainer class is subclassed only to record the loss its own `update` returns (and, with --jumprelu-l0,
to set JumpReLU's thresholds at that operating point once the trainer has built its dictionary)."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    args = common.parse_args()
    pool = common.setup(args)
    from dictionary_learning.trainers import BatchTopKTrainer, JumpReluTrainer, TopKTrainer
    from dictionary_learning.training import trainSAE

    base = {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer, "jumprelu": JumpReluTrainer}[args.arch]
    losses: list[float] = []
    made: list = []

    def jumprelu_pre(ae) -> torch.Tensor:  # its encoder as its trainer computes it: x W_enc + b_enc
        return pool[:args.batch] @ ae.W_enc + ae.b_enc

    class Recording(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)
            if args.jumprelu_l0 is not None:
                with torch.no_grad():
                    self.ae.threshold.copy_(common.thresholds_for_l0(jumprelu_pre(self.ae), args.jumprelu_l0))

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
    extra = {}
    if args.arch == "jumprelu":  # L0 after training, on the first batch
        with torch.no_grad():
            extra["l0_last"] = common.mean_l0(jumprelu_pre(made[0].ae), made[0].ae.threshold)
    common.report(args, "dictionary_learning", version("dictionary-learning"), timer, losses, **extra)


if __name__ == "__main__":
    main()
