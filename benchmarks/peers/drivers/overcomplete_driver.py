"""overcomplete (KempnerInstitute): `train_sae(model, batches, criterion, Adam, nb_epochs=1, clip_grad=1.0,
monitoring=1)`, its real loop, with TopKSAE / BatchTopKSAE (default linear encoder; BatchTopK's top_k is
per batch, so k × batch) and a plain MSE criterion. JumpReLU is not run: overcomplete's JumpSAE has no
built-in sparsity loss to pair it with, so its cost would depend on the penalty the harness picked.

overcomplete imports torchvision.transforms at package import (only for its vision-model wrappers);
torchvision is not installed (setup_venv.sh), so a stub module stands in for it."""

from __future__ import annotations

import itertools
import sys
import types
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    args = common.parse_args()
    if args.arch == "jumprelu":
        common.fail(args, "overcomplete", "no JumpReLU training recipe (JumpSAE has no built-in sparsity loss)")
    pool = common.setup(args)
    import torch

    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:  # absent or a CUDA build that fails against CPU torch
            stub = types.ModuleType("torchvision")
            stub.transforms = types.ModuleType("torchvision.transforms")
            sys.modules["torchvision"] = stub
            sys.modules["torchvision.transforms"] = stub.transforms
    from overcomplete.sae import BatchTopKSAE, TopKSAE, train_sae

    d = pool.shape[1]
    if args.arch == "topk":
        model = TopKSAE(d, args.n_latents, top_k=args.k, device="cpu")
    else:
        model = BatchTopKSAE(d, args.n_latents, top_k=args.k * args.batch, device="cpu")

    def criterion(x, x_hat, pre_codes, codes, dictionary):
        return (x - x_hat).square().mean()

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    timer = common.TimedBatches(pool, args.batch)
    # its loop runs to the end of the iterable: exactly total_steps batches (the request that finds the
    # iterable exhausted is not stamped, but the last step is the unmeasured +1)
    logs = train_sae(model, itertools.islice(timer, common.total_steps(args)), criterion, optimizer,
                     nb_epochs=1, clip_grad=1.0, monitoring=1, device="cpu")
    common.report(args, "overcomplete", version("overcomplete"), timer, list(logs.get("step_loss", [])))


if __name__ == "__main__":
    main()
