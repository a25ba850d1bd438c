"""Chess for MoE-X, as in Karvonen et al. 2024 ("Measuring progress in dictionary learning for language
model interpretability with board game models"): games as character strings (`pgn`), generated
offline with python-chess (`games`), stored as a dataset folder (`dataset`); board-state properties
at the evaluated characters (`bsp`); BSP coverage, board reconstruction and legal-move rate (`metrics`).
Guide: docs/moex-chess.md."""

from .bsp import DEFAULT_GROUPS, GROUPS, BSPTable, board_properties, bsp_table, dot_positions, property_names
from .dataset import build_dataset, load_token_stream, read_games, read_manifest
from .engine import stockfish_available, stockfish_path
from .games import GameSpec, generate_games, random_game
from .metrics import (
    THRESHOLDS,
    CoverageResult,
    LegalMoveResult,
    ReconstructionResult,
    board_reconstruction,
    bsp_coverage,
    greedy_sampler,
    legal_move_rate,
    move_prefixes,
)
from .pgn import VOCAB, board_of, decode, encode, game_string, moves_of, token_stream

__all__ = ["BSPTable", "CoverageResult", "DEFAULT_GROUPS", "GROUPS", "GameSpec", "LegalMoveResult", "ReconstructionResult",
           "THRESHOLDS", "VOCAB", "board_of", "board_properties", "board_reconstruction", "bsp_coverage", "bsp_table",
           "build_dataset", "decode", "dot_positions", "encode", "game_string", "generate_games", "greedy_sampler", "legal_move_rate",
           "load_token_stream", "move_prefixes", "moves_of", "property_names", "random_game", "read_games",
           "read_manifest", "stockfish_available", "stockfish_path", "token_stream"]
