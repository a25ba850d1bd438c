"""Interventions on the local replacement model (`replacement_logits(clamps=...)`, what the graph viewer's
intervention box runs): a clamp at a feature's own value changes nothing, a clamp in the last layer moves the
logits by exactly (new − old) × its decoder row through the frozen final norm and the unembedding, and a clamp
upstream reaches the logits through the live features downstream."""

import pytest
import torch

from featurekit.circuits import replacement
from featurekit.errors import FeaturekitError

from .helpers import prompt, random_clt, random_set, tiny_llama


@pytest.fixture(scope="module")
def rm():
    return replacement.build(tiny_llama(), random_set(), prompt())


def _active(rm, layer):
    pos = rm.n_pos - 1
    latent = int(rm.codes[layer][pos].nonzero()[0])
    return pos, latent, float(rm.codes[layer][pos, latent])


def test_clamp_at_own_value_is_the_clean_model(rm):
    pos, latent, value = _active(rm, 1)
    same = rm.replacement_logits(clamps={(1, pos, latent): value})
    assert torch.allclose(same, rm.replacement_logits(), atol=1e-5) and torch.allclose(same, rm.clean_logits, atol=1e-4)


def test_last_layer_clamp_moves_logits_by_its_decoder_row(rm):
    last = rm.n_layers - 1
    pos, latent, value = _active(rm, last)
    moved = rm.replacement_logits(clamps={(last, pos, latent): value + 3.0})
    row = rm.decoder_rows(last, torch.tensor([latent]))[0]
    final = rm.final
    expected = 3.0 * (row * final.scale[pos] * final.weight) @ rm.W_U.T
    delta = moved[pos] - rm.replacement_logits()[pos]
    assert torch.allclose(delta, expected, atol=1e-5 * float(expected.abs().max()) + 1e-7)
    assert torch.allclose(moved[:pos], rm.replacement_logits()[:pos], atol=1e-6)  # causal: earlier positions unchanged


def test_upstream_clamp_and_clt_and_refusals():
    for tset in (random_set(), random_clt()):
        model_rm = replacement.build(tiny_llama(), tset, prompt())
        pos, latent, value = _active(model_rm, 0)
        moved = model_rm.replacement_logits(clamps={(0, pos, latent): value + 50.0})
        assert not torch.allclose(moved[-1], model_rm.clean_logits[-1], atol=1e-4)
    with pytest.raises(FeaturekitError, match="no feature"):
        model_rm.replacement_logits(clamps={(0, 0, 10_000): 1.0})
