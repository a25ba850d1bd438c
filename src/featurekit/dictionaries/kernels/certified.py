"""Exact fp32 top-k selections found through a bf16 product (CPUs with fast bf16: AMX, AVX-512 BF16).

bf16 runs the (N × F × d) encoder GEMM several times faster than fp32 on such CPUs (BENCHMARKS.md), but
its values are rounded. With x̃ = [x, 1], W̃_j = [W_j, b_j] and x̂, Ŵ_j their bf16 roundings,
the GEMM accumulates x̂·Ŵ_j in fp32 to q_j and rounds it to p̂_j. Then |q_j − p̂_j| ≤ r|p̂_j|,
r = 2u/(1 − 2u) (u = 2⁻⁸; truncation included), and q_j lies within

    M = ‖x̂ − x̃‖·max‖Ŵ‖ + ‖x̃‖·max‖Ŵ − W̃‖ + γ(‖x̂‖·max‖Ŵ‖ + ‖x̃‖·max‖W̃‖)

of the fp32 value an SDDMM computes for the pair (Cauchy–Schwarz on the operands' actual rounding
errors, measured per row and per column; γ = (d + 1)·2⁻²⁴/(1 − (d + 1)·2⁻²⁴) for fp32 accumulation in any
order, once for each product). So from a value L with enough entries p̂ ≥ L, the exact values that
matter are ≥ the floor L − r|L| − M, and an entry can only reach the floor if p̂ ≥ t, the inverse of
p ↦ p + r|p| + M at the floor. The columns are split into groups (column j in group j mod G); only the
groups whose maximum is ≥ t are opened, only their entries ≥ t get exact fp32 values (one SDDMM over
those pairs), and the selection is made among those. The comparisons run on the bf16 bit patterns as
int16 (faster than bf16 arithmetic on CPU), in order for t > 0. The assumption: the bf16 GEMM
accumulates in fp32 (MKL, oneDNN and torch's fallbacks do).

* `certified_topk(x, W, b, k)`: each row's top k (L: the k-th largest maximum of groups of groups).
* `certified_batch_topk(x, W, b, k)`: the batch's B·k largest positive entries (BatchTopK; L: the B·k-th
  largest of those maxima over the batch).
* `certified_above(x, W, b, cut, budget)`: a superset of the entries above a per-column cut (JumpReLU's live
  pairs), whose exact values the caller computes.

Rows with too many opened groups (`width`), and rows where t ≤ 0 or the floor is not finite, are
recomputed with an fp32 product of those rows. Both give the selection of an fp32 evaluation of every
entry, with the SDDMM's values (tests/train/test_fast_paths.py checks them against float64).
"""

from __future__ import annotations

import math

import torch

from .sparse import count_true, narrow_int, offsets, pairs, pairs_at, pairs_to_sparse

#: bf16's unit roundoff (8 significant bits, round to nearest) and fp32's
_U16, _U32 = 2.0**-8, 2.0**-24
#: the result's rounding to bf16, truncation included (+ 10⁻⁴ for the bound's own fp32 arithmetic)
_REL = 2 * _U16 / (1 - 2 * _U16) * (1 + 1e-4)
#: the first width (the most groups a row may open before it is recomputed), in multiples of k; it also
#: sets the group size
CERTIFIED_WIDTH = 5


