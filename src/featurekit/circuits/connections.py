"""Input-dependent connections between transcoder features, averaged over examples: mean input × gradient.

For a feature j of the transcoder at layer L and a context where it fires at position t (a feature store
example), in the REAL model (attention, norms and every MLP live), each other transcoder's codes are spliced in
with a straight-through write (`mlp_out.L' + (f − f.detach()) W_dec`: the forward is unchanged, the gradient
reaches f):

    upstream   (transcoder at L' < L)   a(i → j) = Σ_{t' ≤ t} f_i[t'] · ∂π_j[t] / ∂f_i[t']
    downstream (transcoder at L'' > L)  a(j → i) = f_j[t] · Σ_{t'' ≥ t} ∂π_i[t''] / ∂f_j[t]

π = a feature's pre-activation W_enc · mlp_in + b_enc, f = a code. The connection is the mean of a over the
examples (zeros included); the seed paper's input-dependent counterpart of the virtual weight. The downstream
derivative of every reader at every position with respect to one scalar is a Jacobian-vector product, taken
with the double-backward trick (two backward passes per example).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from ..errors import FeaturekitError
from ..models.hooks import replace
from ..models.sites import unwrap

Example = tuple[Sequence[int], int]   # (token ids of the context, position where the feature fires)


def _check(examples: Sequence[Example]) -> None:
    if not examples:
        raise FeaturekitError("no examples: mean input × gradient needs contexts where the feature fires (a feature store)")
    for ids, pos in examples:
        if not 0 <= pos < len(ids):
            raise FeaturekitError(f"example position {pos} is outside its context of {len(ids)} tokens")


def upstream(model: Any, reader: Any, layer: int, feature: int, writers: dict[int, Any],
             examples: Sequence[Example]) -> dict[int, Tensor]:
    """{L': (F_L',) mean input × gradient of each latent of the transcoder at L' (< layer) into `feature`'s
    pre-activation at the example position}. Transcoders folded (raw units), float32."""
    _check(examples)
    bad = [at for at in writers if at >= layer]
    if bad:
        raise FeaturekitError(f"upstream writers must sit below layer {layer}; got layers {bad}")
    device = next(unwrap(model).parameters()).device
    total = {at: torch.zeros(tc.n_latents) for at, tc in writers.items()}
    for ids, pos in examples:
        _upstream_one(model, reader, layer, feature, writers, ids, pos, device, total)
    return {at: t / len(examples) for at, t in total.items()}


def _upstream_one(model: Any, reader: Any, layer: int, feature: int, writers: dict[int, Any], ids: Sequence[int],
                  pos: int, device: Any, total: dict[int, Tensor]) -> None:
    """One example's Σ_t' f_i[t'] · ∂π_j[t] / ∂f_i[t'] for every writer latent, added into `total`."""
    codes: dict[int, Tensor] = {}
    seen: dict[str, Tensor] = {}
    with ExitStack() as stack:
        for at, tc in writers.items():
            stack.enter_context(replace(model, f"mlp_in.{at}", lambda a, at=at: seen.__setitem__(f"in{at}", a) or a))
            stack.enter_context(replace(model, f"mlp_out.{at}",
                                        lambda a, at=at, tc=tc: _straight_through(a, tc, seen[f"in{at}"], codes, at)))
        stack.enter_context(replace(model, f"mlp_in.{layer}", lambda a: seen.__setitem__("reader", a) or a))
        unwrap(model)(input_ids=torch.as_tensor(ids[:pos + 1], device=device)[None], use_cache=False)
    m = seen["reader"][0, pos].float()
    pre = m @ reader.W_enc[feature] + reader.b_enc[feature]
    leaves = [codes[at] for at in writers]
    grads = torch.autograd.grad(pre, leaves, allow_unused=True)
    for at, f, g in zip(writers, leaves, grads):
        if g is not None:
            total[at] += (f.detach() * g)[0].sum(0).cpu()


def downstream(model: Any, writer: Any, layer: int, feature: int, readers: dict[int, Any],
               examples: Sequence[Example]) -> dict[int, Tensor]:
    """{L'': (F_L'',) mean over the examples of f_j[t] · Σ_{t''} ∂π_i[t''] / ∂f_j[t] for every latent i of the
    transcoder at L'' (> layer)}: what `feature`'s write at its firing position does to each later latent."""
    _check(examples)
    bad = [at for at in readers if at <= layer]
    if bad:
        raise FeaturekitError(f"downstream readers must sit above layer {layer}; got layers {bad}")
    device = next(unwrap(model).parameters()).device
    total = {at: torch.zeros(tc.n_latents) for at, tc in readers.items()}
    row = writer.W_dec[feature].float()
    with _eager(model):                       # the fused CPU attention kernels have no double backward
        for ids, pos in examples:
            _downstream_one(model, writer, layer, feature, readers, row, ids, pos, device, total)
    return {at: t / len(examples) for at, t in total.items()}


