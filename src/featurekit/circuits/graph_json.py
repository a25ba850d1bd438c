"""The graph file: circuit-tracer's / Neuronpedia's attribution-graph JSON (schema 1.0.0), so their viewers load it.

    {"metadata": {slug, scan, prompt_tokens, prompt, transcoder_list, node_threshold, schema_version,
                  info{description, generator{name, version}, create_time_ms, source_urls},
                  generation_settings{max_n_logits, desired_logit_prob, batch_size, max_feature_nodes},
                  pruning_settings{node_threshold, edge_threshold}, featurekit{scores, seconds, ...}},
     "qParams": {pinnedIds, supernodes, linkType, clickedId, sg_pos},
     "nodes": [{node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, influence, activation,
                token_prob, is_target_logit, run_idx, reverse_ctx_idx}],
     "links": [{source, target, weight}]}

Node ids as circuit-tracer writes them (feature "{layer}_{latent}_{pos}", token "E_{token id}_{pos}", logit
"{n_layers + 1}_{token id}_{pos}") except error nodes: circuit-tracer's "0_{layer}_{pos}" is also the id of
layer 0's latent number `layer` at that position, so here they are "err_{layer}_{pos}" (the schema only asks for
a string; viewers key nodes by id and place them by layer and ctx_idx). A feature's `feature` number is
layer·10^⌈log10 F⌉ + latent (circuit-tracer's offset, F the transcoders' width), an error's −1, a token's its
position, a logit's its token id. `influence` is the node's cumulative influence share (the viewer's dynamic
pruning keeps nodes up to its threshold). Only the kept nodes and edges of the pruned graph are written. A
logit-difference graph (a contrast token c) has one logit node per target v whose value is logit(v) − logit(c): its
clerp reads `Output "v" − "c"` and `metadata.featurekit.contrast` names c.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .. import __version__
from .._io import atomic_write_json
from .attribution import Graph
from .prune import Pruned

SCHEMA_VERSION = 1
GENERATOR = {"name": "featurekit trace", "version": __version__}


def _feature_number(layer: int, latent: int, width: int) -> int:
    return layer * 10 ** math.ceil(math.log10(max(width, 2))) + latent


def node_records(graph: Graph, pruned: Pruned, token_strings: list[str], vocab_strings: dict[int, str],
                 widths: dict[int, int]) -> list[dict[str, Any]]:
    """The nodes of the graph (kept ones only), in node order."""
    nodes: list[dict[str, Any]] = []
    feats, T = graph.features, graph.n_pos

    def add(index: int, record: dict[str, Any], js: str) -> None:
        if bool(pruned.node_mask[index]):
            nodes.append({**record, "jsNodeId": js, "influence": float(pruned.cumulative[index]),
                          "token_prob": record.get("token_prob", 0.0), "is_target_logit": record.get("is_target_logit", False),
                          "run_idx": 0, "reverse_ctx_idx": 0, "_index": index})

    for i in range(graph.n_features):
        layer, pos, latent = int(feats.layer[i]), int(feats.pos[i]), int(feats.latent[i])
        add(i, {"node_id": f"{layer}_{latent}_{pos}", "feature": _feature_number(layer, latent, widths[layer]),
                "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder", "clerp": "",
                "activation": float(feats.activation[i])}, f"{layer}_{latent}-0")
    for layer in range(graph.n_layers):
        for pos in range(T):
            add(graph.error_index(layer, pos), {"node_id": f"err_{layer}_{pos}", "feature": -1, "layer": str(layer),
                                                "ctx_idx": pos, "feature_type": "mlp reconstruction error", "clerp": "",
                                                "activation": float(graph.error_norms[layer, pos])}, f"{layer}_{pos}-0")
    for pos, token in enumerate(graph.input_ids):
        add(graph.token_index(pos), {"node_id": f"E_{token}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                                     "feature_type": "embedding", "clerp": token_strings[pos] if pos < len(token_strings) else "",
                                     "activation": None}, f"E_{token}-{pos}")
    minus = "" if graph.contrast is None else f' − "{vocab_strings.get(graph.contrast, str(graph.contrast))}"'
    for k, token in enumerate(graph.logit_tokens):
        p = float(graph.logit_probabilities[k])
        add(graph.logit_index(k), {"node_id": f"{graph.n_layers + 1}_{token}_{T - 1}", "feature": token,
                                   "layer": str(graph.n_layers + 1), "ctx_idx": T - 1, "feature_type": "logit",
                                   "token_prob": p, "is_target_logit": k == 0, "activation": None,
                                   "clerp": f'Output "{vocab_strings.get(token, str(token))}"{minus} (p={p:.3f})'}, f"L_{token}-{T - 1}")
    return nodes


def graph_document(graph: Graph, pruned: Pruned, *, slug: str, scan: str, prompt: str, token_strings: list[str],
                   vocab_strings: dict[int, str], transcoder_list: list[str], widths: dict[int, int],
                   node_threshold: float, edge_threshold: float, extra: dict[str, Any] | None = None,
                   cross_layer: bool = False) -> dict[str, Any]:
    """The JSON document of a pruned graph (`cross_layer`: its features are a cross-layer transcoder's)."""
    nodes = node_records(graph, pruned, token_strings, vocab_strings, widths)
    ids = {n.pop("_index"): n["node_id"] for n in nodes}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": w}
             for t, s, w in zip(targets.tolist(), sources.tolist(), weights) if s in ids and t in ids]
    settings = graph.settings
    metadata = {
        "slug": slug, "scan": scan, "transcoder_list": transcoder_list, "prompt_tokens": token_strings, "prompt": prompt,
        "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION,
        "info": {"description": (f"attribution graph through a cross-layer transcoder over {len(widths)} layers" if cross_layer
                                 else f"attribution graph through {len(widths)} per-layer transcoders"), "source_urls": transcoder_list,
                 "generator": dict(GENERATOR), "create_time_ms": int(time.time() * 1000)},
        "generation_settings": {k: settings[k] for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
                                if k in settings},
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
        "featurekit": extra or {},
    }
    return {"metadata": metadata,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def write(document: dict[str, Any], path: str | Path) -> Path:
    """Write the graph JSON atomically (temp file + rename)."""
    return atomic_write_json(path, document)
