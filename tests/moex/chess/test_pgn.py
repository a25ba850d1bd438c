"""The game string format and its character tokenizer."""

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.moex.chess.pgn import VOCAB, board_of, decode, encode, game_string, moves_of, token_stream


def test_vocab_is_karvonens_32_sorted_characters():
    assert len(VOCAB) == 32 and len(set(VOCAB)) == 32
    assert list(VOCAB) == sorted(VOCAB)
    assert set(VOCAB) == set(" #+-.0123456789;=BKNOQRabcdefghx")


def test_game_string_and_back():
    sans = ["e4", "e5", "Nf3", "Nc6", "Bb5", "a6", "O-O"]
    game = game_string(sans)
    assert game == ";1.e4 e5 2.Nf3 Nc6 3.Bb5 a6 4.O-O"
    assert moves_of(game) == sans
    assert board_of(game).fen().startswith("r1bqkbnr/1ppp1ppp/p1n5/1B2p3/4P3/5N2/PPPP1PPP/RNBQ1RK1 b kq")
    assert moves_of(";1.e4 e5 2.") == ["e4", "e5"]  # a prefix ending at a move number


def test_encode_decode_round_trip():
    game = ";1.e4 e5 2.Qh5 Nc6 3.Bc4 Nf6 4.Qxf7#"
    ids = encode(game)
    assert ids.dtype == torch.long and ids.dim() == 1 and len(ids) == len(game)
    assert int(ids.min()) >= 0 and int(ids.max()) < 32
    assert decode(ids) == game
    assert decode(ids.tolist()) == game


def test_token_stream_concatenates_games():
    games = [";1.e4 e5", ";1.d4"]
    stream = token_stream(games)
    assert decode(stream) == ";1.e4 e5;1.d4"


def test_bad_input_is_named():
    with pytest.raises(FeaturekitError, match="not in the chess vocabulary"):
        encode(";1.e4 {comment}")
    with pytest.raises(FeaturekitError, match="outside 0..31"):
        decode([0, 40])
    with pytest.raises(FeaturekitError, match="starts with ';'"):
        moves_of("1.e4 e5")
    with pytest.raises(FeaturekitError, match="not legal"):
        board_of(";1.e5")


def test_package_exports_resolve():
    import featurekit.moex.chess as chess_pkg

    missing = [name for name in chess_pkg.__all__ if not hasattr(chess_pkg, name)]
    assert not missing
