"""Scoring a frontier point spliced into the model: `CachedSplice` (an SAE at one site, the clean and ablated passes
made once for all points) and `transcoder_splice` (a transcoder's output site replaced by its prediction)."""

from __future__ import annotations

import torch

from ..data.harvest import norm_outliers
from ..errors import FeaturekitError
from ..evaluate import metrics
from ..evaluate.splice import require_lm_head
from ..evaluate.transcoders import transcoder_splice_eval
from ..models.hooks import capture, replace


class CachedSplice:
    """`splice_eval` for many dictionaries of one site: the clean and the zero-ablated passes do not depend on the
    dictionary, so they run once (clean logits kept) and each dictionary costs one spliced forward pass. The same
    numbers as `splice_eval` (tests/test_frontier.py)."""

    @torch.no_grad()
    def __init__(self, model, site: str, ids: torch.Tensor, mask: torch.Tensor, max_norm_multiple: float | None,
                 batch_contexts: int = 16):
        require_lm_head(model, "bench frontier")
        self.model, self.site, self.batches = model, site, []
        self.ce_clean = self.ce_zero = 0.0
        self.n = 0
        for start in range(0, len(ids), batch_contexts):
            b, keep = ids[start:start + batch_contexts], mask[start:start + batch_contexts]
            with capture(model, site) as seen:
                logits = model(input_ids=b, use_cache=False).logits
            keep = keep & ~norm_outliers(seen[site], keep, max_norm_multiple)
            scored = keep[:, :-1]
            with replace(model, site, lambda act, keep=keep: act.masked_fill(keep[..., None], 0.0)):
                zero = model(input_ids=b, use_cache=False).logits
            self.ce_clean += float(metrics.token_cross_entropy(logits, b)[scored].double().sum())
            self.ce_zero += float(metrics.token_cross_entropy(zero, b)[scored].double().sum())
            self.n += int(scored.sum())
            self.batches.append((b, keep, scored, logits))
        if self.n == 0:
            raise FeaturekitError("no position was left to splice and score (every token is masked out)")

    @torch.no_grad()
    def __call__(self, sae) -> dict:
        spliced = kl = 0.0
        for b, keep, scored, clean in self.batches:
            def fn(act: torch.Tensor, keep: torch.Tensor = keep) -> torch.Tensor:
                out = act.clone()
                out[keep] = sae.reconstruct(act[keep].float()).to(act.dtype)
                return out

            with replace(self.model, self.site, fn):
                logits = self.model(input_ids=b, use_cache=False).logits
            spliced += float(metrics.token_cross_entropy(logits, b)[scored].double().sum())
            kl += float(metrics.token_kl(clean, logits)[:, :-1][scored].double().sum())
        out = {"ce_clean": self.ce_clean / self.n, "ce_spliced": spliced / self.n, "ce_zero_ablated": self.ce_zero / self.n,
               "kl_clean_spliced": kl / self.n}
        out["loss_recovered"] = metrics.loss_recovered(out["ce_clean"], out["ce_spliced"], out["ce_zero_ablated"])
        out["delta_ce"] = out["ce_spliced"] - out["ce_clean"]
        out["splice_tokens"] = self.n
        return out


def transcoder_splice(model, sae, site: str, output_site: str, ids, mask, max_norm_multiple: float | None) -> dict:
    """CE / KL with a transcoder's output site replaced by its prediction."""
    out = transcoder_splice_eval(model, [(site, output_site, sae)], ids, mask, 16, progress=False,
                                 max_norm_multiple=max_norm_multiple)
    out.pop("spliced_sites", None)
    return out
