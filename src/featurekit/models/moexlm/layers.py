"""The MLP layers: dense, Switch-style top-k MoE and MoE-X, all read as one (possibly wide) MLP.

Every layer here is ``y = down(h)`` with ``h`` its hidden units, so ``mlp_hidden`` (the input of
``down``) is the same kind of object for all of them:

* **dense**: ``h = act(up x)``, width H (``act`` GELU or ReLU).
* **MoE** with M experts of width D: expert j is ``E_j(x) = W_dec^j act(W_enc^j x + b^j)``; with gates
  ``ω_j(x) ≥ 0`` (nonzero only for the k selected experts),
  ``y = Σ_j ω_j E_j(x) + b = [W_dec^1 … W_dec^M] · concat_j(ω_j act(W_enc^j x + b^j)) + b``,
  i.e. one MLP of width M·D whose hidden layer ``h = concat_j(ω_j act(...))`` has at most k·D nonzeros
  (and, for ReLU experts, fewer). ``up`` holds the stacked encoders (rows ``j·D … (j+1)·D-1`` are expert
  j), ``down`` the stacked decoders, so the wide MLP is literal: ``wide_hidden`` returns h and
  ``forward`` in eval mode (or whenever ``down`` carries a hook) is ``down(wide_hidden(x))``. In training
  mode the same sum is computed expert by expert on the tokens routed to it (the unselected experts never
  run) without materialising the wide hidden layer.

Routers give per-expert logits; ``top_k_gates`` turns them into gates:

* **softmax** (Switch; Fedus et al. 2022): logits = ``W_r x``; gates = the top-k entries of softmax(logits),
  not renormalised (so the router learns through the gate values, as in Switch).
* **sparsity** (MoE-X): logits = −(expected number of active units of expert j)/D, estimated from the
  input and the expert's weight statistics without running the experts (``expected_active``); gates =
  softmax over the k selected logits (they sum to 1).

``load_balance_loss`` is Switch's auxiliary loss ``M · Σ_j f_j P_j`` (f_j: fraction of routed slots that
went to expert j, P_j: mean router probability of j); it is 1 when the load is uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import FeaturekitError

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise FeaturekitError(f"unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class DenseMLP(nn.Module):
    """``y = down(act(up x))``, hidden width H."""

    def __init__(self, d: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.act_name, self.act = act, _activation(act)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.aux_loss = torch.zeros(())

    def hidden(self, x: Tensor) -> Tensor:
        return self.act(self.up(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.hidden(x))


# --- gating ----------------------------------------------------------------------------------------

def top_k_gates(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(gates (N, M) with zeros off the top k, selected expert ids (N, k), softmax probabilities (N, M)).

    ``renormalize``: gates = softmax over the k selected logits (sum to 1); else the selected entries of
    the softmax over all M (Switch)."""
    n_experts = logits.shape[-1]
    if not 1 <= k <= n_experts:
        raise FeaturekitError(f"top_k={k} must be between 1 and the number of experts ({n_experts})")
    probs = logits.softmax(-1)
    top, idx = logits.topk(k, dim=-1)
    values = top.softmax(-1) if renormalize else probs.gather(-1, idx)
    gates = torch.zeros_like(logits).scatter(-1, idx, values)
    return gates, idx, probs


def load_balance_loss(probs: Tensor, idx: Tensor) -> Tensor:
    """Switch's auxiliary loss ``M Σ_j f_j P_j``: f_j the fraction of the N·k routed slots sent to expert j,
    P_j the mean of softmax probability j over tokens. Uniform routing gives 1; all to one expert gives M."""
    n_experts = probs.shape[-1]
    counts = torch.zeros(n_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=probs.dtype, device=probs.device))
    f = counts / idx.numel()
    return n_experts * (f * probs.mean(0)).sum()


# --- routers ---------------------------------------------------------------------------------------

class SoftmaxRouter(nn.Module):
    """Switch's learned router: logits = W_r x (no bias). Its d·M weights are the only router parameters."""

    renormalize = False

    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.proj = nn.Linear(d, n_experts, bias=False)

    def forward(self, x: Tensor, moe: MoE) -> Tensor:
        return self.proj(x)


