"""The `featurekit` command line: parses arguments, builds the config, calls the pipeline.

    featurekit run     [--config FILE] [--set key=value ...]    the whole job
    featurekit harvest [--config FILE] [--set key=value ...]    activations → runs/NAME/activations
    featurekit train   [--config FILE] [--set key=value ...]    cache → runs/NAME/dictionary
    featurekit train   --resume RUN_DIR                         continue a killed run exactly
    featurekit eval    RUN_DIR [--text SOURCE] [--set data.*=…]  held-out metrics → eval.json (other text → evals/LABEL/)
                       [--suite core,probing]                    … and sparse probing (BBC topics) → evals/sparse_probing.json
    featurekit features RUN_DIR [--text SOURCE]                 every latent's statistics and examples → features.sqlite
    featurekit serve   RUN_DIR [RUN_DIR ...] [--port N] [--host H]   the explorer: browse features, try a text, steer (web app)
    featurekit report  RUN_DIR                                  → report.html
    featurekit clean   RUN_DIR                                  remove the activation cache and checkpoint of a finished run
    featurekit config  [--methods]                              every config key with its default and meaning
    featurekit mlp-sparsity [--model M] [--layers L ...] [--k K ...]   loss cost of a top-k of the model's MLP neurons
    featurekit bench synthetic [--out DIR] [--quick] [--methods a,b] ...   every method on synthetic ground truth
    featurekit bench frontier  [--out DIR] [--methods a,b] [--ks 16,32] ... FVU/loss against L0 on the real model
    featurekit itda-match [--model-a M] [--model-b M] [--out DIR] ...   ITDA layer matching (Jaccard of atom labels)
    featurekit export neuronpedia RUN_DIR [--out DIR] [--features a-b,...]   the feature store as Neuronpedia batch JSON
    featurekit export saelens|sparsify RUN_DIR [--out DIR]   the run's dictionary in SAELens / sparsify format
    featurekit import PATH --name NAME [--model M] [--site S]   another library's dictionary as a run folder (eval, features, serve)
    featurekit explain RUN_DIR [--features IDS] [--judge SPEC] [--units U]   explain and score features with a judge LM
    featurekit trace (--set DIR | --transcoders DIR...) --prompt TEXT --out G.json   an attribution graph (circuits)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import FeaturekitError

EPILOG = (
    "Config keys use dots, e.g. --set site=resid_post.8 --set dictionary.n_latents=8192 --set train.lr=1e-3. "
    "Every run directory holds its resolved config.json; `featurekit run --config runs/NAME/config.json` reproduces it."
)


RUN_DIR_HELP = "a run folder written by `featurekit run` / `train` (runs/NAME, or wherever it was moved)"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML or JSON config file (defaults: the main job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable); `featurekit config` lists the keys")
    p.add_argument("--name", help="run name (shortcut for --set name=NAME); the run goes to out_dir/NAME (default runs/NAME)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in out_dir/NAME if its config differs (default: refuse; the same config continues it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurekit", description="Sparse dictionaries for neural network activations.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"featurekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the whole job: harvest, train, evaluate, report (a rerun continues from what is complete)",
                       epilog=EPILOG)
    _config_args(p)
    p = sub.add_parser("harvest", help="harvest activations into the run's activation cache", epilog=EPILOG)
    _config_args(p)
    p = sub.add_parser("train", help="train a dictionary on the run's activation cache", epilog=EPILOG)
    _config_args(p)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (from step 0 if it stopped before the first)")
    p = sub.add_parser("eval", help="evaluate the run's dictionary: held-out metrics, splice CE/KL, feature examples",
                       description="Evaluate RUN_DIR's dictionary. Without options: on the held-out split of the run's own text, "
                                   "written to RUN_DIR/eval.json and RUN_DIR/features/. With --text or --set data.*/eval.*/report.*: "
                                   "on other text (or with other settings), written to RUN_DIR/evals/LABEL/ beside the run's own results.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--text", metavar="SOURCE", help="evaluate on this text source (as data.source: embedded name, .txt/.jsonl/"
                                                    ".parquet path, folder of .txt files, hf:NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a data.*, eval.* or report.* value for this evaluation (repeatable)")
    p.add_argument("--split", choices=["test", "train", "all"],
                   help="which documents of the text (default: test on the run's own text, all on other text)")
    p.add_argument("--label", help="folder name under RUN_DIR/evals (default: the text's name and the split)")
    p.add_argument("--suite", default="core", metavar="NAMES",
                   help="comma-separated evaluations: core (held-out metrics, splice, feature examples; the default), "
                        "probing (sparse probing on BBC News's topics → RUN_DIR/evals/sparse_probing.json, SAEBench's format; "
                        "settings eval.probing_*)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("features", help="build the run's feature store (every latent's statistics, examples, logit effects)",
                       description="Build RUN_DIR/features.sqlite: for every latent its firing statistics, histogram, top and "
                                   "activation-quantile examples, top tokens, co-firing features, logit effects and decoder "
                                   "neighbours, from features.tokens tokens (the held-out split, then training text). `featurekit "
                                   "run` builds it as its last step; `featurekit serve RUN_DIR` browses it. Under torchrun the "
                                   "processes share the tokens.")
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
    p = sub.add_parser("serve", help="the explorer: a local web app over runs' feature stores (feature pages, search, try a text, steer)",
                       description="Serve RUN_DIR's feature store (and those of further runs, side by side) as a web app on "
                                   "http://127.0.0.1:PORT/: run overview, feature list and search (by token, id, explanation), "
                                   "feature pages, and live model calls (the features on each token of a text; steering). "
                                   "Read-only: nothing is written into a run folder. Ctrl-C stops it.")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help=RUN_DIR_HELP + "; several: switch between them")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any free port, printed at start)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; another address prints a warning: "
                        "anyone who can reach it can browse the runs and run the model)")
    _bench_parser(sub)
    _itda_parser(sub)
    _export_parser(sub)
    _import_parser(sub)
    _explain_parser(sub)
    _trace_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = False
    try:
        code = _bench(args) if args.command == "bench" else _dispatch(args)
        done = True
        return code
    except FeaturekitError as err:
        print(f"featurekit: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file featurekit had to read or write: name it and the cause
        where = f" {err.filename}" if err.filename else ""
        print(f"featurekit: error: cannot access{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group(sync=done)


def _leave_process_group(sync: bool) -> None:
    """Under torchrun: leave the process group before the interpreter exits. A gloo group left to the
    interpreter's teardown can abort the process ("terminate called without an active exception")
    after a successful run. `sync` (a successful command): after every rank is done (a barrier)."""
    distributed = sys.modules.get("featurekit.train.distributed")
    if distributed is not None:
        distributed.destroy(sync=sync)


def _dispatch(args: argparse.Namespace) -> int:
    progress = not getattr(args, "quiet", False)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if args.command == "config":
        from .config.help import describe

        print(describe(methods_only=args.methods))
        return 0
    if args.command == "mlp-sparsity":
        return _mlp_sparsity(args, progress)
    if args.command == "serve":
        from .app.server import serve

        return serve(args.run_dirs, host=args.host, port=args.port)
    if args.command == "itda-match":
        return _itda_match(args, progress)
    if args.command == "export":
        return _export(args)
    if args.command == "import":
        return _import(args)
    if args.command == "explain":
        return _explain(args, progress)
    if args.command == "trace":
        return _trace(args)
    if args.command in ("eval", "report", "clean", "features") or (args.command == "train" and args.resume):
        return _on_run_dir(args, progress)
    return _new_run(args, progress)


def _on_run_dir(args: argparse.Namespace, progress: bool) -> int:
    """Commands that work in an existing run folder: eval, report, clean, train --resume."""
    from . import pipeline, rundir
    from .report import write_report

    run_dir = args.resume if args.command == "train" else args.run_dir
    cfg = pipeline.load_run_config(run_dir)  # not a run folder: a clear error, nothing written
    if args.command == "train" and (args.config or args.overrides or args.name or args.overwrite):
        raise FeaturekitError("--resume continues a run with its own config.json; drop --config/--set/--name/--overwrite "
                              "(to change settings, start a new run)")
    if args.command == "train":
        _memory_policy(cfg)
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
    from . import pipeline
    from .config import load_config

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


def _featurekit_command() -> str:
    """How the user can call featurekit again: `featurekit` when that is on PATH, else the path this one ran as
    (e.g. `.venv/bin/featurekit` under make)."""
    import shutil

    me = Path(sys.argv[0])
    if me.name != "featurekit" or (shutil.which("featurekit") and Path(shutil.which("featurekit")).resolve() == me.resolve()):
        return "featurekit"
    return str(me)


def _memory_policy(cfg) -> None:
    """train.keep_freed_memory: glibc keeps freed memory for the next step (train/memory.py). Process-wide, so the
    command applies it for a run it trains, and the library never does on its own."""
    if cfg.train.keep_freed_memory:
        from .train.memory import keep_freed_memory

        keep_freed_memory()


EVAL_SUITES = ("core", "probing")


def _eval(args: argparse.Namespace, cfg, progress: bool) -> None:
    from . import pipeline

    suite = [name.strip() for name in args.suite.split(",") if name.strip()]
    unknown = sorted(set(suite) - set(EVAL_SUITES))
    if unknown or not suite:
        raise FeaturekitError(f"--suite {args.suite!r}: unknown evaluation(s) {', '.join(unknown) or '(none given)'}; "
                              f"valid: {', '.join(EVAL_SUITES)}")
    overrides = list(args.overrides) + ([f"data.source={args.text}"] if args.text else [])
    split, out = None, None
    if overrides or args.split or args.label:
        cfg, split, out = pipeline.other_text(cfg, overrides, args.split, args.label)
    loaded = pipeline.open_model(cfg)
    if "core" in suite:
        result = pipeline.run_eval(cfg, loaded, progress=progress, **({"split": split, "out_dir": out} if out else {}))
        print(_summary(result))
        if out:
            print(f"results: {out / 'eval.json'}")
    if "probing" in suite:
        from .pipeline.probing import run_probing

        result = run_probing(cfg, loaded, out_dir=out)
        print("sparse probing (BBC topics, held-out accuracy): " + ", ".join(
            f"{name} {value:.3f}" for name, value in result["eval_result_details"][0].items() if name.endswith("_accuracy")))
        print(f"results: {(out or cfg.run_dir / 'evals') / 'sparse_probing.json'}")


def _new_run(args: argparse.Namespace, progress: bool) -> int:
    """run, harvest, train: a run folder from a config (a new one, or the same config continued)."""
    from . import pipeline, rundir
    from .config import load_config

    overrides = list(args.overrides) + ([f"name={args.name}"] if args.name else [])
    cfg = pipeline.resolve(load_config(args.config, overrides))
    if args.command in ("run", "train"):
        _memory_policy(cfg)
    with rundir.locked(cfg.run_dir, args.command):
        if args.command == "run":
            report = pipeline.run_all(cfg, progress=progress, overwrite=args.overwrite)
            if not pipeline.distributed.is_main():  # under torchrun rank 0 evaluates and reports
                return 0
            print(_summary(pipeline.read_json(cfg.run_dir / "eval.json")))
            print(f"report: {report}")
            if not pipeline.setup.is_vision(cfg):  # the explorer reads text runs only (docs/vision.md)
                print(f"explore it: {_featurekit_command()} serve {cfg.run_dir}")
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


def _mlp_sparsity(args: argparse.Namespace, progress: bool) -> int:
    from ._io import atomic_write_json
    from .bench.mlp_sparsity import run_mlp_sparsity
    from .evaluate.mlp_topk import DEFAULT_RULES

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


def _summary(result: dict) -> str:
    keys = ("n_tokens", "fvu", "l0", "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero_ablated",
            "loss_recovered", "kl_clean_spliced", "cls_cosine", "patch_rel_change")
    return "  ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys if k in result)



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
    p.add_argument("--ks", help="comma-separated k values for the k-methods (default 16,32,64)")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method that trains on one site)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for FVU / L0 (default 32,768)")
    p.add_argument("--splice-contexts", type=int, help="held-out contexts for CE / KL (default 32)")
    p.add_argument("--threads", type=int, help="torch threads (default: each training run times its first steps at 1, 2, 4, … "
                                               "up to torch's default and keeps the fastest)")
    p.add_argument("--keep", action="store_true", help="keep every trained dictionary (default: delete after scoring)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "frontier":
        return _frontier(args)
    from .bench import synthetic

    cfg = synthetic.make_config(
        quick=args.quick, seed=args.seed, d=args.d, n_features=args.n_features, k=args.k, tokens=args.tokens, latents=args.latents,
        methods=args.methods.split(",") if args.methods else None,
        datasets=None if args.dataset == "all" else args.dataset.split(","),
    )
    synthetic.run_benchmark(cfg, args.out, log=(lambda line: None) if args.quiet else None)
    print(f"results: {args.out / 'results.md'}")
    return 0


def _frontier(args: argparse.Namespace) -> int:
    from .bench import frontier

    fc = frontier.main_config(model=args.model, site=args.site, source=args.source, train_tokens=args.tokens, epochs=args.epochs,
                              latents=args.latents, ks=[int(k) for k in args.ks.split(",")] if args.ks else None,
                              methods=args.methods.split(",") if args.methods else None, eval_tokens=args.eval_tokens,
                              splice_contexts=args.splice_contexts, threads=args.threads)
    frontier.run_frontier(fc, args.out, keep=args.keep, log=(lambda line: None) if args.quiet else None)
    print(f"results: {args.out / 'results.md'}")
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

    from .bench.itda_match import run_itda_match, write_itda_match

    torch.set_num_threads(args.threads)
    result = run_itda_match(args.model_a, args.layers_a, args.model_b, args.layers_b, source=args.source, docs=args.docs,
                            context_len=args.context_len, k=args.k, threshold=args.threshold, max_atoms=args.max_atoms,
                            seed=args.seed, device=args.device, progress=progress, cache_dir=args.cache,
                            target_atoms=args.target_atoms or None)
    paths = write_itda_match(result, args.out)
    print(f"layer-matching score (two text orders): {result['order']['score']:.3f}")
    print(f"results: {paths['md']}")
    return 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit export FORMAT RUN_DIR`: the feature store in other tools' formats."""
    export = sub.add_parser("export", help="write the run's feature store (neuronpedia) or dictionary (saelens, sparsify) in "
                                           "another tool's format")
    formats = export.add_subparsers(dest="format", required=True)
    p = formats.add_parser(
        "neuronpedia", help="the feature store as Neuronpedia / SAEDashboard batch JSON",
        description="Write RUN_DIR/features.sqlite as the JSON files SAEDashboard's neuronpedia-runner writes and "
                    "Neuronpedia imports: batch-N.json (per feature: activation examples with per-token values, logit "
                    "effects, activation histogram, density; top group first, then the quantile bands from the highest), "
                    "skipped_indexes.json (dead or unselected features) and run_settings.json. Fields the store holds "
                    "nothing for (neuron alignment, correlations, the logit histogram) are empty lists; what is "
                    "approximated is listed in docs/neuronpedia.md. Build the store first with `featurekit features RUN_DIR`.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder holding features.sqlite")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/exports/neuronpedia); earlier batch files there are replaced")
    p.add_argument("--features", metavar="IDS", help="only these features, e.g. 0-99,120,130-140 (default: every live feature)")
    p.add_argument("--batch-size", type=int, default=128, help="features per batch-N.json (default 128, as SAEDashboard)")
    p.add_argument("--model-id", help="Neuronpedia model id (default: the store's model name, lowercased, e.g. gpt2-small)")
    p.add_argument("--layer", type=int, help="layer number (default: the site's layer)")
    p.add_argument("--sae-set", help="Neuronpedia SAE set name (default featurekit-METHOD-SITEKIND, e.g. featurekit-topk-resid-post)")
    p.add_argument("--sae-id-suffix", help="suffix of the Neuronpedia source id (LAYER-SET__SUFFIX); default none")
    p.add_argument("--dataset", help="dataset name recorded per feature (default: the store's text sources)")
    _export_dictionary_parsers(formats)


