"""The `featurekit` command line: parses arguments, builds the config, calls the pipeline.

    featurekit run     [--config FILE] [--set key=value ...]    the whole job
    featurekit harvest [--config FILE] [--set key=value ...]    activations → runs/NAME/activations
    featurekit train   [--config FILE] [--set key=value ...]    cache → runs/NAME/dictionary
    featurekit train   --resume runs/NAME                       continue a killed run exactly
    featurekit eval    runs/NAME                                held-out metrics → eval.json
    featurekit report  runs/NAME                                → report.html
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import FeaturekitError

EPILOG = (
    "Config keys use dots, e.g. --set site=resid_post.8 --set dictionary.n_latents=8192 --set train.lr=1e-3. "
    "Every run directory holds its resolved config.json; `featurekit run --config runs/NAME/config.json` reproduces it."
)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML or JSON config file (defaults: the main job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--name", help="run name (shortcut for --set name=NAME)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurekit", description="Sparse dictionaries for neural network activations.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the whole job: harvest, train, evaluate, report", epilog=EPILOG)
    _config_args(p)
    p = sub.add_parser("harvest", help="harvest activations into the run's activation cache", epilog=EPILOG)
    _config_args(p)
    p = sub.add_parser("train", help="train a dictionary on the run's activation cache", epilog=EPILOG)
    _config_args(p)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p = sub.add_parser("eval", help="evaluate the run's dictionary on held-out text (writes eval.json)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("report", help="write the run's report.html")
    p.add_argument("run_dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _dispatch(args)
    except FeaturekitError as err:
        print(f"featurekit: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline
    from .config import load_config
    from .report import write_report

    progress = not getattr(args, "quiet", False)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if args.command == "report":
        print(f"report: {write_report(args.run_dir)}")
        return 0
    if args.command == "eval":
        result = pipeline.run_eval(pipeline.load_run_config(args.run_dir), progress=progress)
        print(_summary(result))
        return 0
    if args.command == "train" and args.resume:
        if args.config or args.overrides or args.name:
            raise FeaturekitError("--resume continues a run with its own config.json; drop --config/--set/--name "
                                  "(to change settings, start a new run)")
        cfg = pipeline.load_run_config(args.resume)
        pipeline.run_train(cfg, resume=True, progress=progress)
        print(f"dictionary: {cfg.run_dir / 'dictionary'}")
        return 0
    overrides = list(args.overrides) + ([f"name={args.name}"] if args.name else [])
    cfg = pipeline.resolve(load_config(args.config, overrides))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_config(cfg)
    if args.command == "harvest":
        cache = pipeline.run_harvest(cfg, progress=progress)
        print(f"activation cache: {cache.dir} ({cache.n_tokens} tokens)")
    elif args.command == "train":
        pipeline.run_train(cfg, progress=progress)
        print(f"dictionary: {cfg.run_dir / 'dictionary'}")
    else:
        report = pipeline.run_all(cfg, progress=progress)
        print(_summary(pipeline.read_json(cfg.run_dir / "eval.json")))
        print(f"report: {report}")
    return 0


def _summary(result: dict) -> str:
    keys = ("n_tokens", "fvu", "l0", "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero_ablated",
            "loss_recovered", "kl_clean_spliced")
    return "  ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys if k in result)


if __name__ == "__main__":
    sys.exit(main())