ESTIMATES = ("expert", "unit")


def _phi(z: Tensor) -> Tensor:
    """The standard normal CDF Φ."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def expected_active(x: Tensor, w_enc: Tensor, b_enc: Tensor, n_experts: int, estimate: str = "expert") -> Tensor:
    """Estimated number of positive pre-activations of each expert, (N, M), without running the experts.

    Expert j's pre-activations on a token are ``z_i = w_i·x + b_i`` for its D units i. Two Gaussian readings:

    * ``"expert"`` (default): the D values z_i of one expert are treated as draws from one Gaussian whose
      mean and variance come from the expert's weight statistics: with ``x̃ = [x, 1]`` and ``w̃_i = [w_i, b_i]``,
      ``mean = m_jᵀ x̃`` and ``var = x̃ᵀ C_j x̃`` (m_j, C_j: mean and covariance of the expert's D rows w̃_i),
      so the expected ℓ0 is ``D · Φ(mean / √var)``. Cost per token O(M·d²) against O(M·D·d) for running
      every expert (D = 4d at top-1: a quarter), plus O(M·D·d²) per forward for the statistics.
    * ``"unit"``: each unit's own row is treated as i.i.d. entries with the row's mean μ_i and deviation
      σ_i: ``z_i ≈ N(μ_i Σ_k x_k + b_i, σ_i² ‖x‖²)``, summed over the units: ``Σ_i Φ((μ_i Σ_k x_k + b_i)/(σ_i ‖x‖))``.
      O(M·D) per token, but it sees x only through Σ_k x_k and ‖x‖ (after a LayerNorm with unit gain and
      zero bias Σ_k x_k = 0 and ‖x‖ ≈ √d: every token gets the same estimate).

    Which of the two the paper uses could not be checked against its text (docs/moex.md).
    """
    if estimate not in ESTIMATES:
        raise FeaturekitError(f"unknown router estimate {estimate!r}: use one of {', '.join(ESTIMATES)}")
    n, d = x.shape
    if estimate == "unit":
        mu, sigma = w_enc.mean(1), w_enc.std(1, unbiased=False)                  # (M·D,)
        s, norm = x.sum(-1, keepdim=True), x.norm(dim=-1, keepdim=True)          # (N, 1)
        p_active = _phi((s * mu + b_enc) / (norm * sigma).clamp_min(1e-12))
        return p_active.view(n, n_experts, -1).sum(-1)
    rows = torch.cat([w_enc, b_enc[:, None]], 1).view(n_experts, -1, d + 1)      # (M, D, d+1)
    mean = rows.mean(1)                                                           # (M, d+1)
    centred = rows - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / rows.shape[1]                       # (M, d+1, d+1)
    xt = torch.cat([x, x.new_ones(n, 1)], 1)                                      # (N, d+1)
    mu = xt @ mean.T                                                              # (N, M)
    var = torch.einsum("na,mab,nb->nm", xt, cov, xt)
    return rows.shape[1] * _phi(mu / var.clamp_min(1e-12).sqrt())


class SparsityRouter(nn.Module):
    """MoE-X's sparsity-aware router: logits = −expected_active/D/temperature (sparser expert → higher
    score). No parameters of its own: it reads the experts' encoder weights."""

    renormalize = True

    def __init__(self, temperature: float = 1.0, estimate: str = "expert"):
        super().__init__()
        if not temperature > 0:
            raise FeaturekitError(f"router temperature must be > 0, got {temperature}")
        if estimate not in ESTIMATES:
            raise FeaturekitError(f"unknown router estimate {estimate!r}: use one of {', '.join(ESTIMATES)}")
        self.temperature, self.estimate = temperature, estimate

    def forward(self, x: Tensor, moe: MoE) -> Tensor:
        active = expected_active(x, moe.up.weight, moe.up.bias, moe.n_experts, self.estimate)
        return -active / moe.expert_hidden / self.temperature