@contextmanager
def _eager(model: Any) -> Iterator[None]:
    hf = unwrap(model)
    previous = hf.config._attn_implementation
    if previous != "eager":
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            hf.set_attn_implementation(previous)


def _downstream_one(model: Any, writer: Any, layer: int, feature: int, readers: dict[int, Any], row: Tensor,
                    ids: Sequence[int], pos: int, device: Any, total: dict[int, Tensor]) -> None:
    """One example's f_j[t] · Σ_t'' ∂π_i[t''] / ∂f_j[t], added into `total`."""
    seen: dict[str, Tensor] = {}
    ids_t = torch.as_tensor(ids, device=device)[None]
    with ExitStack() as stack:
        stack.enter_context(replace(model, f"mlp_in.{layer}", lambda a: seen.__setitem__("in", a) or a))

        def write(a: Tensor) -> Tensor:
            f = writer.encode(seen["in"][0, pos].float().detach())[feature].detach().requires_grad_(True)
            seen["f"] = f
            bump = torch.zeros_like(a, dtype=torch.float32)
            bump[0, pos] = (f - f.detach()) * row
            return a + bump.to(a.dtype)

        stack.enter_context(replace(model, f"mlp_out.{layer}", write))
        for at in readers:
            stack.enter_context(replace(model, f"mlp_in.{at}", lambda a, at=at: seen.__setitem__(f"r{at}", a) or a))
        unwrap(model)(input_ids=ids_t, use_cache=False)
    f = seen["f"]
    pres = {at: seen[f"r{at}"][0].float() @ tc.W_enc.T + tc.b_enc for at, tc in readers.items()}   # (T, F)
    dual = {at: torch.zeros_like(p, requires_grad=True) for at, p in pres.items()}
    (g,) = torch.autograd.grad(sum((pres[at] * dual[at]).sum() for at in readers), f, create_graph=True)
    jac = torch.autograd.grad(g, list(dual.values()), allow_unused=True)
    for at, j in zip(readers, jac):
        if j is not None:
            total[at] += float(f.detach()) * j.sum(0).detach().cpu()


def _straight_through(a: Tensor, tc: Any, m: Tensor, codes: dict[int, Tensor], at: int) -> Tensor:
    """a + (f − f.detach()) W_dec: the same value, with the gradient of the output reaching the codes f."""
    f = tc.encode(m.float().detach()).detach().requires_grad_(True)
    codes[at] = f
    return a + ((f - f.detach()) @ tc.W_dec).to(a.dtype)


def top(values: dict[int, Tensor], k: int) -> list[tuple[int, int, float]]:
    """The k largest |value| over every layer: [(layer, latent, value)]."""
    rows = [(at, int(i), float(v[i])) for at, v in values.items() for i in v.abs().topk(min(k, v.numel())).indices]
    return sorted(rows, key=lambda r: -abs(r[2]))[:k]
