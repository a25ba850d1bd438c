"""Per-token top-k selection of pre-activations, for the sparse kernels of `sparse.py`.

* `row_topk(scores, k)`: an exact per-row top-k in two narrow stages (group maxima, then candidates).
* `topk_preact(x, W, b, k)`: each row's top k of x Wᵀ + b with their values. In fp32 on a CPU with fast
  bf16 it goes through `certified_topk` where a one-time probe finds that faster: a bf16 GEMM, a per-row
  bound on its rounding error (from the operands' actual roundings), exact fp32 values for the entries
  that can reach the top k, an fp32 recomputation of the rare rows with too many of them; the same
  selection as an fp32 product.
* `masked_topk` / `columns_topk`: each row's top k among a set of latents (the aux-k loss's dead ones),
  from a whole pre-activation matrix or by computing those latents' columns only.
"""

from __future__ import annotations

import math

import torch

from . import sparse
from .sparse import (
    _autocast_dtype,
    _cached_choice,
    _cpu_name,
    _fastest,
    _narrow_int,
    _pairs,
    _pairs_at,
    _state,
    count_true,
    encoder_preact,
    mask_to_sparse,
)

#: bf16's unit roundoff (8 significant bits, round to nearest) and fp32's
_U16, _U32 = 2.0**-8, 2.0**-24
#: `certified_topk`'s first width (the most groups a row may open before it is recomputed), in multiples of
#: k; it also sets the group size
CERTIFIED_WIDTH = 5


