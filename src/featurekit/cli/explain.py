"""featurekit explain: explanations and scores for features, from a judge LM (autointerp)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FeaturekitError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _explain_parser(sub)


def _explain_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit explain RUN_DIR`: automated interpretability (featurekit.autointerp, docs/autointerp.md)."""
    p = sub.add_parser(
        "explain", help="explain the run's features with a judge language model and score the explanations",
        description="Explain RUN_DIR's features (or, as controls, the model's MLP neurons or random directions) with a judge "
                    "language model, and score the explanations: detection, fuzzing, surprisal, embedding and the "
                    "explanation-free intruder test. Stages with artefacts under RUN_DIR/autointerp/UNITS/ (pool, examples, "
                    "explanations, scores, summary.json), each resumable: a rerun, or a run killed and restarted, redoes only "
                    "what is missing, and a replay cache of every judge answer makes a rerun free and reproducible. The "
                    "explanations and scores go into the feature store (featurekit serve shows them). docs/autointerp.md "
                    "describes the prompts, scorers and judges, and how to point it at a bigger judge (vLLM, llama.cpp, Ollama).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder holding features.sqlite")
    p.add_argument("--features", metavar="IDS", help="unit ids and ranges, e.g. 0-99,120 (default: --n-features of them, "
                                                   "a seeded sample of the live ones)")
    p.add_argument("--n-features", type=int, default=32, help="how many units when --features is not given (default 32)")
    p.add_argument("--units", default="features", help="features (default); mlp_hidden.L: the model's MLP neurons at layer L; "
                                                       "random: random unit directions at the run's site")
    p.add_argument("--judge", help="hf:NAME (a model featurekit loads, in this process: embedded name, folder, .gguf) or the "
                                   "http(s) base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 "
                                   "(default hf:smollm2-135m)")
    p.add_argument("--judge-model", help="the model name on the judge server (default: the only one it serves)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the judge server's API key (none if unset)")
    p.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at once (HTTP judges; default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request (default 120)")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed judge request, with back-off (default 3)")
    p.add_argument("--no-logprobs", action="store_true", help="do not ask the judge for log-probabilities (no AUC then)")
    p.add_argument("--judge-body", metavar="JSON", help="extra fields for every request to an HTTP judge, e.g. '{\"top_k\": 1}'")
    p.add_argument("--explainers", default="highlight",
                   help="comma-separated: highlight, logits, tokens (no judge: the top tokens; a baseline) (default highlight)")
    p.add_argument("--scorers", default="detection,fuzzing,surprisal,embedding,intruder",
                   help="comma-separated subset of detection, fuzzing, surprisal, embedding, intruder (default: all)")
    p.add_argument("--shuffled", action="store_true", help="also score each explanation on another unit (the chance level)")
    p.add_argument("--controls", action="store_true",
                   help="the measurement with its controls: --n-features features, as many MLP neurons of the site's layer "
                        "(or --layer) and random directions, and shuffled explanations, with the same judge and settings; "
                        "the table goes to RUN_DIR/autointerp/comparison.md")
    p.add_argument("--layer", type=int, help="the layer of the MLP-neuron control (default: the site's layer)")
    p.add_argument("--surprisal-model", help="causal LM of the surprisal scorer (default: the judge's model if it runs in "
                                             "this process, else smollm2-135m)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting, e.g. examples.n_explain=10, scoring.n_shown=5, pool_contexts=256 (docs/autointerp.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample and shuffle (default 0)")
    p.add_argument("--out", type=Path, help="artefact folder (default RUN_DIR/autointerp/UNITS)")
    p.add_argument("--cache", type=Path, help="replay cache folder (default OUT/cache); share one between runs to reuse answers")
    p.add_argument("--no-store", action="store_true", help="do not write the explanations into the feature store")
    p.add_argument("--overwrite", action="store_true", help="redo stages whose artefacts were made with other settings")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="where in-process judge and surprisal models run: cpu (default), cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _explain(args: argparse.Namespace, progress: bool) -> int:
    import json

    from ..autointerp import Settings, explain_run, make_judge
    from ..autointerp.settings import apply_overrides
    from ..features.export import parse_features
    from ..features.store import FeatureStore

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = Settings(explainers=tuple(x.strip() for x in args.explainers.split(",") if x.strip()),
                        scorers=tuple(x.strip() for x in args.scorers.split(",") if x.strip()), seed=args.seed,
                        shuffled=args.shuffled)
    settings = apply_overrides(settings, args.overrides)
    store = FeatureStore(args.run_dir)  # no store: a clear error before any model loads
    n_ids = store.n_latents if args.units == "features" else 1 << 31
    ids = parse_features(args.features, n_ids) if args.features else None
    store.close()
    try:
        body = json.loads(args.judge_body) if args.judge_body else None
    except ValueError as err:
        raise FeaturekitError(f"--judge-body is not JSON ({err}): give an object like '{{\"top_k\": 1}}'") from None
    if body is not None and not isinstance(body, dict):
        raise FeaturekitError("--judge-body must be a JSON object")
    judge = make_judge(args.judge, model=args.judge_model, api_key_env=args.api_key_env, concurrency=args.concurrency,
                       timeout=args.timeout, retries=args.retries, logprobs=not args.no_logprobs, extra_body=body,
                       device=args.device)
    if args.controls:
        from ..autointerp.compare import markdown, measure

        if args.features or args.out or args.cache or args.units != "features":
            raise FeaturekitError("--controls picks its own units and folders: drop --features, --units, --out and --cache")
        table = measure(args.run_dir, n_units=args.n_features, layer=args.layer, judge=judge, settings=settings,
                        surprisal_model=args.surprisal_model, progress=progress, overwrite=args.overwrite, device=args.device)
        print(markdown(table), end="")
        return 0
    summary = explain_run(args.run_dir, units=args.units, ids=ids, n_units=args.n_features, judge=judge, out=args.out,
                          cache=args.cache, settings=settings, surprisal_model=args.surprisal_model,
                          write_to_store=not args.no_store, progress=progress, overwrite=args.overwrite, device=args.device)
    print(_explain_report(summary))
    return 0


