"""Games as character strings in Karvonen et al.'s format, and a character tokenizer for them.

A game is written ``;1.e4 e5 2.Nf3 Nc6 3.Bb5`` (Karvonen et al. 2024, "Measuring progress in
dictionary learning for language model interpretability with board game models"; their ChessGPT
reads the same strings): a leading ``;``, the move number glued to white's move by a ``.``, one
space between half-moves, standard algebraic notation (SAN) with ``+``/``#`` suffixes, no result.
Every character is one of the 32 in `VOCAB`, so a tiny GPT trains on token ids 0..31.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import chess
import torch

from ...errors import FeaturekitError

#: the 32 characters of the format, sorted by code point: index = token id
VOCAB = " #+-.0123456789;=BKNOQRabcdefghx"
STOI = {c: i for i, c in enumerate(VOCAB)}
GAME_START = ";"
_MOVE_NUMBER = re.compile(r"^\d+\.")


def game_string(sans: Iterable[str]) -> str:
    """The format's string of a game given its half-moves in SAN: ``;1.e4 e5 2.Nf3``."""
    parts = []
    for i, san in enumerate(sans):
        parts.append(f"{i // 2 + 1}.{san}" if i % 2 == 0 else san)
    return GAME_START + " ".join(parts)


def moves_of(game: str) -> list[str]:
    """The SAN half-moves of a game string (move numbers and the leading ``;`` dropped)."""
    if not game.startswith(GAME_START):
        raise FeaturekitError(f"a game string starts with {GAME_START!r} (e.g. ';1.e4 e5'); got {game[:20]!r}")
    out = []
    for token in game[1:].split(" "):
        token = _MOVE_NUMBER.sub("", token)
        if token:
            out.append(token)
    return out


def board_of(game: str) -> chess.Board:
    """The board after every move of `game`; an illegal or unreadable move raises FeaturekitError."""
    board = chess.Board()
    for i, san in enumerate(moves_of(game)):
        try:
            board.push_san(san)
        except ValueError as exc:
            raise FeaturekitError(f"half-move {i + 1} of the game, {san!r}, is not legal or not SAN here ({exc}); "
                                  "pass games in the format ';1.e4 e5 2.Nf3'") from exc
    return board


def encode(text: str) -> torch.Tensor:
    """Token ids (1-D int64) of a string over `VOCAB`."""
    bad = sorted(set(text) - STOI.keys())
    if bad:
        raise FeaturekitError(f"characters {''.join(bad)!r} are not in the chess vocabulary {VOCAB!r}; "
                              "write games with game_string (SAN, no comments or results)")
    return torch.tensor([STOI[c] for c in text], dtype=torch.long)


def decode(ids: Iterable[int] | torch.Tensor) -> str:
    """The string of token ids (the inverse of `encode`)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [i for i in ids if not 0 <= int(i) < len(VOCAB)]
    if bad:
        raise FeaturekitError(f"token ids {bad[:5]} are outside 0..{len(VOCAB) - 1}, the chess vocabulary's range")
    return "".join(VOCAB[int(i)] for i in ids)


def token_stream(games: Iterable[str]) -> torch.Tensor:
    """One 1-D int64 stream of all games back to back; each game's leading ``;`` separates it from the last."""
    text = "".join(games)
    if text and not text.startswith(GAME_START):
        raise FeaturekitError(f"games start with {GAME_START!r}; build them with game_string")
    return encode(text)
