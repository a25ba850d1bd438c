"""Chess games generated offline with python-chess: random legal play, optionally mixed with a weak
one-ply heuristic, deterministic given (seed, game index); or Stockfish at varied strength (engine.py:
also deterministic given (seed, index) and the Stockfish build; needs the binary, absent from CI).

Random legal play is the default: it needs nothing but python-chess, every game is reproducible
from its seed, and it covers far more board states than engine play (at the price of games no human
would play; Li et al.'s Othello-GPT was also trained on random legal games). The ``greedy`` mix makes
captures, checks, promotions and mates likelier so games are not pure noise.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import chess

from ...errors import FeaturekitError
from .engine import stockfish_games
from .pgn import game_string

PIECE_VALUE = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9, chess.KING: 0}
POLICIES = ("random", "stockfish")


@dataclass(frozen=True)
class GameSpec:
    """How games are played. ``greedy`` in [0, 1]: the chance that a move is the heuristic's best
    (mate > capture of the most valuable piece > promotion > check, ties broken at random) instead
    of a uniformly random legal move. ``max_chars``: a game stops before its string would pass this
    length (Karvonen et al.'s model reads 1,024-character blocks). ``stockfish_*``: only for policy
    "stockfish" (engine.py): a strength level drawn per game from ``stockfish_skill`` (0..20) sets the chance of a
    random move and the engine's nodes per move (``stockfish_nodes`` at level 20); each game opens with
    1..``stockfish_random_plies`` random plies."""

    policy: str = "random"
    greedy: float = 0.0
    max_chars: int = 1024
    stockfish_skill: tuple[int, int] = (0, 20)
    stockfish_nodes: int = 2000
    stockfish_random_plies: int = 4

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise FeaturekitError(f"unknown game policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if not 0.0 <= self.greedy <= 1.0:
            raise FeaturekitError(f"greedy is a probability; got {self.greedy}, use a value in [0, 1]")
        lo, hi = self.stockfish_skill
        if not 0 <= lo <= hi <= 20 or self.stockfish_nodes < 1 or self.stockfish_random_plies < 1:
            raise FeaturekitError(f"stockfish_skill={self.stockfish_skill} must be 0 ≤ lo ≤ hi ≤ 20, stockfish_nodes and "
                                  f"stockfish_random_plies ≥ 1 (got {self.stockfish_nodes}, {self.stockfish_random_plies})")
        if self.max_chars < 8:
            raise FeaturekitError(f"max_chars={self.max_chars} cannot hold one move; use at least 8 (Karvonen et al. use 1024)")


def game_rng(seed: int, index: int) -> random.Random:
    """The random stream of game `index` under `seed` (string seeding: the same on every machine and run)."""
    return random.Random(f"featurekit.moex.chess:{seed}:{index}")


def heuristic_score(board: chess.Board, move: chess.Move) -> int:
    """A weak one-ply preference: mate, then capturing valuable pieces, promoting, giving check."""
    score = 0
    if board.is_capture(move):
        victim = chess.PAWN if board.is_en_passant(move) else board.piece_type_at(move.to_square)
        score += 10 * PIECE_VALUE[victim]
    if move.promotion:
        score += 8 * PIECE_VALUE[move.promotion]
    if board.gives_check(move):
        score += 5
        board.push(move)
        mate = board.is_checkmate()
        board.pop()
        if mate:
            score += 10_000
    return score


def choose_move(board: chess.Board, rng: random.Random, greedy: float) -> chess.Move:
    """One move by the random/greedy policy."""
    moves = list(board.legal_moves)
    if greedy > 0 and rng.random() < greedy:
        scores = [heuristic_score(board, m) for m in moves]
        best = max(scores)
        moves = [m for m, s in zip(moves, scores) if s == best]
    return rng.choice(moves)


def random_game(seed: int, index: int, spec: GameSpec = GameSpec()) -> str:
    """Game `index` under `seed`, played by the random/greedy policy, as a format string."""
    rng = game_rng(seed, index)
    board = chess.Board()
    sans: list[str] = []
    length = 1  # the ';'
    while not board.is_game_over(claim_draw=False):
        move = choose_move(board, rng, spec.greedy)
        san = board.san_and_push(move)
        ply = len(sans)
        piece = (f"{ply // 2 + 1}." if ply % 2 == 0 else "") + san
        if length + (1 if sans else 0) + len(piece) > spec.max_chars:
            break
        length += (1 if sans else 0) + len(piece)
        sans.append(san)
    return game_string(sans)


def generate_games(seed: int, count: int, spec: GameSpec = GameSpec(), start: int = 0) -> Iterator[str]:
    """Games start..start+count-1 under `seed` (random/greedy: each a pure function of seed and index,
    so a run can be resumed or split across processes)."""
    if count < 0:
        raise FeaturekitError(f"count={count}: ask for zero or more games")
    if spec.policy == "stockfish":
        yield from stockfish_games(seed, start, count, spec, game_rng)
        return
    for index in range(start, start + count):
        yield random_game(seed, index, spec)