def _explain_report(summary: dict) -> str:
    lines = [f"{summary['units']}: {summary['requested']} unit(s), {summary['with_examples']} with enough examples, "
             f"{len(summary['skipped'])} skipped for too few; judge {summary['judge']['label']}"]

    def fmt(m: dict) -> str:
        if m["mean"] is None:
            return "n/a"
        ci = f" [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else ""
        return f"{m['mean']:.3f}{ci} (n={m['n']})"

    main = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy", "surprisal": "auc", "embedding": "auc"}
    for name, entry in summary["explainers"].items():
        lines.append(f"{name}: {entry['explained']} explained, {len(entry['unparseable'])} unparseable answer(s)")
        for group in ("scores", "shuffled"):
            for scorer, s in entry.get(group, {}).items():
                extra = f", AUC {fmt(s['auc'])}" if scorer in ("detection", "fuzzing") and s["auc"]["n"] else ""
                lines.append(f"  {scorer}{' (shuffled)' if group == 'shuffled' else ''}: {main[scorer]} {fmt(s[main[scorer]])}{extra}; "
                             f"{s['unparsed_answers']}/{s['answers']} answers unparseable")
    if "intruder" in summary:
        s = summary["intruder"]
        chance = "n/a" if s["chance"]["mean"] is None else f"{s['chance']['mean']:.3f}"
        lines.append(f"intruder: accuracy {fmt(s['accuracy'])} (chance {chance}); "
                     f"{s['unparsed_answers']}/{s['answers']} answers unparseable")
    r = summary.get("requests", {})
    lines.append(f"judge requests: {r.get('sent', 0)} sent, {r.get('replayed', 0)} from the replay cache; tokens "
                 f"{r.get('prompt_tokens', 0)} in, {r.get('completion_tokens', 0)} out")
    return "\n".join(lines)


HANDLERS = {"explain": _explain}
