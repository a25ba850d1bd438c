"""BSP coverage, board reconstruction and legal-move rate on cases whose answer is known."""

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.moex.chess.bsp import bsp_table
from featurekit.moex.chess.games import GameSpec, generate_games
from featurekit.moex.chess.metrics import (
    THRESHOLDS,
    board_reconstruction,
    bsp_coverage,
    first_move,
    greedy_sampler,
    is_legal,
    legal_move_rate,
    move_prefixes,
)
from featurekit.moex.chess.pgn import STOI, board_of, encode


def _random_bsp(n, p, seed=0, rate=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, p, generator=g) < rate


def test_a_feature_equal_to_a_property_covers_it_fully():
    bsp = _random_bsp(300, 4)
    acts = torch.zeros(300, 6)
    acts[:, 2] = bsp[:, 1].float() * 3.0  # feature 2 is property 1, scaled
    acts[:, 5] = bsp[:, 3].float()
    r = bsp_coverage(acts, bsp)
    assert r.per_property[1] == pytest.approx(1.0) and r.best_feature[1] == 2
    assert r.per_property[3] == pytest.approx(1.0) and r.best_feature[3] == 5
    assert r.per_property[0] < 0.9 and r.per_property[2] < 0.9
    full = bsp_coverage(bsp.float(), bsp)
    assert full.mean == pytest.approx(1.0) and full.mean_present == pytest.approx(1.0)


def test_graded_feature_needs_the_right_threshold():
    bsp = _random_bsp(400, 1, seed=1)
    noise = torch.rand(400, 1, generator=torch.Generator().manual_seed(2)) * 0.3
    acts = noise + 0.7 * bsp.float()  # positives in [0.7, 1.0], negatives in [0, 0.3]
    r = bsp_coverage(acts, bsp)
    assert r.mean == pytest.approx(1.0) and 0.3 <= r.threshold < 0.7
    assert r.per_threshold[0] < 1.0  # at t = 0 every position fires


def test_random_features_cover_little():
    bsp = _random_bsp(2000, 50, seed=3, rate=0.05)
    acts = torch.rand(2000, 64, generator=torch.Generator().manual_seed(4))
    r = bsp_coverage(acts, bsp)
    assert r.mean < 0.2


def test_absent_property_scores_zero_and_dead_features_never_fire():
    bsp = _random_bsp(100, 3, seed=5)
    bsp[:, 2] = False
    acts = torch.cat([bsp.float(), torch.zeros(100, 2), -torch.ones(100, 1)], 1)
    r = bsp_coverage(acts, bsp)
    assert r.per_property[2] == 0.0 and r.present == [True, True, False]
    assert r.mean == pytest.approx(2 / 3) and r.mean_present == pytest.approx(1.0)
    assert r.best_feature[2] == -1


def test_perfect_reconstruction_scores_one():
    bsp = _random_bsp(600, 12, seed=6)
    r = board_reconstruction(bsp[:400].float(), bsp[:400], bsp[400:].float(), bsp[400:])
    assert r.score == pytest.approx(1.0) and r.micro_f1 == pytest.approx(1.0)
    assert r.labels == 12  # each feature labelled with exactly its own property


def test_reconstruction_half_the_features():
    bsp = _random_bsp(600, 10, seed=7)
    acts = bsp.float().clone()
    acts[:, 5:] = 0  # only properties 0..4 have a detector
    r = board_reconstruction(acts[:400], bsp[:400], acts[400:], bsp[400:])
    truth = bsp[400:]
    half = truth[:, :5].sum(1).float()
    expected = (2 * half / (half + truth.sum(1).float())).mean()  # precision 1, recall = found / all, per board
    assert r.score == pytest.approx(float(expected), abs=1e-5)


def test_random_features_reconstruct_nothing():
    bsp = _random_bsp(600, 10, seed=8, rate=0.3)
    acts = torch.rand(600, 40, generator=torch.Generator().manual_seed(9))
    r = board_reconstruction(acts[:400], bsp[:400], acts[400:], bsp[400:])
    assert r.labels == 0 and r.score < 0.05


def test_reconstruction_and_coverage_on_real_games():
    games = list(generate_games(11, 6, GameSpec(max_chars=400)))
    table = bsp_table(games, ["board", "rules"])
    board = table.values[:, table.columns("board")]
    half = len(table) // 2
    # a toy featurizer on the real token stream: the counts of each character among the last 8
    per_game = []
    for game in games:
        onehot = torch.nn.functional.one_hot(encode(game), 32).float()
        csum = torch.cat([torch.zeros(1, 32), onehot.cumsum(0)])
        per_game.append(csum[1:] - csum[torch.clamp(torch.arange(1, len(game) + 1) - 8, min=0)])
    acts = table.gather(per_game)
    gi, ci = int(table.game[5]), int(table.char[5])
    assert torch.equal(acts[5], torch.nn.functional.one_hot(encode(games[gi])[max(0, ci - 7): ci + 1], 32).float().sum(0))
    cov = bsp_coverage(acts, table.values)
    rec = board_reconstruction(acts[:half], board[:half], acts[half:], board[half:])
    ideal = board_reconstruction(board[:half].float(), board[:half], board[half:].float(), board[half:])
    assert 0.0 <= cov.mean < bsp_coverage(table.values.float(), table.values).mean
    assert 0.0 <= rec.score < ideal.score <= 1.0 and len(rec.per_threshold) == len(THRESHOLDS)


