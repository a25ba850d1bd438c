"""`featurekit import`: another library's dictionary (or a featurekit folder) as a run folder, so the commands that
take a RUN_DIR (eval, features, serve, report, export) work on it.

The run's config names the model and site the file records (or `--model` / `--site`), the registered method the
file maps onto with its hyper-parameters, and whatever `overrides` set (the text to evaluate on, eval sizes, ...).
The dictionary is saved in featurekit's format with its source and provenance (`imported_from`). Nothing is
trained: the run has no activation cache or checkpoint.
"""

from __future__ import annotations

import json

from .. import rundir
from ..config import RunConfig, load_config
from ..dictionaries import save
from ..dictionaries.registry import param_names
from ..errors import FeaturekitError
from ..interop import load
from .setup import resolve, start


def import_run(path: str, overrides: list[str], *, subfolder: str | None = None, site: str | None = None,
               model: str | None = None, overwrite: bool = False) -> RunConfig:
    """Load `path` (any format `featurekit.load` reads), write out_dir/NAME/{config.json, dictionary/}; the config."""
    d = load(path, subfolder=subfolder, site=site, model=model)
    src = d.metadata.get("source", {})
    missing = [k for k in ("model", "site") if not src.get(k)]
    if missing:
        raise FeaturekitError(f"{path} does not record its {' or '.join(missing)}; pass "
                              f"{' and '.join('--' + k for k in missing)} (e.g. --model gpt2 --site resid_post.6)")
    hyper = {k: v for k, v in d.hyperparams().items() if k in param_names(d.method)}
    sets = [f"model.name={src['model']}", f"site={src['site']}", f"dictionary.method={d.method}",
            f"dictionary.n_latents={d.n_latents}", *[f"dictionary.{k}={json.dumps(v)}" for k, v in hyper.items()],
            *([f"output_site={src['output_site']}"] if src.get("output_site") else [])]
    cfg = resolve(load_config(None, sets + list(overrides)))
    if (cfg.site, cfg.output_site) != (src["site"], src.get("output_site") or cfg.output_site):
        raise FeaturekitError(f"--set site/output_site cannot change where the dictionary reads ({src['site']}); drop them")
    start(cfg, overwrite=overwrite)
    src = {**src, "model": cfg.model.name}  # a local model folder as the resolved config names it
    with rundir.locked(cfg.run_dir, f"import {path}"):
        save(d, cfg.run_dir / "dictionary", metadata={"source": src, "provenance": d.metadata.get("provenance", {})})
    return cfg
