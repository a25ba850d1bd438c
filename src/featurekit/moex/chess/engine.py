"""Stockfish games at varied strength, reproducible from (seed, game index) (python-chess's engine API).

Stockfish's own ``Skill Level`` handicap draws from a generator seeded by the clock, so it is never used
here (the engine always plays at level 20). Strength is varied by featurekit's seeded generator instead: game
``index`` draws a level ``L`` from ``spec.stockfish_skill`` (0..20) and then

* opens with 1..``spec.stockfish_random_plies`` uniformly random legal plies (otherwise two games at the same
  level would be the same game);
* every later move is, with probability ``(20 − L) / 40`` (0 at level 20, 0.5 at level 0), a uniformly random
  legal move, else the engine's best move after ``spec.stockfish_nodes · 2^((L − 20) / 4)`` nodes (the full
  budget at level 20, 1/32 of it at level 0).

The engine runs on one thread, with a 16 MiB hash cleared before each game (``ucinewgame``), and a node limit,
so its search is deterministic: the same seed, index, spec and Stockfish build give the same game (tested);
the dataset manifest records the build (``stockfish_id``), and a resume with another build is refused.

The binary is ``stockfish`` on PATH, else Debian's ``/usr/games/stockfish`` (``apt-get install stockfish``).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import FeaturekitError
from .pgn import game_string

DEBIAN_PATH = Path("/usr/games/stockfish")  # Debian's package installs it outside PATH


def stockfish_path() -> str | None:
    """The Stockfish binary: ``stockfish`` on PATH, else Debian's /usr/games/stockfish; None when neither exists."""
    found = shutil.which("stockfish")
    if found:
        return found
    return str(DEBIAN_PATH) if DEBIAN_PATH.is_file() else None


ENGINE_TIMEOUT_S = 600.0


def stockfish_available() -> bool:
    return stockfish_path() is not None


def _open(path: str | None = None) -> Any:
    import chess.engine

    path = path or stockfish_path()
    if path is None:
        raise FeaturekitError("policy 'stockfish' needs a stockfish binary (Debian: apt-get install stockfish, which puts it "
                              "in /usr/games; or any stockfish on PATH); or use policy 'random'")
    # python-chess waits 10 s for each engine reply by default; a busy machine needs longer (node limits bound the work)
    engine = chess.engine.SimpleEngine.popen_uci(path, timeout=ENGINE_TIMEOUT_S)
    engine.configure({"Threads": 1, "Hash": 16, "Skill Level": 20})
    return engine


def stockfish_id() -> str:
    """The engine's name and build as it reports them (e.g. 'Stockfish 15.1'), for the dataset manifest."""
    engine = _open()
    try:
        return str(engine.id.get("name", "stockfish"))
    finally:
        engine.quit()


def level_settings(level: int, nodes: int) -> tuple[float, int]:
    """(random-move probability, nodes per engine move) at strength ``level`` (0..20) with full budget ``nodes``."""
    return (20 - level) / 40, max(1, round(nodes * math.pow(2.0, (level - 20) / 4)))


def engine_game(engine: Any, rng: Any, spec: Any, key: tuple[int, int]) -> str:
    """One game (a format string) played by ``engine`` with ``rng`` (the game's own generator)."""
    import chess.engine

    lo, hi = spec.stockfish_skill
    level = rng.randint(lo, hi)
    blunder, nodes = level_settings(level, spec.stockfish_nodes)
    opening = rng.randint(1, max(1, spec.stockfish_random_plies))
    board = chess.Board()
    sans: list[str] = []
    while not board.is_game_over(claim_draw=False):
        if len(sans) < opening or rng.random() < blunder:
            move = rng.choice(list(board.legal_moves))
        else:
            move = engine.play(board, chess.engine.Limit(nodes=nodes), game=key).move
        sans.append(board.san_and_push(move))
        if len(game_string(sans)) > spec.max_chars:
            sans.pop()
            break
    return game_string(sans)


def stockfish_games(seed: int, start: int, count: int, spec: Any, rng_of: Any) -> Iterator[str]:
    """Games start..start+count-1 under ``seed``; ``rng_of(seed, index)`` gives each game's generator."""
    engine = _open()
    try:
        for index in range(start, start + count):
            yield engine_game(engine, rng_of(seed, index), spec, (seed, index))
    finally:
        engine.quit()