def certified_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool = False,
                   width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The exact fp32 top-k of x Wᵀ + b per row (by |·| when `signed`; values keep their sign). The k-th
    largest maximum of groups of groups is a value L with k entries ≥ L, so the row's k-th exact value is
    ≥ the floor (module docstring); the k largest exact values among the entries that can reach it are the
    row's top k. Returns (values fp32 (N, k), indices (N, k) in increasing order, rows recomputed)."""
    F = W.shape[0]
    with torch.no_grad():
        product = _Bf16Product(x, W, b, k, signed)
        kth_key = product.supergroup_maxima().topk(k, dim=-1, sorted=False).values.min(-1).values
        kth = kth_key.view(torch.bfloat16).float()  # L; right where ≥ 0 (kth_key ≥ 0)
        floor = kth - _REL * kth.abs() - product.margin  # the k entries' fp32 values are ≥ this
        t = _reach(floor, product.margin)
        bad = (kth_key < 0) | ~(t > 0) | ~torch.isfinite(floor)  # negative keys are out of order
        rows, cols, bad = product.candidates(t, bad, width)
        del product  # the (N, F) keys
        n = x.shape[0]
        counts = torch.bincount(rows, minlength=n)
        crow = offsets(counts)
        exact = pairs_at(x, W, b, rows, cols, crow)
        # each row's candidates in a table (N, m) of slots, padding -inf (a recomputed row has none)
        m = max(int(counts.max()) if n else 0, k)
        slot = torch.arange(rows.numel(), device=x.device) - crow[rows]
        ranked = torch.full((n, m), float("-inf"), device=x.device).index_put_((rows, slot), exact.abs() if signed else exact)
        pick = ranked.topk(k, dim=-1, sorted=False).indices
        # the k picked slots of each row in increasing order, which is column order (the candidates' order):
        # a mask read back by nonzero, not a sort
        ordered = torch.zeros(n, m, dtype=torch.bool, device=x.device).scatter_(1, pick, True).nonzero()[:, 1].view(n, k)
        at = (crow[:-1, None] + ordered).clamp_(max=max(rows.numel() - 1, 0))  # recomputed rows: any pair, replaced below
        idx, values = (cols[at], exact[at]) if rows.numel() else (ordered, torch.zeros(n, k, device=x.device))
        redo = bad.nonzero().squeeze(1)
        if redo.numel():  # selected by an fp32 product; valued by the same SDDMM as the certified rows (a pair's
            pre = torch.addmm(b, x[redo], W.T)  # SDDMM value does not depend on the other pairs: bit for bit)
            redo_idx = (pre.abs() if signed else pre).topk(k, dim=-1, sorted=False).indices.to(narrow_int(F)).sort(dim=-1).values.long()
            redo_rows, _, redo_cols, redo_crow = pairs(redo_idx, None)
            idx[redo] = redo_idx
            values[redo] = pairs_at(x[redo], W, b, redo_rows, redo_cols, redo_crow).view(-1, k)
        # one canonical form whichever way a row went and whatever the width: columns in increasing order, so
        # a resumed run (whose width starts afresh) repeats an uninterrupted one bit for bit
        return values, idx, int(redo.numel())


def certified_batch_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool = False,
                         width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """BatchTopK's selection of x Wᵀ + b, exactly as in fp32: the B·k largest entries of the batch (B = N
    rows; by |·| when `signed`), those > 0 kept. The B·k-th largest supergroup maximum of the batch is a
    value L with B·k entries ≥ L, so the batch's B·k-th exact value is ≥ L − r|L| − max_rows M; each row
    offers its entries that can reach that floor, with exact values, and the B·k largest of all offers are
    the answer. Rows that open more than `width` groups, or whose threshold is ≤ 0, offer every entry that can
    reach the floor from an fp32 product of the row. Returns (idx, keep, values, rows recomputed): each row's
    kept columns in increasing order (N, m), padded (column 0, keep False, value 0), m the most any row keeps;
    or None where L is not > 0, the floor is not finite, or a row would keep more than half of the latents
    (the caller's fp32 route)."""
    n, F = x.shape[0], W.shape[0]
    total = min(k * n, n * F)
    with torch.no_grad():
        product = _Bf16Product(x, W, b, k, signed)
        top = product.supergroup_maxima().reshape(-1)
        if n == 0 or top.numel() < total:
            return None
        cut_key = top.kthvalue(top.numel() - total + 1).values  # the B·k-th largest
        if int(cut_key) < 0:
            return None
        cut = cut_key.view(torch.bfloat16).float()
        floor = cut - _REL * cut.abs() - product.margin.max()  # the batch's B·k-th exact value is ≥ this
        if not bool(torch.isfinite(floor)):
            return None
        t = _reach(floor, product.margin)  # rows with t ≤ 0 (a wide margin: negative keys out of order) are recomputed
        rows, cols, bad = product.candidates(t, ~(t > 0), width)
        margin = product.margin
        del product  # the (N, F) keys
        redo = bad.nonzero().squeeze(1)
        if redo.numel():  # every entry of these rows that can reach the floor, from an fp32 product (wider by M: exact)
            pre = torch.addmm(b, x[redo], W.T)
            more_rows, more_cols = ((pre.abs() if signed else pre) >= floor - margin[redo, None]).nonzero(as_tuple=True)
            rows, cols = torch.cat([rows, redo[more_rows]]), torch.cat([cols, more_cols])
            order = rows.to(narrow_int(n)).argsort(stable=True)  # grouped by row again, each row in column order
            rows, cols = rows[order], cols[order]
        crow = offsets(torch.bincount(rows, minlength=n))
        exact = pairs_at(x, W, b, rows, cols, crow)
        score = exact.abs() if signed else exact
        chosen = torch.zeros(cols.numel(), dtype=torch.bool, device=x.device)
        chosen[score.topk(min(total, score.numel()), sorted=False).indices] = True
        chosen &= score > 0  # zeros are never kept
        rows, cols, exact = rows[chosen], cols[chosen], exact[chosen]  # still grouped by row, in column order
        counts = torch.bincount(rows, minlength=n)
        if int(counts.max()) > F // 2:
            return None
        idx, kept, values = pairs_to_sparse(rows, cols, counts, exact)
        return idx, kept, values, int(redo.numel())


