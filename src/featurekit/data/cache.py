"""The activation cache on disk: safetensors shards plus a manifest, resumable and checksummed.

Layout of a cache directory:
    shard_00000.safetensors   one tensor per site (key = site name, (n, d), stored in the dtype it
    shard_00001.safetensors   arrived in: bf16 stays bf16) + `token_ids`, `context_idx`, `position` (n,) int64
    ...
    manifest.json             {"format_version", "meta", "sites", "d", "dtype", "shards": [{"file",
                              "n_tokens", "sha256"}], "n_tokens", "complete"}
Every shard holds exactly `shard_tokens` tokens except the last. Shards and the manifest are written
atomically (temporary file + rename), the manifest after each shard, so a crash leaves a valid cache
of the complete shards. `meta` is the caller's description of the harvest (model, sites, dtype,
d per site, context_len, mask policy, ...); it must be JSON-serialisable.

Resume: `write_cache` on a directory whose manifest has the same `meta` keeps the listed shards that
are intact (file present, sha256 matches), stops at the first missing or damaged one, skips that
many tokens of the incoming batches and continues. The caller must therefore feed the same batch
sequence (same text, tokenizer, model, mask and batch order) as the interrupted run. A different
`meta` raises FeaturekitError. A complete cache is returned without reading the batches.

Reading (`ActivationCache`) holds one shard in memory at a time. Opening a cache checks the manifest's
structure; loading a shard checks its tensors against the manifest (every listed site present, widths
equal to `d`, dtype equal to `dtype`), so a manifest that does not describe its shards is refused
with the file named instead of failing later in training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from featurekit._io import FileError, atomic_write, atomic_write_json, read_json, sha256_file
from featurekit.data.batch import ActivationBatch
from featurekit.errors import FeaturekitError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_KEYS = ("token_ids", "context_idx", "position")


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


class ActivationCache:
    """Read access to a cache directory written by `write_cache`."""

    def __init__(self, dir: str | os.PathLike):
        self.dir = Path(dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FeaturekitError(
                f"no activation cache at {self.dir} ({MANIFEST} is missing): harvest activations into it first "
                "(featurekit.data.cache.write_cache / the harvest step), or point to the right directory")
        try:
            self.manifest: dict[str, Any] = read_json(path)
        except FileError:
            raise
        except ValueError as exc:  # not JSON, not UTF-8, a key twice
            raise FeaturekitError(f"{exc}; delete the cache directory {self.dir} and harvest again") from exc
        _check_manifest(self.manifest, path)

    @property
    def sites(self) -> list[str]:
        return list(self.manifest.get("sites") or self.manifest["meta"].get("sites", []))

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.manifest["shards"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    def d(self, site: str) -> int:
        """Width of the activations stored for `site`."""
        dims = self.manifest.get("d") or {}
        if site not in dims:
            raise FeaturekitError(f"site {site!r} is not in the cache at {self.dir}: cached sites are {self.sites}")
        return int(dims[site])

    def shard_path(self, i: int) -> Path:
        return self.dir / self.manifest["shards"][i]["file"]

    def iter_shards(self, order: Sequence[int] | None = None, verify: bool = True,
                    sites: Sequence[str] | None = None) -> Iterator[ActivationBatch]:
        """Yield one ActivationBatch per shard, in `order` (shard indices; default 0..n_shards-1).

        `sites` restricts which activations are loaded (default: all). With `verify`, each shard's
        sha256 is checked against the manifest; a damaged shard raises FeaturekitError naming it.
        """
        wanted = list(self.sites if sites is None else sites)
        for site in wanted:
            if site not in self.sites:
                raise FeaturekitError(f"site {site!r} is not in the cache at {self.dir}: cached sites are {self.sites}")
        indices = range(self.n_shards) if order is None else [int(i) for i in order]
        for i in indices:
            if not 0 <= i < self.n_shards:
                raise FeaturekitError(f"shard index {i} out of range: the cache has {self.n_shards} shards")
            yield self._load_shard(i, wanted, verify)

    def _load_shard(self, i: int, sites: list[str], verify: bool) -> ActivationBatch:
        entry = self.manifest["shards"][i]
        path = self.dir / entry["file"]
        try:
            if verify:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest != entry["sha256"]:
                    raise _corrupt(path, f"sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...")
                tensors = st_load(data)
                del data
            else:
                with safe_open(str(path), framework="pt") as fh:
                    held = set(fh.keys())
                    tensors = {k: fh.get_tensor(k) for k in [*sites, *INDEX_KEYS] if k in held}
                self._check_sites(path, held)
        except FeaturekitError:
            raise
        except FileNotFoundError as exc:
            raise _corrupt(path, "the file is missing") from exc
        except Exception as exc:  # safetensors parse errors (truncated header, bad offsets, ...)
            raise _corrupt(path, f"it cannot be parsed ({type(exc).__name__}: {exc})") from exc
        if verify:
            self._check_sites(path, set(tensors))
        missing = [k for k in [*sites, *INDEX_KEYS] if k not in tensors]
        if missing:
            raise _corrupt(path, f"it lacks the tensors {missing}")
        self._check_acts(path, {s: tensors[s] for s in sites})
        batch = ActivationBatch(acts={s: tensors[s] for s in sites}, token_ids=tensors["token_ids"],
                                context_idx=tensors["context_idx"], position=tensors["position"])
        if batch.n_tokens != entry["n_tokens"] or any(a.shape[0] != batch.n_tokens for a in batch.acts.values()):
            raise _corrupt(path, f"it holds {batch.n_tokens} tokens, the manifest says {entry['n_tokens']}")
        return batch

    def _check_sites(self, shard: Path, held: set[str]) -> None:
        """Every site the manifest lists must be in the shard."""
        absent = sorted(set(self.manifest.get("sites") or []) - held)
        if absent:
            raise self._mismatch(shard, f"it lists the sites {absent}, which the shard does not hold")

    def _check_acts(self, shard: Path, acts: dict[str, torch.Tensor]) -> None:
        """The shard's activations against the manifest's `d` and `dtype`."""
        dims, dtype = self.manifest.get("d") or {}, self.manifest.get("dtype")
        for site, a in acts.items():
            if a.ndim != 2 or (site in dims and a.shape[1] != dims[site]):
                raise self._mismatch(shard, f"d[{site!r}] = {dims.get(site)}, the shard's tensor is {tuple(a.shape)}")
            if dtype is not None and str(a.dtype).removeprefix("torch.") != dtype:
                raise self._mismatch(shard, f"dtype is {dtype!r}, the shard's {site!r} is {str(a.dtype).removeprefix('torch.')}")

    def _mismatch(self, shard: Path, why: str) -> FeaturekitError:
        return FeaturekitError(
            f"{self.dir / MANIFEST} does not describe its shard {shard.name}: {why}. The manifest was edited or belongs to "
            f"other shards: delete {self.dir} and harvest again")


def write_cache(dir: str | os.PathLike, batches: Iterable[ActivationBatch], meta: dict[str, Any],
                shard_tokens: int) -> ActivationCache:
    """Write `batches` into shards of `shard_tokens` tokens under `dir`; resumable (module docstring)."""
    if shard_tokens < 1:
        raise FeaturekitError(f"shard_tokens must be >= 1 (got {shard_tokens})")
    dir = Path(dir)
    meta = _jsonable(meta)
    manifest = _resume_manifest(dir, meta)
    if manifest.get("complete"):
        return ActivationCache(dir)
    skip = sum(s["n_tokens"] for s in manifest["shards"])

    pending: list[ActivationBatch] = []
    n_pending = 0
    for batch in batches:
        if skip:
            cut = min(skip, batch.n_tokens)
            skip -= cut
            if cut == batch.n_tokens:
                continue
            batch = _slice(batch, cut, batch.n_tokens)
        _check_batch(batch, manifest)
        if batch.n_tokens == 0:
            continue
        pending.append(batch)
        n_pending += batch.n_tokens
        while n_pending >= shard_tokens:
            full = _concat(pending)
            _write_shard(dir, manifest, _slice(full, 0, shard_tokens))
            rest = _slice(full, shard_tokens, full.n_tokens)
            pending, n_pending = ([rest], rest.n_tokens) if rest.n_tokens else ([], 0)
    if skip:
        raise FeaturekitError(
            f"the batches given to resume the cache at {dir} have {skip} fewer tokens than the shards already "
            "written: feed the same batch sequence as the first run, or delete the directory to start over")
    if n_pending:
        _write_shard(dir, manifest, _concat(pending))
    if not manifest["shards"]:
        raise FeaturekitError(
            f"no tokens to cache in {dir}: the batches were empty (is the token mask excluding everything?)")
    manifest["complete"] = True
    atomic_write_json(dir / MANIFEST, manifest)
    return ActivationCache(dir)


def _resume_manifest(dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from: the existing one (intact shard prefix only) or a fresh one."""
    path = dir / MANIFEST
    fresh = {"format_version": FORMAT_VERSION, "meta": meta, "sites": None, "d": None, "dtype": None,
             "shards": [], "n_tokens": 0, "complete": False}
    if not path.is_file():
        return fresh
    old = ActivationCache(dir).manifest
    if old["meta"] != meta:
        diff = sorted(k for k in set(old["meta"]) | set(meta) if old["meta"].get(k) != meta.get(k))
        raise FeaturekitError(
            f"{dir} already holds an activation cache with different settings (differs in {diff}): "
            "use another directory, or delete this one to harvest again")
    intact = []
    for entry in old["shards"]:
        shard = dir / entry["file"]
        if not shard.is_file() or sha256_file(shard) != entry["sha256"]:
            break  # this shard and everything after it are written again
        intact.append(entry)
    if len(intact) < len(old["shards"]):
        old.update(shards=intact, n_tokens=sum(e["n_tokens"] for e in intact), complete=False)
        atomic_write_json(path, old)
    return old


