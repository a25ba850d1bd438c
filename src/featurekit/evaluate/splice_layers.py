"""Several dictionaries spliced into one forward pass, and per-layer curves.

A `Splice` is one dictionary at one place: it reads `site` and writes `output_site` (the same site for an SAE,
which replaces the activation by its reconstruction; `mlp_in.L` → `mlp_out.L` for a transcoder, whose
prediction from this forward's MLP input replaces the MLP output: `evaluate.transcoders`). Splices are
ordered by layer (then as given), so "layers 0..L" is a prefix.

    splice_all(model, splices, keep)           context: every splice at once (each reads what the earlier ones produced)
    ablate(model, sites, keep, means=None)     context: the same output sites zero-ablated, or set to their mean
    site_means(model, sites, ids, mask)        the mean clean activation of each site over the kept tokens
    layer_curves(model, splices, ids, mask)    {all, alone[i], cumulative[i]}: CE, ΔCE, KL, loss recovered

For every subset S scored (each splice alone, the prefixes 0..i, all of them), the spliced forward replaces
the sites of S at the kept positions, and the baseline ablates the output sites of S at the same positions
(`ablation` "zero", as every featurekit splice metric, or "mean": the site's mean clean activation over the
scored tokens). loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean); ΔCE = CE_spliced − CE_clean;
KL(clean ‖ spliced) per scored position (`splice.score_splices`: one clean forward per batch serves every subset).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..dictionaries import Dictionary
from ..errors import FeaturekitError
from ..models.hooks import capture, replace, transform
from ..models.sites import parse_site
from .splice import reconstruct_at, score_splices
from .transcoders import splice_transcoders

ABLATIONS = ("zero", "mean")
CURVES = ("alone", "cumulative")


@dataclass(frozen=True)
class Splice:
    """`dictionary` reads `site` and writes `output_site` (= `site` for a dictionary that reconstructs its input)."""

    name: str
    site: str
    output_site: str
    dictionary: Dictionary

    @property
    def layer(self) -> int:
        return parse_site(self.output_site).layer

    @property
    def transcodes(self) -> bool:
        return self.output_site != self.site


def ordered(splices: Sequence[Splice]) -> list[Splice]:
    """The splices by layer (stable), after checking that no two write the same site."""
    if not splices:
        raise FeaturekitError("nothing to splice: give at least one dictionary")
    writers: dict[str, str] = {}
    for s in splices:
        if s.output_site in writers:
            raise FeaturekitError(f"{writers[s.output_site]} and {s.name} both write {s.output_site}; splice one dictionary "
                                  "per site (drop one of them)")
        writers[s.output_site] = s.name
        if s.transcodes != bool(getattr(s.dictionary, "transcodes", False)):
            raise FeaturekitError(f"{s.name}: a {s.dictionary.method} dictionary cannot read {s.site} and write {s.output_site}; "
                                  "an SAE reads and writes one site, a transcoder reads mlp_in.L and writes mlp_out.L")
    return sorted(splices, key=lambda s: s.layer)


@contextmanager
def splice_all(model: torch.nn.Module, splices: Sequence[Splice], keep: torch.Tensor) -> Iterator[None]:
    """Within the context every splice replaces its output site at the `keep` (B, T) positions, all in one forward."""
    with ExitStack() as stack:
        transcoders = [(s.site, s.output_site, s.dictionary) for s in splices if s.transcodes]
        if transcoders:
            stack.enter_context(splice_transcoders(model, transcoders, keep))
        for s in splices:
            if not s.transcodes:
                stack.enter_context(replace(model, s.site, lambda act, d=s.dictionary: reconstruct_at(act, keep, d)))
        yield


def ablate(model: torch.nn.Module, sites: Sequence[str], keep: torch.Tensor, means: dict[str, torch.Tensor] | None = None):
    """Context: each site set to 0 (or to `means[site]`) at the `keep` positions."""
    def fill(act: torch.Tensor, site: str) -> torch.Tensor:
        if means is None:
            return act.masked_fill(keep[..., None], 0.0)
        return torch.where(keep[..., None], means[site].to(act), act)

    return transform(model, {site: (lambda act, site=site: fill(act, site)) for site in sites})


@torch.no_grad()
def site_means(model: torch.nn.Module, sites: Sequence[str], input_ids: torch.Tensor, mask: torch.Tensor,
               batch_contexts: int = 16) -> dict[str, torch.Tensor]:
    """The mean clean activation of each site over the `mask` positions (float32, on the model's device)."""
    device = next(model.parameters()).device
    sums = {site: 0.0 for site in sites}
    n = 0
    for start in range(0, len(input_ids), batch_contexts):
        keep = mask[start:start + batch_contexts].to(device)
        with capture(model, *sites) as seen:
            model(input_ids=input_ids[start:start + batch_contexts].to(device), use_cache=False)
        for site in sites:
            sums[site] = sums[site] + seen[site][keep].double().sum(0)
        n += int(keep.sum())
    if n == 0:
        raise FeaturekitError("no kept token to average for mean-ablation; give more text")
    return {site: (total / n).float() for site, total in sums.items()}


@torch.no_grad()
def layer_curves(model: torch.nn.Module, splices: Sequence[Splice], input_ids: torch.Tensor, mask: torch.Tensor,
                 ablation: str = "zero", batch_contexts: int = 16, progress: bool = True,
                 max_norm_multiple: float | None = None, curves: Sequence[str] = CURVES) -> dict:
    """Every splice at once, each alone and each prefix (layers 0..L) — module docstring. Returns
    {"all": scores, "alone": [scores per splice], "cumulative": [scores of splices[:i+1]], "order": names},
    with only the `curves` named (a subset of CURVES) beside "all"."""
    if ablation not in ABLATIONS:
        raise FeaturekitError(f"ablation {ablation!r}: use one of {', '.join(ABLATIONS)}")
    if set(curves) - set(CURVES):
        raise FeaturekitError(f"curves {sorted(set(curves) - set(CURVES))}: use some of {', '.join(CURVES)}")
    splices = ordered(splices)
    n = len(splices)
    subsets = {("all",): tuple(range(n))}
    if "alone" in curves:
        subsets.update({("alone", i): (i,) for i in range(n)})
    if "cumulative" in curves:
        subsets.update({("cumulative", i): tuple(range(i + 1)) for i in range(n)})
    distinct = sorted(set(subsets.values()), key=lambda s: (len(s), s))
    read = sorted({s.site for s in splices} | {s.output_site for s in splices})
    means = site_means(model, [s.output_site for s in splices], input_ids, mask, batch_contexts) if ablation == "mean" else None

    def variant(subset: tuple[int, ...]):
        chosen = [splices[i] for i in subset]
        return (lambda keep: splice_all(model, chosen, keep),
                lambda keep: ablate(model, [s.output_site for s in chosen], keep, means))

    scored = score_splices(model, input_ids, mask, read, {str(subset): variant(subset) for subset in distinct},
                           batch_contexts, progress, max_norm_multiple, desc="splice every layer")

    def scores(subset: tuple[int, ...]) -> dict:
        out = dict(scored[str(subset)])
        out["ce_ablated"] = out.pop("ce_zero_ablated")
        return out

    result = {"order": [s.name for s in splices], "ablation": ablation, "all": scores(subsets[("all",)])}
    for curve in curves:
        result[curve] = [scores(subsets[(curve, i)]) for i in range(n)]
    return result