def certified_above(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, cut: torch.Tensor, budget: int) -> torch.Tensor | None:
    """(N, F) bool: a superset of the entries of x Wᵀ + b whose fp32 value exceeds their column's `cut` (F,)
    (JumpReLU's live pairs: firing or in the kernel window). An entry's fp32 value is ≤ p̂ + r|p̂| + M
    (module docstring), so with the batch's largest bound M every entry with p̂ ≥ t_j, the inverse at cut_j,
    is in the set. The comparison runs on the bf16 bit patterns as int16, made monotone for negative values
    too (their magnitude bits flipped), so cuts of either sign work. Done in blocks of rows; None (the caller's
    fp32 route) as soon as more than `budget` entries are in the set, or more than 1.25 × the budget's share of
    the rows done so far (a dense batch declines after its first block: little bf16 work wasted)."""
    n, d = x.shape
    with torch.no_grad():
        Wa, W_stats = _bf16_weights(W, b)
        out = torch.empty(n, W.shape[0], dtype=torch.bool, device=x.device)
        total = 0
        starts = [0, *range(min(_FIRST_ROWS, n), n, _ROWS)] if n else []  # a small first block: a dense batch declines cheaply
        for start, end in zip(starts, [*starts[1:], n]):
            rows = slice(start, end)
            xa = torch.empty(x[rows].shape[0], d + 1, dtype=torch.bfloat16, device=x.device)
            xa[:, :d] = x[rows]
            xa[:, d] = 1
            t = _reach(cut, _bf16_margin(x[rows], xa, W_stats).max())
            t_low = t.to(torch.bfloat16)  # then one bf16 step down where rounding went up: a key ≤ t's
            up = (t_low.float() > t).to(torch.int16)
            t_key = _monotone(t_low.view(torch.int16).clone()) - up
            keys = _monotone(torch.mm(xa, Wa.T).view(torch.int16))
            torch.ge(keys, t_key, out=out[rows])
            total += int(count_true(out[rows], -1).sum())
            if total > budget or total > 1.25 * budget * end / n:
                return None
        return out


