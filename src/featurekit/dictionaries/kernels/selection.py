"""Per-token top-k selections of pre-activations, for the sparse kernels.

* `row_topk(scores, k)`: an exact per-row top-k in two narrow stages (group maxima, then candidates).
* `topk_preact(x, W, b, k, choice=)`: each row's top k of x Wᵀ + b with their values. In fp32 on a CPU with
  fast bf16 it goes through `certified.certified_topk` where the dictionary's `KernelChoice` finds that
  faster (`certified_chosen`): the same selection as an fp32 product.
* `batch_topk_sparse(scores, k)`: BatchTopK's selection (the batch's B·k largest) in sparse form, exactly.
* `masked_topk` / `columns_topk`: each row's top k among a set of latents (the aux-k loss's dead ones),
  from a whole pre-activation matrix or by computing those latents' columns only.
"""

from __future__ import annotations

import math

import torch

from . import certified, gemm, reference
from .certified import certified_topk
from .gemm import autocast_dtype, encoder_preact
from .machine import KernelChoice, cpu_name, fastest
from .reference import plain_active


def topk_preact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool = False,
                choice: KernelChoice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) (N, k), no grad: each row's k largest pre-activations x Wᵀ + b (by |·| when
    `signed`; values keep their sign), the values in the precision of the product (bf16 under a bf16
    autocast). In fp32 on CPU, through `certified_topk` where `choice` finds it faster (`certified_chosen`)."""
    if certified_chosen(choice, "top-k selection", fp32_topk, certified_topk, x, W, b, k, signed):
        return with_width(choice, "topk", certified_topk, x, W, b, k, signed)
    return fp32_topk(x, W, b, k, signed, choice)


def certified_chosen(choice: KernelChoice | None, name: str, fp32, fast, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                     k: int, signed: bool) -> bool:
    """Whether the selection `name` takes its certified bf16 route `fast` rather than `fp32`: only in fp32
    on CPU, for weights of ≥ 2²⁰ entries and 20k < F, and there where `choice` (timing both on the first
    1,024 rows, once per machine) finds it faster for the CPU, torch, shape, k and thread count; the answer
    is kept in the cache's gemm_choice.json beside the GEMM choice. Without a `choice`: fp32."""
    if choice is None:
        return False
    if plain_active() or x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32 or autocast_dtype(x.device) is not None \
            or W.numel() < gemm.PROBE_MIN_WEIGHTS or 4 * certified.CERTIFIED_WIDTH * k >= W.shape[0]:
        choice.note(name, "fp32")
        return False
    key = (f"{cpu_name()} | torch {torch.__version__} | {name} k={k}{' signed' if signed else ''} | "
           f"{W.shape[0]}x{W.shape[1]} | threads {torch.get_num_threads()} | certified v2")
    # timed with its fallback: a certified route that declines (None) after its bf16 product costs both
    choices = {"fp32": lambda *a: fp32(*a, choice), "certified": lambda *a: fast(*a) or fp32(*a, choice)}
    answer = choice.answer(key, choices, lambda: fastest(choices, x[:1024], W, b, k, signed))
    choice.note(name, answer)
    return answer == "certified"


def with_width(choice: KernelChoice, name: str, fast, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool):
    """`fast`(x, W, b, k, signed, width)'s answer without its count of recomputed rows. The width (the groups a
    row may open, 5k at first) is kept in `choice.widths` per selection and shape; it grows by a quarter, up
    to 20k, whenever more than 1 % of a batch's rows were recomputed. The answer does not depend on it."""
    widths, key = choice.widths, (name, W.shape[0], k, signed)
    answer = fast(x, W, b, k, signed, widths.get(key))
    if answer is None:
        return None
    *answer, redone = answer
    if redone > 0.01 * x.shape[0]:  # widen, up to 4× the first width (rows no width certifies stay recomputed)
        first = certified.CERTIFIED_WIDTH * k
        widths[key] = min(4 * first, int(1.25 * (widths.get(key) or first)))
    return tuple(answer)


