"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv 2412.06410; reference code bartbussmann/BatchTopK,
and the inference threshold of dictionary_learning `trainers/batch_top_k.py`).

Training:   A = ReLU((x − b_dec) W_encᵀ + b_enc),  keep the B·k largest entries of the batch A,
            x̂ = f W_dec + b_dec           (b_enc kept, as in dictionary_learning and SAELens)
Inference:  f = ReLU(π) · 1[π > θ], one global threshold θ, so a token's code does not depend on
            its batch. θ tracks the smallest activation BatchTopK keeps: after every step,
            θ ← m on the first step, then θ ← β θ + (1 − β) m, with m the batch's minimum kept
            positive activation (dictionary_learning: β = 0.999 from step 1,000; our runs are
            hundreds of steps long, so β = 0.99 from the first step by default, recorded in the file).
Initialisation, unit-norm decoder and aux-k as for TopK.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Output
from .certified import certified_batch_topk
from .gemm import encoder_preact
from .operators import abs_threshold, batch_abs_topk, batch_topk, batch_topk_sparse, threshold
from .selection import certified_chosen, with_width
from .sparse import gather_linear, sparse_decode
from .topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    method = "batchtopk"

    def __init__(self, d_in: int, n_latents: int, k: int = 32, threshold_decay: float = 0.99, seed: int | None = None):
        super().__init__(d_in, n_latents, k=k, seed=seed)
        self.threshold_decay = float(threshold_decay)
        self.register_buffer("theta", torch.zeros(()))
        self.register_buffer("theta_updates", torch.zeros((), dtype=torch.long))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The per-token inference rule (used by `encode`)."""
        return abs_threshold(pre, self.theta) if self.signed else threshold(pre, self.theta)

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward: batch selection. Through the sparse kernels over each row's picks (non-kept
        slots weigh 0) when the selection is exact in sparse form, else densely; same values and gradients
        either way (tests/dictionaries/test_batchtopk.py). In fp32 on CPU the selection goes through
        `certified_batch_topk` (a bf16 product, exact fp32 values for the entries that can reach the cut)
        where a one-time probe finds it faster; it keeps no (N, F) matrix (aux-k computes what it needs)."""
        x = self._check_input(x)
        centered = x - self.b_dec
        with torch.no_grad():
            found, pre, pre_topk = None, None, None
            if certified_chosen("batch top-k selection", _fp32_batch, certified_batch_topk, centered, self.W_enc, self.b_enc,
                                self.k, self.signed):
                found = with_width("batchtopk", certified_batch_topk, centered, self.W_enc, self.b_enc, self.k, self.signed)
            if found is None:
                sparse, pre = _fp32_batch(centered, self.W_enc, self.b_enc, self.k, self.signed)
                at = None
            else:
                idx, keep, at = found
                sparse = idx, keep
                pre_topk = self.columns_pre_topk(centered.detach())
        if sparse is None:
            pre = centered @ self.W_enc.T + self.b_enc  # with its graph
            codes = batch_abs_topk(pre, self.k) if self.signed else batch_topk(pre, self.k)
            out = Output(x_hat=codes @ self.W_dec + self.b_dec, codes=codes, pre=pre)
        else:
            idx, keep = sparse
            values = gather_linear(x, self.W_enc, self.b_enc, idx, pre, shift=self.b_dec, keep=keep, at=at)
            x_hat = sparse_decode(idx, values, self.W_dec, keep=keep) + self.b_dec
            out = Output(x_hat=x_hat, idx=idx, values=values, n_latents=self.n_latents, pre=pre, pre_topk=pre_topk)
        out.losses.update(self.extra_losses(x, out))
        return out

    def pre_at(self, x: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor | None, at: torch.Tensor | None = None) -> torch.Tensor:
        if pre is not None and pre.requires_grad:  # the dense fallback kept the graph
            return pre.gather(-1, idx)
        return super().pre_at(x, idx, pre, at)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """Update θ from the batch's smallest kept activation."""
        kept = out.nonzero_values().abs()
        if kept.numel() == 0:
            return
        m = kept.min()
        if int(self.theta_updates) == 0:
            self.theta.copy_(m)
        else:
            self.theta.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * m)
        self.theta_updates += 1

    def _fold_thresholds(self, c: torch.Tensor) -> None:
        self.theta.div_(c)

    def inference_rule(self) -> dict[str, Any]:
        if self.signed:
            return {"activation": "abs_threshold", "threshold": float(self.theta), "scope": "global", "signed": True,
                    "training_rule": {"activation": "batch_abs_topk", "k": self.k}}
        return {"activation": "threshold", "threshold": float(self.theta), "scope": "global",
                "training_rule": {"activation": "batch_topk", "k": self.k}}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "threshold_decay": self.threshold_decay}


class BatchAbsTopKSAE(BatchTopKSAE):
    """Batch AbsTopK ("BatchAbsoluteK" of the AbsTopK authors' code): the B·k largest |π| of the
    batch keep their sign; at inference f = π · 1[|π| > θ] with θ tracked as for BatchTopK."""

    method = "batchabstopk"
    signed = True


def _fp32_batch(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool):
    """The selection through the whole product: (`batch_topk_sparse`'s answer, the (N, F) product). The
    probe times it against `certified_batch_topk`."""
    pre = encoder_preact(x, W, b)
    return batch_topk_sparse(pre.abs() if signed else pre, k), pre
