"""featurekit trace (attribution graphs through transcoders) and featurekit circuits train-set / quality (transcoder sets)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FeaturekitError
from .common import EPILOG


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _trace_parser(sub)
    _circuits_parser(sub)


def _trace_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit trace`: the attribution graph of one prompt through a transcoder set (circuits)."""
    p = sub.add_parser(
        "trace", help="the attribution graph of one prompt's next token through per-layer transcoders (graph JSON)",
        description="Replace every MLP of the model by its transcoder (mlp_in.L -> mlp_out.L), freeze attention patterns and "
                    "norm denominators at the prompt's clean forward, add an error node per (layer, position) so the logits "
                    "stay exact, and write the pruned attribution graph (direct effects between features, error nodes, token "
                    "embeddings and the top logits) as circuit-tracer / Neuronpedia graph JSON. docs/circuits.md explains it.")
    _set_args(p)
    p.add_argument("--prompt", required=True, help="the text whose next-token prediction the graph explains")
    p.add_argument("--out", type=Path, required=True, help="graph JSON file to write")
    p.add_argument("--model", help="embedded name, local directory, .gguf file or Hub id (default: the model the transcoders name)")
    p.add_argument("--targets", nargs="+", metavar="TOKEN",
                   help="explain these next tokens (each must be one token, e.g. ' Paris') instead of the top logits")
    p.add_argument("--contrast", metavar="TOKEN",
                   help="explain the logit difference target − TOKEN (one token, e.g. ' London') instead of each target's "
                        "demeaned logit; needs --targets")
    p.add_argument("--max-logits", type=int, default=10, help="at most this many top logits as targets (default 10)")
    p.add_argument("--logit-prob", type=float, default=0.95, help="top logits until this cumulative probability (default 0.95)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="keep the nodes holding this share of influence (default 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="keep the edges holding this share of influence (default 0.98)")
    p.add_argument("--batch-size", type=int, default=256, help="targets per backward pass (default 256)")
    p.add_argument("--max-feature-nodes", type=int,
                   help="at most this many feature nodes, the most influential first (default: every active feature)")
    _partial_arg(p)
    p.add_argument("--device", default="cpu")


def _set_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--set", type=Path, metavar="SET_DIR",
                       help="a transcoder set folder (transcoder_set.json + one dictionary per layer)")
    which.add_argument("--transcoders", type=Path, nargs="+", metavar="DIR",
                       help="featurekit transcoder folders, one per layer (each file names its mlp_in.L site)")


def _partial_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partial-set", action="store_true",
                   help="accept transcoders for only some layers: each layer without one keeps its whole MLP output as "
                        "that layer's error node (exact, but no features there); results are labelled a partial set's")


def _load_set_and_model(args: argparse.Namespace) -> tuple:
    """(set, loaded model) from --set/--transcoders, --model, --partial-set, --device."""
    from ..circuits import transcoder_set
    from ..circuits.trace import partial_note
    from ..models.loading import load_model
    from ..models.sites import blocks

    tset = transcoder_set.load(args.set, args.device) if args.set else transcoder_set.from_folders(args.transcoders, args.device)
    name = args.model or tset.model
    if not name:
        raise FeaturekitError("the transcoders do not name their model; pass --model (embedded name, local folder or Hub id)")
    loaded = load_model(name, device=args.device)
    if args.partial_set:
        tset = transcoder_set.partial(tset, len(blocks(loaded.model)))
        print(f"PARTIAL SET: {partial_note(tset)}")
    return tset, loaded


