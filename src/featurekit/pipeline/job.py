"""The main job, `featurekit run`: harvest → train → evaluate → feature store → report, continuing from whatever
is complete.

A rerun of the same command (after a kill, or after it finished) redoes nothing that is done: a complete
activation cache is not harvested again, training resumes from its checkpoint, a dictionary finished
under this config and on this data (`dictionary_complete`) is not trained again, a complete evaluation
of that dictionary (`eval_complete`) is not run again, nor a complete feature store of it (`store_complete`);
the report is always rewritten.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..errors import note
from ..report import write_report
from ..train import distributed
from .evaluation import eval_complete, run_eval
from .features import run_features, store_complete
from .setup import contexts, is_vision, open_model, preflight, resolve, start
from .training import dictionary_complete, run_harvest, run_train


def run_all(cfg: RunConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """The main job (module docstring). `overwrite` replaces a run of another config in the same folder.
    Returns the report's path."""
    cfg = resolve(cfg)
    preflight(cfg)
    if is_vision(cfg):  # images through a vision transformer: the same steps on image views (pipeline/vision.py)
        from .vision import run_vision

        return run_vision(cfg, progress, overwrite)
    loaded = open_model(cfg)
    contexts(loaded, cfg, "test", cfg.eval.tokens)  # a held-out split too short for one context fails now, not after training
    start(cfg, overwrite)
    if dictionary_complete(cfg, loaded):
        note(f"{cfg.run_dir / 'dictionary'} is this config's finished dictionary on the same text and model: "
             f"harvest and training skipped")
    else:
        if cfg.data.cache:
            if distributed.init_from_env() and not distributed.is_main():  # torchrun: rank 0 harvests, the others wait
                distributed.barrier()
            else:
                run_harvest(cfg, loaded, progress)
                distributed.barrier()
        resume = (cfg.run_dir / "checkpoint" / "state.json").is_file()
        run_train(cfg, resume=resume, progress=progress, loaded=loaded)
    if not distributed.is_main():
        return cfg.run_dir / "report.html"
    if eval_complete(cfg):
        note(f"{cfg.run_dir / 'eval.json'} already scores this dictionary: evaluation skipped")
    else:
        run_eval(cfg, loaded, progress)
    if store_complete(cfg):
        note(f"{cfg.run_dir / 'features.sqlite'} already describes this dictionary: feature store skipped")
    else:
        run_features(cfg, loaded, progress, shard=False)  # the other ranks have left: rank 0 builds it alone
    return write_report(cfg.run_dir)
