"""Ground-truth recovery scores on hand-built decoders whose answers are known."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.evaluate.ground_truth import SyntheticConfig, SyntheticData, dataset_config
from featurekit.evaluate.recovery import absorption, bidirectional_coverage, per_token_l0, recovery, score, similarity


def test_identity_permuted_and_rescaled_decoders_score_one():
    data = SyntheticData(dataset_config("default", d=16, n_features=40, k=3.0, seed=1))
    f = data.features
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for decoder in (f, f[perm], f[perm] * torch.linspace(0.1, 5, 40)[:, None]):
        r = recovery(f, decoder)
        assert math.isclose(r["mmcs_true_to_learned"], 1.0, abs_tol=1e-9)
        assert math.isclose(r["mmcs_learned_to_true"], 1.0, abs_tol=1e-9)
        assert r["recovered_fraction"] == 1.0


def test_sign_flipped_rows_count_only_up_to_sign():
    f = torch.eye(6)
    flipped = f.clone()
    flipped[:3] *= -1
    unsigned = recovery(f, flipped)
    assert unsigned["recovered_fraction"] == 0.5  # the flipped half is not found by a non-negative latent
    assert math.isclose(unsigned["mmcs_true_to_learned"], 0.5, abs_tol=1e-9)  # 3 × 1 + 3 × 0 (best other row is orthogonal)
    signed = recovery(f, flipped, up_to_sign=True)
    assert signed["recovered_fraction"] == 1.0 and math.isclose(signed["mmcs_true_to_learned"], 1.0, abs_tol=1e-9)
    per_feature = recovery(f, flipped, up_to_sign=torch.tensor([True, True, True, False, False, False]))
    assert per_feature["recovered_fraction"] == 1.0  # the flipped ones are the bidirectional ones


def test_dead_latents_are_left_out_and_half_rotated_rows_fall_below_threshold():
    f = torch.eye(4)
    rotated = torch.nn.functional.normalize(f + 0.6 * torch.roll(f, 1, dims=1), dim=1)  # cos = 1/√1.36 ≈ 0.857
    decoder = torch.cat([rotated, f])
    live = torch.tensor([True] * 4 + [False] * 4)
    r = recovery(f, decoder, live=live)
    assert r["recovered_fraction"] == 0.0
    assert math.isclose(r["mmcs_true_to_learned"], 1 / math.sqrt(1.36), rel_tol=1e-6)
    assert recovery(f, decoder)["recovered_fraction"] == 1.0  # with the (dead) exact rows


def hierarchy(seed=0, m=3, magnitude="constant"):
    cfg = SyntheticConfig(d=24, n_features=40, k=4.0, n_parents=3, children_per_parent=m, magnitude=magnitude, seed=seed)
    data = SyntheticData(cfg)
    _, codes = data.tokens(3000, stream_seed=1)
    return data, codes


def absorbing_dictionary(data, true_codes, absorbed):
    """Decoder = true features, plus for each child in `absorbed` its latent replaced by f_P + f_c (normalised):
    on that child's tokens the parent latent stays silent and the child latent reconstructs both."""
    decoder, codes = data.features.clone(), true_codes.clone()
    for c in absorbed:
        q = int(data.parent[c])
        both = data.features[q] + data.features[c]
        decoder[c] = both / both.norm()
        on = true_codes[:, c] != 0
        codes[on, c] = both.norm()  # constant magnitudes: a_P = a_c = 1
        codes[on, q] = 0.0
    return decoder, codes


def test_clean_dictionary_has_no_absorption():
    data, codes = hierarchy()
    parents = torch.arange(3)
    r = absorption(data.features, parents, data.children, codes, codes, data.features)
    assert r["absorption_rate"] == 0.0 and r["parent_silent_rate"] == 0.0 and r["absorbed_children"] == 0.0


def test_fully_absorbing_dictionary_has_absorption_one_and_reconstructs_exactly():
    data, true_codes = hierarchy()
    decoder, codes = absorbing_dictionary(data, true_codes, data.children.flatten().tolist())
    torch.testing.assert_close(codes @ decoder, true_codes @ data.features, rtol=1e-5, atol=1e-5)  # same x̂: only attribution differs
    r = absorption(data.features, torch.arange(3), data.children, true_codes, codes, decoder)
    assert r["absorption_rate"] == 1.0 and r["parent_silent_rate"] == 1.0 and r["absorbed_children"] == 1.0


