"""What every command group shares: the config options, help texts, the eval summary line, memory policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = (
    "Config keys use dots, e.g. --set site=resid_post.8 --set dictionary.n_latents=8192 --set train.lr=1e-3. "
    "Every run directory holds its resolved config.json; `featurekit run --config runs/NAME/config.json` reproduces it."
)


RUN_DIR_HELP = "a run folder written by `featurekit run` / `train` (runs/NAME, or wherever it was moved)"



def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML or JSON config file (defaults: the main job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable); `featurekit config` lists the keys")
    p.add_argument("--name", help="run name (shortcut for --set name=NAME); the run goes to out_dir/NAME (default runs/NAME)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in out_dir/NAME if its config differs (default: refuse; the same config continues it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def featurekit_command() -> str:
    """How the user can call featurekit again: `featurekit` when that is on PATH, else the path this one ran as
    (e.g. `.venv/bin/featurekit` under make)."""
    import shutil

    me = Path(sys.argv[0])
    if me.name != "featurekit" or (shutil.which("featurekit") and Path(shutil.which("featurekit")).resolve() == me.resolve()):
        return "featurekit"
    return str(me)


def memory_policy(cfg) -> None:
    """train.keep_freed_memory: glibc keeps freed memory for the next step (train/memory.py). Process-wide, so the
    command applies it for a run it trains, and the library never does on its own."""
    if cfg.train.keep_freed_memory:
        from ..train.memory import keep_freed_memory

        keep_freed_memory()


def summary(result: dict) -> str:
    keys = ("n_tokens", "fvu", "l0", "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero_ablated",
            "loss_recovered", "kl_clean_spliced", "cls_cosine", "patch_rel_change")
    return "  ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys if k in result)