def _write_shard(dir: Path, manifest: dict[str, Any], batch: ActivationBatch) -> None:
    tensors = {site: a.contiguous() for site, a in batch.acts.items()}
    for key in INDEX_KEYS:
        tensors[key] = getattr(batch, key).to(torch.int64).contiguous()
    name = shard_name(len(manifest["shards"]))
    path = atomic_write(dir / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "featurekit.activations"}))
    manifest["shards"].append({"file": name, "n_tokens": batch.n_tokens, "sha256": sha256_file(path)})
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
    atomic_write_json(dir / MANIFEST, manifest)


def _check_batch(batch: ActivationBatch, manifest: dict[str, Any]) -> None:
    """Fix sites/d/dtype from the first batch; later batches must agree."""
    sites = sorted(batch.acts)
    d = {s: int(batch.acts[s].shape[1]) for s in sites}
    dtype = str(next(iter(batch.acts.values())).dtype).removeprefix("torch.") if sites else None
    if manifest["sites"] is None:
        manifest.update(sites=sites, d=d, dtype=dtype)
    elif sites != sorted(manifest["sites"]) or d != manifest["d"]:
        raise FeaturekitError(
            f"a batch has sites/widths {d}, the cache holds {manifest['d']}: every batch must carry the same sites")
    for key in INDEX_KEYS:
        if getattr(batch, key).shape != (batch.n_tokens,):
            raise FeaturekitError(f"ActivationBatch.{key} must have shape ({batch.n_tokens},)")
    for s, a in batch.acts.items():
        if a.ndim != 2 or a.shape[0] != batch.n_tokens:
            raise FeaturekitError(f"ActivationBatch.acts[{s!r}] must be (n_tokens, d), got {tuple(a.shape)}")


