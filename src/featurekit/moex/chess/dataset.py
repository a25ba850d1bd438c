"""A games dataset on disk: shards of games, one game string per line, and a JSON manifest.

    folder/
      games-00000.txt   games 0..shard_size-1 (``;1.e4 e5 2.Nf3 ...``, one per line)
      games-00001.txt   ...
      manifest.json     format, seed, game spec, counts, each shard's sha256, python-chess version

Every file is written atomically. Games are a pure function of (seed, index) (Stockfish games: and of the
engine build, which the manifest records as ``engine``), so an interrupted `build_dataset` resumes: the
manifest (``complete``: false) records the settings and the shards done so far; a rerun with the same
settings keeps the shards on disk and generates the rest, a rerun with other settings is refused.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import chess
import torch

from ..._io import atomic_write_json, atomic_write_text, read_json, sha256_file
from ...errors import FeaturekitError
from .engine import stockfish_id
from .games import GameSpec, generate_games
from .pgn import VOCAB, token_stream

FORMAT = "featurekit.moex.chess.games/1"
MANIFEST = "manifest.json"


def shard_name(i: int) -> str:
    return f"games-{i:05d}.txt"


def _lines(path: Path) -> list[str]:
    text = path.read_text(encoding="ascii")
    return [line for line in text.split("\n") if line]


def _settings(seed: int, count: int, spec: GameSpec, shard_size: int) -> dict:
    spec_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}  # as JSON reads it back
    engine = stockfish_id() if spec.policy == "stockfish" else None  # a resume with another build is refused
    return {"format": FORMAT, "seed": seed, "n_games": count, "shard_size": shard_size, "spec": spec_dict,
            "vocab": VOCAB, "deterministic": True, "engine": engine}


def build_dataset(folder: str | Path, seed: int, count: int, spec: GameSpec = GameSpec(), shard_size: int = 1000,
                  progress: bool = False) -> Path:
    """Generate `count` games under `seed` into `folder`, resuming a partial build; returns the manifest's
    path. The manifest is rewritten after every shard (``complete`` false until the last)."""
    if count < 1 or shard_size < 1:
        raise FeaturekitError(f"count={count}, shard_size={shard_size}: both must be at least 1")
    folder = Path(folder)
    settings = _settings(seed, count, spec, shard_size)
    path = folder / MANIFEST
    if path.exists():
        old = read_json(path)
        if {k: old.get(k) for k in settings} != settings:
            raise FeaturekitError(f"{folder} already holds a chess dataset built with other settings (seed {old.get('seed')}, "
                                  f"{old.get('n_games')} games, spec {old.get('spec')}, engine {old.get('engine')}); choose another folder "
                                  "or delete it")
        if old.get("complete"):
            return path
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=count, desc="chess games", unit="game")
    shards: list[dict] = []
    n_chars = 0
    for si, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        shard = folder / shard_name(si)
        games = _lines(shard) if shard.exists() else []
        if len(games) != n:  # absent, or cut short by a crash before its atomic rename could not happen: regenerate
            games = list(generate_games(seed, n, spec, start=start))
            atomic_write_text(shard, "\n".join(games) + "\n")
        n_chars += sum(len(g) for g in games)
        shards.append({"file": shard.name, "first_game": start, "n_games": n, "sha256": sha256_file(shard)})
        atomic_write_json(path, {**settings, "complete": False, "shards": shards, "chess_version": chess.__version__})
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return atomic_write_json(path, {**settings, "complete": True, "n_chars": n_chars, "shards": shards,
                                    "chess_version": chess.__version__})


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FeaturekitError(f"{path} not found: {folder} is not a finished chess dataset; build it with build_dataset")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise FeaturekitError(f"{path} has format {manifest.get('format')!r}, not {FORMAT!r}; rebuild it with build_dataset")
    if not manifest.get("complete"):
        raise FeaturekitError(f"{folder} is a chess dataset whose build was interrupted; run build_dataset again with the "
                              "same settings to finish it")
    return manifest


def read_games(folder: str | Path, verify: bool = True) -> list[str]:
    """All games of a dataset, in index order (`verify`: check every shard's sha256 against the manifest)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    games: list[str] = []
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.exists():
            raise FeaturekitError(f"{path} is missing; rebuild the dataset with build_dataset (it resumes)")
        if verify and sha256_file(path) != shard["sha256"]:
            raise FeaturekitError(f"{path} does not match its sha256 in the manifest (changed or damaged); "
                                  "delete it and run build_dataset again to regenerate it")
        games += _lines(path)
    if len(games) != manifest["n_games"]:
        raise FeaturekitError(f"{folder}: {len(games)} games on disk, manifest says {manifest['n_games']}; rebuild it")
    return games


def load_token_stream(folder: str | Path) -> torch.Tensor:
    """The dataset as one 1-D int64 token stream (games back to back, each starting with ``;``)."""
    return token_stream(read_games(folder))
