"""The run folder's life: run, harvest, train, eval, features, report, clean; config (the keys) and serve (the explorer)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import FeaturekitError
from .common import EPILOG, RUN_DIR_HELP, config_args, featurekit_command, memory_policy, summary


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole job: harvest, train, evaluate, report (a rerun continues from what is complete)",
                       epilog=EPILOG)
    config_args(p)
    p = sub.add_parser("harvest", help="harvest activations into the run's activation cache", epilog=EPILOG)
    config_args(p)
    p = sub.add_parser("train", help="train a dictionary on the run's activation cache", epilog=EPILOG)
    config_args(p)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (from step 0 if it stopped before the first)")
    p = sub.add_parser("eval", help="evaluate the run's dictionary: held-out metrics, splice CE/KL, feature examples",
                       description="Evaluate RUN_DIR's dictionary. Without options: on the held-out split of the run's own text, "
                                   "written to RUN_DIR/eval.json and RUN_DIR/features/. With --text or --set data.*/eval.*/report.*: "
                                   "on other text (or with other settings), written to RUN_DIR/evals/LABEL/ beside the run's own results. "
                                   "--suite splice_all takes several folders (runs, dictionaries, transcoder sets) of one model and "
                                   "splices all their dictionaries into one forward pass. Every suite evaluation writes a plot "
                                   "(NAME.png, NAME.svg) beside its JSON; `featurekit serve` shows them in the run overview.")
    p.add_argument("run_dir", type=Path, nargs="+", metavar="RUN_DIR",
                   help=RUN_DIR_HELP + " (--suite splice_all: one or more run, dictionary or transcoder set folders)")
    p.add_argument("--text", metavar="SOURCE", help="evaluate on this text source (as data.source: embedded name, .txt/.jsonl/"
                                                    ".parquet path, folder of .txt files, hf:NAME)")
    p.add_argument("--images", metavar="SOURCE", help="a vision run: evaluate on these images (as data.source: a folder of images, "
                                                      "skimage, photos, hf:PATH; default split all) → RUN_DIR/evals/LABEL/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a data.*, eval.* or report.* value for this evaluation (repeatable)")
    p.add_argument("--split", choices=["test", "train", "all"],
                   help="which documents of the text (default: test on the run's own text, all on other text)")
    p.add_argument("--label", help="folder name under RUN_DIR/evals (default: the text's name and the split)")
    p.add_argument("--suite", default="core", metavar="NAMES",
                   help="comma-separated evaluations: core (held-out metrics, splice, feature examples; the default), "
                        "probing (sparse probing on BBC News's topics → RUN_DIR/evals/sparse_probing.json, SAEBench's format; "
                        "settings eval.probing_*), probing_source (which corpus a text chunk comes from: news / Bible / Shakespeare "
                        "[/ Wikipedia] → evals/sparse_probing_source.json), probing_tokens (digit, capitalised word, plural-looking, "
                        "month tokens on per-token codes → evals/sparse_probing_tokens.json), absorption (first-letter feature absorption "
                        "→ evals/absorption_first_letter.json; eval.absorption_*), steering (KL-matched steering of features "
                        "against random, difference-of-means and PCA directions → evals/steering_kl_matched.json; eval.steering_*), "
                        "splice_all (on its own: every dictionary of the folders given spliced into one forward pass, each alone and "
                        "layers 0..L cumulatively: ΔCE, KL, loss recovered against eval.splice_ablation=zero|mean → "
                        "FIRST/evals/splice_all.json and .png; eval.splice_contexts, eval.splice_curves)")
    p.add_argument("--full", action="store_true",
                   help="absorption and steering with their full settings (every single-token word of the vocabulary; "
                        "32 features and 32 directions per baseline on 16 prompts) instead of the CPU-sized defaults")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("features", help="build the run's feature store (every latent's statistics, examples, logit effects)",
                       description="Build RUN_DIR/features.sqlite: for every latent its firing statistics, histogram, top and "
                                   "activation-quantile examples, top tokens, co-firing features, logit effects and decoder "
                                   "neighbours, from features.tokens tokens (the held-out split, then training text). `featurekit "
                                   "run` builds it as its last step; `featurekit serve RUN_DIR` browses it. Under torchrun the "
                                   "processes share the tokens. A vision run: from its held-out image views, CLS-token and "
                                   "patch firings apart, no logit effects (docs/vision.md).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--text", metavar="SOURCE", help="build it from this text source (all its documents) instead")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a features.* value (e.g. features.tokens=500000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("report", help="write the run's report.html from what the run holds (metrics, curves, features)")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p = sub.add_parser("clean", help="free disk: remove a finished run's activation cache and checkpoint, keeping the results",
                       description="Remove RUN_DIR/activations (the training activation cache) and RUN_DIR/checkpoint (the resumable "
                                   "training state) once the dictionary is finished. The dictionary, eval.json, features/, "
                                   "metrics.jsonl and report.html stay; a later `featurekit run` of the same config skips to "
                                   "what is missing.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p = sub.add_parser("config", help="list every config key with its default and meaning, and the dictionary methods")
    p.add_argument("--methods", action="store_true", help="only the dictionary methods")
    p = sub.add_parser("serve", help="the explorer: a local web app over runs' feature stores (feature pages, search, try a text, steer)",
                       description="Serve RUN_DIR's feature store (and those of further runs, side by side) as a web app on "
                                   "http://127.0.0.1:PORT/: run overview, feature list and search (by token, id, explanation), "
                                   "feature pages, and live model calls (the features on each token of a text; steering). "
                                   "A vision run: CLS-token and patch features apart, feature pages with crops and heat-maps "
                                   "of the top patches, try an image; with its feature store also the feature list, search by "
                                   "id and a page for every feature (docs/vision.md). "
                                   "Read-only: nothing is written into a run folder. Ctrl-C stops it.")
    p.add_argument("run_dirs", type=Path, nargs="*", metavar="RUN_DIR", help=RUN_DIR_HELP + "; several: switch between them")
    p.add_argument("--graphs", type=Path, nargs="+", default=[], metavar="G.json",
                   help="attribution graph files (`featurekit trace --out`) to view at /g/NAME/: layer x position layout, "
                        "hover, pruning, pins, interventions; feature nodes link to the served run whose dictionary is "
                        "that layer's transcoder; the stores `featurekit circuits features` wrote for a set's layers "
                        "(SET/stores/layer_L) are served with them (docs/circuits.md, Viewer)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any free port, printed at start)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; another address prints a warning: "
                        "anyone who can reach it can browse the runs and run the model)")


def config(args: argparse.Namespace, progress: bool) -> int:
    from ..config.help import describe

    print(describe(methods_only=args.methods))
    return 0


def serve(args: argparse.Namespace, progress: bool) -> int:
    from ..app.server import serve

    return serve(args.run_dirs, host=args.host, port=args.port, graph_paths=args.graphs)


def run_or_folder(args: argparse.Namespace, progress: bool) -> int:
    """run / harvest / train make or continue a run from a config; eval, features, report, clean and train --resume
    work in an existing run folder."""
    if args.command == "eval":
        if "splice_all" in {name.strip() for name in args.suite.split(",")}:
            return _splice_all(args, progress)
        if len(args.run_dir) != 1:
            raise FeaturekitError(f"featurekit eval takes one RUN_DIR (got {len(args.run_dir)}); only --suite splice_all "
                                  "takes several (the dictionaries spliced together)")
        args.run_dir = args.run_dir[0]
    if args.command in ("eval", "report", "clean", "features") or (args.command == "train" and args.resume):
        return _on_run_dir(args, progress)
    return _new_run(args, progress)


HANDLERS = {"config": config, "serve": serve, **{name: run_or_folder for name in
                                                 ("run", "harvest", "train", "eval", "features", "report", "clean")}}


def _on_run_dir(args: argparse.Namespace, progress: bool) -> int:
    """Commands that work in an existing run folder: eval, report, clean, train --resume."""
    from .. import pipeline, rundir
    from ..report import write_report

    run_dir = args.resume if args.command == "train" else args.run_dir
    cfg = pipeline.load_run_config(run_dir)  # not a run folder: a clear error, nothing written
    if args.command == "train" and (args.config or args.overrides or args.name or args.overwrite):
        raise FeaturekitError("--resume continues a run with its own config.json; drop --config/--set/--name/--overwrite "
                              "(to change settings, start a new run)")
    if args.command == "train":
        memory_policy(cfg)
    with rundir.locked(run_dir, f"{args.command} {run_dir}"):
        rundir.sweep(run_dir)
        if args.command == "report":
            print(f"report: {write_report(run_dir)}")
        elif args.command == "clean":
            freed = rundir.clean(run_dir)
            for name, size in freed.items():
                print(f"removed {run_dir / name} ({size / 2**20:.1f} MiB)")
            print(f"freed {sum(freed.values()) / 2**20:.1f} MiB; kept the dictionary and the results" if freed else "nothing to remove")
        elif args.command == "features":
            _features(args, cfg, progress)
        elif args.command == "train":
            if pipeline.dictionary_complete(cfg):
                print(f"dictionary: {cfg.run_dir / 'dictionary'} (already finished)")
                return 0
            pipeline.run_train(cfg, resume=True, progress=progress)
            if pipeline.distributed.is_main():
                print(f"dictionary: {cfg.run_dir / 'dictionary'}")
        else:
            _eval(args, cfg, progress)
    return 0


def _features(args: argparse.Namespace, cfg, progress: bool) -> None:
    from .. import pipeline
    from ..config import load_config

    bad = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith("features.")]
    if bad:
        raise FeaturekitError(f"featurekit features may change only features.* settings, not {', '.join(bad)}")
    if args.overrides:
        new = load_config(cfg.run_dir / "config.json", args.overrides)
        cfg.features = new.features
    pipeline.distributed.init_from_env()
    path = pipeline.run_features(cfg, progress=progress, text=args.text)
    if path is not None:
        print(f"feature store: {path}")
        print(f"browse it: featurekit serve {cfg.run_dir}")


EVAL_SUITES = ("core", "probing", "probing_source", "probing_tokens", "absorption", "steering")  # splice_all: _splice_all


def _eval(args: argparse.Namespace, cfg, progress: bool) -> None:
    from .. import pipeline

    suite = [name.strip() for name in args.suite.split(",") if name.strip()]
    unknown = sorted(set(suite) - set(EVAL_SUITES))
    if unknown or not suite:
        raise FeaturekitError(f"--suite {args.suite!r}: unknown evaluation(s) {', '.join(unknown) or '(none given)'}; "
                              f"valid: {', '.join(EVAL_SUITES)}; or splice_all on its own (one or more folders)")
    if args.text and args.images:
        raise FeaturekitError("give --text (a text run) or --images (a vision run), not both")
    source = args.text or args.images
    overrides = list(args.overrides) + ([f"data.source={source}"] if source else [])
    split, out = None, None
    if overrides or args.split or args.label:
        cfg, split, out = pipeline.other_text(cfg, overrides, args.split, args.label)
    loaded = pipeline.open_model(cfg)
    if "core" in suite:
        result = pipeline.run_eval(cfg, loaded, progress=progress, **({"split": split, "out_dir": out} if out else {}))
        print(summary(result))
        if out:
            print(f"results: {out / 'eval.json'}")
    if "probing" in suite:
        from ..pipeline.probing import run_probing

        result = run_probing(cfg, loaded, out_dir=out)
        print("sparse probing (BBC topics, held-out accuracy): " + ", ".join(
            f"{name} {value:.3f}" for name, value in result["eval_result_details"][0].items() if name.endswith("_accuracy")))
        print(f"results: {(out or cfg.run_dir / 'evals') / 'sparse_probing.json'}")
    for name, what in (("probing_source", "text source"), ("probing_tokens", "token classes")):
        if name in suite:
            from ..pipeline import probing_tasks

            result = getattr(probing_tasks, f"run_{name}")(cfg, loaded, out_dir=out)
            mean = {k: v for group in result["eval_result_metrics"].values() for k, v in group.items()}
            print(f"sparse probing ({what}, held-out accuracy): " + (", ".join(f"{k} {v:.3f}" for k, v in mean.items()) or "no task"))
            for task, why in (result["eval_result_unstructured"].get("skipped") or {}).items():
                print(f"  skipped {task}: {why}")
            print(f"results: {(out or cfg.run_dir / 'evals') / f'sparse_{name}.json'}")
    if args.full:
        from ..pipeline.absorption import FULL_SETTINGS as full_absorption
        from ..pipeline.steering import FULL_SETTINGS as full_steering

        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **full_absorption, **full_steering))
    if "absorption" in suite:
        from ..pipeline.absorption import run_absorption

        result = run_absorption(cfg, loaded, out_dir=out)
        unstructured, mean = result["eval_result_unstructured"], result["eval_result_metrics"]["mean"]
        f1s = [f"{letter} {f1:.2f}" for letter, f1 in unstructured["probe_f1"].items() if f1 is not None]
        print(f"absorption (first letter): ground-truth probe F1 {', '.join(f1s) or 'none'}; "
              f"{unstructured['n_scored_letters']} letters scored")
        if mean:
            print(f"  mean absorption fraction {mean['mean_absorption_fraction_score']:.3f}, full absorption "
                  f"{mean['mean_full_absorption_score']:.3f}, split features {mean['mean_num_split_features']:.2f}")
        for warning in unstructured["warnings"]:
            print(f"  warning: {warning}")
        print(f"results: {(out or cfg.run_dir / 'evals') / 'absorption_first_letter.json'}")
    if "steering" in suite:
        from ..pipeline.steering import run_steering

        result = run_steering(cfg, loaded, out_dir=out)
        print("KL-matched steering, probability gain of the promoted tokens at each target KL (mean over signed directions):")
        for kind, metrics in result["eval_result_metrics"].items():
            gains = [f"KL {key.removeprefix('prob_gain_at_kl_')}: " + ("not reached" if value is None else f"{value:+.4f}")
                     for key, value in metrics.items() if key.startswith("prob_gain_at_kl_")]
            print(f"  {kind:14s} " + ", ".join(gains))
        print(f"results: {(out or cfg.run_dir / 'evals') / 'steering_kl_matched.json'}")


def _splice_all(args: argparse.Namespace, progress: bool) -> int:
    """`featurekit eval FOLDER... --suite splice_all` (pipeline/splice_layers.py)."""
    from ..pipeline.splice_layers import run_splice_all

    if args.suite.replace(" ", "") != "splice_all":
        raise FeaturekitError(f"--suite {args.suite!r}: splice_all reads several folders and runs on its own; run the other "
                              "evaluations with one RUN_DIR each")
    if args.text or args.split or args.full:
        raise FeaturekitError("splice_all scores the held-out split of the first run's text; change it with "
                              "--set data.source=SOURCE (no --text / --split / --full)")
    result, path = run_splice_all(args.run_dir, args.overrides, args.label, progress=progress)
    config = result["eval_config"]
    print(f"{len(result['eval_result_details'])} dictionaries spliced on {config['scored_tokens']} held-out tokens "
          f"({config['ablation']}-ablation baseline):")
    for row in result["eval_result_details"]:
        print(f"  {row['output_site']:14s} " + " | ".join(
            f"{what}: ΔCE {row[curve]['delta_ce']:+.4f} KL {row[curve]['kl_clean_spliced']:.4f} "
            f"recovered {row[curve]['loss_recovered']:.3f}"
            for curve, what in (("alone", "alone"), ("cumulative", "layers up to here")) if curve in row))
    every = result["eval_result_metrics"]["all"]
    print(f"all at once: CE clean {every['ce_clean']:.4f}, spliced {every['ce_spliced']:.4f}, ablated {every['ce_ablated']:.4f}; "
          f"ΔCE {every['delta_ce']:+.4f}, KL {every['kl_clean_spliced']:.4f}, loss recovered {every['loss_recovered']:.3f}")
    print(f"results: {path}")
    return 0


def _new_run(args: argparse.Namespace, progress: bool) -> int:
    """run, harvest, train: a run folder from a config (a new one, or the same config continued)."""
    from .. import pipeline, rundir
    from ..config import load_config

    overrides = list(args.overrides) + ([f"name={args.name}"] if args.name else [])
    cfg = pipeline.resolve(load_config(args.config, overrides))
    if args.command in ("run", "train"):
        memory_policy(cfg)
    with rundir.locked(cfg.run_dir, args.command):
        if args.command == "run":
            report = pipeline.run_all(cfg, progress=progress, overwrite=args.overwrite)
            if not pipeline.distributed.is_main():  # under torchrun rank 0 evaluates and reports
                return 0
            print(summary(pipeline.read_json(cfg.run_dir / "eval.json")))
            print(f"report: {report}")
            if not pipeline.setup.is_vision(cfg):  # the explorer reads text runs only (docs/vision.md)
                print(f"explore it: {featurekit_command()} serve {cfg.run_dir}")
            return 0
        pipeline.preflight(cfg)
        pipeline.start(cfg, overwrite=args.overwrite)
        if args.command == "harvest":
            cache = pipeline.run_harvest(cfg, progress=progress)
            print(f"activation cache: {cache.dir} ({cache.n_tokens} tokens)")
        elif pipeline.dictionary_complete(cfg):
            print(f"dictionary: {cfg.run_dir / 'dictionary'} (already finished for this config and text)")
        else:  # the same config continues from its checkpoint
            pipeline.run_train(cfg, resume=(cfg.run_dir / "checkpoint" / "state.json").is_file(), progress=progress)
            if pipeline.distributed.is_main():  # under torchrun: once
                print(f"dictionary: {cfg.run_dir / 'dictionary'}")
    return 0

