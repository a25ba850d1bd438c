"""Evaluations that run the model: reconstruction on held-out activations, and the dictionary
spliced into the forward pass (clean vs spliced vs zero-ablated CE, KL).

Splicing replaces the site's activation by the dictionary's reconstruction at the positions the
token mask keeps (by default not position 0, not special tokens and not attention-sink tokens whose
norm exceeds `max_norm_multiple` × the batch median: those are not what the dictionary was trained
on, and the choice is recorded in eval.json). Zero-ablation sets the same positions to zero. CE and
KL are scored at the spliced positions t < T−1 (the prediction of token t+1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from tqdm.auto import tqdm

from ..data.harvest import norm_outliers
from ..dictionaries import Dictionary
from ..errors import FeaturekitError
from ..models.hooks import capture, replace
from ..models.loading import has_lm_head
from . import metrics


@torch.no_grad()
def reconstruction_eval(
    dictionary: Dictionary,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    on_codes: Callable[[torch.Tensor], None] | None = None,
) -> dict:
    """FVU, L0, dead/dense fractions and per-latent density over raw activation batches (n, d).

    A batch may be a pair (x, y): the dictionary reads x and its reconstruction is scored against y
    (transcoders: x the MLP input, y the MLP output; FVU is then the FVU of y).
    `on_codes(codes)` (optional) sees each batch's codes right after they are computed, so a caller
    can gather more statistics without encoding the set a second time."""
    stats = metrics.ReconstructionStats(dictionary.n_latents)
    for batch in batches:
        x, *target = (t.float() for t in (batch if isinstance(batch, (tuple, list)) else (batch,)))
        codes = dictionary.encode(x)
        stats.update(target[0] if target else x, dictionary.reconstruct_from(x, codes), codes)
        if on_codes is not None:
            on_codes(codes)
    return stats.result()


@torch.no_grad()
def splice_eval(
    model: torch.nn.Module,
    dictionary: Dictionary,
    site: str,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    batch_contexts: int = 16,
    progress: bool = True,
    max_norm_multiple: float | None = None,
) -> dict:
    """Clean, spliced and zero-ablated CE, loss recovered and KL(clean ‖ spliced) on `input_ids`."""
    return score_splice(
        model, input_ids, mask, [site],
        spliced=lambda keep: replace(model, site, lambda act: reconstruct_at(act, keep, dictionary)),
        ablated=lambda keep: replace(model, site, lambda act: act.masked_fill(keep[..., None], 0.0)),
        batch_contexts=batch_contexts, progress=progress, max_norm_multiple=max_norm_multiple, desc="splice eval")


@torch.no_grad()
def score_splice(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    read_sites: list[str],
    spliced: Callable[[torch.Tensor], AbstractContextManager],
    ablated: Callable[[torch.Tensor], AbstractContextManager],
    batch_contexts: int = 16,
    progress: bool = True,
    max_norm_multiple: float | None = None,
    desc: str = "splice eval",
) -> dict:
    """The scoring loop every splice evaluation shares (`score_splices` with one variant). Per batch of contexts:
    a clean forward reads `read_sites` (a token that is a norm outlier at any of them is left alone), then
    `spliced(keep)` and `ablated(keep)` (context managers given the kept positions) each wrap one more forward.
    CE and KL(clean ‖ spliced) are summed at the kept positions t < T−1 and averaged at the end.
    A model without a language-model head (an encoder such as BERT) raises FeaturekitError."""
    return score_splices(model, input_ids, mask, read_sites, {"": (spliced, ablated)}, batch_contexts, progress,
                         max_norm_multiple, desc)[""]


Variant = tuple[Callable[[torch.Tensor], AbstractContextManager], Callable[[torch.Tensor], AbstractContextManager]]


@torch.no_grad()
def score_splices(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    read_sites: list[str],
    variants: dict[str, Variant],
    batch_contexts: int = 16,
    progress: bool = True,
    max_norm_multiple: float | None = None,
    desc: str = "splice eval",
) -> dict[str, dict]:
    """`score_splice` for several (spliced, ablated) pairs on the same tokens: one clean forward per batch
    serves every variant, and every variant is scored at the same kept positions. Returns {name: result}."""
    require_lm_head(model, desc)
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    keys = ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_clean_spliced")
    sums = {name: dict.fromkeys(keys, 0.0) for name in variants}
    n_scored = 0
    for start in tqdm(range(0, len(input_ids), batch_contexts), desc=desc, disable=not progress):
        ids = input_ids[start:start + batch_contexts]
        keep = mask[start:start + batch_contexts]
        with capture(model, *read_sites) as seen:
            logits_clean = model(input_ids=ids, use_cache=False).logits
        for site in read_sites:
            keep = keep & ~norm_outliers(seen[site], keep, max_norm_multiple)
        scored = keep[:, :-1]
        ce_clean = float(metrics.token_cross_entropy(logits_clean, ids)[scored].double().sum())
        for name, (spliced, ablated) in variants.items():
            with spliced(keep):
                logits_spliced = model(input_ids=ids, use_cache=False).logits
            with ablated(keep):
                logits_zero = model(input_ids=ids, use_cache=False).logits
            out = sums[name]
            out["ce_clean"] += ce_clean
            for key, logits in (("ce_spliced", logits_spliced), ("ce_zero_ablated", logits_zero)):
                out[key] += float(metrics.token_cross_entropy(logits, ids)[scored].double().sum())
            out["kl_clean_spliced"] += float(metrics.token_kl(logits_clean, logits_spliced)[:, :-1][scored].double().sum())
        n_scored += int(scored.sum())
    if n_scored == 0:
        raise FeaturekitError("no position was left to splice and score (every token is masked out); "
                              "evaluate on more contexts or relax data.exclude_* / data.max_norm_multiple")
    results = {}
    for name, total in sums.items():
        out = {key: value / n_scored for key, value in total.items()}
        out["loss_recovered"] = metrics.loss_recovered(out["ce_clean"], out["ce_spliced"], out["ce_zero_ablated"])
        out["delta_ce"] = out["ce_spliced"] - out["ce_clean"]
        out["splice_tokens"] = n_scored
        results[name] = out
    return results


def require_lm_head(model: torch.nn.Module, what: str = "splice eval") -> None:
    """Raise FeaturekitError unless the model's forward returns next-token logits (models.has_lm_head)."""
    if not has_lm_head(model):
        raise FeaturekitError(
            f"{what} needs next-token logits, but the {type(model).__name__} model has no language-model head "
            "(an encoder loaded through AutoModel returns hidden states): CE, loss recovered and KL cannot be "
            "scored. Check has_lm_head(model) first and skip the splice, or use a causal LM.")


def reconstruct_at(act: torch.Tensor, keep: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
    """`act` with its `keep` positions replaced by the dictionary's reconstruction."""
    out = act.clone()
    out[keep] = dictionary.reconstruct(act[keep].float()).to(act.dtype)
    return out
