"""featurekit trace: attribution graphs through transcoders (circuits)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FeaturekitError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _trace_parser(sub)


def _trace_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit trace`: the attribution graph of one prompt through a transcoder set (circuits)."""
    p = sub.add_parser(
        "trace", help="the attribution graph of one prompt's next token through per-layer transcoders (graph JSON)",
        description="Replace every MLP of the model by its transcoder (mlp_in.L -> mlp_out.L), freeze attention patterns and "
                    "norm denominators at the prompt's clean forward, add an error node per (layer, position) so the logits "
                    "stay exact, and write the pruned attribution graph (direct effects between features, error nodes, token "
                    "embeddings and the top logits) as circuit-tracer / Neuronpedia graph JSON. docs/circuits.md explains it.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--set", type=Path, metavar="SET_DIR",
                       help="a transcoder set folder (transcoder_set.json + one dictionary per layer)")
    which.add_argument("--transcoders", type=Path, nargs="+", metavar="DIR",
                       help="featurekit transcoder folders, one per layer (each file names its mlp_in.L site)")
    p.add_argument("--prompt", required=True, help="the text whose next-token prediction the graph explains")
    p.add_argument("--out", type=Path, required=True, help="graph JSON file to write")
    p.add_argument("--model", help="embedded name, local directory, .gguf file or Hub id (default: the model the transcoders name)")
    p.add_argument("--targets", nargs="+", metavar="TOKEN",
                   help="explain these next tokens (each must be one token, e.g. ' Paris') instead of the top logits")
    p.add_argument("--max-logits", type=int, default=10, help="at most this many top logits as targets (default 10)")
    p.add_argument("--logit-prob", type=float, default=0.95, help="top logits until this cumulative probability (default 0.95)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="keep the nodes holding this share of influence (default 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="keep the edges holding this share of influence (default 0.98)")
    p.add_argument("--batch-size", type=int, default=256, help="targets per backward pass (default 256)")
    p.add_argument("--max-feature-nodes", type=int,
                   help="at most this many feature nodes, the most influential first (default: every active feature)")
    p.add_argument("--device", default="cpu")


def _trace(args: argparse.Namespace) -> int:
    from ..circuits import transcoder_set
    from ..circuits.trace import target_ids, trace
    from ..models.loading import load_model

    tset = transcoder_set.load(args.set, args.device) if args.set else transcoder_set.from_folders(args.transcoders, args.device)
    name = args.model or tset.model
    if not name:
        raise FeaturekitError("the transcoders do not name their model; pass --model (embedded name, local folder or Hub id)")
    loaded = load_model(name, device=args.device)
    targets = target_ids(loaded.tokenizer, args.targets) if args.targets else None
    result = trace(loaded, tset, args.prompt, out=args.out, target_tokens=targets, max_n_logits=args.max_logits,
                   desired_logit_prob=args.logit_prob, batch_size=args.batch_size, node_threshold=args.node_threshold,
                   edge_threshold=args.edge_threshold, max_feature_nodes=args.max_feature_nodes)
    meta = result.document["metadata"]["featurekit"]
    print(f"graph of {len(result.graph.input_ids)} tokens: {meta['n_features']} feature nodes ({meta['n_active_features']} active), "
          f"kept {meta['n_kept_nodes']} nodes "
          f"and {meta['n_kept_edges']} edges; replacement score {meta['replacement_score']:.3f}, completeness "
          f"{meta['completeness_score']:.3f}; replacement logits within {result.replacement_error:.1e} of the model's; "
          f"{result.seconds:.1f} s -> {args.out}")
    return 0


HANDLERS = {"trace": lambda args, progress: _trace(args)}
