"""Sparse kernels for dictionaries whose codes have k ≪ F non-zeros per token.

The dense path costs four (N × F × d) matmuls per training step beyond the encoder's forward:
the decoder forward, its two backward products and the encoder's weight gradient. With k
non-zeros per row, all four only need N × k × d work:

* `gather_linear(x, W, b, idx, pre, shift, at=)` returns the pre-activations ((x − shift) Wᵀ + b) at `idx`
  (N, k), taken from their already computed values `at` (or from a whole `pre`; no grad), and
  back-propagates sparsely:
  ∂W[idx[n,j]] += g[n,j]·(x[n] − shift), ∂b[idx[n,j]] += g[n,j], ∂shift = −∂b W (one (F,) vector:
  no (N, d) gradient for x − shift when x needs none).
* `row_topk(scores, k)`: an exact per-row top-k in two narrow stages (group maxima, then candidates).
* `topk_preact(x, W, b, k)`: each row's top k of x Wᵀ + b with their values; in fp32 on a CPU with fast
  bf16, through `certified_topk` where a probe finds it faster: a bf16 GEMM, a per-row certificate from
  the bf16 rounding-error bound, exact fp32 values for the candidates, fp32 recomputation of the rows
  that cannot be certified; the same selection as an fp32 product.
* `count_true(mask, dim)`: counts of a bool matrix as chunked byte sums (no conversion pass).
* `sparse_decode(idx, values, W_dec)` = Σ_j values[n,j]·W_dec[idx[n,j]] through `embedding_bag`.

* `encoder_preact(x, W, b)` = x Wᵀ + b without grad, the one (N × F × d) product a step cannot
  avoid: on CPU through MKL or oneDNN, whichever a one-time probe finds faster for the shape (the
  winner depends on the CPU: BENCHMARKS.md), in bf16 under a bf16 autocast (selection in bf16;
  `gather_linear` then recomputes the selected values exactly in fp32 with one sampled dense-dense
  product over the N·k pairs, so only ties near the k-th value can differ).

The encoder's weight gradient is one CSR (F × N) @ x (N × d) product over the N·k selected pairs.
All of it gives the same results and gradients as the dense formulas up to fp32 summation order
(tests/dictionaries/test_sparse.py); `plain_kernels()` switches every kernel to the straightforward
dense autograd formulas, which the tests train against.
"""

from __future__ import annotations

import json
import math
import platform
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .._io import atomic_write_json, cache_dir

_state = {"plain": False, "onednn": None, "gemm": {}, "width": {}}


@contextmanager
def plain_kernels() -> Iterator[None]:
    """Inside, the kernels run the straightforward dense autograd formulas (the reference the fast
    paths are tested against): MKL/addmm encoder, dense gather backward."""
    before = _state["plain"]
    _state["plain"] = True
    try:
        yield
    finally:
        _state["plain"] = before


def plain_active() -> bool:
    """True inside `plain_kernels()`."""
    return _state["plain"]


def _onednn_available() -> bool:
    if _state["onednn"] is None:
        try:
            x, w = torch.randn(4, 8), torch.randn(3, 8)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _state["onednn"] = bool(torch.backends.mkldnn.is_available()) and torch.allclose(out, x @ w.T, atol=1e-5)
        except (RuntimeError, AttributeError):
            _state["onednn"] = False
    return _state["onednn"]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _onednn_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """oneDNN's linear with the bias fused, in `dtype`."""
    x, W, b = x.to(dtype).contiguous(), W.to(dtype), b.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(W, x.shape[0]), b, "none", [], "")


