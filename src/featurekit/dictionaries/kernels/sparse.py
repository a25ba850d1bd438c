"""Sparse kernels for dictionaries whose codes have k ≪ F non-zeros per token.

The dense path costs four (N × F × d) matmuls per training step beyond the encoder's forward: the
decoder forward, its two backward products and the encoder's weight gradient. With k non-zeros per row,
all four only need N × k × d work:

* `gather_linear(x, W, b, idx, pre, shift, pair_pre=)` returns the pre-activations ((x − shift) Wᵀ + b) at
  `idx` (N, k), taken from their already computed values `pair_pre` (or from a whole `pre`; no grad), and
  back-propagates sparsely: ∂W[idx[n,j]] += g[n,j]·(x[n] − shift), ∂b[idx[n,j]] += g[n,j], ∂shift = −∂b W
  (one (F,) vector: no (N, d) gradient for x − shift when x needs none). The encoder's weight gradient is
  one CSR (F × N) @ x (N × d) product over the N·k selected pairs.
* `sparse_decode(idx, values, W_dec)` = Σ_j values[n,j]·W_dec[idx[n,j]]: one CSR product on CPU
  (`embedding_bag` elsewhere), backward over the pairs.
* `pairs` / `pairs_at`: a sparse form's (token, latent) pairs, and x Wᵀ + b computed exactly at them (SDDMM).
* `count_true(mask, dim)`: counts of a bool matrix as chunked byte sums (no conversion pass).

All of it gives the same results and gradients as the dense formulas of `reference.py` up to fp32
summation order (tests/dictionaries/test_sparse.py); inside `plain_kernels()` the kernels run those formulas.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import reference
from .reference import densify_with_grad, plain_active


def count_true(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ of a 2-D bool `mask` along `dim` (0 or -1), int32. Counted as bytes in chunks of 128 (a uint8
    sum cannot overflow there), then the chunk counts in int32: one vectorised byte pass, where
    `mask.sum(dim, dtype=torch.int32)` first converts every entry, a far slower pass on CPU."""
    m8 = mask.view(torch.uint8)
    if dim != 0:
        m8 = m8.T  # the last dimension's chunks are read in place below (no transposed copy)
    full = m8.shape[0] - m8.shape[0] % _CHUNK
    counts = m8[full:].sum(0, dtype=torch.int32)
    if full:
        head = m8[:full]
        chunks = head.unflatten(0, (full // _CHUNK, _CHUNK))  # a view in either memory order
        counts += chunks.sum(1, dtype=torch.uint8).sum(0, dtype=torch.int32)
    return counts


_CHUNK = 128


def offsets(counts: torch.Tensor) -> torch.Tensor:
    """CSR offsets (R + 1,) int64 from counts (R,): row r's entries are offsets[r] … offsets[r + 1] − 1."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
    out[1:] = counts.cumsum(0)
    return out


def pairs(idx: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The (token, latent) pairs of a sparse form, flat and grouped by token: (rows, slots, cols, crow),
    crow[n]..crow[n+1] being token n's pairs. With `keep`, only the kept slots (a ragged form: padding
    costs nothing in the kernels); without, all N·m slots in order (slots None: pair p is slot p)."""
    n, m = idx.shape
    if keep is None:
        rows = torch.arange(n, device=idx.device).repeat_interleave(m)
        return rows, None, idx.reshape(-1), torch.arange(0, n * m + 1, m, device=idx.device)
    rows, slots = keep.nonzero(as_tuple=True)  # row-major: grouped by token
    return rows, slots, idx[rows, slots], offsets(keep.sum(-1))


def pairs_at(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor,
              crow: torch.Tensor) -> torch.Tensor:
    """(x Wᵀ + b) at the pairs (rows, cols) (P,), computed exactly in x's dtype: sampled dense-dense
    products (SDDMM) over the pairs (no (P, d) gather of encoder rows). On CPU in blocks of 1,024 rows,
    each as the transposed product (latents × rows, pairs sorted by latent): the rows stay in cache and
    W is read in order, where a row-major SDDMM reads W's rows at random. Each pair's value is one dot
    product of its own two rows, whichever way (bit for bit: it does not depend on the other pairs)."""
    if x.device.type != "cpu":
        dots = _sddmm(crow, cols, x, W)
    else:
        dots = x.new_empty(cols.numel())
        key, F = narrow_int(W.shape[0]), W.shape[0]
        for start in range(0, x.shape[0], _SDDMM_ROWS):
            stop = min(start + _SDDMM_ROWS, x.shape[0])
            lo, hi = int(crow[start]), int(crow[stop])
            if hi == lo:
                continue
            block = cols[lo:hi]
            per_latent = torch.bincount(block, minlength=F)
            if int(per_latent.max()) > stop - start:  # a pair repeated (padding): the row-major form takes it
                dots[lo:hi] = _sddmm(crow[start:stop + 1] - lo, block, x[start:stop], W)
                continue
            order = block.to(key).argsort(stable=True)
            dots[lo:hi][order] = _sddmm(offsets(per_latent), rows[lo:hi][order] - start, W, x[start:stop])
    return dots if b is None else dots + b[cols]


_SDDMM_ROWS = 1024


def _sddmm(crow: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a[i] · c[cols[p]] for the pairs of the CSR pattern (crow, cols) over a's rows (P,)."""
    if a.shape[0] and int((crow[1:] - crow[:-1]).max()) > c.shape[0]:  # torch's CPU SDDMM refuses more pairs than columns in a row
        rows = torch.arange(a.shape[0], device=a.device).repeat_interleave(crow[1:] - crow[:-1])
        return (a @ c.T)[rows, cols]
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), dtype=a.dtype, device=a.device),
                                          (a.shape[0], c.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a, c.T, beta=0.0).values()


def weight_grad(grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Σ_p grad[p] · x[rows[p]] into row cols[p] (P pairs): one CSR (n_rows × N) @ x (N × d) product."""
    order = cols.to(narrow_int(n_rows)).argsort(stable=True)  # the same order; narrow keys sort faster on CPU
    return _csr_mm(offsets(torch.bincount(cols, minlength=n_rows)), rows[order], grad[order], x)


def narrow_int(bound: int) -> torch.dtype:
    """The narrowest integer dtype holding 0 … bound − 1 among int16, int32 and int64."""
    return torch.int16 if bound <= 1 << 15 else torch.int32 if bound <= 1 << 31 else torch.int64


def _csr_mm(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The CSR matrix (crow, cols, values) (R × dense rows) @ `dense`. Written by addmm with β = 0 into a
    fresh buffer (documented to ignore its contents): `S @ dense` would first zero-fill the output and copy
    it, two extra passes."""
    with warnings.catch_warnings():  # "CSR support is in beta": used as documented, as a read-only operand
        warnings.simplefilter("ignore")
        S = torch.sparse_csr_tensor(crow, cols, values, (crow.numel() - 1, dense.shape[0]), check_invariants=False)
        out = dense.new_empty(crow.numel() - 1, dense.shape[1])
        return torch.addmm(out, S, dense, beta=0, out=out)


class _GatherLinear(torch.autograd.Function):
    """(x Wᵀ + b) at P (token, latent) pairs: `known` (P,) when the values are at hand, else computed
    exactly (`pairs_at`); backward over the pairs only."""

    @staticmethod
    def forward(ctx, x, W, b, rows, cols, crow, known):
        ctx.save_for_backward(x, W, rows, cols, crow)
        return pairs_at(x, W, b, rows, cols, crow) if known is None else known

    @staticmethod
    def backward(ctx, grad):
        x, W, rows, cols, crow = ctx.saved_tensors
        grad = grad.contiguous()
        grad_W = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_W = weight_grad(grad.to(x.dtype), rows, cols, x, W.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, W, crow[:-1], per_sample_weights=grad, mode="sum")
        return grad_x, grad_W, grad_b, None, None, None, None


def gather_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                  pair_pre: torch.Tensor | None = None) -> torch.Tensor:
    """((x − shift) Wᵀ + b) at columns idx (N, m), with a sparse backward. The forward values come from
    `pair_pre` (N, m), the same values computed without grad, or from `pre` (N, F), the whole product computed
    without grad; when neither is given or they are in a lower precision than x (a bf16 selection),
    they are computed exactly at the pairs. `shift` (d,) (a dictionary's b_dec) gets its gradient through
    one (F,) vector, −(Σ_n scatter of the value gradients) W, instead of the (N, d) gradient of x − shift,
    which would cost an N·k·d `embedding_bag` pass when x itself needs no gradient (the training
    forward). With `keep` (N, m) only the kept slots are computed (ragged); the others are 0."""
    if plain_active():
        return reference.gather_linear(x, W, b, idx, shift, keep)
    rows, slots, cols, crow = pairs(idx, keep)
    if pair_pre is not None and pair_pre.dtype == x.dtype:
        known = pair_pre.detach().reshape(-1).clone() if keep is None else pair_pre.detach()[rows, slots]
    elif pair_pre is None and pre is not None and pre.dtype == x.dtype:
        known = pre.detach()[rows, cols]
    else:
        known = None
    vector_shift = shift is not None and not x.requires_grad
    x = x if shift is None else x - (shift.detach() if vector_shift else shift)
    flat = _GatherLinear.apply(x, W, b, rows, cols, crow, known)
    if vector_shift:
        h = shift @ W.detach().T  # (F,): zero-valued below, its gradient reaches `shift` only
        flat = flat - gather_1d(h - h.detach(), cols)
    if keep is None:
        return flat.view(idx.shape)
    return flat.new_zeros(idx.shape).index_put((rows, slots), flat)


class _Gather1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, idx):
        ctx.save_for_backward(idx)
        ctx.n, ctx.dtype = v.shape[0], v.dtype
        return v[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        out = torch.zeros(ctx.n, dtype=ctx.dtype, device=grad.device)
        return out.index_add_(0, idx.reshape(-1), grad.reshape(-1).to(ctx.dtype)), None


def gather_1d(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v[idx] for a vector v (F,) and an integer index of any shape, its gradient summed back into v by
    `index_add_` (autograd's indexing backward accumulates through `index_put_`, several times slower on
    CPU). The plain path indexes as autograd does."""
    return v[idx] if plain_active() else _Gather1d.apply(v, idx)


def sparse_decode(idx: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j values[n, j] · W_dec[idx[n, j]] → (N, d); with `keep`, over the kept slots only (ragged bags).
    On CPU one CSR (N × F) @ W_dec product (MKL), backward `weight_grad` and a sampled product
    (`_SparseDecode`, faster than `embedding_bag` there); elsewhere `embedding_bag`."""
    if plain_active():
        return reference.sparse_decode(idx, values, W_dec, keep)
    rows, slots, cols, crow = pairs(idx, keep)
    flat = values.reshape(-1) if keep is None else values[rows, slots]
    if W_dec.device.type == "cpu" and values.dtype == W_dec.dtype and W_dec.dtype in (torch.float32, torch.float64):  # MKL's types
        return _SparseDecode.apply(flat, W_dec, rows, cols, crow)
    return F.embedding_bag(cols, W_dec, crow[:-1], per_sample_weights=flat, mode="sum")


class _SparseDecode(torch.autograd.Function):
    """Σ_p values[p] · W_dec[cols[p]] into row rows[p] (pairs grouped by row, `crow`): forward one CSR @
    dense product; backward ∂W_dec through `weight_grad`, ∂values[p] = grad[rows[p]] · W_dec[cols[p]]
    through `pairs_at`."""

    @staticmethod
    def forward(ctx, values, W_dec, rows, cols, crow):
        ctx.save_for_backward(values, W_dec, rows, cols, crow)
        return _csr_mm(crow, cols, values.detach(), W_dec)

    @staticmethod
    def backward(ctx, grad):
        values, W_dec, rows, cols, crow = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = pairs_at(grad, W_dec, None, rows, cols, crow)
        if ctx.needs_input_grad[1]:
            grad_W = weight_grad(values, rows, cols, grad, W_dec.shape[0])
        return grad_values, grad_W, None, None, None


def densify(idx: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Dense (N, F) codes from the sparse form (no grad)."""
    return densify_with_grad(idx, values.detach(), n_latents)


def mask_to_sparse(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, F) bool mask with a varying count per row → (idx, keep), each (N, m), m = the largest
    count (at least 1): row n's kept columns in order, then padding (column 0, keep False) that
    must be weighted by `keep`. Linear in N·F (no sort): for per-token threshold selections."""
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    idx, keep, _ = pairs_to_sparse(rows, cols, count_true(mask, -1).long())
    return idx, keep


def pairs_to_sparse(rows: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
                    values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pairs in row-major order (rows ascending, `counts` (N,) of them per row) → `mask_to_sparse`'s padded
    form (idx, keep) (N, m), and `values` (one per pair) at the same slots (0 in the padding)."""
    n, device = counts.shape[0], counts.device
    width = max(int(counts.max()) if n else 0, 1)
    slot = torch.arange(rows.numel(), device=device) - (counts.cumsum(0) - counts)[rows]
    idx = torch.zeros(n, width, dtype=torch.long, device=device).index_put_((rows, slot), cols)
    keep = torch.zeros(n, width, dtype=torch.bool, device=device).index_put_((rows, slot), torch.ones((), dtype=torch.bool, device=device))
    at = None if values is None else torch.zeros(n, width, dtype=values.dtype, device=device).index_put_((rows, slot), values)
    return idx, keep, at
