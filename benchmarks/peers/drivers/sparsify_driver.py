"""EleutherAI sparsify (PyPI `eai-sparsify`): its `Trainer(...).fit()` with loss_fn="fvu", optimizer="adam".

sparsify only trains from a Hugging Face model through forward hooks, so the model here is a stub
PreTrainedModel: each forward takes the next batch from the timed iterator and passes it through one
nn.Identity layer, the hookpoint. Everything else (SAE forward/backward, decoder-gradient projection,
Adam, lr schedule, renormalisation, dead-latent counters) is sparsify's own Trainer. One dataset item is
one "sequence" of `batch` tokens, so each step is one forward of the stub. TopK only (sparsify has no
other architecture).

On CUDA sparsify always runs its SAE's forward under its own bf16 autocast (a decorator enabled when
`torch.cuda.is_bf16_supported()`), with its Triton decoder when Triton is importable. --precision bf16 keeps
that; --precision fp32 turns the decorator off (the flag is read once, when sparsify is imported), so both
libraries run the same arithmetic. On CPU, bf16 is a CPU autocast around the whole loop (the decorator targets
CUDA only)."""

from __future__ import annotations

import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    args = common.parse_args()
    if args.arch != "topk":
        common.fail(args, "sparsify", "sparsify implements only TopK")
    pool = common.setup(args)
    import torch

    if args.device == "cuda" and args.precision == "fp32":
        torch.cuda.is_bf16_supported = lambda *a, **kw: False  # read by sparsify's autocast decorator at import
    from sparsify import SaeConfig, TrainConfig, Trainer
    from transformers import PretrainedConfig, PreTrainedModel

    timer = common.TimedBatches(pool, args.batch)

    class StubConfig(PretrainedConfig):
        model_type = "fk_bench_stub"

    class StubModel(PreTrainedModel):
        config_class = StubConfig
        base_model_prefix = ""

        def __init__(self, config):
            super().__init__(config)
            self.layers = torch.nn.ModuleList([torch.nn.Identity()])
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
            self.timer = None
            self.post_init()

        @property
        def dummy_inputs(self):
            return {"input_ids": torch.zeros(1, 4, dtype=torch.long)}

        def forward(self, input_ids, **kw):
            if self.timer is None:  # sparsify's width probe
                h = pool[: input_ids.shape[1]].unsqueeze(0)
            else:
                h = next(self.timer).unsqueeze(0)
            return self.layers[0](h)

    model = StubModel(StubConfig()).to(args.device)
    steps = common.total_steps(args)
    dataset = [{"input_ids": torch.zeros(args.batch, dtype=torch.long)} for _ in range(steps)]
    with tempfile.TemporaryDirectory(prefix="fk-bench-sparsify-") as tmp:
        cfg = TrainConfig(SaeConfig(num_latents=args.n_latents, k=args.k), batch_size=1, loss_fn="fvu", optimizer="adam",
                          lr=args.lr, hookpoints=["layers.0"], log_to_wandb=False, save_dir=tmp, save_every=10**9)
        trainer = Trainer(cfg, dataset, model)
        losses: list[float] = []
        for sae in trainer.saes.values():
            sae.register_forward_hook(lambda mod, inp, out: losses.append(float(out.fvu.detach())))
        model.timer = timer
        # bf16 on CPU: an autocast around the whole loop (sparsify's own autocast decorator targets CUDA only)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16" and args.device == "cpu"):
            trainer.fit()
    from sparsify.utils import decoder_impl

    common.report(args, "sparsify", version("eai-sparsify"), timer, losses, decoder=decoder_impl.__name__)


if __name__ == "__main__":
    main()
