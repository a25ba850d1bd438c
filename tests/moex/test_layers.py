"""The MoE layers on toy sizes: the wide-MLP identity, the sparsity router's estimate, gating, load balance."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.errors import FeaturekitError
from featurekit.models.moexlm.layers import DenseMLP, expected_active, load_balance_loss, moex, switch_moe, top_k_gates, true_active

D_MODEL, M, D = 16, 4, 12


def _layers():
    torch.manual_seed(0)
    return {"switch-gelu-k1": switch_moe(D_MODEL, M, D, 1, "gelu"), "switch-relu-k2": switch_moe(D_MODEL, M, D, 2, "relu"),
            "moex-k1": moex(D_MODEL, M, D, 1), "moex-k2": moex(D_MODEL, M, D, 2)}


@pytest.mark.parametrize("name", list(_layers()))
def test_layer_equals_the_wide_mlp(name):
    layer = _layers()[name].double()
    x = torch.randn(40, D_MODEL, dtype=torch.float64) + 0.3
    gates = layer.route(x)[0]
    # the wide MLP written out: every unit of every expert computed, then gated per expert block
    wide = layer.act(layer.up(x)) * gates.repeat_interleave(D, dim=1)
    reference = layer.down(wide)
    layer.train()
    sparse = layer(x)
    layer.eval()
    as_wide = layer(x)
    torch.testing.assert_close(sparse, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(as_wide, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.wide_hidden(x, gates), wide, rtol=0, atol=1e-12)
    if layer.act_name == "relu":  # ω ReLU(z) = ReLU(ω z) for ω ≥ 0: the gated hidden is itself a ReLU layer
        torch.testing.assert_close(wide, torch.relu(layer.up(x) * gates.repeat_interleave(D, dim=1)), rtol=0, atol=1e-12)


def test_training_path_has_the_wide_mlps_gradients():
    layer = moex(D_MODEL, M, D, 2).double()
    x = torch.randn(30, D_MODEL, dtype=torch.float64)
    grads = []
    for train in (True, False):
        layer.train(train)
        layer.zero_grad()
        (layer(x) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_hidden_units_of_unselected_experts_are_zero():
    layer = moex(D_MODEL, M, D, 2)
    x = torch.randn(50, D_MODEL)
    gates, idx, _ = layer.route(x)
    h = layer.wide_hidden(x, gates).view(50, M, D)
    selected = torch.zeros(50, M, dtype=torch.bool).scatter(1, idx, True)
    assert (h[~selected] == 0).all()
    assert ((h != 0).sum((1, 2)) <= 2 * D).all()


def test_dense_mlp_hidden_is_the_down_input():
    mlp = DenseMLP(D_MODEL, 32, "relu")
    x = torch.randn(5, D_MODEL)
    torch.testing.assert_close(mlp(x), mlp.down(torch.relu(mlp.up(x))))


# --- the sparsity-aware router -----------------------------------------------------------------------

@pytest.mark.parametrize("estimate", ["expert", "unit"])
def test_estimate_is_exact_in_expectation_for_gaussian_rows(estimate):
    """Rows with i.i.d. N(μ, σ²) entries: the fraction of positive units on a fixed x is Φ((μΣx + b)/(σ‖x‖))."""
    torch.manual_seed(1)
    d, units = 256, 4000
    x = torch.randn(1, d) + 0.2
    for mu, sigma, b in [(0.0, 1.0, 0.0), (0.05, 1.0, 0.0), (-0.03, 0.5, 0.4), (0.02, 0.2, -0.5)]:
        w = mu + sigma * torch.randn(units, d)
        bias = torch.full((units,), b)
        est = expected_active(x, w, bias, 1, estimate)[0, 0] / units
        true = ((x @ w.T + bias) > 0).float().mean()
        exact = 0.5 * (1 + math.erf((mu * x.sum().item() + b) / (sigma * x.norm().item()) / math.sqrt(2)))
        assert abs(est.item() - exact) < 0.03
        assert abs(true.item() - exact) < 0.03


def test_expert_estimate_is_exact_for_correlated_gaussian_rows():
    """Rows drawn from any multivariate Gaussian N(m, C): z = w·x + b is N(mᵀx̃, x̃ᵀCx̃) on a fixed x, so the
    per-expert estimate D·Φ(mean/√var) is the expected ℓ0, whatever the correlations between weights."""
    torch.manual_seed(3)
    d, units, n_experts = 24, 3000, 3
    ws, bs = [], []
    for _ in range(n_experts):
        mean, mix = 0.3 * torch.randn(d + 1), torch.randn(d + 1, d + 1) / math.sqrt(d)
        rows = mean + torch.randn(units, d + 1) @ mix
        ws.append(rows[:, :d])
        bs.append(rows[:, d])
    w, b = torch.cat(ws), torch.cat(bs)
    x = torch.randn(50, d)
    est = expected_active(x, w, b, n_experts, "expert")
    true = ((x @ w.T + b) > 0).view(50, n_experts, units).sum(-1).float()
    assert ((est - true).abs() / units).max() < 0.05


def _corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_gate_score_correlates_negatively_with_true_l0():
    torch.manual_seed(0)
    layer = moex(64, 8, 256, top_k=2)  # default init, isotropic inputs
    x = torch.randn(2000, 64)
    with torch.no_grad():
        r = _corr(layer.router(x, layer), true_active(x, layer))
    assert r < -0.6, r  # measured -0.80 with these settings (docs/moex.md)


def test_unit_estimate_needs_rows_with_different_means():
    torch.manual_seed(0)
    layer = moex(64, 8, 256, top_k=2, estimate="unit")
    x = torch.randn(2000, 64) + 0.5
    with torch.no_grad():
        flat = _corr(layer.router(x, layer), true_active(x, layer))
        layer.up.weight.add_(torch.randn(8 * 256, 1) * layer.up.weight.std())  # rows with different means
        shifted = _corr(layer.router(x, layer), true_active(x, layer))
    assert shifted < -0.6 and shifted < flat - 0.3, (flat, shifted)  # measured -0.34 → -0.92


def test_router_picks_sparser_than_average_experts():
    torch.manual_seed(2)
    layer = moex(64, 8, 256, top_k=2)
    x = torch.randn(2000, 64)
    with torch.no_grad():
        _, idx, _ = layer.route(x)
        l0 = true_active(x, layer)
    assert l0.gather(1, idx).mean() < l0.mean() - 5


def test_unknown_estimate_is_refused():
    with pytest.raises(FeaturekitError, match="unknown router estimate 'rows'"):
        moex(8, 2, 4, estimate="rows")


def test_router_runs_no_expert():
    """The estimate reads only the input and the weights' row statistics: the experts' forward never runs."""
    layer = moex(D_MODEL, M, D, 1)
    calls = []
    layer.up.register_forward_hook(lambda *a: calls.append(1))
    layer.route(torch.randn(7, D_MODEL))
    assert calls == []


# --- gating and load balance ------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), m=st.integers(1, 9), data=st.data())
def test_top_k_gates(n, m, data):
    k = data.draw(st.integers(1, m))
    logits = torch.randn(n, m, generator=torch.Generator().manual_seed(n * 31 + m))
    for renorm in (True, False):
        gates, idx, probs = top_k_gates(logits, k, renorm)
        assert ((gates > 0).sum(1) == k).all()
        assert (gates.gather(1, idx) == gates.max(1, keepdim=True).values).any(1).all()
        # the selected experts are the k largest logits
        assert (logits.gather(1, idx).min(1).values >= logits.masked_fill(gates > 0, -math.inf).max(1).values).all()
        if renorm:
            torch.testing.assert_close(gates.sum(1), torch.ones(n))
        else:
            torch.testing.assert_close(gates.gather(1, idx), probs.gather(1, idx))


def test_top_k_out_of_range_is_refused():
    with pytest.raises(FeaturekitError, match="top_k"):
        top_k_gates(torch.randn(3, 4), 5, True)
    with pytest.raises(FeaturekitError, match="top_k"):
        moex(8, 4, 8, top_k=0)


def test_load_balance_loss_uniform_and_collapsed():
    n, m = 64, 4
    uniform = torch.full((n, m), 1 / m)
    balanced = torch.arange(n).remainder(m).unsqueeze(1)
    assert load_balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, m)
    collapsed[:, 0] = 1
    assert load_balance_loss(collapsed, torch.zeros(n, 1, dtype=torch.long)).item() == pytest.approx(m)


def test_load_balance_gradient_spreads_a_collapsed_switch_router():
    torch.manual_seed(0)
    layer = switch_moe(D_MODEL, M, D, 1)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[0] = 1.0  # every positive-sum token goes to expert 0
    x = torch.randn(200, D_MODEL).abs()
    opt = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    before = layer.route(x)[2][:, 0].mean()
    for _ in range(20):
        layer.route(x)
        opt.zero_grad()
        layer.aux_loss.backward()
        opt.step()
    assert layer.route(x)[2][:, 0].mean() < before