def _export_dictionary_parsers(formats: argparse._SubParsersAction) -> None:
    """`featurekit export saelens|sparsify RUN_DIR`: the run's dictionary in another library's format (interop)."""
    p = formats.add_parser(
        "saelens", help="the run's dictionary as a SAELens folder (cfg.json + sae_weights.safetensors)",
        description="Write RUN_DIR/dictionary as the folder SAELens's SAE.load_from_disk reads: cfg.json + "
                    "sae_weights.safetensors, normalisation folded into the weights. relu → standard, topk/abstopk → topk/"
                    "abstopk, jumprelu → jumprelu, batchtopk/matryoshka → jumprelu with the global threshold per latent (as "
                    "SAELens saves its own BatchTopK). Other methods (transcoders, MP-SAE, ITDA, SNMF, Feature/Mutual Choice, "
                    "...) stop with an error saying why and what works instead. docs/interop.md has the mapping.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/exports/saelens)")
    p = formats.add_parser(
        "sparsify", help="the run's dictionary as an EleutherAI sparsify hookpoint folder (cfg.json + sae.safetensors)",
        description="Write RUN_DIR/dictionary as the folder sparsify's SparseCoder.load_from_disk reads, under OUT/HOOKPOINT "
                    "(layers.L for resid_post.L, layers.L.mlp for mlp_out.L or an mlp_in.L → mlp_out.L transcoder). topk → "
                    "SAE, transcoder / skiptranscoder → transcode (skip_connection); other methods stop with an error saying "
                    "why and what works instead. docs/interop.md has the mapping.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/exports/sparsify)")


