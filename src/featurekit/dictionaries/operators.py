"""Sparsity operators: pure functions from pre-activations to codes.

Each takes `pre` of shape (..., F) and returns codes of the same shape. They hold no state and
have property tests of their own (tests/dictionaries/test_operators.py).
"""

from __future__ import annotations

import torch

from .kernels import batch_topk_sparse


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, zero the rest, then ReLU.

    TopK precedes the ReLU (Gao et al. 2024, `TopK.forward`): when fewer than k entries are
    positive, the row has fewer than k non-zeros. Ties at the k-th value are broken by
    `torch.topk` (lowest index first on CPU), so exactly min(k, F) entries are selected.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse form of `topk`: (values after ReLU, indices), each of shape (..., k)."""
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.relu(), indices


def relu(pre: torch.Tensor) -> torch.Tensor:
    """f = max(pre, 0)."""
    return pre.relu()


def _batch_select(pre: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep `pre` where `scores` is among the batch's B·k largest (and positive); zero elsewhere."""
    if pre.ndim != 2:
        raise ValueError(f"batch selection needs a (B, F) batch, got shape {tuple(pre.shape)}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    sparse = batch_topk_sparse(scores, k)
    if sparse is not None:
        idx, keep = sparse
        return torch.zeros_like(pre).scatter_add_(-1, idx, pre.gather(-1, idx) * keep)
    flat = scores.flatten()
    top = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    kept = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top.indices, True) & (flat > 0)
    return pre * kept.view_as(pre)


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK (Bussmann, Leask & Nanda 2024, §2.1): ReLU, then keep the B·k largest entries of
    the whole (B, F) batch and zero the rest. Rows get different numbers of latents; the batch mean
    is exactly k when at least B·k entries are positive (zeros are never kept). Batch-coupled: use
    `threshold` at inference. Uses `batch_topk_sparse` when it is exact, else the full top-k; both
    select the same set (tested against the plain flatten-and-top-k; ties at the cut aside).
    """
    return _batch_select(pre.relu(), pre.relu(), k)


def abs_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """AbsTopK (Zhu, Khalili & Zhu 2025, arXiv 2510.00404): keep each row's k
    largest-magnitude entries WITH their sign (the hard-thresholding operator H_k), zero the rest."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    idx = pre.abs().topk(min(k, pre.shape[-1]), dim=-1, sorted=False).indices
    return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))


