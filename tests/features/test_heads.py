"""Attention-output dictionaries: decoder-norm shares per head, per-head top features, and the pipeline."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.errors import FeaturekitError
from featurekit.features.heads import head_shares, head_summary


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_shares_are_a_distribution_over_heads(n_heads, head_dim, n_latents, seed):
    w = torch.randn(n_latents, n_heads * head_dim, generator=torch.Generator().manual_seed(seed))
    shares = head_shares(w, n_heads)
    assert shares.shape == (n_latents, n_heads) and (shares >= 0).all()
    assert torch.allclose(shares.sum(1), torch.ones(n_latents), atol=1e-5)
    assert torch.allclose(head_shares(w * 3.0, n_heads), shares, atol=1e-6)  # scale-free


def test_hand_built_decoder():
    """Feature 0 lives in head 1 only; feature 1 splits 3:1 between heads 0 and 2 (norms 3 and 1)."""
    w = torch.zeros(3, 6)
    w[0, 2:4] = torch.tensor([0.6, 0.8])
    w[1, 0:2] = torch.tensor([3.0, 0.0])
    w[1, 4:6] = torch.tensor([0.0, -1.0])
    w[2] = 1.0
    shares = head_shares(w, 3)
    assert torch.allclose(shares[0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(shares[1], torch.tensor([0.75, 0.0, 0.25]))
    assert torch.allclose(shares[2], torch.full((3,), 1 / 3))
    summary = head_summary(w, 3, density=torch.tensor([0.1, 0.2, 0.0]), top=2)
    assert summary["n_live"] == 2 and summary["single_head_fraction"] == 1.0  # feature 2 is dead
    assert [t["feature"] for t in summary["heads"][0]["top_features"]] == [1, 0]
    assert summary["heads"][1]["top_features"][0] == {"feature": 0, "share": 1.0, "density": pytest.approx(0.1)}
    assert [h["features_mostly_here"] for h in summary["heads"]] == [1, 1, 0]
    assert summary["dominant_head"][:2] == [1, 0] and summary["head_dim"] == 2
    with pytest.raises(FeaturekitError, match="does not split into 4 heads"):
        head_shares(w, 4)


def test_attention_output_dictionary_through_the_pipeline(tiny, tmp_path):
    from featurekit import pipeline

    from ..test_pipeline import config

    cfg = config(tiny, tmp_path, "name=attn", "site=attn_z.1", "dictionary.n_latents=48")
    report = pipeline.run_all(cfg, progress=False)
    heads = json.loads((cfg.run_dir / "features" / "heads.json").read_text())
    assert heads["n_heads"] == 4 and heads["head_dim"] == 8 and len(heads["heads"]) == 4
    assert len(heads["dominant_head"]) == 48 and all(0.25 <= s <= 1 for s in heads["dominant_share"])
    assert all(h["top_features"] for h in heads["heads"])
    html = report.read_text()
    assert 'id="heads"' in html and "features mostly here" in html
