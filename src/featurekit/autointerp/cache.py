"""The replay cache: every judge answer on disk, keyed by a hash of the judge and the request.

    CACHE/ab/abcdef….json   {"key", "judge": {identity}, "request": {...}, "response": {text, logprobs, usage}}

The key is the sha256 of the canonical JSON of the judge's identity (kind, model, and for an in-process model the
digest of its weights) and the request (messages, max_tokens, temperature, logprobs): another judge, model or
setting is another key. Each answer is written atomically as soon as it arrives, so a run killed or cut off
(a judge server that dies) keeps every answer it got, and a rerun asks only for the rest. Identical requests
get the stored answer: a rerun costs no judge calls and gives bit-identical results.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .._io import atomic_write_text


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def request_key(identity: dict, request: dict) -> str:
    return hashlib.sha256(canonical({"judge": identity, "request": request}).encode()).hexdigest()


class ReplayCache:
    """Answers by key under `folder` (module docstring). Safe for threads and processes: entries are immutable
    and written by rename."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable: asked again and rewritten
        return entry.get("response") if entry.get("key") == key else None

    def put(self, key: str, identity: dict, request: dict, response: dict) -> None:
        atomic_write_text(self._path(key), canonical({"key": key, "judge": identity, "request": request, "response": response}))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json")) if self.folder.is_dir() else 0
