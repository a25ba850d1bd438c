"""JumpReLU's training kernels: its straight-through estimators, and two ways to run them without the
(N, F) autograd graph of the plain formulas (`jumprelu_forward`).

With θ ≥ 0, only the (token, latent) pairs that fire (π > θ) or lie in the estimator's window
|π − θ| < ε/2 carry a value or a gradient. While they are few (at most `SPARSE_MAX_DENSITY` of the pairs,
and at most half of the latents in any token) they are gathered and run through the sparse kernels with θ
gathered per pair; otherwise `_DenseJumpReLU` runs the same formulas in row blocks with the decoder fused in.
Both give the plain formulas' values and gradients (tests/dictionaries/test_jumprelu.py,
tests/train/test_fast_paths.py). The live pairs are found from the fp32 product, or through a bf16 product
(`certified.certified_above`, exact values at the candidates) where the dictionary's `KernelChoice` finds that
faster.
"""

from __future__ import annotations

import torch

from .certified import certified_above
from .forward import Encoder, FastCodes, Picked, fast_codes
from .gemm import autocast_dtype, encoder_preact
from .reference import plain_active
from .selection import certified_chosen
from .sparse import count_true, gather_1d, gather_linear, mask_to_sparse, pairs, pairs_at, pairs_to_sparse, sparse_decode

#: the sparse training path runs while at most this share of the (token, latent) pairs is live: the sparse
#: kernels' gathers run far below GEMM speed per multiply-add on CPU, so past a few per cent of the pairs the
#: dense GEMMs are cheaper (the two break even near 4.5 %; BENCHMARKS.md, "Numbers formerly in code comments")
SPARSE_MAX_DENSITY = 0.04
#: the bf16 route to the live pairs (`certified_live`) gives up past this share of candidate pairs: its SDDMM then
#: costs more than the fp32 product it saves (BENCHMARKS.md)
CERTIFIED_MAX_DENSITY = 0.02
#: rows per block in the dense path (bounds its temporaries to a few (rows, F) blocks)
_BLOCK_ROWS = 512