def batch_abs_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Batch AbsTopK (the official code's "BatchAbsoluteK"): keep the B·k largest |π| of the batch, signed."""
    return _batch_select(pre, pre.abs(), k)


def mutual_choice(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Mutual Choice (Ayonrinde 2024, arXiv 2411.02124): the sparsity budget M = B·k is allocated
    freely over the batch's token–feature affinities ReLU(π), i.e. the B·k largest entries of the
    (B, F) batch are kept. That is exactly BatchTopK (found concurrently), so this is `batch_topk`."""
    return batch_topk(pre, k)


def feature_choice_mask(scores: torch.Tensor, m: float) -> torch.Tensor:
    """The selection of `feature_choice` as a bool (B, F) mask, for non-negative `scores`.

    Each latent (column) takes its ⌊m⌋ largest tokens; the round(m·F) − ⌊m⌋·F latents whose
    (⌊m⌋+1)-th largest score is highest take one more (ours: so a fractional m spends the budget
    round(m·F) exactly). Zero scores are never kept; m ≥ B keeps every positive entry."""
    if scores.ndim != 2:
        raise ValueError(f"feature choice needs a (B, F) batch, got shape {tuple(scores.shape)}")
    if m <= 0:
        raise ValueError(f"m must be positive, got {m}")
    rows, width = scores.shape
    total = min(round(m * width), rows * width)
    base, extra = divmod(total, width)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if total == 0:
        return mask
    values, tokens = scores.topk(base + (1 if extra else 0), dim=0, sorted=True)
    mask.scatter_(0, tokens[:base], True)
    if extra:
        cols = values[base].topk(extra, sorted=False).indices
        mask[tokens[base, cols], cols] = True
    return mask & (scores > 0)


def feature_choice(pre: torch.Tensor, m: float) -> torch.Tensor:
    """Feature Choice (Ayonrinde 2024, arXiv 2411.02124): each latent chooses the m tokens of the
    batch with the largest affinity ReLU(π) — a column-wise top-m of the (B, F) batch. With
    m = k·B/F the batch mean L0 is k; a token may get any number of latents (or none).
    Fractional m: see `feature_choice_mask`. Batch-coupled: use a per-latent `threshold` at inference."""
    return pre * feature_choice_mask(pre.relu(), m)


def threshold(pre: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Per-token JumpReLU-style rule: f = ReLU(pre) · 1[pre > θ] (θ a scalar or per-latent vector).

    The inference form of batch-coupled rules (BatchTopK, Feature/Mutual Choice): a token's code then does
    not depend on its batch (as BatchTopK's global threshold, Bussmann, Leask & Nanda 2024)."""
    return pre.relu() * (pre > theta)


def abs_threshold(pre: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Signed per-token rule: f = π · 1[|π| > θ] (the inference form of batch AbsTopK)."""
    return pre * (pre.abs() > theta)


def jumprelu(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """JumpReLU_θ(π) = π · H(π − θ), θ per latent (Rajamanoharan et al. 2024). Inference form: no
    straight-through estimator (that lives in `dictionaries/jumprelu.py`)."""
    return pre * (pre > theta)


# -- statistical top-k (Spark Transformer) and the lazy-neuron top-k ----------------------------
#
# Statistical top-k (You et al. 2025, "Spark Transformer", arXiv 2506.06644). Paper: a
# linear-time, sort-free replacement of top-k: per row, θ = mean + c·std of its n entries with
# c = Φ⁻¹(1 − k/n) (Φ the standard normal CDF), so about k entries exceed θ when the row is
# Gaussian; the differentiable form is the soft threshold max(x − θ, 0). The std is the population
# std (÷n), as in the authors' public implementation of the same operator in Gemma 3n
# (transformers `Gemma3nTextMLP._gaussian_topk`). Ours: the hard form ReLU(x)·1[x > θ] (kept values
# are not shrunk, which suits SAEs), the |x| form for signed maps, and the heavy-tail calibration
# `calibrated_multiplier` (c fitted on data instead of the Gaussian quantile; the paper notes the
# Gaussian c keeps ~5× too many entries on Laplace/Student-t rows).


def gaussian_multiplier(k: int, n: int) -> float:
    """c = Φ⁻¹(1 − k/n): the number of standard deviations above the mean that a Gaussian row of n
    entries exceeds about k times. −inf when k ≥ n (keep everything)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return float("-inf") if k >= n else float(torch.special.ndtri(torch.tensor(1.0 - k / n, dtype=torch.float64)))


def statistical_threshold(scores: torch.Tensor, k: int, multiplier: float | torch.Tensor | None = None) -> torch.Tensor:
    """θ = mean + c·std over the last axis (population std), shape (..., 1); c defaults to
    `gaussian_multiplier(k, n)`. Linear in n: no sort, no selection."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16 statistics are too coarse
    c = gaussian_multiplier(k, scores.shape[-1]) if multiplier is None else multiplier
    c = torch.as_tensor(c, dtype=scores.dtype, device=scores.device)
    std, mean = torch.std_mean(scores, dim=-1, keepdim=True, correction=0)
    return (mean + c * std).masked_fill(c == float("-inf"), float("-inf"))  # c = −inf keeps all, even when std = 0


def statistical_topk(pre: torch.Tensor, k: int, multiplier: float | torch.Tensor | None = None, *,
                     soft: bool = False, signed: bool = False) -> torch.Tensor:
    """Statistical top-k: keep the entries above θ = mean + c·std of their row (about k of them).

    hard (default): ReLU(π)·1[π > θ];  soft (the paper's form): max(π − θ, 0).
    signed=True ranks by |π| (θ from the |π| row) and keeps the sign: π·1[|π| > θ], or
    sign(π)·max(|π| − θ, 0) when soft. The count per row varies; it is ≈ k only for Gaussian rows
    unless `multiplier` was calibrated (`calibrated_multiplier`)."""
    scores = pre.abs() if signed else pre
    theta = statistical_threshold(scores, k, multiplier)
    if soft:
        shrunk = (scores - theta).relu().to(pre.dtype)
        return pre.sign() * shrunk if signed else shrunk
    keep = scores > theta
    return pre * keep if signed else pre.relu() * keep


@torch.no_grad()
def calibrated_multiplier(scores: torch.Tensor, k: int) -> float:
    """The heavy-tail calibration (ours): the c for which exactly B·k of the B rows' standardised
    entries z = (s − mean)/std exceed c, i.e. the empirical (1 − k/n) quantile of z pooled over
    the rows, instead of Φ⁻¹(1 − k/n). Rows with the same shape of distribution then keep k on
    average. One selection over the B·n values, done once per calibration (not per token)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    scores = scores.reshape(-1, scores.shape[-1]).float()
    n_total = scores.numel()
    target = k * scores.shape[0]
    if target >= n_total:
        return float("-inf")
    std, mean = torch.std_mean(scores, dim=-1, keepdim=True, correction=0)
    z = ((scores - mean) / std.clamp_min(torch.finfo(scores.dtype).tiny)).flatten()
    below, above = z.kthvalue(n_total - target).values, z.kthvalue(n_total - target + 1).values  # (B·k+1)-th and B·k-th largest
    return float((below + above) / 2)  # midway: rounding in mean + c·std moves an entry across only if the two are within rounding


def lazy_topk(act: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of an activation map (Li et al. 2023, "The Lazy Neuron Phenomenon", arXiv 2210.06313):
    h = TopK_k(σ(π)) — keep the k largest entries of the map AFTER the activation function with
    their values, zero the rest. For σ = ReLU this equals `topk(pre, k)` (Gao et al.'s ReLU after
    TopK; property-tested); for signed maps (GELU, SwiGLU neurons) it keeps the k most positive."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    idx = act.topk(min(k, act.shape[-1]), dim=-1, sorted=False).indices
    return torch.zeros_like(act).scatter(-1, idx, act.gather(-1, idx))


def top_afa_select(pre: torch.Tensor, target: torch.Tensor, row_norms: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-AFA selection (Lee et al. 2025, arXiv 2503.24277; code `TopAFASAE.forward`) in sparse form.

    Per row: a = ReLU(pre), scores s_j = (a_j·‖d_j‖)² (`row_norms` = decoder row norms, default 1),
    sorted descending (stable: ties keep the lower index first); c_t = √(s_(1) + … + s_(t)) is the
    norm of the t largest codes; k* = the smallest t in 1..F minimising |c_t − target|. Returns
    (idx, keep, k*): the first W = max k* columns of the order (..., W), the mask of the kept ones
    (position < k*) and k* (...). The official code overwrites c_F by 10⁴ (a guard); here c_F is the
    true total, which differs only when keeping every latent is closest to the target.
    """
    a = pre.relu().to(torch.promote_types(pre.dtype, torch.float32))
    scores = (a * row_norms.to(a.dtype)).square() if row_norms is not None else a.square()
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    gap = (sorted_scores.cumsum(-1).sqrt() - target.to(a.dtype).unsqueeze(-1)).abs()
    k = gap.argmin(-1) + 1  # argmin returns the first minimum
    width = int(k.max()) if k.numel() else 1
    keep = torch.arange(width, device=pre.device) < k.unsqueeze(-1)
    return order[..., :width], keep, k


def top_afa(pre: torch.Tensor, target: torch.Tensor, row_norms: torch.Tensor | None = None) -> torch.Tensor:
    """top-AFA: keep each row's k* largest ReLU(pre) (k* from `top_afa_select`: the prefix of the
    sorted codes whose norm is closest to `target`, the approximate feature activation ‖x − b_dec‖),
    zero the rest. Per token: no k, no batch coupling."""
    idx, keep, _ = top_afa_select(pre, target, row_norms)
    return torch.zeros_like(pre).scatter(-1, idx, pre.relu().gather(-1, idx) * keep)
