"""Game generation: legal, deterministic given the seed, within the length limit."""

import chess
import pytest

from featurekit.errors import FeaturekitError
from featurekit.moex.chess.engine import level_settings, stockfish_available
from featurekit.moex.chess.games import GameSpec, generate_games, random_game
from featurekit.moex.chess.pgn import VOCAB, board_of, moves_of


def test_games_are_legal_and_within_length():
    spec = GameSpec(max_chars=300)
    games = list(generate_games(seed=3, count=6, spec=spec))
    for g in games:
        assert len(g) <= 300 and set(g) <= set(VOCAB)
        board = board_of(g)  # replays every move with python-chess
        assert len(board.move_stack) == len(moves_of(g)) > 10


def test_deterministic_given_seed_and_index():
    spec = GameSpec(max_chars=200)
    a = list(generate_games(7, 3, spec))
    assert a == list(generate_games(7, 3, spec))
    assert list(generate_games(7, 2, spec, start=1)) == a[1:]  # a game depends on (seed, index) only
    assert a != list(generate_games(8, 3, spec))


def test_finished_games_end_in_a_game_over():
    game = random_game(0, 0, GameSpec(max_chars=100_000))  # no length limit: played to the end
    assert board_of(game).is_game_over(claim_draw=False)


def test_greedy_mix_captures_more():
    plain = "".join(generate_games(1, 4, GameSpec(max_chars=400)))
    greedy = "".join(generate_games(1, 4, GameSpec(greedy=1.0, max_chars=400)))
    per_move = lambda s: s.count("x") / s.count(" ")  # noqa: E731
    assert per_move(greedy) > per_move(plain)


def test_bad_specs_are_named():
    with pytest.raises(FeaturekitError, match="unknown game policy"):
        GameSpec(policy="alphazero")
    with pytest.raises(FeaturekitError, match="probability"):
        GameSpec(greedy=1.5)
    with pytest.raises(FeaturekitError, match="max_chars"):
        GameSpec(max_chars=3)


@pytest.mark.skipif(not stockfish_available(), reason="no stockfish binary (apt-get install stockfish)")
def test_stockfish_games_are_legal_varied_and_reproducible():
    spec = GameSpec(policy="stockfish", stockfish_nodes=50, max_chars=160)
    games = list(generate_games(0, 4, spec))
    assert all(isinstance(board_of(g), chess.Board) and len(g) <= 160 for g in games)
    assert len(set(games)) == 4  # random opening plies and per-game strength: no two games alike
    assert list(generate_games(0, 4, spec)) == games  # seeded: the same games again (same engine build)
    assert list(generate_games(0, 2, spec, start=2)) == games[2:]  # a game depends on (seed, index) only: resumable
    assert list(generate_games(1, 1, spec)) != games[:1]
    strong = list(generate_games(0, 3, GameSpec(policy="stockfish", stockfish_nodes=50, max_chars=160, stockfish_skill=(20, 20))))
    assert strong != games[:3]


def test_strength_levels_set_blunders_and_nodes():
    assert level_settings(20, 2000) == (0.0, 2000) and level_settings(0, 2000) == (0.5, 62)
    assert level_settings(0, 10) == (0.5, 1)  # at least one node
    with pytest.raises(FeaturekitError, match="stockfish_skill"):
        GameSpec(policy="stockfish", stockfish_skill=(5, 21))


@pytest.mark.skipif(stockfish_available(), reason="a stockfish binary is installed")
def test_stockfish_missing_is_named():
    with pytest.raises(FeaturekitError, match="stockfish binary"):
        list(generate_games(0, 1, GameSpec(policy="stockfish")))