def _kernel(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return (((pre - theta) / eps).abs() < 0.5).to(pre.dtype)


def _reduce_to(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θ's gradient: summed over tokens for a per-latent θ (F,), elementwise for a gathered θ (N, m)."""
    return grad.sum(0) if theta.dim() < grad.dim() else grad


class JumpReLUFn(torch.autograd.Function):
    """f = π·H(π − θ); ∂f/∂π = H(π − θ), ∂f/∂θ := −(θ/ε) K((π − θ)/ε) with the rectangle kernel K (paper §4)."""

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


class StepFn(torch.autograd.Function):
    """H(π − θ) (the L0 term); ∂H/∂π := 0, ∂H/∂θ := −(1/ε) K((π − θ)/ε)."""

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
    """t · mask for a bool mask, multiplied as its bytes: the same values as `t * mask`, without torch's slow
    type-promotion path for a bool factor on CPU."""
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
    x_c = x − shift. The same values and gradients as `JumpReLUFn`, `StepFn` and `f @ W_dec` on π with
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


def live_above(pre: torch.Tensor, cut: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The entries of `pre` (N, F) above their column's `cut`, in `mask_to_sparse`'s form with their values:
    (idx, keep, values) (N, m). Found in blocks of rows, each compared and scanned while it is in cache, with
    no (N, F) mask; None as soon as more than `budget` entries are found, or more than 1.5 × the budget's
    share of the rows scanned once `_SCAN_DECIDE_ROWS` are (a dense batch then declines after a fraction of
    the scan)."""
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


#: rows per block in `live_above` (a block of pre and its comparison stay in cache), and the rows it scans before
#: it may decline on the share found so far
_SCAN_ROWS, _SCAN_DECIDE_ROWS = 64, 512


def certified_live(centered: torch.Tensor, W: torch.Tensor, b: torch.Tensor, cut: torch.Tensor, budget: int,
                   choice=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The pairs whose pre-activation exceeds their latent's `cut`, found through the bf16 product where a
    `choice` finds that faster (fp32 on CPU, `certified_chosen`): `certified_above`'s candidates get
    their exact fp32 values (one SDDMM) and only those above the cut are kept. Returns (idx, keep, values)
    (N, m) in `mask_to_sparse`'s form, the values at the kept slots; None where the route is not taken or
    the candidates exceed `budget` or `CERTIFIED_MAX_DENSITY` (the caller's fp32 product decides)."""
    def fp32(x, W, b, _k, _signed, choice=None):
        return (encoder_preact(x, W, b, choice) > cut,)

    def certified(x, W, b, _k, _signed):
        live = certified_above(x, W, b, cut, x.shape[0] * W.shape[0])
        return None if live is None else (live,)

    if not certified_chosen(choice, "JumpReLU live pairs", fp32, certified, centered, W, b, 1, False):
        return None
    candidates = certified_above(centered, W, b, cut, min(budget, int(CERTIFIED_MAX_DENSITY * cut.numel() * centered.shape[0])))
    if candidates is None:
        return None
    idx, keep = mask_to_sparse(candidates)
    del candidates
    rows, slots, cols, crow = pairs(idx, keep)
    exact = pairs_at(centered, W, b, rows, cols, crow)
    below = ~(exact > cut[cols])
    keep = keep.index_put((rows[below], slots[below]), torch.tensor(False))
    return idx, keep, torch.zeros(idx.shape, dtype=exact.dtype, device=exact.device).index_put_((rows, slots), exact)


def jumprelu_forward(x: torch.Tensor, enc: Encoder, theta: torch.Tensor, eps: float, W_dec: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, FastCodes] | None:
    """JumpReLU's training forward without the plain formulas' (N, F) graph: (x̂ − b_dec, L0 = mean over tokens
    of Σ_j H(π_j − θ_j), the (N, F) π without grad where it was computed, the codes for the `Output`). Sparse
    while the live pairs are few (module docstring), else the fused dense path; None inside `plain_kernels()`,
    and on the dense path when x itself needs a gradient (the caller then runs the plain formulas)."""
    if plain_active():
        return None
    n, F = x.shape[0], enc.W.shape[0]
    with torch.no_grad():
        # firing or in the kernel window |π − θ| < ε/2, i.e. π > θ − ε/2 (taken wider, θ − ε: a superset is exact,
        # its extra pairs carry neither a value nor a gradient, and no rounding at the window's edge is lost)
        cut = theta.detach() - eps
        budget = int(n * F * SPARSE_MAX_DENSITY)
        centered = enc.centred(x)
        found, pre = certified_live(centered, enc.W, enc.b, cut, budget, enc.choice), None
        if found is None:
            pre = encoder_preact(centered, enc.W, enc.b, enc.choice)
            found = live_above(pre, cut, budget)
        sparse = found is not None and int(count_true(found[1], -1).max()) <= F // 2
    if sparse:
        picked = Picked(found[0], found[1], pair_pre=found[2], pre=pre, ragged=True)
        pre_at = gather_linear(x, enc.W, enc.b, picked.idx, pre, shift=enc.shift, keep=picked.keep, pair_pre=picked.pair_pre)
        theta_at = gather_1d(theta, picked.idx)
        values = JumpReLUFn.apply(pre_at, theta_at, eps) * picked.keep
        x_hat = sparse_decode(picked.idx, values, W_dec, keep=picked.keep)
        l0 = (StepFn.apply(pre_at, theta_at, eps) * picked.keep).sum(-1).mean()
        return x_hat, l0, pre, fast_codes(x, enc, pre, picked.idx, values)
    if pre is None:  # few candidates, but some token holds more than half of the latents
        pre = encoder_preact(centered, enc.W, enc.b, enc.choice)
    if x.requires_grad:
        return None
    x_hat, l0, fired = _DenseJumpReLU.apply(centered, enc.W, enc.b, enc.shift, theta, W_dec, pre, eps)
    theta = theta.detach().clone()  # this step's θ, should the codes be read after the update
    return x_hat, l0, pre, fast_codes(x, enc, pre, dense=lambda: pre * (pre > theta), fire_counts=fired)
