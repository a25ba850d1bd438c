"""How sparse can a model's own MLP be made? A top-k of the MLP neurons at inference, and its loss cost.

At each chosen layer L the site `mlp_hidden.L` (the neurons: the input of the MLP's down/output
projection) of every masked-in token is replaced by rule(a, k), a the token's n neuron values.
Rules (pure operators of `dictionaries.operators`):

    abs_topk                the k largest |a| with their sign (exact; the natural rule for gated
                            or GELU MLPs, whose neurons are signed)
    topk                    the k largest a (Li et al. 2023, "The Lazy Neuron Phenomenon": Top-k of
                            the activation map; for a ReLU MLP it equals abs_topk)
    statistical             Spark's statistical top-k on |a| (You et al. 2025): keep |a| > mean + c·std
                            of the token's |a|, c = Φ⁻¹(1 − k/n) — no sort; ≈ k kept only if |a| looks Gaussian
    statistical_calibrated  the same with c = `calibrated_multiplier` of the batch's clean |a| at that
                            layer (ours: the heavy-tail calibration), so ≈ k kept on average

Masking and scoring follow `splice_eval`: tokens outside `mask` (position 0, special tokens) and,
with `max_norm_multiple`, tokens whose neuron norm at any chosen layer exceeds that multiple of the
batch median are left alone; CE and KL(clean ‖ sparsified) are averaged over the masked-in
positions t < T−1 (the prediction of token t+1). Zero-ablating the same neurons gives CE_zero and

    loss_recovered = (CE_zero − CE_k) / (CE_zero − CE_clean)      (1 = no cost, 0 = as bad as no MLP)

`l0` is the mean number of non-zero neurons per transformed token and layer after the rule (the
statistical rules hit k only on average); `l0_clean` is the same count before it.

`featurekit mlp-sparsity` (`featurekit.bench.mlp_sparsity`) runs this on held-out contexts of a text source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.harvest import norm_outliers
from ..dictionaries import operators
from ..errors import FeaturekitError
from ..models.hooks import capture, transform
from ..models.sites import n_layers, site_dim, unwrap
from . import metrics

RULES = ("abs_topk", "topk", "statistical", "statistical_calibrated")
DEFAULT_RULES = ("abs_topk", "statistical", "statistical_calibrated")


def sparsify(act: torch.Tensor, rule: str, k: int, multiplier: float | None = None) -> torch.Tensor:
    """rule(act, k) on the last axis (see the module docstring); `multiplier` is c for the statistical rules."""
    if rule == "abs_topk":
        return operators.abs_topk(act, k)
    if rule == "topk":
        return operators.lazy_topk(act, k)
    if rule in ("statistical", "statistical_calibrated"):
        return operators.statistical_topk(act, k, multiplier, signed=True)
    raise FeaturekitError(f"unknown MLP sparsity rule {rule!r}; choose from {list(RULES)}")


@torch.no_grad()
def mlp_sparsity_eval(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    layers: Sequence[int],
    ks: Sequence[int],
    rules: Sequence[str] = DEFAULT_RULES,
    batch_contexts: int = 8,
    max_norm_multiple: float | None = None,
    progress: bool = True,
) -> dict:
    """Clean and zero-ablated CE, then per (rule, k): CE, ΔCE, KL(clean ‖ sparsified), loss recovered
    and l0, with the MLP neurons of all `layers` sparsified together. Returns a dict with `rows`."""
    model = unwrap(model)
    bad = [r for r in rules if r not in RULES]
    if bad or not rules:
        raise FeaturekitError(f"unknown MLP sparsity rule(s) {bad}; choose from {list(RULES)}")
    if not layers or any(not 0 <= layer < n_layers(model) for layer in layers):
        raise FeaturekitError(f"layers must be a non-empty list of block indices in 0..{n_layers(model) - 1}, got {list(layers)}")
    sites = [f"mlp_hidden.{layer}" for layer in sorted(set(layers))]
    width = site_dim(model, sites[0])
    if not ks or any(k <= 0 for k in ks):
        raise FeaturekitError(f"ks must be positive neuron counts (at most {width} are kept), got {list(ks)}")
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    cases = [(rule, k) for rule in rules for k in ks]
    sums = {case: {"ce": 0.0, "kl": 0.0, "nonzero": 0} for case in cases}
    ce_clean = ce_zero = 0.0
    n_scored = n_transformed = nonzero_clean = 0

    for start in tqdm(range(0, len(input_ids), batch_contexts), desc="mlp sparsity", disable=not progress):
        ids, keep = input_ids[start:start + batch_contexts], mask[start:start + batch_contexts]
        with capture(model, *sites) as seen:
            logits_clean = model(input_ids=ids, use_cache=False).logits
        for site in sites:
            keep = keep & ~norm_outliers(seen[site], keep, max_norm_multiple)
        if not keep.any():
            continue
        scored = keep[:, :-1]
        n_scored += int(scored.sum())
        n_transformed += int(keep.sum()) * len(sites)
        nonzero_clean += sum(int((seen[site][keep] != 0).sum()) for site in sites)
        ce_clean += _ce_sum(logits_clean, ids, scored)
        with transform(model, {site: (lambda a, keep=keep: a.masked_fill(keep[..., None], 0.0)) for site in sites}):
            ce_zero += _ce_sum(model(input_ids=ids, use_cache=False).logits, ids, scored)
        for rule, k in cases:
            counter = [0]
            fns = {}
            for site in sites:
                c = operators.calibrated_multiplier(seen[site][keep].abs(), k) if rule == "statistical_calibrated" else None
                fns[site] = _at_positions(keep, lambda a, rule=rule, k=k, c=c: sparsify(a, rule, k, c), counter)
            with transform(model, fns):
                logits = model(input_ids=ids, use_cache=False).logits
            sums[(rule, k)]["ce"] += _ce_sum(logits, ids, scored)
            sums[(rule, k)]["kl"] += float(metrics.token_kl(logits_clean, logits)[:, :-1][scored].double().sum())
            sums[(rule, k)]["nonzero"] += counter[0]
    if n_scored == 0:
        raise FeaturekitError("no position was left to sparsify and score (every token is masked out); "
                              "use more contexts or relax the token mask / max_norm_multiple")
    ce_clean, ce_zero = ce_clean / n_scored, ce_zero / n_scored
    rows = []
    for (rule, k), s in sums.items():
        ce = s["ce"] / n_scored
        rows.append({"rule": rule, "k": k, "ce": ce, "delta_ce": ce - ce_clean, "kl": s["kl"] / n_scored,
                     "loss_recovered": metrics.loss_recovered(ce_clean, ce, ce_zero), "l0": s["nonzero"] / n_transformed})
    return {"sites": sites, "n_neurons": width, "tokens": n_scored, "ce_clean": ce_clean, "ce_zero_ablated": ce_zero,
            "l0_clean": nonzero_clean / n_transformed, "max_norm_multiple": max_norm_multiple, "rows": rows}


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> float:
    return float(metrics.token_cross_entropy(logits, ids)[scored].double().sum())


Edit = Callable[[torch.Tensor], torch.Tensor]


def _at_positions(keep: torch.Tensor, fn: Edit, counter: list[int]) -> Edit:
    """act ↦ act with fn applied to the rows at `keep` (computed in float32); counts the non-zeros fn leaves."""
    def edit(act: torch.Tensor) -> torch.Tensor:
        new = fn(act[keep].float()).to(act.dtype)
        counter[0] += int((new != 0).sum())
        out = act.clone()
        out[keep] = new
        return out

    return edit

