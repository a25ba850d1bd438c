"""One prompt to one graph file: tokenise, build the local replacement model, attribute, prune, score, write.

    trace(loaded, transcoders, prompt, out=path)  → TraceResult (graph, pruned graph, scores, JSON document)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.tokens import tokenize
from ..errors import FeaturekitError
from . import attribution, graph_json, prune, replacement
from .partial_set import PartialSet
from .sets import KIND_CLT, AnySet


@dataclass
class TraceResult:
    graph: attribution.Graph
    pruned: prune.Pruned
    scores: dict[str, float]
    replacement_error: float     # max |replacement logits − clean logits| / max |clean logits|
    document: dict[str, Any]
    seconds: float
    replacement: Any = None      # the prompt's LocalReplacement (for interventions on it)


def prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """The prompt's token ids as a run sees them (BOS in front where the tokenizer adds one)."""
    if not prompt:
        raise FeaturekitError("the prompt is empty; pass the text whose next token the graph should explain")
    ids, keep = tokenize(tokenizer, prompt)
    return ids[0]


def trace(loaded: Any, transcoders: AnySet, prompt: str, *, out: str | Path | None = None,
          target_tokens: Sequence[int] | None = None, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
          batch_size: int = 256, node_threshold: float = 0.8, edge_threshold: float = 0.98, slug: str | None = None,
          max_feature_nodes: int | None = None, contrast_token: int | None = None) -> TraceResult:
    """The attribution graph of `prompt`'s next-token prediction; the JSON is written to `out` when given. With a
    `contrast_token` c (and `target_tokens`), each logit node is the logit difference logit(target) − logit(c)."""
    start = time.perf_counter()
    ids = prompt_ids(loaded.tokenizer, prompt)
    rm = replacement.build(loaded.model, transcoders, ids)
    clean = rm.clean_logits
    error = float((rm.replacement_logits() - clean).abs().max() / clean.abs().max().clamp_min(1e-30))
    graph = attribution.attribute(rm, target_tokens, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
                                  batch_size=batch_size, max_feature_nodes=max_feature_nodes, contrast=contrast_token)
    pruned = prune.prune(graph, node_threshold, edge_threshold)
    scores = prune.scores(graph)
    tok = loaded.tokenizer
    token_strings = [tok.decode([t]) for t in graph.input_ids]
    vocab_strings = {t: tok.decode([t]) for t in graph.logit_tokens + ([] if graph.contrast is None else [graph.contrast])}
    seconds = time.perf_counter() - start
    extra = {**scores, "replacement_logit_error": error, "seconds": round(seconds, 3),
             "attribution_seconds": graph.settings.get("seconds"), "n_features": graph.n_features,
             "n_active_features": graph.settings.get("active_features"),
             "n_kept_nodes": int(pruned.node_mask.sum()), "n_kept_edges": int(pruned.edge_mask.sum()),
             "model": loaded.name}
    if graph.contrast is not None:
        extra["contrast"] = {"token": graph.contrast, "text": vocab_strings[graph.contrast]}
    document = graph_json.graph_document(
        graph, pruned, slug=slug or _slug(prompt), scan=str(transcoders.model or loaded.name), prompt=prompt,
        token_strings=token_strings, vocab_strings=vocab_strings,
        transcoder_list=transcoders.listing(), widths={layer: transcoders.width(layer) for layer in transcoders.layers},
        node_threshold=node_threshold, edge_threshold=edge_threshold, extra=extra, cross_layer=transcoders.kind == KIND_CLT)
    if isinstance(transcoders, PartialSet):
        note = partial_note(transcoders)
        document["metadata"]["featurekit"]["partial_set"] = {"covered": transcoders.covered, "missing": transcoders.missing}
        document["metadata"]["info"]["description"] += f" (PARTIAL SET: {note})"
    if out is not None:
        graph_json.write(document, out)
    return TraceResult(graph, pruned, scores, error, document, seconds, rm)


def partial_note(tset: PartialSet) -> str:
    """One line saying which layers a partial set lacks and what that means."""
    return (f"transcoders at layers {_ranges(tset.covered)} only; layers {_ranges(tset.missing)} have none, their whole MLP "
            "output is that layer's error node (exact, no features there)")


def _ranges(layers: Sequence[int]) -> str:
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts) or "none"


def _slug(prompt: str) -> str:
    words = "".join(c if c.isalnum() else "-" for c in prompt.lower()).split("-")
    return "-".join(w for w in words if w)[:48] or "graph"


def target_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Token strings (e.g. ' Paris') to ids; each must be exactly one token of the tokenizer."""
    ids = []
    for text in tokens:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise FeaturekitError(f"target {text!r} is {len(encoded)} tokens {encoded} for this tokenizer; pass one token "
                                  "(mind the leading space, e.g. ' Paris')")
        ids.append(int(encoded[0]))
    return ids
