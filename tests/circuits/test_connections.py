"""Mean input × gradient connections (`circuits.connections`) on a tiny random Llama: each number equals the
central finite difference of the target pre-activation when the source's writes are scaled by (1 ± ε) in the real
model (MLPs and attention live), one example and the mean of two; refusals."""

import pytest
import torch

from featurekit.circuits import connections
from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture, replace

from .helpers import prompt, random_set, tiny_llama

EPS = 1e-2


@pytest.fixture(scope="module")
def setup():
    model, tset = tiny_llama(), random_set().folded()
    ids = prompt(9).tolist()
    with capture(model, *[f"mlp_in.{layer}" for layer in range(3)]) as seen, torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    codes = {layer: tset[layer].encode(seen[f"mlp_in.{layer}"][0].float()) for layer in range(3)}
    return model, tset, ids, codes


def _pre(model, ids, layer, tc, edit_layer, delta):
    """Pre-activations (T, F) of `tc` at `layer` with `delta` (T, d) added to mlp_out.edit_layer."""
    with torch.no_grad(), capture(model, f"mlp_in.{layer}") as seen, replace(model, f"mlp_out.{edit_layer}", lambda a: a + delta):
        model(input_ids=torch.tensor([ids]))
    return seen[f"mlp_in.{layer}"][0].float() @ tc.W_enc.T + tc.b_enc


def test_upstream_equals_finite_difference(setup):
    model, tset, ids, codes = setup
    pos = 8
    j = int(codes[2][pos].nonzero()[0])
    got = connections.upstream(model, tset[2], 2, j, {0: tset[0], 1: tset[1]}, [(ids, pos)])
    for layer in (0, 1):
        for i in got[layer].abs().topk(3).indices.tolist():
            write = codes[layer][:, i:i + 1] * tset[layer].W_dec[i]           # (T, d): latent i at every position
            plus, minus = (_pre(model, ids, 2, tset[2], layer, s * EPS * write)[pos, j] for s in (1, -1))
            fd = (plus - minus) / (2 * EPS)
            assert abs(float(got[layer][i]) - float(fd)) <= 2e-2 * abs(float(fd)) + 1e-4
    twice = connections.upstream(model, tset[2], 2, j, {1: tset[1]}, [(ids, pos), (ids, pos)])
    assert torch.allclose(twice[1], got[1], atol=1e-6)                           # the mean of equal examples


def test_downstream_equals_finite_difference(setup):
    model, tset, ids, codes = setup
    pos = 3
    i = int(codes[0][pos].nonzero()[0])
    before = model.config._attn_implementation
    got = connections.downstream(model, tset[0], 0, i, {1: tset[1], 2: tset[2]}, [(ids, pos)])
    write = torch.zeros(len(ids), tset[0].W_dec.shape[1])
    write[pos] = codes[0][pos, i] * tset[0].W_dec[i]
    for layer in (1, 2):
        plus, minus = (_pre(model, ids, layer, tset[layer], 0, s * EPS * write) for s in (1, -1))
        fd = ((plus - minus) / (2 * EPS)).sum(0)
        top = got[layer].abs().topk(5).indices
        assert torch.allclose(got[layer][top], fd[top], rtol=2e-2, atol=1e-4)
    assert connections.top(got, 3)[0][2] == max((float(v) for g in got.values() for v in g), key=abs)
    assert model.config._attn_implementation == before                           # eager only inside the call


def test_refusals(setup):
    model, tset, ids, codes = setup
    with pytest.raises(FeaturekitError, match="no examples"):
        connections.upstream(model, tset[2], 2, 0, {0: tset[0]}, [])
    with pytest.raises(FeaturekitError, match="below layer"):
        connections.upstream(model, tset[1], 1, 0, {2: tset[2]}, [(ids, 1)])
    with pytest.raises(FeaturekitError, match="above layer"):
        connections.downstream(model, tset[1], 1, 0, {0: tset[0]}, [(ids, 1)])
    with pytest.raises(FeaturekitError, match="outside"):
        connections.downstream(model, tset[0], 0, 0, {1: tset[1]}, [(ids, 99)])
