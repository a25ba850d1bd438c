"""The artefacts of an autointerp run on disk, one folder per stage, one file per unit:

    OUT/settings.json                     what the examples depend on (the store's identity, example and pool settings)
    OUT/pool.safetensors, pool.json       the pool (`pool.py`); pool_tiles.safetensors: its MiniLM tile vectors
    OUT/examples/U.json                   a unit's examples (`examples.py`)
    OUT/explanations/E@J/U.json           explainer E's explanation by judge J  (+ _stage.json: the judge, the settings)
    OUT/scores/E@J/S/U.json               scorer S of that explanation           (+ _stage.json)
    OUT/scores/E@J~shuffled/S/U.json      the shuffled-explanations control: unit U scored with another unit's explanation
    OUT/scores/intruder@J/U.json          the explanation-free intruder test
    OUT/summary.json                      the aggregate (deterministic: the same artefacts give the same bytes)
    OUT/runs.jsonl                        one line per invocation: judge requests, cache hits, tokens, seconds
    OUT/cache/                            the replay cache (`cache.py`)

Every file is written atomically (temporary file + rename), so a killed run leaves whole files only; a rerun
skips every unit whose file exists and does the rest. A stage folder whose `_stage.json` records other
settings is refused (naming the keys) unless the run is told to overwrite; then that stage starts over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..errors import FeaturekitError
from ..rundir import differing_keys


def unit_file(folder: Path, unit: int) -> Path:
    return folder / f"{int(unit):07d}.json"


def read_unit(folder: Path, unit: int) -> dict | None:
    try:
        return json.loads(unit_file(folder, unit).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as err:  # not ours (atomic writes leave no half files): say so rather than guess
        raise FeaturekitError(f"{unit_file(folder, unit)} is not valid JSON ({err}): delete it and rerun") from err


def write_unit(folder: Path, unit: int, data: dict) -> None:
    atomic_write_json(unit_file(folder, unit), data)


def stage(folder: Path, identity: dict[str, Any], overwrite: bool, what: str) -> Path:
    """Make sure `folder` holds results of exactly `identity` (module docstring); returns the folder."""
    marker = folder / "_stage.json"
    if marker.is_file():
        old = json.loads(marker.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(identity)):
            if not overwrite:
                keys = differing_keys(old, json.loads(json.dumps(identity)))
                raise FeaturekitError(f"{folder} holds {what} made with other settings ({', '.join(keys) or 'settings'} differ): "
                                      f"pass --overwrite to redo them, or --out for another folder")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_json(marker, identity)
    return folder


def sweep(out: Path) -> None:
    """Remove temporary files left by killed atomic writes."""
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