def _mm_bias(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[x, 1] [W, b]ᵀ in `dtype`: the bias rides in the product (addmm would first copy b into every
    row of the (N, F) output, a whole extra pass); the casts happen in the copies into the augmented operands."""
    n, d = x.shape
    xa = torch.empty(n, d + 1, dtype=dtype, device=x.device)
    xa[:, :d] = x
    xa[:, d] = 1
    Wa = torch.empty(W.shape[0], d + 1, dtype=dtype, device=W.device)
    Wa[:, :d] = W
    Wa[:, d] = b
    return torch.mm(xa, Wa.T)


def _fastest(choices: dict, *args, rounds: int = 3) -> str:
    """The name of the fastest function in `choices` on `args`: best of `rounds` timings each, taken in
    turns so that a slow spell of the machine hits every candidate alike (a single timing each picked the
    slower kernel about one time in three on a 2-vCPU VM, whose speed drifts)."""
    best = dict.fromkeys(choices, float("inf"))
    for fn in choices.values():
        fn(*args)  # warm-up (first-call packing, allocation)
    for _ in range(rounds):
        for name, fn in choices.items():
            start = time.perf_counter()
            fn(*args)
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


GEMM_CHOICES = {"mm_bias": _mm_bias, "onednn": _onednn_linear}
#: smaller encoders take `_mm_bias` without a probe (a step is then too short for the kernel to matter)
PROBE_MIN_WEIGHTS = 1 << 20


def _cpu_gemm(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """The faster of the augmented MKL product (`_mm_bias`) and oneDNN's linear for this CPU, torch,
    dtype, shape and thread count: which one wins depends on the CPU (oneDNN ≈ 2× MKL in fp32 on an
    AVX-512 AMD Zen 5; MKL ahead on an AMX Xeon; BENCHMARKS.md). Chosen once by timing both, and the
    choice is kept in the cache folder (`gemm_choice.json`) so that later runs on the machine take the
    same kernel, and a run repeated from its config reproduces its weights bit for bit."""
    if W.numel() < PROBE_MIN_WEIGHTS or not _onednn_available():
        return _mm_bias
    key = f"{_cpu_name()} | torch {torch.__version__} | {dtype} | {W.shape[0]}x{W.shape[1]} | threads {torch.get_num_threads()}"
    return GEMM_CHOICES[_cached_choice(key, GEMM_CHOICES, lambda: _fastest(GEMM_CHOICES, x[:1024], W, b, dtype))]


def _cached_choice(key: str, allowed, probe) -> str:
    """The machine's answer to `key` from cache_dir()/gemm_choice.json, or `probe()`'s, then recorded there
    (the file is read again just before writing: a probe may itself have recorded another answer)."""
    if key not in _state["gemm"]:
        path = cache_dir() / "gemm_choice.json"

        def known() -> dict:
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return {}

        answer = known().get(key)
        if answer not in allowed:
            answer = probe()
            try:
                atomic_write_json(path, {**known(), key: answer})
            except OSError:  # a read-only cache: probe again next time
                pass
        _state["gemm"][key] = answer
    return _state["gemm"][key]


@torch.no_grad()
def encoder_preact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, probe: bool = True) -> torch.Tensor:
    """x Wᵀ + b (N, F), no grad; on CPU through the faster of MKL and oneDNN (`_cpu_gemm`; `probe=False`:
    MKL without a probe, for shapes that change every step), bf16 under a bf16 autocast (then the result
    is bf16)."""
    low = _autocast_dtype(x.device)
    with torch.autocast(x.device.type, enabled=False):
        if _state["plain"]:
            return torch.addmm(b, x, W.T) if x.dim() == 2 else x @ W.T + b
        dtype = low or x.dtype
        if x.dim() == 2 and x.device.type == "cpu":
            return (_cpu_gemm(x, W, b, dtype) if probe else _mm_bias)(x, W, b, dtype)
        x, W, b = x.to(dtype), W.to(dtype), b.to(dtype)
        return torch.addmm(b, x, W.T) if x.dim() == 2 else x @ W.T + b


#: bf16's unit roundoff (8 significant bits, round to nearest) and fp32's
_U16, _U32 = 2.0**-8, 2.0**-24
#: `certified_topk`'s first candidate width, in multiples of k. On d = 576 activations at initialisation
#: (the widest spread of near-equal values) 4k left 4 % (8,192 latents) to 43 % (32,768) of the rows
#: uncertified, 5k 0–3 %, 6k ≤ 0.03 %
CERTIFIED_WIDTH = 5


def certified_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool = False,
                   width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The exact fp32 top-k of x Wᵀ + b per row (by |·| when `signed`), found through a bf16 product.

    bf16 runs the (N × F × d) GEMM several times faster than fp32 on CPUs with bf16 units (AMX: ≈ 1,200
    against ≈ 175 GFLOP/s), but each of its values p̂ may be off by up to 2u|p̂|/(1 − 2u) + c·R (the first
    term the result's rounding to bf16, bounded for truncation as well as rounding to nearest), where
    R = ‖[x, 1]‖·max_j ‖[W_j, b_j]‖ ≥ Σ_i |x_i W_ji| + |b_j| (Cauchy–Schwarz), c = 2u + u² + γ(1 + u)²,
    u = 2⁻⁸ (the operands and the result rounded to bf16) and γ = (d + 1)·2⁻²⁴/(1 − (d + 1)·2⁻²⁴) (fp32
    accumulation in any order). Each row's columns are split into groups (as in `row_topk`) and the
    `width` groups with the largest bf16 maxima are kept: their k largest maxima are k entries whose
    exact values are ≥ a floor (the k-th maximum minus its bound and the fp32 rounding γR), and every
    entry outside the kept groups is ≤ the smallest kept maximum. The kept entries that can reach the
    floor get their values computed exactly in fp32 (one SDDMM over those pairs only) and the k largest
    are the row's top k, provided the certificate holds: the smallest kept maximum plus its bound and γR
    stays below the floor. Rows where it fails (too many near-equal values) are recomputed with an fp32 product of
    those rows. So the result is the top k of an fp32 evaluation of every entry, like the
    dense path's up to fp32 rounding (tests/train/test_fast_paths.py checks it against float64).
    Returns (values fp32 (N, k), indices (N, k), number of rows recomputed)."""
    n, d = x.shape
    F = W.shape[0]
    width = min(max(width or CERTIFIED_WIDTH * k, k), F)
    size = 1 << max(0, round(0.5 * math.log2(max(F / width, 1))))  # columns per group, as in `row_topk`
    size = size if F % size == 0 and F // size > width else 1
    groups = F // size
    with torch.no_grad():
        low = _mm_bias(x, W, b, torch.bfloat16)
        scores = low.abs() if signed else low
        # column j is in group j mod `groups`; keep the `width` groups with the largest maxima
        grouped = scores.view(n, size, groups)
        top = (grouped.amax(1) if size > 1 else scores).topk(width, dim=-1, sorted=False)
        kept = top.indices
        cand = grouped.gather(2, kept[:, None, :].expand(n, size, width))  # (n, size, width), bf16: no index copy
        del low, scores, grouped
        # the k largest kept maxima are k entries ≥ the k-th of them; an entry outside the kept groups is ≤ the
        # smallest kept maximum (or none is outside)
        maxima = top.values.float()
        kth = maxima.topk(k, dim=-1, sorted=False).values.min(-1).values
        outside = maxima.min(-1).values
        w_norm = torch.linalg.vector_norm(W, dim=1)  # no (F, d) temporary
        reach = torch.linalg.vector_norm(x, dim=1).square_().add_(1).sqrt_() * w_norm.square_().add_(b.square()).max().sqrt()
        gamma = (d + 1) * _U32 / (1 - (d + 1) * _U32)
        # (+ 1e-4 relative for the rounding of this bound's own fp32 arithmetic, + flushed subnormals)
        margin = (2 * _U16 + _U16**2 + gamma * (1 + _U16) ** 2 + gamma) * (1 + 1e-4) * reach + 1e-30
        rel = 2 * _U16 / (1 - 2 * _U16) * (1 + 1e-4)  # the result's rounding to bf16, truncation included
        floor = kth - rel * kth.abs() - margin  # the k entries' fp32 values are ≥ this
        if width < groups:
            bad = ~(outside + rel * outside.abs() + margin < floor)  # NaN and Inf fail too
        else:  # every entry is a candidate: nothing to certify
            bad = ~torch.isfinite(floor)
        # exact values only for the kept entries that can reach the floor: p̂ + rel|p̂| + margin ≥ floor, i.e.
        # p̂ ≥ t with t the inverse of the increasing p ↦ p + rel|p| at floor − margin, taken a little low
        # (a wider set is still exact)
        t = floor - margin
        t = torch.where(t >= 0, t / (1 + rel), t / (1 - rel))
        t = t - 1e-6 * t.abs() - 1e-30
        need = (cand >= t[:, None, None]).view(n, size * width)
        rows, slots = need.nonzero(as_tuple=True)  # grouped by row
        cols = kept[rows, slots % width] + (slots // width) * groups
        counts = count_true(need, -1)
        crow = torch.zeros(n + 1, dtype=torch.long, device=x.device)
        crow[1:] = counts.cumsum(0)
        exact = _pairs_at(x, W, b, rows, cols, crow)
        # each row's pairs into an (n, m) table, padded with -inf, then its top k
        m = max(int(counts.max()) if n else 0, k)
        pos = (rows, torch.arange(rows.numel(), device=x.device) - crow[rows])
        ranked = torch.full((n, m), float("-inf"), device=x.device).index_put_(pos, exact.abs() if signed else exact)
        pick = ranked.topk(k, dim=-1, sorted=False).indices
        idx = torch.zeros(n, m, dtype=torch.long, device=x.device).index_put_(pos, cols).gather(-1, pick)
        values = torch.zeros(n, m, device=x.device).index_put_(pos, exact).gather(-1, pick)
        redo = bad.nonzero().squeeze(1)
        if redo.numel():  # selected by an fp32 product; valued by the same SDDMM as the certified rows (a pair's
            pre = torch.addmm(b, x[redo], W.T)  # SDDMM value does not depend on the other pairs: bit for bit)
            idx[redo] = (pre.abs() if signed else pre).topk(k, dim=-1, sorted=False).indices
            values[redo] = _pairs_at(x[redo], W, b, torch.arange(redo.numel(), device=x.device).repeat_interleave(k),
                                     idx[redo].reshape(-1), torch.arange(0, redo.numel() * k + 1, k, device=x.device)).view(-1, k)
        # one canonical form whichever way a row went and whatever the width: columns in increasing order, so
        # a resumed run (whose width starts afresh) repeats an uninterrupted one bit for bit
        idx, order = idx.sort(dim=-1)
        return values.gather(-1, order), idx, int(redo.numel())


def topk_preact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) (N, k), no grad: each row's k largest pre-activations x Wᵀ + b (by |·| when
    `signed`; values keep their sign), the values in the precision of the product (bf16 under a bf16
    autocast). In fp32 on CPU, through `certified_topk` where a one-time probe finds it faster for the
    CPU, shape and k (kept in the cache with the GEMM choice); its candidate width (5k at first) grows
    by a quarter, up to 20k, whenever more than 1 % of a batch's rows needed the fp32 fallback."""
    choice = "fp32"
    if not _state["plain"] and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
            and _autocast_dtype(x.device) is None and W.numel() >= PROBE_MIN_WEIGHTS and 4 * CERTIFIED_WIDTH * k < W.shape[0]:
        choice = _select_choice(x, W, b, k, signed)
    if choice == "certified":
        key = (W.shape[0], k, signed)
        values, idx, redone = certified_topk(x, W, b, k, signed, _state["width"].get(key))
        if redone > 0.01 * x.shape[0]:  # widen, up to 4× the first width (rows no width certifies stay recomputed)
            _state["width"][key] = min(4 * CERTIFIED_WIDTH * k, int(1.25 * (_state["width"].get(key) or CERTIFIED_WIDTH * k)))
        return values, idx
    pre = encoder_preact(x, W, b)
    values, idx = row_topk(pre.abs() if signed else pre, k)
    return (pre.gather(-1, idx) if signed else values), idx


