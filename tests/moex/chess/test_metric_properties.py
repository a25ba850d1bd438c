"""Hypothesis properties of the chess metrics: bounds, invariances, monotonicity."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.moex.chess.metrics import board_reconstruction, bsp_coverage, legal_move_rate, move_prefixes

FAST = settings(max_examples=25, deadline=None)


@st.composite
def acts_and_bsp(draw, min_rows=4):
    n = draw(st.integers(min_rows, 40))
    f = draw(st.integers(1, 6))
    p = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n, f, generator=g) * draw(st.sampled_from([1.0, 5.0]))
    acts[torch.rand(n, f, generator=g) < draw(st.floats(0.0, 0.9))] = 0.0  # sparse, like ReLU units
    bsp = torch.rand(n, p, generator=g) < draw(st.floats(0.05, 0.95))
    return acts, bsp, seed


@FAST
@given(acts_and_bsp())
def test_coverage_is_in_unit_interval(data):
    acts, bsp, _ = data
    r = bsp_coverage(acts, bsp)
    assert 0.0 <= r.mean <= r.mean_present + 1e-6 <= 1.0 + 1e-6
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in r.per_property + r.per_threshold)
    assert r.mean == max(r.per_threshold)


@FAST
@given(acts_and_bsp())
def test_coverage_ignores_feature_order_scale_and_position_order(data):
    acts, bsp, seed = data
    base = bsp_coverage(acts, bsp)
    g = torch.Generator().manual_seed(seed + 1)
    perm_f = torch.randperm(acts.shape[1], generator=g)
    perm_n = torch.randperm(acts.shape[0], generator=g)
    scale = torch.rand(acts.shape[1], generator=g) * 10 + 0.1  # thresholds are fractions of each feature's max
    other = bsp_coverage(acts[:, perm_f] * scale[perm_f], bsp)
    shuffled = bsp_coverage(acts[perm_n], bsp[perm_n])
    for r in (other, shuffled):
        assert abs(r.mean - base.mean) < 1e-5
        assert max(abs(a - b) for a, b in zip(r.per_property, base.per_property)) < 1e-5


@FAST
@given(acts_and_bsp(), st.integers(0, 2**31 - 1))
def test_more_features_never_lower_coverage(data, seed):
    acts, bsp, _ = data
    extra = torch.rand(acts.shape[0], 3, generator=torch.Generator().manual_seed(seed))
    more = bsp_coverage(torch.cat([acts, extra], 1), bsp)
    less = bsp_coverage(acts, bsp)
    assert all(a >= b - 1e-6 for a, b in zip(more.per_threshold, less.per_threshold))
    assert more.mean >= less.mean - 1e-6


@FAST
@given(acts_and_bsp(min_rows=8))
def test_reconstruction_is_bounded_and_ignores_feature_order(data):
    acts, bsp, seed = data
    h = acts.shape[0] // 2
    r = board_reconstruction(acts[:h], bsp[:h], acts[h:], bsp[h:], min_count=1)
    assert 0.0 <= r.score <= 1.0 + 1e-6 and 0.0 <= r.micro_f1 <= 1.0 + 1e-6
    perm = torch.randperm(acts.shape[1], generator=torch.Generator().manual_seed(seed))
    p = board_reconstruction(acts[:h, perm], bsp[:h], acts[h:, perm], bsp[h:], min_count=1)
    assert abs(p.score - r.score) < 1e-6 and p.labels == r.labels


@FAST
@given(acts_and_bsp(min_rows=8))
def test_reconstruction_with_the_properties_themselves_is_perfect_on_seen_boards(data):
    _, bsp, _ = data
    # train = test, features = the properties: every property's own feature has precision 1, recall 1,
    # and any other label a feature earns holds on every position where that feature fires
    r = board_reconstruction(bsp.float(), bsp, bsp.float(), bsp, precision=1.0, min_count=1)
    assert abs(r.score - 1.0) < 1e-6


@FAST
@given(st.lists(st.sampled_from(["e4", "Nf3", "Qxf7#", "O-O", "zz", "", "2.d4", "e2e4"]), min_size=5, max_size=5))
def test_legal_move_rate_is_a_fraction(texts):
    prefixes = move_prefixes(";1.e4 e5 2.Nf3 Nc6 3.Bb5")
    r = legal_move_rate(prefixes, texts)
    assert 0.0 <= r.rate <= 1.0 and r.total == 5 and r.legal == round(r.rate * 5)