def _monotone(keys: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as int16 → int16 keys in the order of the values, negatives included (a negative
    value's magnitude bits flipped; −0 sorts just below +0). In place."""
    return keys.bitwise_xor_(keys.bitwise_right_shift(15).bitwise_and_(0x7FFF))


#: rows per block in `certified_above` (its int16 keys live one block at a time), and in its first block
_ROWS, _FIRST_ROWS = 1024, 128


class _Bf16Product:
    """x Wᵀ + b through bf16 for one batch: the int16 keys of p̂ (|p̂| when `signed`) in groups of `size`
    consecutive columns, their maxima and each row's bound M (`margin`). The weights' bf16 copy is permuted
    so that group g's members lie `groups` apart in the product (key column s·groups + g holds column
    g·size + s): the group maxima are one vectorised pass, and the candidates come out in column order."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool):
        n, d = x.shape
        F = W.shape[0]
        size = 1 << max(0, round(0.5 * math.log2(max(F / (CERTIFIED_WIDTH * k), 1))))  # columns per group
        self.size = size if F % size == 0 and F // size > k else 1
        self.groups, self.k = F // self.size, k
        xa = torch.empty(n, d + 1, dtype=torch.bfloat16, device=x.device)  # [x, 1] in bf16
        xa[:, :d] = x
        xa[:, d] = 1
        Wa, W_stats = _bf16_weights(W, b, self.size)
        keys = torch.mm(xa, Wa.T).view(torch.int16)  # int16 order = value order among values ≥ 0, negatives below
        keys = keys & 0x7FFF if signed else keys  # |p̂|: the sign bit cleared
        self.grouped = keys.view(n, self.size, self.groups)  # [row, s, g]: column g·size + s
        self.maxima = self.grouped.amax(1) if self.size > 1 else keys
        self.margin = _bf16_margin(x, xa, W_stats)

    def supergroup_maxima(self) -> torch.Tensor:
        """(N, S) maxima of groups of groups (group g in supergroup g mod S, S ≥ 8k where the groups allow):
        distinct entries, so the k largest of a row are k entries ≥ the k-th of them."""
        sup = self.groups
        while sup % 2 == 0 and sup // 2 >= 8 * self.k:
            sup //= 2
        return self.maxima.view(self.maxima.shape[0], self.groups // sup, sup).amax(1) if sup < self.groups else self.maxima

    def candidates(self, t: torch.Tensor, bad: torch.Tensor, width: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's columns whose p̂ ≥ t (N,), from the groups that hold one, as pairs (rows, cols) grouped by
        row and in column order within a row (a group's members are consecutive columns), and `bad` with the
        rows that open more than `width` groups (default 5k) added; bad rows offer none. Pairs, not padded
        tables: nonzero over the groups, then over the opened groups' members."""
        n, size, groups = self.grouped.shape
        width = min(max(width or CERTIFIED_WIDTH * self.k, self.k), groups)
        t_low = t.to(torch.bfloat16)  # rounded down to a bf16 value ≤ t (a wider set is still exact)
        t_key = t_low.view(torch.int16) - (t_low.float() > t).to(torch.int16)
        live = self.maxima >= t_key[:, None]
        if width < groups:
            bad = bad | (count_true(live, -1) > width)
        if bad.any():
            live[bad] = False
        rows, group = live.nonzero(as_tuple=True)
        pair, member = (self.grouped[rows, :, group] >= t_key[rows, None]).nonzero(as_tuple=True)  # (opened, size)
        return rows[pair], group[pair] * size + member, bad


def _reach(floor: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """t with p̂ + r|p̂| + M ≥ floor ⟺ p̂ ≥ t (the inverse of an increasing map), taken a little low."""
    t = floor - margin
    t = torch.where(t >= 0, t / (1 + _REL), t / (1 - _REL))
    return t - 1e-6 * t.abs() - 1e-30


def _bf16_weights(W: torch.Tensor, b: torch.Tensor, size: int = 1) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[W, b] in bf16 (F, d + 1), its rows permuted for groups of `size` (row g·size + s at s·(F / size) + g;
    `size` divides F), and over its rows the largest ‖Ŵ_j − W̃_j‖, ‖W̃_j‖ and ‖Ŵ_j‖ (W̃ = [W, b], Ŵ its bf16
    rounding). Done in blocks of ≥ 256 rows that stay in cache: as whole-matrix passes the conversions,
    difference and norms would read W from memory 5 times."""
    F, d = W.shape
    groups = F // size
    norm = torch.linalg.vector_norm
    Wa = torch.empty(F, d + 1, dtype=torch.bfloat16, device=W.device)
    permuted = Wa.view(size, groups, d + 1)  # [s, g]: row g·size + s of W
    permuted[:, :, d] = b.view(groups, size).T
    b_low = Wa[:, d].float()
    err, exact, rounded = (torch.empty(F, device=W.device) for _ in range(3))
    step = max(_BLOCK, size)  # whole groups per block (both powers of two)
    for start in range(0, F, step):
        block = slice(start, start + step)
        source = W[block].view(-1, size, d).transpose(0, 1)  # [s, g] of this block's groups
        target = permuted[:, start // size:(start + step) // size, :d]
        target.copy_(source)
        low = target.float()
        rounded[block] = norm(low, dim=2).T.reshape(-1)
        err[block] = norm(low.sub_(source), dim=2).T.reshape(-1)
        exact[block] = norm(W[block], dim=1)
    b_err = (b_low.view(size, groups).T.reshape(-1) - b).square_()
    return Wa, (err.square_().add_(b_err).max().sqrt(), exact.square_().add_(b.square()).max().sqrt(),
                rounded.square_().add_(b_low.square_()).max().sqrt())


_BLOCK = 256


def _bf16_margin(x: torch.Tensor, xa: torch.Tensor, W_stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per row, M: how far the fp32 accumulation of [x, 1]·[W_j, b_j] in bf16 operands (xa, and the weights
    whose `_bf16_weights` statistics are W_stats) can lie from the fp32 SDDMM value of any column j. The
    operands' rounding errors are exact in fp32 (a value minus its bf16 rounding); + the flush of subnormal
    operands and results to 0, slack for this bound's own fp32 arithmetic, and inf (no bound) for weights
    so small that their fp32 norms may underflow."""
    d = x.shape[1]
    norm = torch.linalg.vector_norm
    W_err, W_norm, Wh_norm = W_stats
    if not W_norm >= _TINY:  # fp32 norms of weights this small underflow: no bound (every row recomputed)
        return torch.full((x.shape[0],), float("inf"), device=x.device)
    xh = xa.float()
    xh_norm = norm(xh, dim=1)
    x_err = norm(xh[:, :d].sub_(x), dim=1)  # the appended 1 is exact
    x_norm = norm(x, dim=1).square_().add_(1).sqrt_()
    gamma = (d + 1) * _U32 / (1 - (d + 1) * _U32)
    # bf16 units may flush subnormal operands and results to 0: ≤ 2⁻¹²⁶ each, in every product and the result
    flush = math.sqrt(d + 1) * 2.0**-126 * (xh_norm + Wh_norm) + 2.0**-126
    slack = 1 + 1e-4 + 4 * (d + 1) * _U32  # the fp32 rounding of the norms and of this sum
    return (x_err * Wh_norm + x_norm * W_err + gamma * (xh_norm * Wh_norm + x_norm * W_norm) + flush) * slack + 1e-30


#: below this largest weight row norm the fp32 norms of `_bf16_weights` may underflow (squares < 2⁻¹²⁶)
_TINY = 2.0**-40