def certified_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool = False,
                   width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The exact fp32 top-k of x Wᵀ + b per row (by |·| when `signed`), found through a bf16 product.

    bf16 runs the (N × F × d) GEMM several times faster than fp32 on CPUs with bf16 units (AMX: ≈ 1,200
    against ≈ 175 GFLOP/s). With x̃ = [x, 1], W̃_j = [W_j, b_j] and x̂, Ŵ_j their bf16 roundings, the GEMM
    accumulates x̂·Ŵ_j in fp32 to q_j and rounds it to p̂_j. Then |q_j − p̂_j| ≤ r|p̂_j|, r = 2u/(1 − 2u)
    (u = 2⁻⁸; truncation included), and q_j lies within
        M = ‖x̂ − x̃‖·max‖Ŵ‖ + ‖x̃‖·max‖Ŵ − W̃‖ + γ(‖x̂‖·max‖Ŵ‖ + ‖x̃‖·max‖W̃‖)
    of the fp32 value the SDDMM computes (Cauchy–Schwarz on the operands' actual rounding errors, measured
    per row and per column, γ = (d + 1)·2⁻²⁴/(1 − (d + 1)·2⁻²⁴) for fp32 accumulation in any order, once
    for each product). The columns are split into groups as in `row_topk`; the k-th largest maximum of
    groups of groups is a value L with k entries ≥ L, so the row's k-th exact value is ≥ the floor
    L − r|L| − M, and an entry can only reach the floor if p̂ ≥ t, the inverse of p ↦ p + r|p| + M at
    the floor. Only groups whose maximum is ≥ t are opened, only their entries ≥ t get exact fp32 values
    (one SDDMM over those pairs) and the k largest of those are the row's top k. The comparisons run on
    the bf16 bit patterns as int16, in order for t > 0. A row with more than `width` such groups (too
    many near-equal values; default 5k), t ≤ 0 (its top k reaches down to about 0) or a non-finite
    floor is recomputed with an fp32 product of those rows. So the result is the top k of an fp32 evaluation of every entry, like
    the dense path's up to fp32 rounding (tests/train/test_fast_paths.py checks it against float64).
    Returns (values fp32 (N, k), indices (N, k), number of rows recomputed)."""
    n, d = x.shape
    F = W.shape[0]
    size = 1 << max(0, round(0.5 * math.log2(max(F / (CERTIFIED_WIDTH * k), 1))))  # columns per group
    size = size if F % size == 0 and F // size > k else 1
    groups = F // size
    width = min(max(width or CERTIFIED_WIDTH * k, k), groups)
    with torch.no_grad():
        xa = torch.empty(n, d + 1, dtype=torch.bfloat16, device=x.device)  # [x, 1] in bf16
        xa[:, :d] = x
        xa[:, d] = 1
        Wa, W_stats = _bf16_weights(W, b)
        low = torch.mm(xa, Wa.T)
        # compared as int16 bit patterns (≈ 4× faster than bf16 on CPU): their order is the values' order
        # among non-negative values, and every negative one is below them; |p̂| clears the sign bit
        keys = low.view(torch.int16)
        keys = keys & 0x7FFF if signed else keys
        del low
        # column j is in group j mod `groups`, group g in supergroup g mod `sup` (≥ 8k of them): the k largest
        # supergroup maxima are k distinct entries
        grouped = keys.view(n, size, groups)
        maxima = grouped.amax(1) if size > 1 else keys
        sup = groups
        while sup % 2 == 0 and sup // 2 >= 8 * k:
            sup //= 2
        top = maxima.view(n, groups // sup, sup).amax(1) if sup < groups else maxima
        kth_key = top.topk(k, dim=-1, sorted=False).values.min(-1).values
        del top
        kth = kth_key.view(torch.bfloat16).float()  # L; right where ≥ 0 (kth_key ≥ 0)
        margin = _bf16_margin(x, xa, W_stats)
        rel = 2 * _U16 / (1 - 2 * _U16) * (1 + 1e-4)  # the result's rounding to bf16, truncation included
        floor = kth - rel * kth.abs() - margin  # the k entries' fp32 values are ≥ this
        # p̂ + rel|p̂| + margin ≥ floor ⟺ p̂ ≥ t (the inverse of an increasing map), taken a little low (a wider set is still exact)
        t = floor - margin
        t = torch.where(t >= 0, t / (1 + rel), t / (1 - rel))
        t = t - 1e-6 * t.abs() - 1e-30
        # rows whose threshold is not > 0 (negative keys out of order), NaN or Inf go to the fp32 fallback
        bad = (kth_key < 0) | ~(t > 0) | ~torch.isfinite(floor)
        t_low = t.to(torch.bfloat16)  # rounded down to a bf16 value ≤ t (a wider set is still exact)
        t_key = t_low.view(torch.int16) - (t_low.float() > t).to(torch.int16)
        live = maxima >= t_key[:, None]  # the groups holding an entry ≥ t
        del maxima
        if width < groups:
            bad |= count_true(live, -1) > width
        if bad.any():
            live[bad] = False
        group_idx, group_keep = mask_to_sparse(live)
        del live
        opened = group_idx.shape[1]
        cand = grouped.gather(2, group_idx[:, None, :].expand(n, size, opened))  # (n, size, opened) keys
        del keys, grouped
        need = ((cand >= t_key[:, None, None]) & group_keep[:, None, :]).view(n, size * opened)
        del cand
        slot, keep = mask_to_sparse(need)  # each row's candidates (positions in its size × opened block), padded
        if slot.shape[1] < k:  # only recomputed rows can hold fewer than k (or there are no rows at all)
            slot, keep = (torch.nn.functional.pad(t, (0, k - t.shape[1])) for t in (slot, keep))
        table = group_idx.gather(-1, slot % opened) + (slot // opened) * groups  # their columns
        rows, slots, cols, crow = _pairs(table, keep)
        exact = _pairs_at(x, W, b, rows, cols, crow)
        ranked = torch.full(table.shape, float("-inf"), device=x.device).index_put_((rows, slots), exact.abs() if signed else exact)
        pick = ranked.topk(k, dim=-1, sorted=False).indices
        idx = table.gather(-1, pick)
        values = torch.zeros(table.shape, device=x.device).index_put_((rows, slots), exact).gather(-1, pick)
        redo = bad.nonzero().squeeze(1)
        if redo.numel():  # selected by an fp32 product; valued by the same SDDMM as the certified rows (a pair's
            pre = torch.addmm(b, x[redo], W.T)  # SDDMM value does not depend on the other pairs: bit for bit)
            idx[redo] = (pre.abs() if signed else pre).topk(k, dim=-1, sorted=False).indices
            redo_rows, _, redo_cols, redo_crow = _pairs(idx[redo], None)
            values[redo] = _pairs_at(x[redo], W, b, redo_rows, redo_cols, redo_crow).view(-1, k)
        # one canonical form whichever way a row went and whatever the width: columns in increasing order, so
        # a resumed run (whose width starts afresh) repeats an uninterrupted one bit for bit
        idx, order = idx.to(_narrow_int(F)).sort(dim=-1)
        idx = idx.long()
        return values.gather(-1, order), idx, int(redo.numel())


def _bf16_weights(W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[W, b] in bf16 (F, d + 1), and over its rows the largest ‖Ŵ_j − W̃_j‖, ‖W̃_j‖ and ‖Ŵ_j‖ (W̃ = [W, b], Ŵ
    its bf16 rounding). Done in blocks of 256 rows that stay in cache: as whole-matrix passes the
    conversions, difference and norms read W from memory 5 times (117 against 41 ms at 32,768 × 576)."""
    F, d = W.shape
    norm = torch.linalg.vector_norm
    Wa = torch.empty(F, d + 1, dtype=torch.bfloat16, device=W.device)
    Wa[:, d] = b
    b_err = (Wa[:, d].float() - b).square_()
    err, exact, rounded = (torch.empty(F, device=W.device) for _ in range(3))
    for start in range(0, F, _BLOCK):
        block = slice(start, start + _BLOCK)
        Wa[block, :d] = W[block]
        low = Wa[block, :d].float()
        rounded[block] = norm(low, dim=1)
        err[block] = norm(low.sub_(W[block]), dim=1)
        exact[block] = norm(W[block], dim=1)
    b_low = Wa[:, d].float().square_()
    return Wa, (err.square_().add_(b_err).max().sqrt(), exact.square_().add_(b.square()).max().sqrt(),
                rounded.square_().add_(b_low).max().sqrt())