def _trace(args: argparse.Namespace) -> int:
    from ..circuits.trace import target_ids, trace

    tset, loaded = _load_set_and_model(args)
    targets = target_ids(loaded.tokenizer, args.targets) if args.targets else None
    if args.contrast is not None and targets is None:
        raise FeaturekitError("--contrast needs --targets: the graph explains logit(target) - logit(contrast) for the given targets")
    contrast = target_ids(loaded.tokenizer, [args.contrast])[0] if args.contrast is not None else None
    result = trace(loaded, tset, args.prompt, out=args.out, target_tokens=targets, max_n_logits=args.max_logits,
                   contrast_token=contrast,
                   desired_logit_prob=args.logit_prob, batch_size=args.batch_size, node_threshold=args.node_threshold,
                   edge_threshold=args.edge_threshold, max_feature_nodes=args.max_feature_nodes)
    meta = result.document["metadata"]["featurekit"]
    print(f"graph of {len(result.graph.input_ids)} tokens: {meta['n_features']} feature nodes ({meta['n_active_features']} active), "
          f"kept {meta['n_kept_nodes']} nodes "
          f"and {meta['n_kept_edges']} edges; replacement score {meta['replacement_score']:.3f}, completeness "
          f"{meta['completeness_score']:.3f}; replacement logits within {result.replacement_error:.1e} of the model's; "
          f"{result.seconds:.1f} s -> {args.out}")
    return 0


