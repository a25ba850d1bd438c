"""Board-state properties (BSPs): yes/no facts about the board at a point of a game, computed with
python-chess, at the characters where Karvonen et al. 2024 read their model's activations.

Positions: every ``.`` of a game string (``;1.e4 e5 2.`` — the dot after a move number). The model
has then read every move so far and is about to read white's next move, so the board is the one
after all earlier half-moves and white is to move ("mine" = white, "theirs" = black, as in their
mine/yours framing). Karvonen et al. cut games to 256 characters and keep the first 20 dots per
game; `max_chars` / `max_positions` do the same when set.

Groups of properties (names in brackets):
* ``board`` — one per (piece, square): ``P@e4`` (white pawn on e4), ``n@f6`` (black knight on f6):
  12 pieces × 64 squares = 768, Karvonen et al.'s G_board (the empty class excluded).
* ``empty`` — ``empty@e4``: 64, the empty class, kept apart because their metrics leave it out.
* ``threat`` — ``attacked@e4``: square attacked by the side not to move (their threat board).
* ``rules`` — facts of the rules, from their list of higher-level BSPs: ``in_check``,
  ``any_pin`` (a piece of either side is pinned to its king), ``castling_rights`` /
  ``kingside_castling`` / ``queenside_castling`` (the side to move still has them),
  ``legal_en_passant``, ``can_claim_draw`` (threefold repetition or fifty moves).
* ``tactics`` — ``can_check_next`` (a legal move gives check), ``mate_threat`` (the other side
  would mate in one if it were its turn; false when in check), ``can_capture_queen``,
  ``has_queen``, ``has_bishop_pair``, ``connected_rooks`` (two rooks of the side to move see each
  other along a rank or file), ``ambiguous_san`` (a legal non-pawn move needs a disambiguating file
  or rank in SAN), and two of ours, not theirs: ``fork_mine`` / ``fork_theirs`` (an unpinned
  piece attacks two or more enemy pieces each worth more than itself, the king worth most) and
  ``hanging_mine`` / ``hanging_theirs`` (a non-king piece attacked by the other side and defended
  by none of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import chess
import numpy as np
import torch

from ...errors import FeaturekitError
from .pgn import board_of, moves_of

PIECES = "PNBRQKpnbrqk"  # white upper case, black lower case; column block i of group "board"
GROUPS = ("board", "empty", "threat", "rules", "tactics")
DEFAULT_GROUPS = ("board", "rules", "tactics")
RULES = ("in_check", "any_pin", "castling_rights", "kingside_castling", "queenside_castling", "legal_en_passant",
         "can_claim_draw")
TACTICS = ("can_check_next", "mate_threat", "can_capture_queen", "has_queen", "has_bishop_pair", "connected_rooks",
           "ambiguous_san", "fork_mine", "fork_theirs", "hanging_mine", "hanging_theirs")
VALUE = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9, chess.KING: 100}


def _check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    groups = tuple(groups)
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise FeaturekitError(f"unknown BSP groups {bad or '(none given)'}; choose from {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in groups)  # canonical order


def property_names(groups: Sequence[str] = DEFAULT_GROUPS) -> list[str]:
    """The names of the properties of `groups`, in column order."""
    names: list[str] = []
    for g in _check_groups(groups):
        if g == "board":
            names += [f"{p}@{s}" for p in PIECES for s in chess.SQUARE_NAMES]
        elif g == "empty":
            names += [f"empty@{s}" for s in chess.SQUARE_NAMES]
        elif g == "threat":
            names += [f"attacked@{s}" for s in chess.SQUARE_NAMES]
        elif g == "rules":
            names += list(RULES)
        else:
            names += list(TACTICS)
    return names


def _bits(mask: int) -> np.ndarray:
    """64 booleans, square a1 = 0 ... h8 = 63."""
    return np.unpackbits(np.frombuffer(int(mask).to_bytes(8, "little"), dtype=np.uint8), bitorder="little").astype(bool)


def _attacked_by(board: chess.Board, color: chess.Color) -> int:
    mask = 0
    for sq in chess.scan_forward(board.occupied_co[color]):
        mask |= int(board.attacks_mask(sq))
    return mask


def _rules(board: chess.Board) -> list[bool]:
    us = board.turn
    pinned = any(board.is_pinned(c, sq) for c in chess.COLORS for sq in chess.scan_forward(board.occupied_co[c]))
    return [board.is_check(), pinned, board.has_castling_rights(us), board.has_kingside_castling_rights(us),
            board.has_queenside_castling_rights(us), board.has_legal_en_passant(), _can_claim_draw(board)]


def _can_claim_draw(board: chess.Board) -> bool:
    """python-chess's can_claim_draw, skipped when it cannot hold: a threefold claim needs a position
    seen twice within the reversible moves, which takes at least 7 plies since the last capture or
    pawn move (a position recurs at the earliest every 4 plies), and the fifty-move claim needs 99."""
    if board.halfmove_clock < 7:
        return False
    return board.can_claim_draw()


def _can_check_next(board: chess.Board) -> bool:
    return any(board.gives_check(m) for m in board.legal_moves)


def _mate_threat(board: chess.Board) -> bool:
    if board.is_check():
        return False
    b = board.copy(stack=False)
    b.push(chess.Move.null())
    for m in b.legal_moves:
        if not b.gives_check(m):
            continue
        b.push(m)
        mate = b.is_checkmate()
        b.pop()
        if mate:
            return True
    return False


def _can_capture_queen(board: chess.Board) -> bool:
    queens = board.pieces_mask(chess.QUEEN, not board.turn)
    return any(chess.BB_SQUARES[m.to_square] & queens for m in board.legal_moves)


def _connected_rooks(board: chess.Board) -> bool:
    rooks = list(board.pieces(chess.ROOK, board.turn))
    for i, a in enumerate(rooks):
        for b in rooks[i + 1:]:
            aligned = chess.square_file(a) == chess.square_file(b) or chess.square_rank(a) == chess.square_rank(b)
            if aligned and not chess.between(a, b) & board.occupied:
                return True
    return False


def _ambiguous_san(board: chess.Board) -> bool:
    seen: dict[tuple[int, int], int] = {}
    for m in board.legal_moves:
        kind = board.piece_type_at(m.from_square)
        if kind == chess.PAWN:
            continue
        key = (kind, m.to_square)
        if key in seen and seen[key] != m.from_square:
            return True
        seen[key] = m.from_square
    return False


def _fork(board: chess.Board, color: chess.Color) -> bool:
    for sq in chess.scan_forward(board.occupied_co[color] & ~board.kings):
        if board.is_pinned(color, sq):
            continue
        worth = VALUE[board.piece_type_at(sq)]
        targets = board.attacks_mask(sq) & board.occupied_co[not color]
        bigger = sum(1 for t in chess.scan_forward(targets) if VALUE[board.piece_type_at(t)] > worth)
        if bigger >= 2:
            return True
    return False


def _hanging(board: chess.Board, color: chess.Color) -> bool:
    for sq in chess.scan_forward(board.occupied_co[color] & ~board.kings):
        if board.attackers_mask(not color, sq) and not board.attackers_mask(color, sq):
            return True
    return False


def _tactics(board: chess.Board) -> list[bool]:
    us = board.turn
    mine = board.occupied_co[us]
    return [_can_check_next(board), _mate_threat(board), _can_capture_queen(board),
            bool(board.queens & mine), chess.popcount(board.bishops & mine) >= 2, _connected_rooks(board),
            _ambiguous_san(board), _fork(board, us), _fork(board, not us), _hanging(board, us), _hanging(board, not us)]


def board_properties(board: chess.Board, groups: Sequence[str] = DEFAULT_GROUPS) -> np.ndarray:
    """The properties of one board, a bool vector in `property_names(groups)` order."""
    parts: list[np.ndarray] = []
    for g in _check_groups(groups):
        if g == "board":
            parts += [_bits(board.pieces_mask(chess.Piece.from_symbol(p).piece_type, p.isupper())) for p in PIECES]
        elif g == "empty":
            parts.append(~_bits(board.occupied))
        elif g == "threat":
            parts.append(_bits(_attacked_by(board, not board.turn)))
        elif g == "rules":
            parts.append(np.array(_rules(board), dtype=bool))
        else:
            parts.append(np.array(_tactics(board), dtype=bool))
    return np.concatenate(parts)


def dot_positions(game: str, max_chars: int | None = None, max_positions: int | None = None) -> list[int]:
    """Indices of the ``.`` characters of `game` (within its first `max_chars`), at most `max_positions`."""
    text = game if max_chars is None else game[:max_chars]
    dots = [i for i, c in enumerate(text) if c == "."]
    return dots if max_positions is None else dots[:max_positions]


@dataclass
class BSPTable:
    """The BSPs of many positions: ``values[n, p]`` is property ``names[p]`` at character ``char[n]``
    of game ``game[n]`` (the model's activation to pair it with: that game's token at that index)."""

    names: list[str]
    values: torch.Tensor  # (N, P) bool
    game: torch.Tensor  # (N,) int64
    char: torch.Tensor  # (N,) int64

    def columns(self, group: str, drop_start: bool = False) -> list[int]:
        """Column indices of one group's properties (``board``, ``empty``, ``threat``, ``rules``, ``tactics``);
        `drop_start`: without those that hold in the starting position (e.g. ``P@e2``: 736 of the 768
        ``board`` properties remain), as one version of Karvonen et al.'s labelling does."""
        names = property_names([group])
        wanted = set(names)
        if drop_start:
            wanted -= {n for n, v in zip(names, board_properties(chess.Board(), [group]).tolist()) if v}
        return [i for i, n in enumerate(self.names) if n in wanted]

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def gather(self, acts_by_game: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, F) activations row-aligned with `values`: row n is ``acts_by_game[game[n]][char[n]]``, where
        ``acts_by_game[g]`` holds one game's per-character activations (len(game) × F, e.g. a site's
        output on ``encode(games[g])``)."""
        rows = []
        for g, c in zip(self.game.tolist(), self.char.tolist()):
            if g >= len(acts_by_game) or acts_by_game[g].dim() != 2 or c >= acts_by_game[g].shape[0]:
                raise FeaturekitError(f"acts_by_game[{g}] must be a (characters × features) tensor covering character {c}; "
                                      "pass one per game, in the order given to bsp_table")
            rows.append(acts_by_game[g][c])
        if not rows:
            raise FeaturekitError("the table has no positions (games without a '.'); nothing to gather")
        return torch.stack(rows)


def bsp_table(games: Sequence[str], groups: Sequence[str] = DEFAULT_GROUPS, max_chars: int | None = None,
              max_positions: int | None = None) -> BSPTable:
    """The BSPs at every evaluated position (`dot_positions`) of every game."""
    names = property_names(groups)
    rows, game_idx, char_idx = [], [], []
    for gi, game in enumerate(games):
        dots = dot_positions(game, max_chars, max_positions)
        if not dots:
            continue
        moves = moves_of(game[: dots[-1] + 1])
        board = chess.Board()
        played = 0
        for dot in dots:
            before = game[:dot].count(" ")  # half-moves completed before this dot
            while played < before:
                try:
                    board.push_san(moves[played])
                except (ValueError, IndexError) as exc:
                    raise FeaturekitError(f"game {gi}: half-move {played + 1} is not legal ({exc}); "
                                          "BSPs need legal games in the format ';1.e4 e5 2.Nf3'") from exc
                played += 1
            rows.append(board_properties(board, groups))
            game_idx.append(gi)
            char_idx.append(dot)
    values = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, len(names), dtype=torch.bool)
    return BSPTable(names, values, torch.tensor(game_idx, dtype=torch.long), torch.tensor(char_idx, dtype=torch.long))


def properties_after(game: str, groups: Sequence[str] = DEFAULT_GROUPS) -> dict[str, bool]:
    """Name → value of every property after all of `game`'s moves (handy for checking one position)."""
    return dict(zip(property_names(groups), board_properties(board_of(game), groups).tolist()))
