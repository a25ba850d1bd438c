"""Steering with a dictionary feature, and the feature's direct effect on the next-token logits.

`steer(model, dictionary, feature, scale)` is a context in which every forward pass adds
`scale · d̂` to the activation at the dictionary's site (every position unless `positions` is given),
with d̂ = W_dec[feature] / ‖W_dec[feature]‖. This is the SNMF paper's intervention (Shafran et al.
2025; code `intervention/intervener.py`: h ← h + α z/‖z‖ at the MLP hidden activation, all positions);
for residual-stream SAEs it is the usual decoder-direction steering.

`feature_logit_effect(model, dictionary, feature)` is the direct path of d̂ to the logits:

    e = W_U · norm_f(W_out d̂)

W_out is the projection whose input the site is (the MLP down projection for `mlp_hidden.L`, the
attention output projection for `attn_z.L`; other sites already live in the residual stream), norm_f
the model's final norm applied to the lone vector, W_U the unembedding: the SNMF paper's
output-centric vocabulary projection. Later blocks are skipped, so `e` predicts a steering effect best
when the direct path dominates (late layers, or a scale large against the residual stream).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..dictionaries import Dictionary
from ..errors import FeaturekitError
from ..models.hooks import add
from ..models.sites import body_model, parse_site, resolve, unwrap

#: Site kinds that are the input of a projection into the residual stream.
PROJECTED_KINDS = ("mlp_hidden", "attn_z")
#: Attribute names of the final norm on the body model, per family (llama/gemma, gpt2, neox).
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")


def feature_direction(dictionary: Dictionary, feature: int) -> Tensor:
    """The unit-norm decoder row of `feature` (raw activation units at the dictionary's site)."""
    if not 0 <= feature < dictionary.n_latents:
        raise FeaturekitError(f"feature {feature} is out of range: the dictionary has {dictionary.n_latents} features")
    row = dictionary.W_dec[feature].detach().float()
    norm = row.norm()
    if norm == 0:
        raise FeaturekitError(f"feature {feature} has a zero decoder row and no direction to steer with")
    return row / norm


def dictionary_site(dictionary: Dictionary, site: str | None = None) -> str:
    """`site`, or the site recorded in the dictionary's file (`metadata.source.site`)."""
    site = site or getattr(dictionary, "metadata", {}).get("source", {}).get("site")
    if site is None:
        raise FeaturekitError("this dictionary does not record its site (it was not loaded from a file); pass site=, e.g. 'mlp_hidden.6'")
    return site


@contextmanager
def steer(model: Any, dictionary: Dictionary, feature: int, scale: float, site: str | None = None,
          positions: int | slice | Sequence[int] | Tensor | None = None) -> Iterator[Tensor]:
    """Within the context, add `scale` × the feature's unit direction at its site; yields the added direction."""
    direction = feature_direction(dictionary, feature)
    with add(model, dictionary_site(dictionary, site), direction, scale, positions):
        yield direction


@torch.no_grad()
def feature_logit_effect(model: Any, dictionary: Dictionary, feature: int, site: str | None = None) -> Tensor:
    """(vocab,) direct effect of the feature's unit direction on the logits (module docstring), float32."""
    site = dictionary_site(dictionary, site)
    return direction_logit_effect(model, site, feature_direction(dictionary, feature))


@torch.no_grad()
def direction_logit_effect(model: Any, site: str, direction: Tensor) -> Tensor:
    """(vocab,) direct effect of a direction (d,) at `site` on the logits, float32: `feature_logit_effect` for any
    vector (a baseline direction, a difference of means, a principal component)."""
    if direction.ndim != 1:
        raise FeaturekitError(f"a steering direction is one vector (d,), got shape {tuple(direction.shape)}")
    param = next(unwrap(model).parameters())
    v = direction.to(device=param.device, dtype=param.dtype)[None]
    if parse_site(site).kind in PROJECTED_KINDS:
        proj = resolve(model, site).module
        v = proj(v) - proj(torch.zeros_like(v))  # the linear part (a bias would not depend on the feature)
    body = body_model(model)
    norm = next((getattr(body, name) for name in FINAL_NORMS if isinstance(getattr(body, name, None), torch.nn.Module)), None)
    if norm is not None:
        v = norm(v)
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise FeaturekitError("this model has no output embedding (LM head); the logit effect needs a causal LM")
    return (v.float() @ head.weight.float().T)[0]
