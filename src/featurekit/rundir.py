"""The run directory as a unit: one writer at a time, no stale temporary files, no silent overwrite.

A run folder is self-contained and relocatable: every command that takes RUN_DIR works inside that
folder, wherever it lies and whatever its name (`pipeline.load_run_config` points the config there).

- **Lock** (`locked`): every command that writes into a run folder holds an exclusive `flock` on
  `RUN_DIR/.lock` for its whole duration. The kernel releases it when the holder exits, however it
  exits (SIGKILL included), so a crashed run never leaves it stuck. A second writer is refused at
  once with the holder's pid, command and start time (which the holder writes into the file).
  Under torchrun only rank 0 takes it.
- **Stale files** (`sweep`): a killed atomic write leaves `.NAME.XXXX.tmp`; a killed dictionary save
  leaves `.dictionary.XXXX/` or `.dictionary.old/`; a kill between a checkpoint's tensor file and its
  `state.json` leaves a tensor file nobody refers to. They are removed when a command starts (under
  the lock, so never another writer's file in flight).
- **Same config or nothing** (`check_config`): a run name whose folder holds a config.json that
  differs from the new one is refused (naming the differing keys) unless `--overwrite` is given,
  which empties the folder first.
- **Cleaning** (`clean`): removes what can be recomputed (the activation cache, the checkpoint) once
  the dictionary is complete, keeping the results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._io import read_json
from .errors import FeaturekitError

LOCK = ".lock"
RECOMPUTABLE = ("activations", "checkpoint")  # what `clean` removes: the training cache and the resumable state
_STALE_DIR = re.compile(r"^\.dictionary\.(old|[A-Za-z0-9_]+)$")


def rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextmanager
def locked(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run folder's lock while the block runs (see the module docstring)."""
    if rank() != 0:  # torchrun: rank 0 holds it for the whole job
        yield
        return
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(run_dir / LOCK, "a+", encoding="utf-8")
    except OSError as err:
        raise FeaturekitError(f"cannot use the run folder {run_dir} ({err.strerror or err}): "
                              f"check that it is writable, or choose another out_dir / --name") from err
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fh)
            raise FeaturekitError(f"the run folder {run_dir} is in use by another featurekit process ({holder}); wait "
                                  f"for it to finish or stop it, or use another --name") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        fh.flush()
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:  # a command that failed before writing anything
            (run_dir / LOCK).unlink(missing_ok=True)
            run_dir.rmdir()
        fh.close()  # closing the descriptor releases the lock


def _read_holder(fh: Any) -> str:
    """The lock holder's description; it writes it just after taking the lock, so a reader that comes in
    between (an empty or half-written file) looks again for up to a second."""
    for _ in range(20):
        fh.seek(0)
        holder = _holder(fh.read())
        if holder != "holder unknown":
            return holder
        time.sleep(0.05)
    return holder


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, `featurekit {info['command']}` started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def sweep(run_dir: Path) -> list[Path]:
    """Remove the stale temporary files of killed writes (module docstring); returns what went."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or rank() != 0:  # torchrun: rank 0 alone, before anyone writes
        return []
    removed = []
    for path in sorted(run_dir.rglob(".*")):
        if path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
        elif path.is_dir() and _STALE_DIR.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for ckpt in [run_dir / "checkpoint", *sorted((run_dir / "shards").glob("rank*/checkpoint"))]:
        removed += _orphan_tensors(ckpt)
    return removed


def _orphan_tensors(ckpt: Path) -> list[Path]:
    """Checkpoint tensor files that state.json does not name (a kill between the two writes)."""
    files = sorted(ckpt.glob("state-*.safetensors"))
    if not files:
        return []
    try:
        current = read_json(ckpt / "state.json").get("tensors")
    except (FeaturekitError, OSError, ValueError, AttributeError):
        return []  # no readable state.json: leave the folder for resume's own error
    orphans = [f for f in files if f.name != current]
    for f in orphans:
        f.unlink(missing_ok=True)
    return orphans


def differing_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (where and name excepted)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in ("name", "out_dir"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def check_config(run_dir: Path, config: dict[str, Any], overwrite: bool, normalize: Any = None) -> None:
    """Refuse a run folder that holds another config's run, unless `overwrite` (which empties it).
    `normalize(old)` brings the stored config to the current form (defaults of keys added since, format v1)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    if overwrite:
        empty(run_dir)
        return
    try:
        old = read_json(path)
        old = normalize(old) if normalize else old
    except (OSError, ValueError) as err:
        raise FeaturekitError(f"{path} is unreadable ({err}); pass --overwrite to start this run afresh") from err
    diff = differing_keys(old if isinstance(old, dict) else {}, config)
    if diff:
        shown = ", ".join(f"{k}: {_at(old, k)!r} → {_at(config, k)!r}" for k in diff[:6]) + (" …" if len(diff) > 6 else "")
        raise FeaturekitError(f"the run folder {run_dir} already holds a run with another config ({shown}); "
                              f"choose another --name, or pass --overwrite to replace that run")


def _at(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def empty(run_dir: Path) -> None:
    """Remove everything in the run folder but its lock."""
    for path in Path(run_dir).iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clean(run_dir: Path) -> dict[str, int]:
    """Remove the activation cache and the checkpoint of a run whose dictionary is complete; returns
    the bytes freed per folder. Everything else (dictionary, eval.json, features/, report) stays."""
    run_dir = Path(run_dir)
    if not (run_dir / "dictionary" / "featurekit.json").is_file():
        raise FeaturekitError(f"{run_dir} has no finished dictionary yet; its activation cache and checkpoint are what a "
                              f"resumed run continues from. Finish the run first (`featurekit run` or `featurekit train "
                              f"--resume {run_dir}`), or delete the folder if you no longer need it")
    freed = {}
    for name in RECOMPUTABLE:
        paths = [run_dir / name] + sorted((run_dir / "shards").glob(f"rank*/{name}"))
        for path in paths:
            if path.exists():
                freed[str(path.relative_to(run_dir))] = size_bytes(path)
                shutil.rmtree(path)
    return freed