def _slice(b: ActivationBatch, start: int, stop: int) -> ActivationBatch:
    return ActivationBatch(acts={s: a[start:stop] for s, a in b.acts.items()}, token_ids=b.token_ids[start:stop],
                           context_idx=b.context_idx[start:stop], position=b.position[start:stop])


def _concat(batches: list[ActivationBatch]) -> ActivationBatch:
    if len(batches) == 1:
        return batches[0]
    return ActivationBatch(
        acts={s: torch.cat([b.acts[s] for b in batches]) for s in batches[0].acts},
        **{k: torch.cat([getattr(b, k) for b in batches]) for k in INDEX_KEYS})


def _check_manifest(manifest: Any, path: Path) -> None:
    """The manifest's structure: what every reader relies on, checked when the cache is opened."""
    def bad(why: str) -> FeaturekitError:
        return FeaturekitError(f"{path} is not a valid activation cache manifest: {why}. Delete {path.parent} and harvest again")

    if not isinstance(manifest, dict):
        raise bad(f"it holds a JSON {type(manifest).__name__}, not an object")
    _check_version(manifest, path)
    if not isinstance(manifest.get("meta"), dict):
        raise bad("'meta' (the harvest's settings) must be an object")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad("'shards' is missing" if shards is None else "'shards' must be a list")
    for i, entry in enumerate(shards):
        _check_entry(entry, i, bad)
    sites, dims = manifest.get("sites"), manifest.get("d")
    if sites is None and dims is None and not shards:
        return  # nothing written yet
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise bad("'sites' must be a list of site names")
    if not isinstance(dims, dict) or not all(type(v) is int and v > 0 for v in dims.values()):
        raise bad("'d' must map each site to its width (a positive integer)")
    if sorted(sites) != sorted(dims):
        raise bad(f"'sites' {sorted(sites)} and the sites of 'd' {sorted(dims)} disagree")
    dtype = manifest.get("dtype")
    if sites and not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        raise bad(f"'dtype' must name a torch dtype (e.g. 'float32'), got {dtype!r}")