def test_metric_inputs_are_checked():
    bsp = _random_bsp(10, 3)
    with pytest.raises(FeaturekitError, match="9 rows"):
        bsp_coverage(torch.zeros(9, 2), bsp)
    with pytest.raises(FeaturekitError, match="2-D"):
        bsp_coverage(torch.zeros(10), bsp)
    with pytest.raises(FeaturekitError, match="NaN"):
        bsp_coverage(torch.full((10, 2), float("nan")), bsp)
    with pytest.raises(FeaturekitError, match="boolean"):
        bsp_coverage(torch.zeros(10, 2), bsp.float() * 2)
    with pytest.raises(FeaturekitError, match="thresholds"):
        bsp_coverage(torch.zeros(10, 2), bsp, thresholds=[1.5])
    with pytest.raises(FeaturekitError, match="same features"):
        board_reconstruction(torch.zeros(10, 2), bsp, torch.zeros(10, 3), bsp)


def test_legal_move_rate():
    game = ";1.e4 e5 2.Nf3 Nc6 3.Bb5"
    prefixes = move_prefixes(game)
    assert prefixes == [";1.", ";1.e4 ", ";1.e4 e5 2.", ";1.e4 e5 2.Nf3 ", ";1.e4 e5 2.Nf3 Nc6 3."]
    truth = ["e4 e5", "e5 2.Nf3", "Nf3 Nc6", "Nc6 3.Bb5", "Bb5 a6"]
    assert legal_move_rate(prefixes, truth).rate == 1.0
    wrong = ["e5", "e5", "Ke2", "Nf6", "Bb6"]  # e5 is not legal for white; Bb6 is not a bishop move
    r = legal_move_rate(prefixes, wrong)
    assert (r.legal, r.total) == (3, 5) and r.rate == pytest.approx(0.6)
    # a callable sampler: the first legal move in python-chess's order, written in SAN
    sample = lambda p: board_of(p).san(next(iter(board_of(p).legal_moves)))  # noqa: E731
    assert legal_move_rate(prefixes, sample=sample).rate == 1.0
    assert legal_move_rate(prefixes, sample=lambda p: "").rate == 0.0
    with pytest.raises(FeaturekitError, match="exactly one"):
        legal_move_rate(prefixes)
    with pytest.raises(FeaturekitError, match="one per prefix"):
        legal_move_rate(prefixes, truth[:2])


def test_first_move_and_strictness():
    assert first_move(" 2.Nf3 Nc6") == "Nf3" and first_move("e5 2.Nf3") == "e5" and first_move("Qxf7#;1.e4") == "Qxf7#"
    assert first_move("x.e4") == ""
    board = board_of(";1.e4 e5")
    assert is_legal(board, "Nf3") and is_legal(board, "g1f3") and not is_legal(board, "g1f3", strict=True)
    assert not is_legal(board, "--") and not is_legal(board, "Nf4") and not is_legal(board, "")


class Bigram(torch.nn.Module):
    """A real one-layer model: the next character's logits are a table lookup of the current one."""

    def __init__(self, table):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 32)
        with torch.no_grad():
            self.emb.weight.fill_(-10.0)
            for cur, nxt in table.items():
                self.emb.weight[STOI[cur], STOI[nxt]] = 10.0

    def forward(self, ids):
        return self.emb(ids)


def test_greedy_sampler_with_a_known_model():
    # after '.' or ' ': 'e'; after 'e': '4'; after '4': ' '  => it always plays "e4"
    model = Bigram({".": "e", " ": "e", "e": "4", "4": " "})
    sample = greedy_sampler(model, context=16)
    assert sample(";1.") == "e4" and sample(";1.e4 e5 2.") == "e4"
    r = legal_move_rate([";1.", ";1.e4 e5 2.", ";1.d4 e5 2."], sample=sample)
    assert (r.legal, r.total) == (2, 3)  # e4 is illegal only where white's own pawn already stands on e4
    with pytest.raises(FeaturekitError, match="logits of shape"):
        greedy_sampler(lambda ids: torch.zeros(1, ids.shape[0], 5))(";1.")