_BLOCK = 256


def _bf16_margin(x: torch.Tensor, xa: torch.Tensor, W_stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per row, M of `certified_topk`: how far the fp32 accumulation of [x, 1]·[W_j, b_j] in bf16 operands
    (xa, and the weights whose `_bf16_weights` statistics are W_stats) can lie from the fp32 SDDMM value
    of any column j. The operands' rounding errors are exact in fp32 (a value minus its bf16 rounding);
    + 10⁻⁴ relative for this bound's own fp32 arithmetic and 10⁻³⁰ for flushed subnormals."""
    d = x.shape[1]
    norm = torch.linalg.vector_norm
    W_err, W_norm, Wh_norm = W_stats
    xh = xa.float()
    xh_norm = norm(xh, dim=1)
    x_err = norm(xh[:, :d].sub_(x), dim=1)  # the appended 1 is exact
    x_norm = norm(x, dim=1).square_().add_(1).sqrt_()
    gamma = (d + 1) * _U32 / (1 - (d + 1) * _U32)
    return (x_err * Wh_norm + x_norm * W_err + gamma * (xh_norm * Wh_norm + x_norm * W_norm)) * (1 + 1e-4) + 1e-30


def topk_preact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) (N, k), no grad: each row's k largest pre-activations x Wᵀ + b (by |·| when
    `signed`; values keep their sign), the values in the precision of the product (bf16 under a bf16
    autocast). In fp32 on CPU, through `certified_topk` where a one-time probe finds it faster for the
    CPU, shape and k (kept in the cache with the GEMM choice); its width (the groups a row may open, 5k at
    first) grows by a quarter, up to 20k, whenever more than 1 % of a batch's rows needed the fp32 fallback."""
    choice = "fp32"
    if not _state["plain"] and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
            and _autocast_dtype(x.device) is None and W.numel() >= sparse.PROBE_MIN_WEIGHTS and 4 * CERTIFIED_WIDTH * k < W.shape[0]:
        choice = _select_choice(x, W, b, k, signed)
    if choice == "certified":
        key = (W.shape[0], k, signed)
        values, idx, redone = certified_topk(x, W, b, k, signed, _state["width"].get(key))
        if redone > 0.01 * x.shape[0]:  # widen, up to 4× the first width (rows no width certifies stay recomputed)
            _state["width"][key] = min(4 * CERTIFIED_WIDTH * k, int(1.25 * (_state["width"].get(key) or CERTIFIED_WIDTH * k)))
        return values, idx
    return _fp32_topk(x, W, b, k, signed)


