"""Benchmarks and model studies: bench synthetic / frontier, mlp-sparsity, itda-match."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _bench_parser(sub)
    p = sub.add_parser("mlp-sparsity", help="CE/KL cost of keeping only k of the model's own MLP neurons (mlp_hidden) per token")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local directory, .gguf file or Hub id")
    p.add_argument("--layers", type=int, nargs="+", help="blocks whose MLPs are sparsified together (default: the middle one)")
    p.add_argument("--k", dest="ks", type=int, nargs="+", default=[16, 64, 256, 1024], help="neurons kept per token")
    p.add_argument("--rules", nargs="+", help="abs_topk topk statistical statistical_calibrated (default: all but topk)")
    p.add_argument("--source", default="bbc", help="text source (held-out split)")
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _itda_parser(sub)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit bench NAME ...`: benchmarks that train many methods on the same inputs."""
    bench = sub.add_parser("bench", help="benchmarks: every method on the same inputs").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("synthetic", help="train every registered method on synthetic data with known features; score recovery")
    p.add_argument("--out", type=Path, default=Path("runs/bench_synthetic"), help="output folder: results.json, results.md, bench.png/.svg")
    p.add_argument("--seed", type=int, help="dataset, initialisation and stream seed (default 0)")
    p.add_argument("--d", type=int, help="activation dimension")
    p.add_argument("--n-features", type=int, help="true features (more than d: superposition)")
    p.add_argument("--k", type=int, help="true mean number of active features per token, and every method's k")
    p.add_argument("--tokens", type=int, help="training tokens per method and dataset")
    p.add_argument("--latents", type=int, help="latents of every dictionary")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method but the transcoders)")
    p.add_argument("--dataset", default="all", help="default, hierarchical, bidirectional, a comma-separated list, or all")
    p.add_argument("--quick", action="store_true", help="the small setting of the tests (options above still apply)")
    p.add_argument("--quiet", action="store_true", help="no per-method progress lines")
    p = bench.add_parser("frontier", help="FVU / loss recovered against L0 for every method on a real model, at one token budget")
    p.add_argument("--out", type=Path, default=Path("runs/bench_frontier"), help="results.json, results.md, frontier.png/.svg go here")
    p.add_argument("--model", help="embedded name, local directory, .gguf file or Hub id (default smollm2-135m)")
    p.add_argument("--site", help="site (default resid_post.6)")
    p.add_argument("--source", help="text source (default bbc)")
    p.add_argument("--tokens", type=int, help="harvested training tokens (default 150,000)")
    p.add_argument("--epochs", type=int, help="passes over them per point (default 2)")
    p.add_argument("--latents", type=int, help="latents of every dictionary (default 2,304)")
    p.add_argument("--batch-size", type=int, help="tokens per training step (default 2,048)")
    p.add_argument("--ks", help="comma-separated k values for the k-methods (default 16,32,64)")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method that trains on one site)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for FVU / L0 (default 32,768)")
    p.add_argument("--splice-contexts", type=int, help="held-out contexts for CE / KL (default 32)")
    p.add_argument("--threads", type=int, help="torch threads (default: each training run times its first steps at 1, 2, 4, … "
                                               "up to torch's default and keeps the fastest)")
    p.add_argument("--output-site", help="a transcoder frontier: --site is the input (e.g. mlp_in.6), this the predicted site "
                                         "(mlp_out.6), which the splice replaces; the methods default to the transcoders")
    p.add_argument("--suite", help="comma-separated evaluations at matched L0 on each method's point nearest --suite-l0: "
                                   "probing, absorption, steering (keeps the dictionaries; docs/evaluation.md)")
    p.add_argument("--suite-l0", type=float, default=32.0, help="the matched L0 of --suite (default 32)")
    p.add_argument("--suite-full", action="store_true", help="--suite at `featurekit eval`'s default settings instead of the "
                                                             "smaller frontier ones (docs/evaluation.md)")
    p.add_argument("--combine", type=Path, nargs="+", metavar="DIR", help="train nothing: one table and plot in --out from "
                                                                          "frontier folders run with the same options; with --suite, "
                                                                          "the suite over all their matched points at once")
    p.add_argument("--keep", action="store_true", help="keep every trained dictionary (default: delete after scoring)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "frontier":
        return _frontier(args)
    from ..bench import synthetic

    cfg = synthetic.make_config(
        quick=args.quick, seed=args.seed, d=args.d, n_features=args.n_features, k=args.k, tokens=args.tokens, latents=args.latents,
        methods=args.methods.split(",") if args.methods else None,
        datasets=None if args.dataset == "all" else args.dataset.split(","),
    )
    synthetic.run_benchmark(cfg, args.out, log=(lambda line: None) if args.quiet else None)
    print(f"results: {args.out / 'results.md'}")
    return 0


def _frontier(args: argparse.Namespace) -> int:
    from ..bench import frontier
    from ..bench.frontier_suite import EVALUATIONS, SuiteSettings
    from ..errors import FeaturekitError

    suite = None
    if args.suite:
        names = tuple(e.strip() for e in args.suite.split(",") if e.strip())
        if set(names) - set(EVALUATIONS) or not names:
            raise FeaturekitError(f"--suite takes a comma-separated list of {', '.join(EVALUATIONS)}, got {args.suite!r}")
        suite = (SuiteSettings.full if args.suite_full else SuiteSettings)(target_l0=args.suite_l0, evaluations=names)
    if args.combine:
        frontier.combine(args.combine, args.out, suite=suite, log=(lambda line: None) if args.quiet else None)
        print(f"results: {args.out / 'results.md'}")
        return 0
    fc = frontier.main_config(model=args.model, site=args.site, output_site=args.output_site, source=args.source,
                              train_tokens=args.tokens, epochs=args.epochs, batch_size=args.batch_size,
                              latents=args.latents, ks=[int(k) for k in args.ks.split(",")] if args.ks else None,
                              methods=args.methods.split(",") if args.methods else None, eval_tokens=args.eval_tokens,
                              splice_contexts=args.splice_contexts, threads=args.threads)
    frontier.run_frontier(fc, args.out, keep=args.keep, log=(lambda line: None) if args.quiet else None, suite=suite)
    print(f"results: {args.out / 'results.md'}")
    return 0


def _mlp_sparsity(args: argparse.Namespace, progress: bool) -> int:
    from .._io import atomic_write_json
    from ..bench.mlp_sparsity import run_mlp_sparsity
    from ..evaluate.mlp_topk import DEFAULT_RULES

    result = run_mlp_sparsity(args.model, args.layers, args.ks, args.rules or DEFAULT_RULES, args.source, args.contexts,
                              args.context_len, device=args.device, progress=progress)
    print(f"{result['sites']}  n={result['n_neurons']}  tokens={result['tokens']}  ce_clean={result['ce_clean']:.4f}  "
          f"ce_zero_ablated={result['ce_zero_ablated']:.4f}  l0_clean={result['l0_clean']:.1f}")
    print(f"{'rule':<24}{'k':>6}{'l0':>9}{'ce':>9}{'delta_ce':>10}{'kl':>9}{'recovered':>11}")
    for r in result["rows"]:
        print(f"{r['rule']:<24}{r['k']:>6}{r['l0']:>9.1f}{r['ce']:>9.4f}{r['delta_ce']:>10.4f}{r['kl']:>9.4f}{r['loss_recovered']:>11.4f}")
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def _itda_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("itda-match", help="ITDA layer matching: one model's layers in two text orders, and against a second model")
    p.add_argument("--model-a", default="smollm2-135m", help="embedded name, local directory, .gguf file or Hub id")
    p.add_argument("--layers-a", type=int, nargs="+", help="resid_post layers (default: about 10, evenly spaced)")
    p.add_argument("--model-b", help="second model for the cross-model matrix (e.g. a Gemma-3-270M .gguf or folder)")
    p.add_argument("--layers-b", type=int, nargs="+")
    p.add_argument("--source", default="bbc", help="text source; one context per document")
    p.add_argument("--docs", type=int, default=160)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--k", type=int, default=40, help="matching-pursuit steps")
    p.add_argument("--threshold", type=float, default=4e-4, help="ITDA τ on ‖x/‖x‖ − x̂/‖x̂‖‖²/d")
    p.add_argument("--max-atoms", type=int, default=4096, help="size cap of the two-order fits")
    p.add_argument("--target-atoms", type=int, default=1500, help="cross-model: τ set so each dictionary has this many atoms; 0: fixed τ")
    p.add_argument("--seed", type=int, default=0, help="seed of the second document order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", type=Path, help="folder that keeps the harvested activations for later runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the pursuit's many small steps: 1 is fastest on a busy CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/itda_match"), help="output folder: result.json, result.md, heatmaps.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _itda_match(args: argparse.Namespace, progress: bool) -> int:
    import torch

    from ..bench.itda_match import run_itda_match, write_itda_match

    torch.set_num_threads(args.threads)
    result = run_itda_match(args.model_a, args.layers_a, args.model_b, args.layers_b, source=args.source, docs=args.docs,
                            context_len=args.context_len, k=args.k, threshold=args.threshold, max_atoms=args.max_atoms,
                            seed=args.seed, device=args.device, progress=progress, cache_dir=args.cache,
                            target_atoms=args.target_atoms or None)
    paths = write_itda_match(result, args.out)
    print(f"layer-matching score (two text orders): {result['order']['score']:.3f}")
    print(f"results: {paths['md']}")
    return 0


HANDLERS = {"bench": lambda args, progress: _bench(args), "mlp-sparsity": _mlp_sparsity, "itda-match": _itda_match}
