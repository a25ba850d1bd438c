"""SAELens: `SAETrainer(...).fit()` (its real training loop minus the ActivationsStore) on
TopKTrainingSAE / BatchTopKTrainingSAE / JumpReLUTrainingSAE, fed by the timed iterator.
SAELens defaults otherwise (rescale_acts_by_decoder_norm, apply_b_dec_to_input, grad clipping 1.0,
per-step firing statistics); W&B logging and checkpoints off. With --jumprelu-l0 the thresholds are set
by `common.thresholds_for_l0` on its own pre-activations of the first batch."""

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
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    d = pool.shape[1]
    if args.arch == "topk":
        sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=d, d_sae=args.n_latents, k=args.k))
    elif args.arch == "batchtopk":
        sae = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=d, d_sae=args.n_latents, k=args.k))
    else:
        sae = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(d_in=d, d_sae=args.n_latents))
        if args.jumprelu_l0 is not None:
            with torch.no_grad():
                sae.threshold.copy_(common.thresholds_for_l0(sae.encode_with_hidden_pre(pool[:args.batch])[1], args.jumprelu_l0))
    steps = common.total_steps(args)
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr, lr_end=args.lr / 10,
                           device="cpu", autocast=False, logger=LoggingConfig(log_to_wandb=False))
    timer = common.TimedBatches(pool, args.batch)
    losses: list[float] = []
    forward = sae.training_forward_pass

    def recording_forward(*a, **kw):
        out = forward(*a, **kw)
        losses.append(out.loss.item())
        return out

    sae.training_forward_pass = recording_forward
    sae_lens.SAETrainer(cfg=cfg, sae=sae, data_provider=timer).fit()
    extra = {}
    if args.arch == "jumprelu":  # L0 after training, on the first batch
        with torch.no_grad():
            extra["l0_last"] = common.mean_l0(sae.encode_with_hidden_pre(pool[:args.batch])[1], sae.threshold)
    common.report(args, "saelens", version("sae-lens"), timer, losses, **extra)


if __name__ == "__main__":
    main()