def _fp32_topk(x, W, b, k, signed):
    with torch.no_grad():
        pre = encoder_preact(x, W, b)
        return row_topk(pre.abs() if signed else pre, k)


def _select_choice(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool) -> str:
    """"fp32" or "certified", by timing both on the first 1,024 rows (`_fastest`); kept in gemm_choice.json."""
    key = (f"{_cpu_name()} | torch {torch.__version__} | top-k selection k={k}{' signed' if signed else ''} | "
           f"{W.shape[0]}x{W.shape[1]} | threads {torch.get_num_threads()}")
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


def count_true(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ of a 2-D bool `mask` along `dim` (0 or -1), int32. Counted as bytes in chunks of 128 (a uint8
    sum cannot overflow there), then the chunk counts in int32: one vectorised byte pass. `mask.sum(dim,
    dtype=torch.int32)` converts every entry first; at 4,096 × 8,192 it takes 62–75 ms on CPU against 3–4."""
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


def _pairs(idx: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The (token, latent) pairs of a sparse form, flat and grouped by token: (rows, slots, cols, crow),
    crow[n]..crow[n+1] being token n's pairs. With `keep`, only the kept slots (a ragged form: padding
    costs nothing in the kernels); without, all N·m slots in order (slots None: pair p is slot p)."""
    n, m = idx.shape
    if keep is None:
        rows = torch.arange(n, device=idx.device).repeat_interleave(m)
        return rows, None, idx.reshape(-1), torch.arange(0, n * m + 1, m, device=idx.device)
    rows, slots = keep.nonzero(as_tuple=True)  # row-major: grouped by token
    crow = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    crow[1:] = keep.sum(-1).cumsum(0)
    return rows, slots, idx[rows, slots], crow


def _pairs_at(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              crow: torch.Tensor) -> torch.Tensor:
    """(x Wᵀ + b) at the pairs (rows, cols) (P,), computed exactly in x's dtype: one sampled dense-dense
    product (SDDMM) over the pairs (no (P, d) gather of encoder rows)."""
    if x.shape[0] and int((crow[1:] - crow[:-1]).max()) > W.shape[0]:  # torch's CPU SDDMM refuses more pairs than columns in a row
        return (x @ W.T + b)[rows, cols]
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), dtype=x.dtype, device=x.device),
                                          (x.shape[0], W.shape[0]), check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, x, W.T, beta=0.0).values()
    return dots + b[cols]