def fp32_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool,
              choice: KernelChoice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_preact` through the whole product (in its precision) and `row_topk`."""
    with torch.no_grad():
        pre = encoder_preact(x, W, b, choice)
        values, idx = row_topk(pre.abs() if signed else pre, k)
        return (pre.gather(-1, idx) if signed else values), idx


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of `scores` (N, F), unsorted: the same
    values as `torch.topk` (ties at the k-th value may pick other columns of equal value).

    Exact two-stage selection: split each row's columns into F/b groups of b (columns j, j + F/b, …,
    so the group maxima are one vectorised pass) and keep the k groups with the largest maxima. Their
    k maxima are k entries ≥ t, the smallest of them, so every entry of the row's top k is ≥ t and
    lies in one of those groups; a top-k over their k·b entries is the answer. With b ≈ √(F/k) both
    top-ks are ≈ √(F·k) wide instead of F. Falls back to `torch.topk` where no power-of-two b divides F
    usefully, and inside `plain_kernels()`. bf16 scores on CPU are ranked by their bit patterns as int16
    (integer comparisons are faster than bf16 arithmetic there): in order among values ≥ 0, negatives
    below them, so the rows whose k-th is negative are ranked again as bf16."""
    if scores.dtype == torch.bfloat16 and scores.device.type == "cpu" and scores.dim() == 2 and not plain_active():
        keys = scores.view(torch.int16)
        idx = row_topk(keys, k)[1]
        redo = (keys.gather(1, idx).min(-1).values < 0).nonzero().squeeze(1)
        if redo.numel():
            idx[redo] = scores[redo].topk(min(k, scores.shape[-1]), dim=-1, sorted=False).indices
        return scores.gather(1, idx), idx
    n, width = scores.shape[0], scores.shape[-1]
    b = 1 << max(0, round(0.5 * math.log2(max(width / max(k, 1), 1))))
    if plain_active() or scores.dim() != 2 or b < 4 or width % b or width // b < 2 * k:
        return reference.row_topk(scores, k)
    groups = width // b
    best = scores.view(n, b, groups).amax(1).topk(k, dim=-1, sorted=False).indices  # (N, k) group ids
    cols = (best.unsqueeze(-1) + torch.arange(0, width, groups, device=scores.device)).view(n, k * b)
    values, pick = scores.gather(1, cols).topk(k, dim=-1, sorted=False)
    return values, cols.gather(1, pick)


def batch_topk_sparse(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The B·k largest entries of `scores` (B, F), those > 0 kept (so `scores` and ReLU(`scores`) select
    alike), in sparse form, exactly, without a top-k over all B·F entries — or None when the sparse form
    would be wider than F/2 per row.

    Each row's c = min(4k, F) largest scores are candidates (`row_topk`), and t is the B·k-th largest
    candidate: t is at most the true B·k-th largest score (the candidates are a subset), so every pick
    is ≥ t. A row whose c candidates are all ≥ t may own more picks than it offered: those rows alone
    (usually a few) count their entries ≥ t and offer that many candidates. The B·k largest of all
    candidates are then the answer. Only the row top-k touches the whole (B, F) matrix. Returns
    (idx, keep): columns (B, m), m = the largest number kept in a row, and a bool mask of the kept
    slots (score > 0; the rest is padding: other columns, weighed 0).
    """
    rows, width = scores.shape
    total = min(k * rows, scores.numel())
    c = min(4 * k, width)
    cand, cols = row_topk(scores, c)
    top = cand.flatten().topk(total, sorted=False)
    t = top.values.min()
    full = (cand >= t).all(-1).nonzero().flatten() if c < width else cand.new_zeros(0, dtype=torch.long)
    if full.numel():  # rows that may own more picks: offer every entry ≥ t
        wide = int((scores[full] >= t).sum(-1).max())
        more, more_cols = row_topk(scores[full], wide)
        cand = torch.cat([cand, cand.new_full((rows, wide - c), float("-inf"))], 1).index_copy_(0, full, more)
        cols = torch.cat([cols, cols.new_zeros(rows, wide - c)], 1).index_copy_(0, full, more_cols)
        c = wide
        top = cand.flatten().topk(total, sorted=False)
    chosen = torch.zeros(rows * c, dtype=torch.bool, device=cand.device).index_fill_(0, top.indices, True)
    keep = chosen.view(rows, c) & (cand > 0)
    counts = keep.sum(-1)
    m = max(int(counts.max()) if counts.numel() else 0, 1)
    if m > width // 2:
        return None
    order = keep.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[:, :m]  # kept slots first
    return cols.gather(-1, order), keep.gather(-1, order)


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
        sub = encoder_preact(x, W[cols], b[cols])  # no kernel question: the dead count changes every step
        pos = row_topk(sub.abs() if signed else sub, k)[1]
        return cols[pos], sub.gather(-1, pos)