def _fp32_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_preact` through the whole product (in its precision) and `row_topk`."""
    with torch.no_grad():
        pre = encoder_preact(x, W, b)
        values, idx = row_topk(pre.abs() if signed else pre, k)
        return (pre.gather(-1, idx) if signed else values), idx


def _select_choice(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool) -> str:
    """"fp32" or "certified", by timing both on the first 1,024 rows (`_fastest`); kept in gemm_choice.json."""
    key = (f"{_cpu_name()} | torch {torch.__version__} | top-k selection k={k}{' signed' if signed else ''} | "
           f"{W.shape[0]}x{W.shape[1]} | threads {torch.get_num_threads()} | certified v2")
    choices = {"fp32": _fp32_topk, "certified": certified_topk}
    return _cached_choice(key, choices, lambda: _fastest(choices, x[:1024], W, b, k, signed))


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of `scores` (N, F), unsorted: the same
    values as `torch.topk` (ties at the k-th value may pick other columns of equal value).

    Exact two-stage selection: split each row's columns into F/b groups of b (columns j, j + F/b, …,
    so the group maxima are one vectorised pass) and keep the k groups with the largest maxima. Their
    k maxima are k entries ≥ t, the smallest of them, so every entry of the row's top k is ≥ t and
    lies in one of those groups; a top-k over their k·b entries is the answer. With b ≈ √(F/k) both
    top-ks are ≈ √(F·k) wide instead of F (≈ 1.3–1.6× faster than one `torch.topk` at F = 8,192,
    k = 32–128 on CPU). Falls back to `torch.topk` where no power-of-two b divides F usefully, and
    inside `plain_kernels()`."""
    n, width = scores.shape[0], scores.shape[-1]
    b = 1 << max(0, round(0.5 * math.log2(max(width / max(k, 1), 1))))
    if _state["plain"] or scores.dim() != 2 or b < 4 or width % b or width // b < 2 * k:
        return scores.topk(min(k, width), dim=-1, sorted=False)
    groups = width // b
    best = scores.view(n, b, groups).amax(1).topk(k, dim=-1, sorted=False).indices  # (N, k) group ids
    cols = (best.unsqueeze(-1) + torch.arange(0, width, groups, device=scores.device)).view(n, k * b)
    values, pick = scores.gather(1, cols).topk(k, dim=-1, sorted=False)
    return values, cols.gather(1, pick)


def masked_topk(pre: torch.Tensor, k: int, among: torch.Tensor, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) (N, k) of each row's k largest pre-activations among the latents in `among` (F,)
    bool, ranked by |pre| when `signed` (values keep their sign); no grad."""
    with torch.no_grad():
        masked = (pre.abs() if signed else pre).masked_fill(~among, float("-inf"))
        indices = row_topk(masked, k)[1]
        return indices, pre.detach().gather(-1, indices)


def columns_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, among: torch.Tensor,
                 signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_topk` of x Wᵀ + b without the (N, F) product: only the columns in `among` are computed
    (the aux-k loss's dead latents: the cost follows their number)."""
    with torch.no_grad():
        cols = among.nonzero().squeeze(1)
        sub = encoder_preact(x, W[cols], b[cols], probe=False)  # the dead count changes every step: no probe per count
        pos = row_topk(sub.abs() if signed else sub, k)[1]
        return cols[pos], sub.gather(-1, pos)