def _check_entry(entry: Any, i: int, bad) -> None:
    if not isinstance(entry, dict):
        raise bad(f"shards[{i}] must be an object with file, n_tokens and sha256")
    missing = [k for k in ("file", "n_tokens", "sha256") if k not in entry]
    if missing:
        raise bad(f"shards[{i}] lacks {missing}")
    name = entry["file"]
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise bad(f"shards[{i}].file must be a file name inside the cache folder, got {name!r}")
    if type(entry["n_tokens"]) is not int or entry["n_tokens"] < 0:
        raise bad(f"shards[{i}].n_tokens must be a non-negative integer, got {entry['n_tokens']!r}")
    if not isinstance(entry["sha256"], str):
        raise bad(f"shards[{i}].sha256 must be a hex string, got {entry['sha256']!r}")


def _check_version(manifest: dict[str, Any], path: Path) -> None:
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise FeaturekitError(f"{path} has no format_version: it is not a featurekit activation cache manifest, or it is "
                              f"damaged; delete {path.parent} and harvest again")
    if version > FORMAT_VERSION:
        raise FeaturekitError(
            f"{path} has cache format version {version}, this featurekit reads up to {FORMAT_VERSION}: "
            "upgrade featurekit (pip install -U featurekit) or harvest the cache again with this version")


def _corrupt(path: Path, why: str) -> FeaturekitError:
    return FeaturekitError(
        f"activation cache shard {path} is damaged: {why}. Delete {path} and rerun the harvest with the same "
        "settings; it resumes from the last intact shard")


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` as it reads back from JSON (tuples become lists), so resume comparisons are exact."""
    try:
        return json.loads(json.dumps(meta))
    except TypeError as exc:
        raise FeaturekitError(f"cache meta must be JSON-serialisable ({exc}): pass strings, numbers, lists, dicts") from exc
