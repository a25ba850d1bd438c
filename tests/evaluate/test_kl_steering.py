"""KL-matched steering on the tiny random model: the strength search reaches its target KLs within tolerance, and a
direction that is a token's unembedding row scores higher on its promoted tokens than random directions at matched KL.
The baseline directions on hand-built activations."""

from __future__ import annotations

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.evaluate.kl_steering import SteeringProbe, choose_features, difference_of_means, kl_matched, random_directions
from featurekit.models.hooks import capture_activations
from featurekit.models.loading import load_model

SITE = "resid_post.2"  # the tiny model's last block: the direct path to the logits dominates


@pytest.fixture(scope="module")
def setup(tiny):
    loaded = load_model(str(tiny / "model"))
    prompts = torch.randint(4, 30, (4, 8), generator=torch.Generator().manual_seed(0))
    x = capture_activations(loaded.model, prompts, [SITE])[SITE][:, 1:].reshape(-1, 32)
    return loaded.model, prompts, float(x.norm(dim=1).mean())


def test_the_strength_search_hits_every_target_kl_within_tolerance(setup):
    model, prompts, scale = setup
    directions = random_directions(32, 3, seed=1)
    probe = SteeringProbe(model, SITE, prompts, torch.cat([directions, -directions]), scale, top_tokens=3)
    targets = [0.001, 0.002, 0.004]
    found = kl_matched(probe, targets, tol=0.05)
    assert found["reached"].all() and found["within_tol"].all()
    ratio = found["kl"] / torch.tensor(targets, dtype=torch.float64)
    assert ((ratio - 1).abs() <= 0.051).all(), ratio
    assert (found["r"][:, 0] < found["r"][:, 1]).all() and (found["r"][:, 1] < found["r"][:, 2]).all()  # more KL, more strength
    # re-measuring at the found strengths gives the recorded KL (the search reports what it measured)
    again = probe(torch.arange(6), found["r"][:, 1].float())
    assert torch.allclose(again["kl"].double(), found["kl"][:, 1], rtol=1e-4)
    # an unreachable target is reported as such, not as a number at the grid's end
    assert not kl_matched(probe, [1e3])["reached"].any()


def test_an_unembedding_row_promotes_its_token_more_than_random_directions_at_matched_kl(setup):
    model, prompts, scale = setup
    token = 10
    row = model.get_output_embeddings().weight.detach()[token]
    probe = SteeringProbe(model, SITE, prompts, torch.cat([row[None], random_directions(32, 4, seed=2)]), scale, top_tokens=3)
    assert int(probe.promoted[0, 0]) == token  # its promoted tokens start with the token itself
    found = kl_matched(probe, [0.002, 0.004])
    assert found["within_tol"].all()
    for t in range(2):
        assert (found["prob_gain"][0, t] > found["prob_gain"][1:, t]).all(), found["prob_gain"]
        assert found["log_rank_gain"][0, t] > 0  # (ranks in a 32-token vocabulary are too coarse to rank directions)


def test_baseline_directions_on_hand_built_activations():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    codes = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
    assert torch.allclose(difference_of_means(x, codes, [0]), torch.tensor([[2.0 - 0.0, 0.0 - 3.0]]))
    assert torch.allclose(difference_of_means(x, codes, [1]), torch.tensor([[0.0 - 4 / 3, 4.0 - 2 / 3]]))
    with pytest.raises(FeaturekitError, match="needs both"):
        difference_of_means(x, torch.zeros(4, 2), [0])
    many = torch.zeros(20, 4)
    many[:6, 0], many[:, 1], many[:2, 2], many[5:15, 3] = 1, 1, 1, 1  # 1 fires everywhere, 2 too rarely
    assert choose_features(many, 5, seed=0) == [0, 3]
    v = random_directions(8, 3, seed=0)
    assert torch.allclose(v.norm(dim=1), torch.ones(3)) and torch.equal(v, random_directions(8, 3, seed=0))
