"""Small file helpers shared by every module: atomic writes and JSON.

Every file featurekit writes goes through `atomic_write_*`: the data lands in a temporary file in
the same directory, is flushed and fsynced, then renamed over the target. A crash leaves either the
old file or the new one, never half of one.

A write or read that fails in the operating system (a full disk, a read-only folder, a damaged
file) raises `FileError`, a FeaturekitError naming the file, the cause and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .errors import FeaturekitError


class FileError(FeaturekitError, OSError):
    """A file featurekit could not write or read. Also an OSError, so callers that tolerate an
    unwritable file (`except OSError`, e.g. a read-only cache folder) still do; `errno` and
    `filename` are the operating system's."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message, not OSError's "[Errno N] ...: filename"


def write_error(path: str | os.PathLike, exc: BaseException) -> FileError:
    """A FileError naming `path`, the operating system's cause in `exc` and the fix."""
    code, cause = _os_cause(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk, or set out_dir to a folder on another disk"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "the folder is read-only or not writable by you: make it writable, or set out_dir to a writable folder"
    else:
        fix = "check that the folder exists, is writable and its disk is healthy"
    err = FileError(f"could not write {path}: {cause}; {fix}")
    err.errno, err.filename = code, str(path)
    return err


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError (or safetensors' SafetensorError) raised in the block into a FileError naming `path`."""
    try:
        yield
    except FileError:
        raise
    except (OSError, SafetensorError) as exc:
        raise write_error(path, exc) from exc


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and atomically move the result to `path`. An operating-system error
    (full disk, read-only folder) raises FileError naming `path`; the temporary file is removed."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        with writing(path):
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder as one step: the block writes into a fresh sibling staging folder (yielded), which then
    replaces `path` (an existing folder is swapped out and removed). A reader never finds new files beside old
    ones, or half a folder; if the block raises, `path` is left as it was and the staging folder is removed.
    Write the files inside with `atomic_write*` (they are fsynced). An operating-system error raises FileError
    naming the file under `path`, not the staging folder."""
    import shutil

    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        try:
            yield staging
        except FileError as err:  # name the folder's file, not the staging folder's
            name = Path(err.filename).name if err.filename else ""
            raise write_error(path / name, err.__cause__ or err) from err.__cause__
        with writing(path):
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(staging, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as strict JSON: a NaN or infinity (which JSON cannot hold) raises FeaturekitError naming it."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError as err:
        found = _non_finite(obj)
        if found is None:  # another ValueError (a circular reference): a bug in the caller
            raise
        where, value = found
        raise FeaturekitError(
            f"refusing to write {path}: {where} is {value}, which JSON cannot hold; a NaN or infinity here usually "
            f"means a diverged run or a division by zero upstream (lower train.lr, check the inputs)") from err
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse the JSON file at `path`. A missing, unreadable, non-UTF-8 or damaged file, one with a key twice
    in an object or a bare NaN/Infinity (not JSON), raises FeaturekitError (FileError for the operating
    system's errors) naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        failed = FileError(f"could not read {path}: {err.strerror or err}; check the path and its permissions")
        failed.errno, failed.filename = err.errno, str(path)
        raise failed from err
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise FeaturekitError(f"{path} is not UTF-8 text (byte {err.start}); the file is damaged or not a JSON file") from err
    except json.JSONDecodeError as err:
        raise FeaturekitError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                              f"the file is damaged or truncated") from err
    except StrictJSONError as err:
        raise FeaturekitError(f"{path}: {err}; the file was edited by hand or is damaged") from err


class StrictJSONError(ValueError):
    """JSON that parses but is refused: a key twice in one object (the parser would silently keep the
    last), or a bare NaN/Infinity (Python's extension, not JSON)."""


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"it holds a bare {name}, which is not JSON (featurekit never writes one)")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json.loads that refuses a key given twice in one object."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"key {key!r} appears twice in one object: keep one")
        out[key] = value
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """featurekit's cache folder: $FEATUREKIT_CACHE, else $XDG_CACHE_HOME/featurekit, else ~/.cache/featurekit."""
    env = os.environ.get("FEATUREKIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "featurekit"


def _os_cause(exc: BaseException) -> tuple[int | None, str]:
    """(errno, text) of an OSError or of safetensors' "I/O error: ... (os error N)" message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.errno, exc.strerror
    found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
    if found:
        return int(found.group(2)), found.group(1)
    return getattr(exc, "errno", None), str(exc)


def _non_finite(obj: Any, where: str = "") -> tuple[str, str] | None:
    """(key path, value) of the first NaN or infinity in `obj` (dicts, lists, arrays), else None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "the value", repr(obj))
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    elif hasattr(obj, "tolist"):
        return _non_finite(obj.tolist(), where)
    else:
        return None
    return next((found for key, value in items if (found := _non_finite(value, key))), None)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