def _circuits_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit circuits train-set | features | quality | faithfulness`: transcoder sets for circuits."""
    circuits = sub.add_parser("circuits", help="transcoder sets for attribution graphs: train one, measure its replacement "
                                               "quality, test a graph's faithfulness").add_subparsers(dest="circuits", required=True)
    p = circuits.add_parser(
        "train-set", help="train a transcoder for every layer (or the chosen ones) of a model, or one cross-layer transcoder",
        description="Per-layer transcoders (--method transcoder or skiptranscoder) are trained layer by layer, each an "
                    "ordinary run on mlp_in.L -> mlp_out.L in a scratch folder inside OUT_DIR that is deleted once the layer's "
                    "dictionary is moved to OUT_DIR/layer_L (one layer's activation cache on disk at a time); a rerun skips "
                    "finished layers and continues a killed one from its checkpoint. --method clt trains one cross-layer "
                    "transcoder over the layers jointly, streamed from the model (nothing cached). OUT_DIR/transcoder_set.json "
                    "is written last; `featurekit trace --set OUT_DIR` and `featurekit circuits quality OUT_DIR` read it. "
                    "dictionary.n_latents and dictionary.k are per layer for both kinds.", epilog=EPILOG)
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="the set folder to write (or continue)")
    p.add_argument("--model", help="embedded name, local directory, .gguf file or Hub id (default: the config's model)")
    p.add_argument("--layers", default="all", help="all (default), a list 0,3,5 or a range 2-6")
    p.add_argument("--method", default="transcoder", help="transcoder (default), skiptranscoder or clt")
    p.add_argument("--latents", type=int, help="latents per layer (dictionary.n_latents)")
    p.add_argument("--k", type=int, help="active latents per token and layer (dictionary.k)")
    p.add_argument("--tokens", type=int, help="training tokens (data.train_tokens)")
    p.add_argument("--layers-per-pass", type=int, default=1, metavar="N",
                   help="per-layer sets: harvest N layers' activation caches in one model pass (the same caches and "
                        "transcoders as one pass per layer; N times the disk and memory for the caches; default 1)")
    p.add_argument("--config", type=Path, help="YAML or JSON config file for the data, dictionary and train settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable); `featurekit config` lists the keys")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = circuits.add_parser(
        "features", help="feature stores for a transcoder set's layers from ONE model pass (top contexts, histograms, "
                         "logit effects), served as runs that the graph viewer links to",
        description="Run the model once over held-out text (the set's text, held-out split first, as `featurekit features`), "
                    "capture every chosen layer's MLP input in the same forward, encode it with that layer's transcoder and "
                    "write one feature store per layer: OUT/layer_L/{config.json, features.sqlite}, OUT = SET_DIR/stores by "
                    "default, a run folder whose dictionary is SET_DIR/layer_L. `featurekit serve --graphs G.json` serves "
                    "them for a graph traced through the set; `featurekit serve SET_DIR/stores/layer_*` browses them. A rerun "
                    "skips layers whose store is complete. Works on a set still training (its finished layer_L folders).",
        epilog=EPILOG)
    p.add_argument("set", type=Path, metavar="SET_DIR", help="a per-layer transcoder set folder (train-set's OUT_DIR)")
    p.add_argument("--layers", default="all", help="all (default: every layer the set has), a list 0,3,5 or a range 2-6")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens in the pass (features.tokens; default 20000)")
    p.add_argument("--text", metavar="SOURCE", help="build them from this text source (all its documents) instead")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the layer_L store runs here instead of SET_DIR/stores")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a features.* value (e.g. features.top_n=10)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = circuits.add_parser(
        "quality", help="replace every MLP of the set's layers by the set at once: CE and KL against the clean model and "
                        "against zero-ablating the same MLPs (loss recovered), on held-out text",
        description="Splice the whole set into the model (each layer's MLP output predicted from the same forward's MLP "
                    "inputs; a CLT sums every earlier layer's decoders) and score next-token CE, KL(clean || replaced) and "
                    "loss recovered against zero-ablating the same MLPs, on the held-out split of the text.")
    p.add_argument("set", type=Path, metavar="SET_DIR", help="a transcoder set folder (transcoder_set.json)")
    p.add_argument("--model", help="default: the model the set names")
    p.add_argument("--text", help="text source (as data.source; default the config's, bbc)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    p.add_argument("--context-len", type=int, help="tokens per context (data.context_len)")
    p.add_argument("--batch-contexts", type=int, default=8, help="contexts per forward pass (default 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument("--out", type=Path, help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = circuits.add_parser(
        "faithfulness", help="ablate a prompt's graph's top features and compare the target logit's change with the graph's "
                             "prediction, in the local replacement model and in the real model (random-feature control)",
        description="Trace the prompt's graph for one target token, rank the pruned graph's features by influence, direct and "
                    "total effect on the target, ablate the top k (codes set to 0) and report the graph's predicted change of "
                    "the demeaned target logit (direct edges; linear response through later features) beside the measured "
                    "change: in the frozen model with other features held (= the direct prediction), in the local replacement "
                    "model with features live (frozen attention and norms), and in the real model with every MLP replaced by "
                    "the set plus its clean error term (attention and norms live); k random active features (seeded) as a "
                    "control. docs/circuits.md explains the columns.")
    _set_args(p)
    p.add_argument("--prompt", required=True, help="a prompt the model gets right")
    p.add_argument("--target", help="the target next token, one token (e.g. ' Paris'; default: the model's top token)")
    p.add_argument("--contrast", metavar="TOKEN", help="measure the logit difference target − TOKEN (one token, e.g. "
                                                       "' London') instead of the target's demeaned logit")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20], help="feature counts to ablate (default 1 5 10 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control (default 0)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning: node influence share (default 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: edge score share (default 0.98)")
    p.add_argument("--max-feature-nodes", type=int, help="at most this many feature nodes in the graph (default: all)")
    p.add_argument("--model", help="default: the model the transcoders name")
    p.add_argument("--graph-out", type=Path, help="also write the graph JSON here")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    _partial_arg(p)
    p.add_argument("--device", default="cpu")


def _faithfulness(args: argparse.Namespace) -> int:
    import time

    import torch

    from .._io import atomic_write_json
    from ..circuits import faithfulness
    from ..circuits.trace import prompt_ids, target_ids, trace
    from ..models.sites import unwrap

    start = time.perf_counter()
    tset, loaded = _load_set_and_model(args)
    if args.target:
        target = target_ids(loaded.tokenizer, [args.target])[0]
    else:                                   # the model's own top next token
        with torch.no_grad():
            ids = prompt_ids(loaded.tokenizer, args.prompt)
            target = int(unwrap(loaded.model)(input_ids=ids[None]).logits[0, -1].argmax())
    contrast = target_ids(loaded.tokenizer, [args.contrast])[0] if args.contrast is not None else None
    result = trace(loaded, tset, args.prompt, out=args.graph_out, target_tokens=[target], node_threshold=args.node_threshold,
                   edge_threshold=args.edge_threshold, max_feature_nodes=args.max_feature_nodes, contrast_token=contrast)
    rm = result.replacement
    probs = torch.softmax(rm.clean_logits[-1].double(), -1)
    top = int(probs.argmax())
    rows = faithfulness.evaluate(loaded.model, rm, result.graph, result.pruned, target, ks=args.k, seed=args.seed)
    tok = loaded.tokenizer
    head = (f"{args.prompt!r} -> target {tok.decode([target])!r} (p = {float(probs[target]):.3f}; the model's top token "
            f"{tok.decode([top])!r}); {result.graph.n_features} active features, "
            f"{int(result.pruned.node_mask[:result.graph.n_features].sum())} in the pruned graph; change of the "
            + (f"logit difference target - {tok.decode([contrast])!r}:" if contrast is not None else "demeaned target logit:"))
    print(head)
    print(faithfulness.describe(rows))
    seconds = time.perf_counter() - start
    print(f"{seconds:.1f} s")
    if args.out:
        partial = result.document["metadata"]["featurekit"].get("partial_set")
        atomic_write_json(args.out, {"prompt": args.prompt, "target": tok.decode([target]), "target_id": target,
                                     "target_probability": float(probs[target]), "top_token": tok.decode([top]),
                                     "contrast": None if contrast is None else tok.decode([contrast]),
                                     "model": loaded.name, "transcoders": tset.listing(), "partial_set": partial,
                                     "n_features": result.graph.n_features, "scores": result.scores, "seed": args.seed,
                                     "rows": rows, "seconds": round(seconds, 2)})
        print(f"-> {args.out}")
    return 0


def _set_features(args: argparse.Namespace, progress: bool) -> int:
    from ..pipeline.set_features import build_set_stores

    bad = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith("features.")]
    if bad:
        raise FeaturekitError(f"featurekit circuits features may change only features.* settings, not {', '.join(bad)}")
    runs = build_set_stores(args.set, args.layers, tokens=args.tokens, text=args.text, out=args.out,
                            overrides=args.overrides, progress=progress)
    first, last = runs[min(runs)], runs[max(runs)]
    print(f"feature stores of layers {sorted(runs)}: {first}{' ... ' + str(last) if last != first else ''}")
    print(f"browse them: featurekit serve {first.parent}/layer_* (or serve --graphs G.json for a graph traced through the set)")
    return 0


def _circuits(args: argparse.Namespace, progress: bool) -> int:
    if args.circuits == "faithfulness":
        return _faithfulness(args)
    if args.circuits == "features":
        return _set_features(args, progress)
    if args.circuits == "train-set":
        from ..config import load_config
        from ..pipeline.circuit_sets import check_method, train_set

        check_method(args.method)
        flags = {"model.name": args.model, "dictionary.n_latents": args.latents, "dictionary.k": args.k,
                 "data.train_tokens": args.tokens}
        overrides = [f"dictionary.method={args.method}", *args.overrides,
                     *(f"{key}={value}" for key, value in flags.items() if value is not None)]
        cfg = load_config(args.config, overrides)
        out = train_set(cfg, args.out, args.layers, progress=progress, per_pass=args.layers_per_pass)
        print(f"transcoder set: {out}")
        return 0
    from .._io import atomic_write_json
    from ..circuits import transcoder_set
    from ..circuits.quality import describe, replacement_quality
    from ..config import load_config
    from ..models.loading import load_model
    from ..pipeline import contexts

    tset = transcoder_set.load(args.set)
    name = args.model or tset.model
    if not name:
        raise FeaturekitError("the set does not name its model; pass --model")
    overrides = [f"model.name={name}", *([f"data.source={args.text}"] if args.text else []),
                 *([f"data.context_len={args.context_len}"] if args.context_len else [])]
    cfg = load_config(None, overrides)
    import torch

    loaded = load_model(name, dtype=getattr(torch, args.dtype), device=args.device)
    ids, mask = contexts(loaded, cfg, "test", args.tokens)
    result = replacement_quality(loaded.model, tset, ids, mask, batch_contexts=args.batch_contexts, progress=progress)
    result.update({"set": str(args.set), "model": name, "text": cfg.data.source, "split": "test",
                   "context_len": cfg.data.context_len})
    print(describe(result))
    if args.out:
        atomic_write_json(args.out, result)
        print(f"-> {args.out}")
    return 0


HANDLERS = {"trace": lambda args, progress: _trace(args), "circuits": _circuits}
