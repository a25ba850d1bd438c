"""What each feature's decoder direction does, from the weights alone: its logit effects and its nearest
neighbours among the dictionary's features.

**Logit effects** (`logit_effects`): the direct path of every feature's unit decoder direction d̂ to the
next-token logits, e = W_U · norm_f(W_out d̂) — the same path as `evaluate.steering.feature_logit_effect`,
for all features in batches, keeping each one's most promoted and most suppressed tokens. What it
approximates, by site kind:

- `resid_pre`, `resid_post`, `mlp_out`, `attn_out` (and a transcoder's output site): d̂ lives in the
  residual stream; the path skips every later block, so it is exact only for the last layer's output
  and a first-order reading elsewhere (the later blocks' reaction to the feature is ignored);
- `mlp_hidden`, `attn_z`: d̂ is first mapped into the residual stream by the projection the site feeds
  (the MLP's down projection, the attention output projection), then as above;
- `mlp_in`: d̂ is a direction after the MLP's input norm, read as if it were a residual direction — a
  rough guide only;
- the final norm is applied to d̂ alone (its scale is the norm's gain on a unit vector, not what the
  residual stream's norm would give).

A model without an output embedding (an encoder such as BERT) has no logit effects (None).

**Neighbours** (`decoder_neighbours`): each feature's most similar other features by cosine of their
decoder rows (signed: a direction and its opposite are not neighbours).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.sites import body_model, parse_site, resolve, unwrap

PROJECTED_KINDS = ("mlp_hidden", "attn_z")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")


@torch.no_grad()
def logit_effects(model: Any, W_dec: Tensor, site: str, top: int = 10, batch: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(pos_ids, pos_values, neg_ids, neg_values), each (F, top): every feature's most promoted and most
    suppressed tokens through the direct path (module docstring), or None without an output embedding."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        return None
    param = next(unwrap(model).parameters())
    proj = resolve(model, site).module if parse_site(site).kind in PROJECTED_KINDS else None
    body = body_model(model)
    norm = next((getattr(body, n) for n in FINAL_NORMS if isinstance(getattr(body, n, None), torch.nn.Module)), None)
    unembed = head.weight.float()
    top = min(top, unembed.shape[0])
    out = [[], [], [], []]
    for start in range(0, W_dec.shape[0], batch):
        rows = W_dec[start:start + batch].detach().float()
        v = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(device=param.device, dtype=param.dtype)
        if proj is not None:
            v = proj(v) - proj(torch.zeros_like(v[:1]))  # the linear part: a bias does not depend on the feature
        if norm is not None:
            v = norm(v)
        logits = v.float() @ unembed.T.to(v.device)
        pos, neg = logits.topk(top, dim=1), (-logits).topk(top, dim=1)
        for lst, t in zip(out, (pos.indices, pos.values, neg.indices, -neg.values)):
            lst.append(t.cpu())
    return tuple(torch.cat(t) for t in out)


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, k: int = 10, batch: int = 1024) -> tuple[Tensor, Tensor]:
    """(ids, cosines), each (F, k): every feature's k most similar other features by decoder cosine."""
    w = W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, w.shape[0] - 1)
    ids, cos = [], []
    for start in range(0, w.shape[0], batch):
        sim = w[start:start + batch] @ w.T
        rows = torch.arange(start, min(start + batch, w.shape[0]))
        sim[torch.arange(len(rows)), rows] = float("-inf")  # not its own neighbour
        best = sim.topk(k, dim=1)
        ids.append(best.indices)
        cos.append(best.values)
    return torch.cat(ids), torch.cat(cos)