def _export_dictionary(args: argparse.Namespace) -> int:
    from . import rundir
    from .dictionaries import load
    from .interop import export

    sae = load(args.run_dir / "dictionary")
    out = args.out or args.run_dir / "exports" / args.format
    with rundir.locked(args.run_dir, f"export {args.format} {args.run_dir}"):
        folder = export(sae, args.format, out)
    print(f"{args.format} export: {sae.method} dictionary ({sae.d_in} → {sae.n_latents}) in {folder}")
    return 0


def _import_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit import PATH`: a dictionary in any format featurekit.load reads, as a run folder (docs/interop.md)."""
    p = sub.add_parser(
        "import", help="another library's dictionary (SAELens, sparsify, Gemma Scope, dictionary_learning) as a run folder",
        description="Read PATH (a SAELens folder, a sparsify hookpoint folder, a Gemma Scope params.npz, a dictionary_learning "
                    "trainer folder, a featurekit dictionary, or hf:ORG/REPO with --subfolder) onto the featurekit method it "
                    "maps to, and write out_dir/NAME/config.json + dictionary/ so that featurekit eval, features, serve, report "
                    "and export work on it. The config names the model and site the file records (or --model / --site) and "
                    "takes --set overrides for the rest (data.source, eval.tokens, ...). docs/interop.md has the mapping.",
        epilog=EPILOG)
    p.add_argument("path", metavar="PATH", help="the dictionary file or folder, or hf:ORG/REPO")
    p.add_argument("--name", required=True, help="run name: the run goes to out_dir/NAME (default runs/NAME)")
    p.add_argument("--model", help="the model the dictionary reads (when the file does not record it, or to point at a local copy)")
    p.add_argument("--site", help="the featurekit site it reads, e.g. resid_post.6 (when the file's hook has no site)")
    p.add_argument("--subfolder", help="a folder inside PATH (or inside the Hub repository)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable), e.g. data.source=FILE")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in out_dir/NAME")


def _import(args: argparse.Namespace) -> int:
    from .pipeline.importing import import_run

    cfg = import_run(args.path, [*args.overrides, f"name={args.name}"], subfolder=args.subfolder, site=args.site,
                     model=args.model, overwrite=args.overwrite)
    print(f"imported {cfg.dictionary.method} dictionary ({cfg.dictionary.n_latents} latents, {cfg.site} of {cfg.model.name}) "
          f"into {cfg.run_dir}; next: featurekit eval {cfg.run_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format in ("saelens", "sparsify"):
        return _export_dictionary(args)
    from . import rundir
    from .features.export import export_neuronpedia, parse_features
    from .features.store import FeatureStore

    store = FeatureStore(args.run_dir)  # no store: a clear error, nothing written
    out = args.out or args.run_dir / "exports" / "neuronpedia"
    features = parse_features(args.features, store.n_latents) if args.features else None
    with rundir.locked(args.run_dir, f"export neuronpedia {args.run_dir}"):
        files = export_neuronpedia(store, out, features=features, batch_size=args.batch_size, model_id=args.model_id,
                                   layer=args.layer, sae_set=args.sae_set, sae_id_suffix=args.sae_id_suffix,
                                   dataset=args.dataset)
    batches = [f for f in files if f.name.startswith("batch-")]
    print(f"neuronpedia export: {len(batches)} batch file(s) and {len(files) - len(batches)} metadata file(s) in {out}")
    return 0


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
    p.add_argument("--explainers", default="highlight", help="comma-separated: highlight, logits (default highlight)")
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

    from .autointerp import Settings, explain_run, make_judge
    from .autointerp.settings import apply_overrides
    from .features.export import parse_features
    from .features.store import FeatureStore

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
        from .autointerp.compare import markdown, measure

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
    from .circuits import transcoder_set
    from .circuits.trace import target_ids, trace
    from .models.loading import load_model

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


if __name__ == "__main__":
    sys.exit(main())
