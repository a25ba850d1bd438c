"""Jaccard similarity of ITDA dictionaries' atom labels, the layer-matching score, chance and rank correlation."""

import pytest
import torch

from featurekit.dictionaries.itda import ITDADictionary
from featurekit.errors import FeaturekitError
from featurekit.evaluate.layer_matching import (
    chance_jaccard,
    char_labels,
    compare,
    jaccard,
    jaccard_matrix,
    matching_score,
    rank_correlation,
)


def test_jaccard_of_label_sets():
    assert jaccard({(0, 1), (2, 3)}, [(2, 3), (0, 1)]) == 1.0
    assert jaccard({(0, 1)}, {(0, 2)}) == 0.0
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0
    sim = jaccard_matrix([{1, 2}, {3}], [{1, 2}, {3, 4}, set()])
    assert sim.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]


def test_matching_score_counts_diagonal_argmaxes_both_ways():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.6], [0.0, 0.1, 0.7]])
    out = matching_score(sim)
    assert out["row_fraction"] == pytest.approx(2 / 3) and out["col_fraction"] == 1.0 and out["score"] == pytest.approx(5 / 6)
    assert out["row_argmax"] == [0, 2, 2]
    with pytest.raises(FeaturekitError, match="square"):
        matching_score(sim[:2])


def dictionary(context, position):
    d = ITDADictionary(4, len(context))
    n = len(context)
    d.set_atoms(torch.randn(n, 4), torch.tensor(context), torch.tensor(position), torch.zeros(n, dtype=torch.long))
    return d


def test_atoms_are_the_same_when_their_tokens_end_at_the_same_character():
    """Two tokenizations of two documents: an atom's identity is (document, character where its token ends)."""
    ends_a = torch.tensor([[3, 7, 12, -1], [2, 5, 9, 14]])  # e.g. "the cat  sat" / ...
    ends_b = torch.tensor([[3, 5, 7, 12], [5, 9, 14, -1]])  # another tokenizer splits "cat" and merges the first words
    a = dictionary([0, 0, 1, 1], [1, 2, 0, 3])  # labels (0,7) (0,12) (1,2) (1,14)
    b = dictionary([0, 0, 1], [2, 3, 2])  # labels (0,7) (0,12) (1,14)
    assert char_labels(a, ends_a) == {(0, 7), (0, 12), (1, 2), (1, 14)}
    assert compare({0: a}, ends_a, {0: b}, ends_b).item() == pytest.approx(3 / 4)
    assert compare({0: a}, ends_a, {0: a}, ends_a).item() == 1.0
    assert compare({0: dictionary([0], [0])}, ends_a, {0: b}, ends_b).item() == 0.0


def test_chance_jaccard_and_rank_correlation():
    assert chance_jaccard(100, 30, 100, 100, 100) == pytest.approx(0.3)  # every label vs a random 30: J = 30/100
    assert chance_jaccard(10, 10, 100, 100, 0) == 0.0
    g = torch.Generator().manual_seed(0)
    a = set(torch.randperm(1000, generator=g)[:200].tolist())
    sims = [jaccard(a, set(torch.randperm(1000, generator=g)[:300].tolist())) for _ in range(200)]
    assert sum(sims) / len(sims) == pytest.approx(chance_jaccard(200, 300, 1000, 1000, 1000), rel=0.05)
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3], [5, 5, 5]) == 0.0
