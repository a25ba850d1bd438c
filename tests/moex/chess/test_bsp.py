"""Board-state properties on hand-made positions, checked square by square."""

import chess
import pytest

from featurekit.errors import FeaturekitError
from featurekit.moex.chess.bsp import GROUPS, PIECES, board_properties, bsp_table, dot_positions, properties_after, property_names


def test_names_and_sizes():
    assert len(property_names(["board"])) == 12 * 64
    assert len(property_names(["empty"])) == len(property_names(["threat"])) == 64
    names = property_names(GROUPS)
    assert len(names) == len(set(names)) == len(board_properties(chess.Board(), GROUPS))
    assert property_names(["board"])[:2] == ["P@a1", "P@b1"] and "n@f6" in names
    with pytest.raises(FeaturekitError, match="unknown BSP groups"):
        property_names(["pieces"])


def test_after_e4_square_by_square():
    props = properties_after(";1.e4", ["board", "empty", "threat", "rules"])
    assert props["P@e4"] and not props["P@e2"] and props["empty@e2"] and not props["empty@e4"]
    assert props["p@e7"] and props["K@e1"] and props["k@e8"]
    # every square against python-chess's own piece_at, one at a time
    board = chess.Board()
    board.push_san("e4")
    for sq, name in enumerate(chess.SQUARE_NAMES):
        piece = board.piece_at(sq)
        for symbol in PIECES:
            assert props[f"{symbol}@{name}"] == (piece is not None and piece.symbol() == symbol), (symbol, name)
        assert props[f"empty@{name}"] == (piece is None)
        # black to move: "attacked" = attacked by white
        assert props[f"attacked@{name}"] == board.is_attacked_by(chess.WHITE, sq)
    assert props["attacked@d5"] and props["attacked@f5"] and not props["attacked@e5"]
    assert not props["legal_en_passant"]  # no black pawn beside e4
    assert props["castling_rights"] and props["kingside_castling"] and props["queenside_castling"]
    assert not props["in_check"] and not props["any_pin"]


def test_rules_properties():
    assert properties_after(";1.e4 a6 2.e5 d5")["legal_en_passant"]  # exd6 e.p.
    assert not properties_after(";1.e4 a6 2.e5 d6")["legal_en_passant"]
    assert properties_after(";1.e4 f5 2.Qh5+")["in_check"]
    assert properties_after(";1.d4 e5 2.Nc3 Bb4")["any_pin"]  # Nc3 pinned to Ke1 along b4-e1
    moved_king = properties_after(";1.e4 e5 2.Ke2 Ke7 3.Ke1")  # black to move, black's king has moved
    assert not moved_king["castling_rights"]
    assert properties_after(";1.Nf3 Nf6 2.Ng1 Ng8 3.Nf3 Nf6 4.Ng1 Ng8")["can_claim_draw"]  # threefold
    assert not properties_after(";1.Nf3 Nf6 2.Ng1 Ng8")["can_claim_draw"]


def test_tactics_properties():
    scholar = properties_after(";1.e4 e5 2.Bc4 Nc6 3.Qh5")  # black to move; Qxf7# is threatened
    assert scholar["mate_threat"] and scholar["has_queen"] and scholar["has_bishop_pair"]
    assert not properties_after(";1.e4 e5")["mate_threat"]
    d5 = properties_after(";1.e4 d5")  # white to move: e4 attacked by d5, undefended; d5 defended by Qd8
    assert d5["hanging_mine"] and not d5["hanging_theirs"] and not d5["can_capture_queen"]
    assert properties_after(";1.e4 d5 2.Qg4")["can_capture_queen"]  # black to move: Bxg4 (d7 is empty)
    assert not properties_after(";1.e4 e6 2.Qg4")["can_capture_queen"]
    assert not properties_after(";1.e4")["can_check_next"]
    assert properties_after(";1.e4 e5 2.Nf3 d6")["can_check_next"]  # Bb5+
    fork = dict(zip(property_names(["tactics"]),
                    board_properties(chess.Board("r3k3/2N5/8/8/8/8/8/4K3 w - - 0 1"), ["tactics"]).tolist()))
    assert fork["fork_mine"] and not fork["fork_theirs"]
    rooks = dict(zip(property_names(["tactics"]),
                     board_properties(chess.Board("4k3/8/8/8/8/8/8/R3K2R w - - 0 1"), ["tactics"]).tolist()))
    assert not rooks["connected_rooks"]  # the king stands between them
    rooks2 = dict(zip(property_names(["tactics"]),
                      board_properties(chess.Board("4k3/8/8/8/8/8/8/R4RK1 w - - 0 1"), ["tactics"]).tolist()))
    assert rooks2["connected_rooks"] and rooks2["ambiguous_san"]  # Rd1 / Rb1 ... both rooks reach b1-e1


def test_dot_positions_and_table():
    game = ";1.e4 e5 2.Nf3 Nc6 3.Bb5"
    assert dot_positions(game) == [2, 10, 20]
    assert dot_positions(game, max_positions=2) == [2, 10]
    assert dot_positions(game, max_chars=11) == [2, 10] and dot_positions(game, max_chars=10) == [2]
    table = bsp_table([game, ";1.d4"], ["board"])
    assert table.values.shape == (4, 768) and table.game.tolist() == [0, 0, 0, 1] and table.char.tolist() == [2, 10, 20, 2]
    names = table.names
    start, after2, after4 = table.values[0], table.values[1], table.values[2]
    assert start[names.index("P@e2")] and not start[names.index("P@e4")]  # the dot of "1." sees the start position
    assert after2[names.index("P@e4")] and after2[names.index("p@e5")] and after2[names.index("P@e2")] == 0
    assert after4[names.index("N@f3")] and after4[names.index("n@c6")] and not after4[names.index("B@b5")]
    assert table.columns("board") == list(range(768))
    kept = [names[i] for i in table.columns("board", drop_start=True)]
    assert len(kept) == 768 - 32 and "P@e2" not in kept and "K@e1" not in kept and "P@e4" in kept
    with pytest.raises(FeaturekitError, match="not legal"):
        bsp_table([";1.e4 e4 2.d4"], ["board"])


def test_gather_pairs_activations_with_positions():
    import torch

    games = [";1.e4 e5 2.Nf3", ";1.d4"]
    table = bsp_table(games, ["board"])
    acts = [torch.arange(len(g), dtype=torch.float32)[:, None].repeat(1, 3) + 100 * i for i, g in enumerate(games)]
    got = table.gather(acts)
    assert got.shape == (3, 3) and got[:, 0].tolist() == [2.0, 10.0, 102.0]
    with pytest.raises(FeaturekitError, match="covering character 10"):
        table.gather([acts[0][:5], acts[1]])