# --- the MoE layer ---------------------------------------------------------------------------------

class MoE(nn.Module):
    """M experts of width D, top-k gated by ``router``; see the module docstring for the wide-MLP reading.

    After each forward, ``aux_loss`` holds the load-balancing loss and ``last_route`` the (gates, ids,
    probs) of that pass (for inspection and tests)."""

    def __init__(self, d: int, n_experts: int, expert_hidden: int, top_k: int, act: str, router: nn.Module):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise FeaturekitError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.n_experts, self.expert_hidden, self.top_k = n_experts, expert_hidden, top_k
        self.act_name, self.act = act, _activation(act)
        self.up = nn.Linear(d, n_experts * expert_hidden)      # stacked encoders W_enc^j, b^j
        self.down = nn.Linear(n_experts * expert_hidden, d)    # stacked decoders W_dec^j; one shared output bias
        self.router = router
        self.aux_loss = torch.zeros(())
        self.last_route: tuple[Tensor, Tensor, Tensor] | None = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gates, idx, probs = top_k_gates(self.router(x, self), self.top_k, self.router.renormalize)
        self.aux_loss = load_balance_loss(probs, idx)
        self.last_route = (gates, idx, probs)
        return gates, idx, probs

    def _expert_rows(self, j: int) -> slice:
        return slice(j * self.expert_hidden, (j + 1) * self.expert_hidden)

    def wide_hidden(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        """The (N, M·D) hidden units ``concat_j(ω_j act(W_enc^j x + b^j))`` for tokens x (N, d); only the
        selected experts are computed, the others' blocks are zero."""
        if gates is None:
            gates = self.route(x)[0]
        h = x.new_zeros(x.shape[0], self.n_experts, self.expert_hidden)
        for j in range(self.n_experts):
            tokens = gates[:, j].nonzero().squeeze(1)
            if tokens.numel():
                rows = self._expert_rows(j)
                pre = F.linear(x[tokens], self.up.weight[rows], self.up.bias[rows])
                h[tokens, j] = gates[tokens, j, None] * self.act(pre)
        return h.view(x.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates = self.route(x)[0]
        hooked = bool(self.down._forward_pre_hooks or self.down._forward_hooks)
        if hooked or not self.training:  # the wide MLP itself, so that hooks on `down` see (and can edit) the hidden units
            return self.down(self.wide_hidden(x, gates).view(*shape[:-1], -1))  # (B, T, M·D) like a dense MLP's hidden
        out = x.new_zeros(x.shape).add_(self.down.bias)
        for j in range(self.n_experts):
            tokens = gates[:, j].nonzero().squeeze(1)
            if tokens.numel():
                rows = self._expert_rows(j)
                h = gates[tokens, j, None] * self.act(F.linear(x[tokens], self.up.weight[rows], self.up.bias[rows]))
                out = out.index_add(0, tokens, F.linear(h, self.down.weight[:, rows]))
        return out.view(shape)


def switch_moe(d: int, n_experts: int, expert_hidden: int, top_k: int = 1, act: str = "gelu") -> MoE:
    """Switch-style MoE: learned softmax router, top-k gates not renormalised."""
    return MoE(d, n_experts, expert_hidden, top_k, act, SoftmaxRouter(d, n_experts))


def moex(d: int, n_experts: int, expert_hidden: int, top_k: int = 1, temperature: float = 1.0,
         estimate: str = "expert") -> MoE:
    """MoE-X: ReLU experts and the sparsity-aware router."""
    return MoE(d, n_experts, expert_hidden, top_k, "relu", SparsityRouter(temperature, estimate))


def true_active(x: Tensor, moe: MoE) -> Tensor:
    """The exact ℓ0 of every expert's pre-activation on x, (N, M): what ``expected_active`` estimates
    (this runs every expert; for tests and measurements only)."""
    pre = moe.up(x).view(x.shape[0], moe.n_experts, -1)
    return (pre > 0).sum(-1).to(x.dtype)