def _weight_grad(grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Σ_p grad[p] · x[rows[p]] into row cols[p] (P pairs): one CSR (n_rows × N) @ x (N × d) product."""
    order = cols.argsort(stable=True)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=x.device)
    crow[1:] = torch.bincount(cols, minlength=n_rows).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": used as documented, as a read-only operand
        warnings.simplefilter("ignore")
        S = torch.sparse_csr_tensor(crow, rows[order], grad[order], (n_rows, x.shape[0]), check_invariants=False)
    return S @ x


class _GatherLinear(torch.autograd.Function):
    """(x Wᵀ + b) at P (token, latent) pairs: `known` (P,) when the values are at hand, else computed
    exactly (`_pairs_at`); backward over the pairs only."""

    @staticmethod
    def forward(ctx, x, W, b, rows, cols, crow, known):
        ctx.save_for_backward(x, W, rows, cols, crow)
        return _pairs_at(x, W, b, rows, cols, crow) if known is None else known

    @staticmethod
    def backward(ctx, grad):
        x, W, rows, cols, crow = ctx.saved_tensors
        grad = grad.contiguous()
        grad_W = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_W = _weight_grad(grad.to(x.dtype), rows, cols, x, W.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, W, crow[:-1], per_sample_weights=grad, mode="sum")
        return grad_x, grad_W, grad_b, None, None, None, None


def gather_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None, keep: torch.Tensor | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
    """((x − shift) Wᵀ + b) at columns idx (N, m), with a sparse backward. The forward values come from
    `at` (N, m), the same values computed without grad, or from `pre` (N, F), the whole product computed
    without grad; when neither is given or they are in a lower precision than x (a bf16 selection),
    they are computed exactly at the pairs. `shift` (d,) (a dictionary's b_dec) gets its gradient through
    one (F,) vector, −(Σ_n scatter of the value gradients) W, instead of the (N, d) gradient of x − shift,
    which would cost an N·k·d `embedding_bag` pass when x itself needs no gradient (the training
    forward). With `keep` (N, m) only the kept slots are computed (ragged); the others are 0."""
    if _state["plain"]:
        x = x if shift is None else x - shift
        values = (x @ W.T + b).gather(-1, idx)
        return values if keep is None else values * keep
    rows, slots, cols, crow = _pairs(idx, keep)
    if at is not None and at.dtype == x.dtype:
        known = at.detach().reshape(-1).clone() if keep is None else at.detach()[rows, slots]
    elif at is None and pre is not None and pre.dtype == x.dtype:
        known = pre.detach()[rows, cols]
    else:
        known = None
    vector_shift = shift is not None and not x.requires_grad
    x = x if shift is None else x - (shift.detach() if vector_shift else shift)
    flat = _GatherLinear.apply(x, W, b, rows, cols, crow, known)
    if vector_shift:
        h = shift @ W.detach().T  # (F,): zero-valued below, its gradient reaches `shift` only
        flat = flat - (h - h.detach())[cols]
    if keep is None:
        return flat.view(idx.shape)
    return flat.new_zeros(idx.shape).index_put((rows, slots), flat)


def sparse_decode(idx: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j values[n, j] · W_dec[idx[n, j]] → (N, d); with `keep`, over the kept slots only (ragged bags)."""
    if _state["plain"]:
        return densify_with_grad(idx, values if keep is None else values * keep, W_dec.shape[0]) @ W_dec
    if keep is None:
        return F.embedding_bag(idx, W_dec, per_sample_weights=values, mode="sum")
    rows, slots, cols, crow = _pairs(idx, keep)
    return F.embedding_bag(cols, W_dec, crow[:-1], per_sample_weights=values[rows, slots], mode="sum")


def densify_with_grad(idx: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Dense (N, F) codes from the sparse form, differentiable in `values` (the plain path). Summed, so
    padding slots (value 0, possibly repeating a real column) never overwrite a code."""
    return torch.zeros(idx.shape[0], n_latents, dtype=values.dtype, device=values.device).scatter_add(-1, idx, values)


def densify(idx: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Dense (N, F) codes from the sparse form (no grad)."""
    return densify_with_grad(idx, values.detach(), n_latents)


def mask_to_sparse(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, F) bool mask with a varying count per row → (idx, keep), each (N, m), m = the largest
    count (at least 1): row n's kept columns in order, then padding (column 0, keep False) that
    must be weighted by `keep`. Linear in N·F (no sort): for per-token threshold selections."""
    counts = count_true(mask, -1).long()
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    slot = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    idx = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    keep = torch.zeros(mask.shape[0], width, dtype=torch.bool, device=mask.device)
    idx[rows, slot] = cols
    keep[rows, slot] = True
    return idx, keep