def test_combined_latents_without_a_parent_latent_absorb_every_child():
    """The TopK solution on hierarchical data: one latent per (parent, child) pair, none for the parent alone.
    The best single parent match is one of those pairs; it must not count as the parent's latent (rate 1, not (m−1)/m)."""
    data, true_codes = hierarchy()
    decoder, codes = absorbing_dictionary(data, true_codes, data.children.flatten().tolist())
    decoder[:3] = 0.0  # no parent rows at all
    codes[:, :3] = 0.0
    r = absorption(data.features, torch.arange(3), data.children, true_codes, codes, decoder)
    assert r["absorption_rate"] == 1.0 and r["parent_silent_rate"] == 1.0


def test_missing_parent_is_silent_but_not_absorbed():
    data, true_codes = hierarchy()
    codes = true_codes.clone()
    codes[:, :3] = 0  # the parent latents never fire and nothing else carries the parents
    r = absorption(data.features, torch.arange(3), data.children, true_codes, codes, data.features)
    assert r["parent_silent_rate"] == 1.0 and r["absorption_rate"] == 0.0


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 1000), st.integers(2, 4), st.data())
def test_absorption_is_exactly_the_absorbed_children(seed, m, draw):
    data, true_codes = hierarchy(seed, m)
    children = data.children.flatten().tolist()
    absorbed = draw.draw(st.lists(st.sampled_from(children), unique=True))
    decoder, codes = absorbing_dictionary(data, true_codes, absorbed)
    r = absorption(data.features, torch.arange(3), data.children, true_codes, codes, decoder)
    per_child = dict(zip(children, r["child_absorption"]))
    assert per_child == {c: 1.0 if c in absorbed else 0.0 for c in children}
    assert math.isclose(r["absorption_rate"], len(absorbed) / len(children))


def test_bidirectional_coverage_signed_one_latent_unsigned_two():
    f = torch.eye(4)
    t = torch.tensor([[1.0, -1.0, 0.5, -2.0], [-1.0, 1.0, -0.5, 2.0]])  # every feature used with both signs
    signed = bidirectional_coverage(f, f, t)
    assert signed == {"coverage": 1.0, "latents_per_covered": 1.0}
    two_rows = torch.cat([f, -f])
    nonneg = torch.cat([t.clamp(min=0), (-t).clamp(min=0)], dim=1)
    assert bidirectional_coverage(f, two_rows, nonneg) == {"coverage": 1.0, "latents_per_covered": 2.0}
    only_plus = bidirectional_coverage(f, f, t.clamp(min=0))
    assert only_plus == {"coverage": 0.0, "latents_per_covered": None}


def test_per_token_l0_correlation():
    true = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert math.isclose(per_token_l0(true * 3, true)["l0_true_corr"], 1.0, rel_tol=1e-9)
    constant = torch.tensor([[1.0, 0, 0]] * 4)
    assert per_token_l0(constant, true) == {"l0_std": 0.0, "l0_true_corr": None}


@pytest.mark.parametrize("name", ["default", "hierarchical", "bidirectional"])
def test_score_of_the_ground_truth_itself(name):
    data = SyntheticData(dataset_config(name, d=16, n_features=48, k=3.0, seed=2, noise_std=0.0))
    x, true_codes = data.tokens(4000, stream_seed=2)
    r = score(data, x, true_codes, true_codes, true_codes @ data.features, data.features)
    assert r["fvu"] < 1e-10 and r["dead_fraction"] == 0.0 and math.isclose(r["l0"], float((true_codes != 0).sum(1).double().mean()))
    assert math.isclose(r["mmcs_true_to_learned"], 1.0, abs_tol=1e-9) and r["recovered_fraction"] == 1.0
    assert math.isclose(r["l0_true_corr"], 1.0, rel_tol=1e-9)
    if name == "hierarchical":
        assert r["absorption_rate"] == 0.0 and r["children_recovered"] == 1.0 and r["parents_recovered"] == 1.0
    if name == "bidirectional":
        assert r["bidirectional_coverage"] == 1.0 and r["latents_per_bidirectional"] == 1.0


def test_similarity_mask_shapes():
    f, d = torch.eye(3), -torch.eye(3)
    assert torch.equal(similarity(f, d, True), torch.eye(3, dtype=torch.float64))
    assert torch.equal(similarity(f, d, False), -torch.eye(3, dtype=torch.float64))
