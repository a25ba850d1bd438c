"""FeatureStats against brute force; build_examples and choose_latents on hand-made cases."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.errors import FeaturekitError
from featurekit.features.examples import FeatureStats, build_examples, choose_latents, write_features


def random_codes(seed: int, n: int, n_latents: int, n_ctx: int = 7, seq_len: int = 9):
    """Sparse codes with many exact ties (values from a small set) and a few negative entries,
    each row at a distinct (context, position), rows in random order."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.5, -1.0])
    codes = levels[torch.randint(len(levels), (n, n_latents), generator=gen)]
    cont = torch.rand(n, n_latents, generator=gen) < 0.2
    codes = torch.where(cont, torch.rand(n, n_latents, generator=gen) * 3, codes)
    slots = torch.randperm(n_ctx * seq_len, generator=gen)[:n]
    return codes, slots // seq_len, slots % seq_len


def brute_top(codes, ctx, pos, latent, top_n):
    entries = [(codes[i, latent].item(), ctx[i].item(), pos[i].item())
               for i in range(codes.shape[0]) if codes[i, latent] > 0]
    return sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[:top_n]


def stream(codes, ctx, pos, n_latents, top_n, cuts=(), chunk_elements=None):
    stats = FeatureStats(n_latents, top_n=top_n)
    if chunk_elements:
        stats.chunk_elements = chunk_elements  # rows per internal chunk = chunk_elements // n_latents
    bounds = [0, *sorted(cuts), codes.shape[0]]
    for a, b in zip(bounds, bounds[1:]):
        stats.update(codes[a:b], ctx[a:b], pos[a:b])
    return stats


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 60), n_latents=st.integers(1, 6),
       top_n=st.integers(1, 5), data=st.data())
def test_stats_match_brute_force_and_chunking(seed, n, n_latents, top_n, data):
    codes, ctx, pos = random_codes(seed, n, n_latents)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=4))
    chunk_elements = data.draw(st.sampled_from([None, 1, 7, 40]))
    stats = stream(codes, ctx, pos, n_latents, top_n, cuts, chunk_elements)
    assert stats.n_tokens == n
    expected_counts = (codes != 0).sum(0)
    assert torch.equal(stats.counts, expected_counts)
    assert torch.equal(stats.density(), (expected_counts.double() / max(n, 1)).float())
    for f in range(n_latents):
        assert stats.top(f) == brute_top(codes, ctx, pos, f, top_n)
        assert stats.max_act[f].item() == max([0.0] + codes[:, f].tolist())
    # One chunk, and the rows in another order, give identical state.
    whole = stream(codes, ctx, pos, n_latents, top_n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    shuffled = stream(codes[perm], ctx[perm], pos[perm], n_latents, top_n, cuts)
    for other in (whole, shuffled):
        assert torch.equal(other.top_values, stats.top_values)
        assert torch.equal(other.top_context, stats.top_context)
        assert torch.equal(other.top_position, stats.top_position)


def test_ties_prefer_smaller_context_then_position():
    codes = torch.ones(4, 1)
    stats = FeatureStats(1, top_n=2)
    stats.update(codes[:2], torch.tensor([5, 3]), torch.tensor([0, 7]))
    stats.update(codes[2:], torch.tensor([3, 9]), torch.tensor([2, 1]))
    assert stats.top(0) == [(1.0, 3, 2), (1.0, 3, 7)]


def test_update_rejects_bad_shapes():
    stats = FeatureStats(4)
    with pytest.raises(FeaturekitError, match="shape"):
        stats.update(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(FeaturekitError, match="context_idx"):
        stats.update(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(FeaturekitError, match="out of range"):
        stats.top(4)


def hand_made():
    """2 contexts of 6 tokens, 3 latents; latent 1 peaks at (1, 4) then (0, 1); latent 2 is dead."""
    input_ids = torch.arange(12).reshape(2, 6)
    codes = torch.zeros(2, 6, 3)
    codes[0, :, 0] = torch.tensor([0.0, 0.2, 0.0, 0.0, 0.0, 0.1])
    codes[0, 1, 1], codes[0, 2, 1] = 2.0, 0.5
    codes[1, 3, 1], codes[1, 4, 1], codes[1, 5, 1] = 1.0, 3.0, 0.25
    stats = FeatureStats(3, top_n=2)
    ctx = torch.arange(2).repeat_interleave(6)
    pos = torch.arange(6).repeat(2)
    # Token 0 of each context is excluded, as a BOS mask would do.
    keep = pos > 0
    stats.update(codes.reshape(12, 3)[keep], ctx[keep], pos[keep])
    return stats, input_ids, codes


def test_build_examples_hand_made():
    stats, input_ids, codes = hand_made()
    calls = []

    def activation_fn(idx):
        calls.append(idx.tolist())
        return codes[idx]

    out = build_examples(stats, [1, 2], input_ids, lambda t: f"w{t}", activation_fn, window=(2, 1), batch_size=1)
    assert calls == [[0], [1]]  # only the needed contexts, batch_size at a time
    feat1, feat2 = out
    assert feat1["index"] == 1 and feat1["max_act"] == 3.0
    assert feat1["density"] == pytest.approx(5 / 10)
    first, second = feat1["examples"]
    assert first["tokens"] == ["w8", "w9", "w10", "w11"]
    assert first["acts"] == [0.0, 1.0, 3.0, 0.25]
    assert first["max_pos"] == 2 and first["tokens"][first["max_pos"]] == "w10"
    assert (first["context"], first["position"], first["value"]) == (1, 4, 3.0)
    assert second["tokens"] == ["w0", "w1", "w2"]  # window clipped at the start of the context
    assert second["acts"] == [0.0, 2.0, 0.5] and second["max_pos"] == 1
    assert feat2 == {"index": 2, "density": 0.0, "max_act": 0.0, "examples": []}
    json.dumps(out)  # JSON-ready


def test_build_examples_without_activation_fn_marks_only_the_peak():
    stats, input_ids, _ = hand_made()
    (feat,) = build_examples(stats, [0], input_ids, str, window=(1, 1))
    assert [ex["acts"] for ex in feat["examples"]] == [[0.0, pytest.approx(0.2), 0.0], [0.0, pytest.approx(0.1)]]


def test_build_examples_checks_inputs():
    stats, input_ids, codes = hand_made()
    with pytest.raises(FeaturekitError, match="input_ids"):
        build_examples(stats, [1], input_ids[:1], str, lambda i: codes[i])
    with pytest.raises(FeaturekitError, match="activation_fn"):
        build_examples(stats, [1], input_ids, str, lambda i: codes[i][..., :2])


def test_choose_latents_samples_live_latents_reproducibly():
    stats = FeatureStats(50)
    codes = torch.zeros(4, 50)
    live = [3, 7, 8, 20, 31, 44, 49]
    codes[0, live] = 1.0
    stats.update(codes, torch.zeros(4, dtype=torch.long), torch.arange(4))
    picked = choose_latents(stats, 4, seed=1)
    assert len(picked) == 4 and set(picked) <= set(live) and picked == sorted(picked)
    assert picked == choose_latents(stats, 4, seed=1)
    assert choose_latents(stats, 100, seed=0) == live


def test_write_features(tmp_path):
    stats, input_ids, codes = hand_made()
    examples = build_examples(stats, [0, 1], input_ids, str, lambda i: codes[i])
    write_features(tmp_path / "features", stats, examples)
    density = json.loads((tmp_path / "features" / "density.json").read_text())
    assert density["n_tokens"] == 10 and len(density["density"]) == 3
    assert json.loads((tmp_path / "features" / "top_examples.json").read_text()) == examples
