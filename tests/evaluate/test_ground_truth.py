"""The synthetic ground-truth generator: frequencies, hierarchy, signs, correlation, determinism."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.dictionaries import TopKSAE
from featurekit.errors import FeaturekitError
from featurekit.evaluate.ground_truth import SyntheticConfig, SyntheticData, dataset_config, zipf_probabilities
from featurekit.evaluate.recovery import recovery


@st.composite
def configs(draw):
    n_parents = draw(st.integers(0, 3))
    m = draw(st.integers(1, 4))
    free = draw(st.integers(4, 30))
    n_groups = draw(st.integers(0, free // 4))
    return SyntheticConfig(
        d=draw(st.integers(4, 24)), n_features=n_parents * (1 + m) + free, k=draw(st.floats(0.5, 3.0)),
        zipf_exponent=draw(st.floats(0.0, 1.5)), n_groups=n_groups, group_size=min(4, free // max(n_groups, 1)),
        group_correlation=draw(st.floats(0.0, 0.9)), n_parents=n_parents, children_per_parent=m,
        bidirectional_fraction=draw(st.sampled_from([0.0, 0.5, 1.0])),
        magnitude=draw(st.sampled_from(["uniform", "lognormal", "exponential", "constant"])),
        noise_std=draw(st.sampled_from([0.0, 0.05])), seed=draw(st.integers(0, 10_000)),
    )


@settings(max_examples=40, deadline=None)
@given(configs())
def test_features_are_unit_and_probabilities_follow_zipf_with_mean_count_k(cfg):
    data = SyntheticData(cfg)
    torch.testing.assert_close(data.features.norm(dim=1), torch.ones(cfg.n_features))
    assert math.isclose(float(data.probability.sum()), cfg.k, rel_tol=1e-9)  # expected active features per token
    root_p = data.probability[data.roots]
    ranks = torch.arange(1, len(data.roots) + 1, dtype=torch.float64)
    uncapped = root_p < 1
    scaled = root_p[uncapped] * ranks[uncapped] ** cfg.zipf_exponent  # p_r · r^s is one constant below the cap
    if len(scaled):
        torch.testing.assert_close(scaled, torch.full_like(scaled, float(scaled[0])))
    assert bool((root_p[1:] <= root_p[:-1]).all())  # ordered by rank
    if cfg.n_parents:
        expected = (root_p[:cfg.n_parents, None] / cfg.children_per_parent).expand(-1, cfg.children_per_parent)
        torch.testing.assert_close(data.probability[data.children], expected)


@settings(max_examples=40, deadline=None)
@given(configs())
def test_each_firing_parent_has_exactly_one_child_and_children_never_fire_alone(cfg):
    data = SyntheticData(cfg)
    x, codes = data.sample(512, torch.Generator().manual_seed(1))
    fires = codes != 0
    for q in range(cfg.n_parents):
        n_children = fires[:, data.children[q]].sum(dim=1)
        assert torch.equal(n_children, fires[:, q].long())
    if cfg.noise_std == 0:
        torch.testing.assert_close(x, codes @ data.features)
    assert bool((codes[:, ~data.bidirectional] >= 0).all())


def test_empirical_frequencies_match_the_probabilities_including_grouped_and_children():
    cfg = dataset_config("hierarchical", d=16, n_features=48, k=4.0, seed=3)
    data = SyntheticData(cfg)
    _, codes = data.tokens(60_000, stream_seed=1)
    freq = (codes != 0).double().mean(0)
    p = data.probability
    sigma = (p * (1 - p) / 60_000).sqrt()
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all())
    assert abs(float((codes != 0).sum(1).double().mean()) - 4.0) < 0.05  # the mean count is k


def test_bidirectional_signs_are_balanced_and_only_on_bidirectional_features():
    data = SyntheticData(dataset_config("bidirectional", d=16, n_features=40, k=4.0, seed=5))
    assert int(data.bidirectional.sum()) > 0
    _, codes = data.tokens(40_000, stream_seed=1)
    on = codes[:, data.bidirectional]
    n_fired, n_negative = int((on != 0).sum()), int((on < 0).sum())
    assert abs(n_negative / n_fired - 0.5) < 5 * math.sqrt(0.25 / n_fired)
    assert bool((codes[:, ~data.bidirectional] >= 0).all())
    assert not bool(data.bidirectional[data.group >= 0].any())  # only free ungrouped roots are bidirectional


def test_groups_co_fire_and_ungrouped_features_do_not():
    cfg = SyntheticConfig(d=16, n_features=24, k=3.0, zipf_exponent=0.0, n_groups=2, group_size=4, group_correlation=0.8, seed=2)
    data = SyntheticData(cfg)
    _, codes = data.tokens(40_000, stream_seed=1)
    fires = (codes != 0).double()
    corr = torch.corrcoef(fires.T)
    grouped = (data.group >= 0).nonzero().flatten()
    same = data.group[grouped][:, None] == data.group[grouped][None, :]
    off_diag = ~torch.eye(len(grouped), dtype=torch.bool)
    within = corr[grouped][:, grouped][same & off_diag]
    free = (data.group < 0).nonzero().flatten()
    between = corr[free][:, free][~torch.eye(len(free), dtype=torch.bool)]
    assert float(within.min()) > 0.2
    assert float(between.abs().max()) < 0.05


@pytest.mark.parametrize("magnitude", ["uniform", "lognormal", "exponential", "constant"])
def test_magnitudes_are_positive_with_the_configured_mean(magnitude):
    cfg = SyntheticConfig(d=8, n_features=16, k=4.0, magnitude=magnitude, magnitude_mean=1.5, magnitude_spread=0.5, seed=1)
    _, codes = SyntheticData(cfg).tokens(20_000, stream_seed=1)
    values = codes[codes != 0]
    assert bool((values > 0).all())
    assert abs(float(values.mean()) - 1.5) < 0.05


def test_determinism_by_seed_and_independent_streams():
    cfg = dataset_config("hierarchical", d=16, n_features=48, k=3.0, seed=7)
    a, b = SyntheticData(cfg), SyntheticData(cfg)
    assert torch.equal(a.features, b.features)
    xa, ca = a.tokens(3000, stream_seed=1, batch_size=1000)
    xb, cb = b.tokens(3000, stream_seed=1, batch_size=1000)
    assert torch.equal(xa, xb) and torch.equal(ca, cb)
    batches = [x for (x, _), _ in zip(a.stream(1000, 1), range(3))]
    assert torch.equal(torch.cat(batches), xa)  # the stream is the same tokens, batch by batch
    assert not torch.equal(a.tokens(3000, stream_seed=2, batch_size=1000)[0], xa)  # another stream
    other = SyntheticData(dataset_config("hierarchical", d=16, n_features=48, k=3.0, seed=8))
    assert not torch.equal(other.features, a.features)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_features_are_not_a_dictionary_initialisation_of_the_same_seed(seed):
    """A recovery test must not start at the answer: tied inits draw randn(F, d) from manual_seed(seed)."""
    data = SyntheticData(dataset_config("default", d=24, n_features=48, k=3.0, seed=seed))
    init = TopKSAE(24, 64, k=3, seed=seed).W_dec
    assert recovery(data.features, init)["mmcs_true_to_learned"] < 0.7


def test_zipf_probabilities_cap_at_one_and_keep_the_total():
    weights = torch.tensor([100.0, 1.0, 1.0, 1.0])
    p = zipf_probabilities(weights, torch.ones(4), 2.5)
    assert float(p[0]) == 1.0 and math.isclose(float(p.sum()), 2.5, rel_tol=1e-9)
    torch.testing.assert_close(p[1:], torch.full((3,), 0.5, dtype=torch.float64))
    with pytest.raises(FeaturekitError, match="more than"):
        zipf_probabilities(weights, torch.ones(4), 5.0)


@pytest.mark.parametrize("bad", [
    {"n_features": 10, "n_parents": 3, "children_per_parent": 3},  # the hierarchy needs 12 features
    {"magnitude": "gaussian"},
    {"magnitude": "uniform", "magnitude_spread": 1.0},  # could reach 0
    {"group_correlation": 1.5},
    {"k": 0.0},
])
def test_invalid_configs_fail_with_a_clear_error(bad):
    with pytest.raises(FeaturekitError):
        SyntheticData(SyntheticConfig(**{"d": 8, "n_features": 16, **bad}))
    with pytest.raises(FeaturekitError, match="unknown synthetic dataset"):
        dataset_config("nested")
