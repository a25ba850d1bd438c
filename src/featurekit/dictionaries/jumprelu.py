"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435). The paper has no
official code; formulas follow the paper (§3–§4) as written out in research/seed-methods-sae.md §3,
and the reference implementations SAELens `saes/jumprelu_sae.py` and dictionary_learning
`trainers/jumprelu.py` (read, not copied):

    π = (x − b_dec) W_encᵀ + b_enc        (encoder input centred on b_dec: see "changes" below)
    f = π · H(π − θ),  θ ∈ R^F learned     x̂ = f W_dec + b_dec,  decoder rows unit-norm
    L = Σ_d (x − x̂)² (mean over tokens) + λ · mean over tokens of Σ_j H(π_j − θ_j)       (paper eq. for L0)

Pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε (paper §4; the
same in SAELens and dictionary_learning):
    ∂f_j/∂θ_j := −(θ_j/ε) K((π_j − θ_j)/ε),   ∂f_j/∂π_j = H(π_j − θ_j)
    ∂H_j/∂θ_j := −(1/ε) K((π_j − θ_j)/ε),     ∂H_j/∂π_j := 0   (the L0 term trains only θ)
θ is a raw parameter (dictionary_learning: log-θ trained poorly), clamped at ≥ 0 after each step.
Decoder rows are kept at unit norm (the trainer's projection + renormalisation), as dictionary_learning.
W_enc = W_decᵀ at init (random unit directions), as both references. λ is ramped up linearly by
the trainer (`train.sparsity_warmup_fraction`; the paper warms λ up too).

Changes from the paper's recipe, and why. Measured on tests/train/synthetic.py data (48 true
features in d = 24, a mean offset carrying 94 % of the input norm, 96 latents, 500 steps × 256
tokens, lr 3e-3, the test's setup), MMCS true→learned over live latents at λ = 0.2 / 1: the code
before these changes 0.62 / 0.64 (FVU 0.41 / 0.57); each change below removed alone 0.69 / 0.72
(1), 0.84 / 0.90 (2), 0.92 / 0.96 (3); all three 0.96 / 0.97 (FVU 0.13 / 0.21).

1. The encoder input is centred on b_dec, π = (x − b_dec) W_encᵀ + b_enc (the paper [as read in
   the spec; memory] and dictionary_learning use W_enc x + b_enc; SAELens's default
   `apply_b_dec_to_input=True` centres, as every other featurekit method). On data with a large
   mean (LLM residual streams carry one) the uncentred π_j is dominated by ⟨e_j, mean⟩: at init half
   the latents fire on every token with π far above θ, where the kernel is zero, so neither the L0
   term nor the threshold estimator reaches them, and the other half never fire; every encoder
   update also moves ⟨e_j, mean⟩ and with it every π_j. A reparametrisation of b_enc, not a new model.
2. b_enc is initialised from data so that each latent fires on a share `init_firing_rate` of the
   trainer's init sample (b_enc,j = θ_j − the (1 − r) quantile of π_j): the b_enc init of Anthropic's
   January-2025 update (transformer-circuits.pub/2025/january-update; they target 10 000 active latents
   of their width). The paper's b_enc = 0 with a tiny θ starts every centred latent firing on about
   half the tokens (L0 ≈ F/2), and the L0 term must then lift θ through the bulk of π's distribution
   with a kernel gradient that only a few tokens per batch feed, while the dictionary trains on dense
   codes and blends features. Rates 0.01–0.1 measured alike (MMCS 0.96–0.98 at λ = 0.2).
   `init_firing_rate=None` keeps the paper's b_enc = 0.
3. ε = θ_init = 0.1 in the training scale (E‖x‖ = √d, spec §0.2 N1). The paper's 0.001 is for
   E‖x‖² = 1 (N2), i.e. 0.001·√d here (0.024 at d = 576, 0.005 at d = 24). With 1 and 2 in place,
   ε from 0.03 to 0.3 measured alike; ε = θ_init = 0.005 weakens λ's hold on L0 at small batches
   (λ = 1: L0 1.9 instead of 1.25; few tokens fall in the kernel window), and θ_init ≥ 0.3 (a large
   jump at init) hurts (θ_init = 1: MMCS 0.66). ε trades bias for variance (paper §4): widen it for
   small batches.

λ is in units of Σ_d squared error in the training scale: a latent fires where it removes more than
λ of it. On the test data λ = 0.1 / 0.2 / 1 give L0 2.8 / 1.9 / 1.25 (true mean L0 2.4). Small λ
converges slowest (λ = 0.05: L0 4.9 after 500 steps, 2.5 after 2000). Kept from the paper after
testing alternatives: no pseudo-derivative of the L0 term to π (letting it reach W_enc and b_enc, as
Anthropic's variant does, switched latents off: λ = 0.2 half of them dead, λ = 1 L0 fell to 0); Adam
β₁ = 0.9 (the paper's β₁ = 0 measured the same).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FeaturekitError
from .base import Dictionary, Output
from .certified import certified_above
from .gemm import autocast_dtype, encoder_preact, plain_active
from .operators import jumprelu
from .selection import certified_chosen
from .sparse import _pairs, _pairs_at, count_true, gather_1d, gather_linear, mask_to_sparse, pairs_to_sparse, sparse_decode

#: the sparse training path runs while at most this share of the (token, latent) pairs is live. Measured at
#: 8,192 latents, d = 576, batch 4,096, fp32, 1 thread (ragged sparse kernels): sparse 1.05 s vs dense 1.61 s a
#: step at 2.6 % live, 1.6–1.9 vs 1.59 s at 5.0 % — even at ≈ 4.5 %
SPARSE_MAX_DENSITY = 0.04
#: the bf16 route to the live pairs (`_certified_live`) gives up past this share of candidate pairs: its SDDMM then
#: costs more than the fp32 product it saves. Measured at d = 576, batch 4,096, 1 thread (Xeon with AMX), step
#: against the fp32 route: 8,192 latents 517 → 429 ms at L0 ≈ 34 (≈ 1.4 % candidates) but 849 → 957 at L0 ≈ 128;
#: 32,768 latents 1,668 → 1,144 ms at L0 ≈ 35 and 2,024 → 1,681 at L0 ≈ 118
CERTIFIED_MAX_DENSITY = 0.02
#: rows per block in the dense path (bounds its temporaries to a few (rows, F) blocks)
_BLOCK_ROWS = 512
#: latents per chunk in the data-dependent b_enc init (bounds the sample × chunk pre-activation block)
_INIT_CHUNK = 1024


def _kernel(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return (((pre - theta) / eps).abs() < 0.5).to(pre.dtype)


def _reduce_to(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θ's gradient: summed over tokens for a per-latent θ (F,), elementwise for a gathered θ (N, m)."""
    return grad.sum(0) if theta.dim() < grad.dim() else grad


class _JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        grad_theta = -(theta / ctx.eps) * _kernel(pre, theta, ctx.eps) * grad
        return grad * (pre > theta), _reduce_to(grad_theta, theta), None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return torch.zeros_like(pre), _reduce_to(-(1.0 / ctx.eps) * _kernel(pre, theta, ctx.eps) * grad, theta), None


def _masked(t: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """t · mask for a bool mask, multiplied as its bytes: the same values as `t * mask`, 2–3× faster on
    CPU (a bool factor takes torch's slow type-promotion path; measured 7.3 → 2.5 ms at 512 × 8,192)."""
    return torch.mul(t, mask.view(torch.uint8), out=out)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, in place when the dtypes agree (no temporary), else through a product in a's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).to(acc.dtype)


class _DenseJumpReLU(torch.autograd.Function):
    """The dense training path with the decoder fused in: x̂ − b_dec = f W_dec with f = π·H(π − θ), and
    L0 = mean over tokens of Σ_j H(π_j − θ_j), π = x_c W_encᵀ + b_enc already computed (no grad),
    x_c = x − shift. The same values and gradients as `_JumpReLUFn`, `_StepFn` and `f @ W_dec` on π with
    its graph, with no (N, F) matrix beyond π and the mask: f and its gradient live one row block at a
    time, in the forward (f W_dec) and in the backward (∂f = ∂x̂ W_decᵀ, W_dec's gradient fᵀ ∂x̂, the kernel
    window once for both θ terms, W_enc's gradient one GEMM per block). shift (b_dec) gets
    −(Σ_n ∂π_n) W_enc without an (N, d) gradient for x_c. Under a bf16 autocast the decoder and the
    encoder-gradient GEMMs run in bf16 (fp32 accumulation), as autograd's matmuls would."""

    @staticmethod
    def forward(ctx, x_c, W, b, shift, theta, W_dec, pre, eps):
        low = autocast_dtype(pre.device)
        mask = pre > theta
        ctx.save_for_backward(x_c, W, theta, W_dec, pre, mask)
        ctx.eps, ctx.low = eps, low
        dec = W_dec.detach().to(low or W_dec.dtype)
        x_hat = torch.empty(pre.shape[0], W_dec.shape[1], dtype=dec.dtype, device=pre.device)
        with torch.autocast(pre.device.type, enabled=False):
            for s in range(0, pre.shape[0], _BLOCK_ROWS):
                rows = slice(s, s + _BLOCK_ROWS)
                torch.mm(_masked(pre[rows], mask[rows]).to(dec.dtype), dec, out=x_hat[rows])
        fired = count_true(mask, 0).long()  # θ ≥ 0, so a latent fires exactly where the mask is set
        ctx.mark_non_differentiable(fired)
        return x_hat, fired.sum().to(pre.dtype) / pre.shape[0], fired

    @staticmethod
    def backward(ctx, grad_x_hat, grad_l0, _):
        x_c, W, theta, W_dec, pre, mask = ctx.saved_tensors
        n, gdt = pre.shape[0], ctx.low or W.dtype
        grad_W = torch.zeros_like(W) if ctx.needs_input_grad[1] else None
        grad_W_dec = torch.zeros_like(W_dec) if ctx.needs_input_grad[5] else None
        grad_b = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
        k_grad = torch.zeros_like(theta)  # Σ_n K·∂f
        k_count = torch.zeros_like(theta)  # Σ_n K
        dec, grad_x_hat = W_dec.to(gdt), grad_x_hat.to(gdt)
        for s in range(0, n, _BLOCK_ROWS):  # row blocks: no (N, F) temporaries beyond the saved ones
            rows = slice(s, s + _BLOCK_ROWS)
            g = grad_x_hat[rows] @ dec.T  # ∂f for the block (bf16 under a bf16 autocast)
            window = (pre[rows] - theta).div_(ctx.eps).abs_().lt_(0.5)  # `_kernel`, as 0/1 in pre's dtype
            k_grad += (g * window).sum(0, dtype=theta.dtype)
            if grad_l0 is not None:
                k_count += window.sum(0, dtype=theta.dtype)  # exact: counts below 2^24
            grad_pre = _masked(g, mask[rows], out=g)  # g is not needed after this
            grad_b += grad_pre.sum(0, dtype=W.dtype)
            if grad_W is not None:
                _accumulate_mm(grad_W, grad_pre.T, x_c[rows].to(gdt))
            if grad_W_dec is not None:
                _accumulate_mm(grad_W_dec, _masked(pre[rows], mask[rows]).T, grad_x_hat[rows])
        # ∂θ: −(θ/ε) Σ_n K·∂f  −  (1/ε) Σ_n K·∂L0/N
        grad_theta = -(theta / ctx.eps) * k_grad
        if grad_l0 is not None:
            grad_theta -= (grad_l0.to(theta.dtype) / (ctx.eps * n)) * k_count
        grad_shift = -(grad_b @ W) if ctx.needs_input_grad[3] else None
        return None, grad_W, grad_b, grad_shift, grad_theta, grad_W_dec, None, None


def _above(pre: torch.Tensor, cut: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The entries of `pre` (N, F) above their column's `cut`, in `mask_to_sparse`'s form with their values:
    (idx, keep, values) (N, m). Found in blocks of rows, each compared and scanned while it is in cache, with
    no (N, F) mask (≈ 155 → 100 ms at 4,096 × 8,192); None as soon as more than `budget` entries are found, or
    more than 1.5 × the budget's share of the rows scanned once `_SCAN_DECIDE_ROWS` are (a dense batch: at
    12 % live pairs the scan declined after a third of the batch, 40 ms, and now after an eighth, 5 ms)."""
    n, F = pre.shape
    flat_pre, found, total = pre.reshape(-1), [], 0
    for start in range(0, n, _SCAN_ROWS):
        flat = (pre[start:start + _SCAN_ROWS] > cut).view(-1).nonzero().squeeze(1)
        total += flat.numel()
        done = min(start + _SCAN_ROWS, n)
        if total > budget or (done >= _SCAN_DECIDE_ROWS and total > 1.5 * budget * done / n):
            return None
        found.append(flat + start * F)
    flat = torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=pre.device)
    rows, cols = flat.div(F, rounding_mode="floor"), flat.remainder(F)  # row-major: columns in order within a row
    return pairs_to_sparse(rows, cols, torch.bincount(rows, minlength=n), flat_pre[flat])


#: rows per block in `_above` (a block of pre and its comparison stay in cache), and the rows it scans before
#: it may decline on the share found so far
_SCAN_ROWS, _SCAN_DECIDE_ROWS = 64, 512


def _certified_live(centered: torch.Tensor, W: torch.Tensor, b: torch.Tensor, cut: torch.Tensor,
                    budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The pairs whose pre-activation exceeds their latent's `cut`, found through the bf16 product where a
    one-time probe finds that faster (fp32 on CPU, `certified_chosen`): `certified_above`'s candidates get
    their exact fp32 values (one SDDMM) and only those above the cut are kept. Returns (idx, keep, values)
    (N, m) in `mask_to_sparse`'s form, the values at the kept slots; None where the route is not taken or
    the candidates exceed `budget` or `CERTIFIED_MAX_DENSITY` (the caller's fp32 product decides)."""
    def fp32(x, W, b, _k, _signed):
        return (encoder_preact(x, W, b) > cut,)

    def certified(x, W, b, _k, _signed):
        live = certified_above(x, W, b, cut, x.shape[0] * W.shape[0])
        return None if live is None else (live,)

    if not certified_chosen("JumpReLU live pairs", fp32, certified, centered, W, b, 1, False):
        return None
    candidates = certified_above(centered, W, b, cut, min(budget, int(CERTIFIED_MAX_DENSITY * cut.numel() * centered.shape[0])))
    if candidates is None:
        return None
    idx, keep = mask_to_sparse(candidates)
    del candidates
    rows, slots, cols, crow = _pairs(idx, keep)
    exact = _pairs_at(centered, W, b, rows, cols, crow)
    below = ~(exact > cut[cols])
    keep = keep.index_put((rows[below], slots[below]), torch.tensor(False))
    return idx, keep, torch.zeros(idx.shape, dtype=exact.dtype, device=exact.device).index_put_((rows, slots), exact)


class JumpReLUSAE(Dictionary):
    method = "jumprelu"
    recon_loss = "squared_error"

    def __init__(self, d_in: int, n_latents: int, l0_coefficient: float = 1.0, bandwidth: float = 0.1,
                 threshold_init: float = 0.1, init_firing_rate: float | None = 0.1, seed: int | None = None):
        super().__init__(d_in, n_latents)
        if bandwidth <= 0 or threshold_init < 0:
            raise FeaturekitError(f"JumpReLU needs bandwidth > 0 and threshold_init ≥ 0, got {bandwidth}, {threshold_init}")
        if init_firing_rate is not None and not 0 < init_firing_rate < 1:
            raise FeaturekitError(f"init_firing_rate must lie in (0, 1) or be null (b_enc = 0), got {init_firing_rate}")
        self.l0_coefficient, self.bandwidth, self.threshold_init = float(l0_coefficient), float(bandwidth), float(threshold_init)
        self.init_firing_rate = None if init_firing_rate is None else float(init_firing_rate)
        #: multiplies λ; the trainer ramps it from 0 to 1 (a training-time schedule, not saved).
        self.sparsity_scale = 1.0
        self.theta = torch.nn.Parameter(torch.full((n_latents,), self.threshold_init))
        self.init_tied(seed)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return jumprelu(pre, self.theta)

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """b_enc,j = θ_j − q_j with q_j halfway between the round(r·n)-th and the next largest π_j of the
        n sample tokens (b_enc = 0 while computing it), so each latent starts firing on a share r of them."""
        n = x.shape[0]
        if self.init_firing_rate is None or n < 2:
            return
        above = min(max(round(self.init_firing_rate * n), 1), n - 1)
        centred = x.to(self.W_enc.device, self.W_enc.dtype) - self.b_dec
        for idx in torch.arange(self.n_latents, device=self.W_enc.device).split(_INIT_CHUNK):
            pre = centred @ self.W_enc[idx].T  # (n, chunk), b_enc = 0
            top = pre.topk(above + 1, dim=0).values[-2:]  # the above-th and (above + 1)-th largest π_j
            self.b_enc[idx] = self.theta[idx] - top.mean(0)  # the cut halfway between them: rounding cannot move a token across

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward with the straight-through estimators. Sparse: only the (token, latent)
        pairs that fire or lie in the kernel window |π − θ| < ε/2 carry a value or a gradient, so
        they are gathered (`mask_to_sparse`) and run through the sparse kernels with θ gathered per
        pair — the same values and gradients as the dense formulas (tests/dictionaries/test_jumprelu.py).
        Dense (`_DenseJumpReLU`: the same values and gradients, five GEMMs, no (N, F) code matrix) when more than 4 % of the pairs,
        or half of the latents in some token, are live."""
        x = self._check_input(x)
        centered = x - self.b_dec
        if not plain_active():
            with torch.no_grad():
                # firing or in the kernel window |π − θ| < ε/2, i.e. π > θ − ε/2 (taken wider, θ − ε: a superset is exact,
                # its extra pairs carry neither a value nor a gradient, and no rounding at the window's edge is lost)
                cut = self.theta.detach() - self.bandwidth
                # sparse kernels while live pairs are few: the embedding_bag gathers run ≈ 20× below GEMM speed per
                # multiply-add on CPU, so past ≈ 4 % of the (N, F) pairs the dense GEMMs are cheaper
                budget = int(x.shape[0] * self.n_latents * SPARSE_MAX_DENSITY)
                found, pre = _certified_live(centered.detach(), self.W_enc, self.b_enc, cut, budget), None
                if found is None:
                    pre = encoder_preact(centered, self.W_enc, self.b_enc)
                    found = _above(pre, cut, budget)
                sparse = found is not None and int(count_true(found[1], -1).max()) <= self.n_latents // 2
                if sparse:
                    idx, keep, at = found
            if sparse:
                pre_at = gather_linear(x, self.W_enc, self.b_enc, idx, pre, shift=self.b_dec, keep=keep, at=at)
                theta_at = gather_1d(self.theta, idx)
                values = _JumpReLUFn.apply(pre_at, theta_at, self.bandwidth) * keep
                out = Output(x_hat=sparse_decode(idx, values, self.W_dec, keep=keep) + self.b_dec, idx=idx, values=values,
                             n_latents=self.n_latents, pre=pre, pre_topk=self.columns_pre_topk(centered.detach()) if pre is None else None)
                l0 = (_StepFn.apply(pre_at, theta_at, self.bandwidth) * keep).sum(-1).mean()
                out.losses["l0"] = self.l0_coefficient * self.sparsity_scale * l0
                return out
            if pre is None:  # few candidates, but some token holds more than half of the latents
                pre = encoder_preact(centered.detach(), self.W_enc, self.b_enc)
            if not x.requires_grad:
                x_hat, l0, fired = _DenseJumpReLU.apply(centered.detach(), self.W_enc, self.b_enc, self.b_dec, self.theta,
                                                        self.W_dec, pre, self.bandwidth)
                theta = self.theta.detach().clone()  # this step's θ, should the codes be read after the update
                out = Output(x_hat=x_hat + self.b_dec, codes=lambda: pre * (pre > theta), pre=pre, fire_counts=fired)
                out.losses["l0"] = self.l0_coefficient * self.sparsity_scale * l0
                return out
        pre = self.pre_activation(x)
        codes = _JumpReLUFn.apply(pre, self.theta, self.bandwidth)
        out = Output(x_hat=codes @ self.W_dec + self.b_dec, codes=codes, pre=pre)
        l0 = _StepFn.apply(pre, self.theta, self.bandwidth).sum(-1).mean()
        out.losses["l0"] = self.l0_coefficient * self.sparsity_scale * l0
        return out

    def pre_at(self, x: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor | None, at: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-activations at `idx` with gradient (the aux losses): through `gather_linear` on every path, so
        they reach the encoder whether the forward kept a `pre` with its graph (plain), one without (the fast
        paths) or none (the certified route)."""
        return gather_linear(x, self.W_enc, self.b_enc, idx, pre, shift=self.b_dec, at=at)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        self.theta.clamp_(min=0.0)

    def _fold_thresholds(self, c: torch.Tensor) -> None:
        self.theta.div_(c)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "jumprelu", "pre_activation": "(x - b_dec) W_enc^T + b_enc",
                "threshold": "per-latent parameter `theta`"}

    def hyperparams(self) -> dict[str, Any]:
        return {"l0_coefficient": self.l0_coefficient, "bandwidth": self.bandwidth, "threshold_init": self.threshold_init,
                "init_firing_rate": self.init_firing_rate}
