"""The runs the explorer serves: the run folders named on the command line, each addressed in URLs by its
name (the folder's name, made unique with `-2`, `-3`, …) or by its index — never by a path, so no URL can
reach a file the command line did not name.

A `Run` holds its feature store (opened read-only), config, evaluation and training curves, read once;
the dictionary is loaded on first use (live calls, and the decoder cosines to other runs). Nothing here
writes into a run folder.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..dictionaries import Dictionary, load
from ..errors import FeaturekitError
from ..features.store import FILENAME, FeatureStore
from .vision import VisionRun, is_vision_run

T = TypeVar("T")
#: the evaluation results the overview shows (RUN/evals/NAME.json and its plot NAME.png), by file name: no other file is read
EVALUATIONS = ("sparse_probing", "sparse_probing_source", "sparse_probing_tokens", "absorption_first_letter",
               "steering_kl_matched", "splice_all")


class Run:
    """One run folder: its store, config, metrics; a lock serialises store queries (one SQLite connection)."""

    def __init__(self, index: int, name: str, path: Path) -> None:
        self.index, self.name, self.path = index, name, path
        if not (path / "config.json").is_file():
            raise FeaturekitError(f"{path} is not a featurekit run folder (no config.json): pass the folder that "
                                  f"`featurekit run` wrote (runs/NAME)")
        if not (path / FILENAME).is_file():
            raise FeaturekitError(f"{path} has no feature store ({FILENAME}): build it with `featurekit features {path}`")
        self.store = FeatureStore(path / FILENAME)
        self.meta = self.store.meta
        self.config = _read_json(path / "config.json") or {}
        self.eval = _read_json(path / "eval.json")
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._cache: dict[str, Any] = {}
        self._dictionary: Dictionary | None = None
        self._unit_decoder: torch.Tensor | None = None

    # -- what the pages show ------------------------------------------------------------------------------
    @property
    def site(self) -> str:
        return self.meta.get("site") or self.config.get("site", "?")

    @property
    def output_site(self) -> str | None:
        return self.meta.get("output_site") or self.config.get("output_site")

    @property
    def decoder_site(self) -> str:
        """Where the decoder's rows live: the output site of a transcoder, else the site."""
        return self.output_site or self.site

    @property
    def model(self) -> str:
        return str(self.meta.get("model") or self.config.get("model", {}).get("name", "?"))

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "?"))

    @property
    def signed(self) -> bool:
        return bool(self.meta.get("signed"))

    @property
    def n_latents(self) -> int:
        return self.store.n_latents

    def query(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(store, ...)` under the run's lock (SQLite connections are not for concurrent use)."""
        with self._lock:
            return fn(self.store, *args, **kwargs)

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """A value computed once (the store never changes under a running server)."""
        if key not in self._cache:
            value = compute()
            self._cache.setdefault(key, value)
        return self._cache[key]

    def densities(self) -> list[float]:
        return self.cached("densities", lambda: self.query(FeatureStore.densities))

    def has_explanations(self) -> bool:
        """Not cached: `featurekit explain` adds explanations to a store in place, also while it is served."""
        return self.query(lambda store: bool(store.db.execute("SELECT 1 FROM explanations LIMIT 1").fetchall()))

    def evaluations(self) -> list[dict]:
        """The run's suite results (RUN/evals/NAME.json for NAME in EVALUATIONS): name, type, headline metrics
        (group, key, number) and whether its plot exists."""
        def read() -> list[dict]:
            out = []
            for name in EVALUATIONS:
                result = _read_json(self.path / "evals" / f"{name}.json")
                if not isinstance(result, dict):
                    continue
                groups = result.get("eval_result_metrics")
                rows = [(str(group), str(key), value) for group, values in (groups.items() if isinstance(groups, dict) else [])
                        if isinstance(values, dict) for key, value in values.items()
                        if isinstance(value, (int, float)) and not isinstance(value, bool)]
                out.append({"name": name, "type": str(result.get("eval_type_id", "")), "metrics": rows,
                            "plot": (self.path / "evals" / f"{name}.png").is_file()})
            return out

        return self.cached("evaluations", read)

    def eval_plot(self, name: str) -> bytes | None:
        """The PNG of evaluation `name` (one of EVALUATIONS), or None."""
        path = self.path / "evals" / f"{name}.png"
        return path.read_bytes() if name in EVALUATIONS and path.is_file() else None

    def n_live(self) -> int:
        return self.cached("n_live", lambda: self.query(FeatureStore.count_features, live_only=True))

    def metrics(self) -> list[dict]:
        """The training curves (metrics.jsonl); lines that do not parse are skipped."""
        def read() -> list[dict]:
            path = self.path / "metrics.jsonl"
            rows = []
            if path.is_file():
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict):
                        rows.append(row)
            return rows
        return self.cached("metrics", read)

    # -- the dictionary (loaded on first use) ----------------------------------------------------------------
    @property
    def dictionary_dir(self) -> Path:
        """RUN/dictionary; for the store run of a transcoder set's layer (`featurekit circuits features`), which holds
        no dictionary of its own, the set's layer folder its store names (`transcoder_set.dictionary_dir`, relative)."""
        own, named = self.path / "dictionary", self.meta.get("transcoder_set")
        pointer = named.get("dictionary_dir") if isinstance(named, dict) else None
        return self.path / pointer if isinstance(pointer, str) and pointer and not own.is_dir() else own

    def dictionary(self) -> Dictionary:
        with self._load_lock:
            if self._dictionary is None:
                sae = load(self.dictionary_dir)
                sae.eval()
                self._dictionary = sae
            return self._dictionary

    def unit_decoder(self) -> torch.Tensor:
        """(F, d) float32 decoder rows scaled to unit norm (zero rows stay zero)."""
        sae = self.dictionary()
        with self._load_lock:
            if self._unit_decoder is None:
                w = sae.W_dec.detach().float().cpu()
                self._unit_decoder = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return self._unit_decoder

    def close(self) -> None:
        self.store.close()


class Runs:
    """The served runs, in command-line order."""

    def __init__(self, paths: Sequence[str | Path], allow_empty: bool = False) -> None:
        if not paths and not allow_empty:
            raise FeaturekitError("featurekit serve needs at least one run folder")
        self.runs: list[Run | VisionRun] = []
        seen: set[str] = set()
        for i, path in enumerate(paths):
            path = Path(path)
            base = path.resolve().name or f"run{i}"
            name, n = base, 2
            while name in seen or name.isdigit():  # a digit-only name would read as an index
                name, n = f"{base}-{n}", n + 1
            seen.add(name)
            self.runs.append(VisionRun(i, name, path) if is_vision_run(path) else Run(i, name, path))

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def get(self, key: str) -> Run | None:
        """The run named `key`, or with index `key`; None for anything else."""
        for run in self.runs:
            if run.name == key:
                return run
        if key.isdigit() and int(key) < len(self.runs):
            return self.runs[int(key)]
        return None

    def peers(self, run: Run) -> list[Run]:
        """The other runs whose decoder rows live in the same space: the same model and decoder site."""
        return [o for o in self.runs if o is not run and not isinstance(o, VisionRun)
                and o.model == run.model and o.decoder_site == run.decoder_site]

    def nearest(self, run: Run, feature: int, other: Run, k: int = 5) -> list[tuple[int, float]]:
        """The `k` features of `other` whose decoder rows have the largest cosine with `feature`'s in `run`."""
        mine, theirs = run.unit_decoder(), other.unit_decoder()
        if mine.shape[1] != theirs.shape[1]:
            return []
        cos = theirs @ mine[feature]
        values, ids = cos.topk(min(k, cos.numel()))
        return [(int(i), float(v)) for i, v in zip(ids, values)]

    def close(self) -> None:
        for run in self.runs:
            run.close()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
