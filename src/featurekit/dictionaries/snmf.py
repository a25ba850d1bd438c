"""SNMF: semi-nonnegative matrix factorisation of MLP activations.

Shafran, Geiger & Geva, "Decomposing MLP Activations into Interpretable Features via Semi-Nonnegative
Matrix Factorization" (arXiv 2506.10920, 2025). Official code: github.com/ordavid-s/snmf-mlp-decomposition,
`factorization/seminmf.py` (class `NMFSemiNMF`, `wta_features`, `fix_hoyer_scale`); read for the update
rules below. The paper factorises the MLP hidden activations (the input of the down projection, site
`mlp_hidden.L`).

Orientation. The paper writes A (d × n, one column per token) ≈ Z Y with Z (d × k) signed and sparse and
Y (k × n) ≥ 0; the code writes A ≈ F Gᵀ with F = Z, G = Yᵀ. featurekit keeps tokens as rows, so here

    X (n × d) ≈ G W_dec      W_dec = Fᵀ (k × d): row i is feature i, a signed combination of ⌈s·d⌉ neurons
                             G = Yᵀ (n × k) ≥ 0: the codes (encode(x) is one row of G)

No bias: the paper factorises the raw activations (b_dec = b_enc = 0, and the fitters use no input scale).

The paper's iteration (code `NMFSemiNMF.fit`), in this orientation, ρ = 1e-6:
  1. F-step   W ← (GᵀG + ρI)⁻¹ GᵀX                       (closed-form ridge least squares)
  2. WTA      keep the m = ⌈s·d⌉ entries of largest |value| in each row of W (`wta_features`, s = 0.01)
  3. scale    G_j ← G_j / ‖G_j‖,  W_j ← W_j · ‖G_j‖         (`fix_hoyer_scale`: unit-norm columns of G)
  4. G-step   P = X Wᵀ, Q = W Wᵀ,  G ← G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + 1e-6))
              (the semi-NMF rule of Ding, Li & Jordan 2010, with X⁺ = (|X|+X)/2, X⁻ = (|X|−X)/2)
  5. loss ‖X − G W‖²_F; keep the best pair; stop after `patience` iterations without an improvement
     larger than `tol`; restore the best pair.
`tests/dictionaries/snmf_reference.py` (the tests' reference) runs this on an in-memory X (init "random": G ~ U(0,1) ≥ 1e-6, as the code's
default; "svd" as the code's `init_svd`). Step 4 never increases the loss for fixed W (Ding et al.; tested);
step 1 is the exact minimiser over W; the hard WTA of step 2 can increase it, which is why the code keeps
the best pair. With s = 1 (no WTA) every iteration is non-increasing (tested).

Inference rule (ours: the paper only factorises a fixed token set). A new token's coefficients are the
nonnegative least-squares solution with the features fixed,

    g(x) = argmin_{g ≥ 0} ‖x − b_dec − g W_dec‖²,

the subproblem the G-step iterates on (its fixed points satisfy this problem's KKT conditions). It is
solved by projected gradient with Nesterov momentum and per-token adaptive restart (FISTA: Beck &
Teboulle 2009; restart: O'Donoghue & Candès 2015) from the clamped ridge least-squares point, step
1/λ_max(Q), `nnls_iters` iterations. Tokens do not interact (no batch coupling); codes have exact
zeros, so L0 counts the features in use. On SmolLM2-135M mlp_hidden.6 (k = 256) 20 iterations get
within 1e-4 FVU of the converged solution; the default is 30.

Streaming fit (`SNMFFitter`, ours; the paper's fit keeps the n × k matrix G and all of A in memory). An
online alternating least squares in the style of online dictionary learning (Mairal et al. 2010): for
each chunk X_c of `train.batch_size` tokens, at step t,

    G_c = g(X_c)                                               G-step: the inference rule above
    β = min(decay, t/(t+1)),  C ← βC + (1−β) G_cᵀG_c,  B ← βB + (1−β) G_cᵀX_c
    W ← WTA((C + ρ·mean(diag C)·I)⁻¹ B)                        F-step (step 1) on the discounted
                                                               statistics of all chunks seen, then step 2
    W_j ← W_j/‖W_j‖, C ← DCD, B ← DB with D = diag(‖W_j‖)       step 3 moved to W (G is not kept); C, B
                                                               rescaled so they describe the same fit
Memory is W, B (k × d) and C (k × k), whatever the number of tokens; the ordered stream is read
`passes` times. Differences from the paper, by design: the G-step solves each chunk's NNLS to
convergence from scratch instead of one warm-started multiplicative step; the F-step uses discounted
statistics instead of all tokens at the current G; no best-pair tracking or early stopping (a fixed
number of passes). With decay = 0 and a single chunk holding every token, each step is one exact
alternating minimisation step (the full-batch reference of the tests). Measured on SmolLM2-135M
mlp_hidden.6 (30k tokens, k = 256, one thread, wall clock on a loaded 2-core machine): the paper's
algorithm, 100 iterations in 780 s, reaches FVU 0.745 with its own G (0.674 on held-out tokens with the
NNLS codes); this fit, 3 passes of 2048-token chunks in 30–40 s, reaches held-out FVU 0.628 (β = 0.5),
0.638 (0.8), 0.657 (0.9), 0.674 (0.95): a short memory wins while the features still move; the
default is 0.8. The codes are not sparse: NNLS uses many small coefficients (L0 ≈ 320 of k = 512 at
mlp_hidden.6; half of a token's code energy sits in ≈ 12 features). The ridge is relative (ρ times the
mean of diag C): with the paper's unit-norm G columns diag(GᵀG) = 1, so this is the paper's ρ.
Choices of ours: features start as the WTA of random tokens of the first chunk (the code's k-means init
also starts from data; secondary notes on the authors' notebook report the inits alike, not re-checked
here); a feature with no statistics
keeps its row (one that stops firing keeps its direction: its rows of C and B decay together); a
feature that has not fired on `dead_tokens` (default `DEAD_TOKENS`) consecutive tokens is re-seeded with
the WTA of the residual of one of the chunk's worst-reconstructed tokens, and its statistics are reset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError
from .base import Dictionary
from .registry import register

#: ρ of the F-step (relative to the mean of diag GᵀG, which the paper's scale fix makes 1).
RIDGE = 1e-6
#: ε of the multiplicative G-step's denominator (code).
MU_EPS = 1e-6
#: The streaming fit re-seeds a feature that has not fired on this many consecutive tokens.
DEAD_TOKENS = 65_536


# -- pure pieces ----------------------------------------------------------------------------------
def winner_take_all(w: torch.Tensor, m: int) -> torch.Tensor:
    """Keep the m entries of largest |value| in each row of w (k, d); zero the rest (a new tensor)."""
    if m >= w.shape[-1]:
        return w.clone()
    idx = w.abs().topk(m, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx))


def active_neurons(sparsity: float, d: int) -> int:
    """m = ⌈s·d⌉ (at least 1): neurons kept per feature."""
    return max(1, math.ceil(sparsity * d - 1e-9))


def multiplicative_g_step(g: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """One semi-NMF G-step (Ding et al. 2010): G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + ε)), P = X Wᵀ, Q = W Wᵀ."""
    num = p.clamp_min(0) + g @ (-q).clamp_min(0)
    den = (-p).clamp_min(0) + g @ q.clamp_min(0) + MU_EPS
    return g * torch.sqrt(num / den)


def lipschitz(q: torch.Tensor) -> torch.Tensor:
    """λ_max(Q): the gradient's Lipschitz constant of ½ g Q gᵀ − g·p."""
    return torch.linalg.eigvalsh(q.double())[-1].clamp_min(1e-30).to(q.dtype)


def least_squares_init(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, P (Q + ρ·mean(diag Q)·I)⁻¹): the clamped ridge least-squares codes."""
    if not torch.isfinite(q).all():
        raise FeaturekitError("the SNMF feature Gram matrix is not finite; the dictionary weights hold NaN/Inf")
    k = q.shape[0]
    ridge = RIDGE * float(q.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(k, dtype=torch.float64, device=q.device)
    for _ in range(8):  # more features than dimensions make Q singular: its float32 rounding can put eigenvalues below −ρ
        chol, info = torch.linalg.cholesky_ex(q.double() + ridge * eye)
        if int(info) == 0:
            return torch.cholesky_solve(p.double().T, chol).T.clamp_min(0).to(p.dtype)
        ridge *= 10
    raise FeaturekitError(f"the SNMF feature Gram matrix is not positive definite even with a ridge of {ridge / 10:.3g}")


def nnls(p: torch.Tensor, q: torch.Tensor, iters: int, lip: torch.Tensor | None = None,
         init: torch.Tensor | None = None) -> torch.Tensor:
    """Rows g = argmin_{g ≥ 0} ½ g Q gᵀ − g·p (= ½‖x − g W‖² + const with p = x Wᵀ, Q = W Wᵀ).

    FISTA with per-row adaptive restart (module docstring), `iters` iterations from `init` (default: the
    clamped ridge least-squares point). Rows are independent: a row's result does not depend on the others.
    """
    lip = lipschitz(q) if lip is None else lip
    g = least_squares_init(p, q) if init is None else init.clamp_min(0)
    y, t = g, torch.ones(g.shape[0], 1, dtype=g.dtype, device=g.device)
    step = 1.0 / lip
    for _ in range(iters):
        g_new = (y - (y @ q - p) * step).clamp_min(0)
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        restart = ((y - g_new) * (g_new - g)).sum(-1, keepdim=True) > 0  # momentum points uphill: drop it
        y = torch.where(restart, g_new, g_new + (t - 1) / t_new * (g_new - g))
        t = torch.where(restart, torch.ones_like(t_new), t_new)
        g = g_new
    return g


def objective(x: torch.Tensor, codes: torch.Tensor, w: torch.Tensor) -> float:
    """‖X − G W‖²_F."""
    return float((x - codes @ w).detach().pow(2).sum())


# -- the streaming fitter -----------------------------------------------------------------------------
class SNMFFitter:
    """Online SNMF over a token stream (module docstring); the `Dictionary.fitter` protocol of `train.fit.fit_stream`.

    `update(x, ...)` runs the G-step on the chunk x (n, d), updates the statistics and the features and
    returns metrics (fvu of the chunk under the features it was encoded with, l0, dead fraction,
    re-seeded features); `state()` / `load_state()` hold everything needed to continue exactly;
    `finish()` builds the `SNMFDictionary`. `passes` tells the driver how often to read the stream.
    """

    done = False  # reads every pass of the stream

    def __init__(self, d_in: int, n_latents: int, sparsity: float = 0.01, nnls_iters: int = 30, decay: float = 0.8,
                 passes: int = 3, seed: int = 0, dead_tokens: int = DEAD_TOKENS):
        _check(d_in, n_latents, sparsity, nnls_iters)
        if not 0 <= decay < 1 or passes < 1:
            raise FeaturekitError(f"SNMF needs 0 <= decay < 1 and passes >= 1, got {decay} and {passes}")
        self.d_in, self.n_latents, self.sparsity, self.nnls_iters = d_in, n_latents, sparsity, nnls_iters
        self.decay, self.passes, self.seed, self.dead_tokens = decay, passes, seed, dead_tokens
        self.m = active_neurons(sparsity, d_in)
        self.w: torch.Tensor | None = None
        self.c = torch.zeros(n_latents, n_latents, dtype=torch.float64)
        self.b = torch.zeros(n_latents, d_in, dtype=torch.float64)
        self.since_fired = torch.zeros(n_latents, dtype=torch.long)  # tokens
        self.step = 0

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, *, seed: int | None = None, batch_size: int = 4096) -> SNMFFitter:
        """From a `DictionaryConfig` (n_latents and SNMFParams); chunks are the driver's steps of batch_size tokens."""
        p = cfg.params
        return cls(d_in, cfg.n_latents, p.sparsity, p.nnls_iters, p.decay, p.passes, seed or 0)

    def state(self) -> dict[str, torch.Tensor]:
        if self.w is None:
            raise FeaturekitError("the SNMF fit has not seen any tokens yet")
        return {"w": self.w.clone(), "c": self.c.clone(), "b": self.b.clone(), "since_fired": self.since_fired.clone(),
                "step": torch.tensor(self.step)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["w"].shape) != (self.n_latents, self.d_in):
            raise FeaturekitError(f"the SNMF checkpoint holds {tuple(state['w'].shape)} features, the config asks for "
                                  f"{(self.n_latents, self.d_in)}; resume with the run's own config")
        self.w, self.c, self.b = state["w"].float().clone(), state["c"].double().clone(), state["b"].double().clone()
        self.since_fired, self.step = state["since_fired"].long().clone(), int(state["step"])

    def _init_features(self, x: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        rows = x[torch.randperm(x.shape[0], generator=gen)[:self.n_latents]]
        if rows.shape[0] < self.n_latents:  # a first chunk smaller than k: the rest start as Gaussian rows
            rows = torch.cat([rows, torch.randn(self.n_latents - rows.shape[0], self.d_in, generator=gen)])
        self.w = _unit_rows(winner_take_all(rows, self.m))

    @torch.no_grad()
    def update(self, x: torch.Tensor, *unused: Any) -> dict[str, float]:
        x = x.float()
        if not torch.isfinite(x).all():
            raise FeaturekitError(f"SNMF chunk at step {self.step} holds NaN/Inf activations; check the harvest dtype")
        if self.w is None:
            self._init_features(x)
        w = self.w
        q = w @ w.T
        codes = nnls(x @ w.T, q, self.nnls_iters, lipschitz(q))
        residual = x - codes @ w
        sst = float((x - x.mean(0)).pow(2).sum())
        fired = (codes > 0).any(0)
        beta = min(self.decay, self.step / (self.step + 1))
        cd = codes.double()
        self.c.mul_(beta).add_(cd.T @ cd, alpha=1 - beta)
        self.b.mul_(beta).add_(cd.T @ x.double(), alpha=1 - beta)
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        self.step += 1
        self._f_step()
        reseeded = self._reseed(residual)
        return {"fvu": float(residual.pow(2).sum()) / sst if sst > 0 else None,
                "l0": float((codes > 0).sum(-1).float().mean()),
                "dead_fraction": float((self.since_fired >= self.dead_tokens).float().mean()), "reseeded": reseeded}

    def _f_step(self) -> None:
        """W ← WTA((C + ρ mean(diag C) I)⁻¹ B); rows with no statistics keep their value; unit rows, C and B rescaled."""
        k = self.n_latents
        diag = self.c.diagonal()
        ridge = RIDGE * float(diag.mean().clamp_min(1e-30))
        w = torch.linalg.solve(self.c + ridge * torch.eye(k, dtype=torch.float64), self.b)
        w = winner_take_all(w, self.m).float()
        norms = w.norm(dim=1)
        keep = (diag <= 0) | (norms <= 0)
        w[keep] = self.w[keep]
        scale = torch.where(keep, torch.ones_like(norms), norms).double()
        self.w = _unit_rows(w)
        self.c.mul_(scale[:, None] * scale[None, :])
        self.b.mul_(scale[:, None])

    def _reseed(self, residual: torch.Tensor) -> int:
        """Dead features take the WTA'd residuals of the worst-reconstructed tokens (nonzero ones); returns how many."""
        dead = (self.since_fired >= self.dead_tokens).nonzero().flatten()
        err = residual.pow(2).sum(-1)
        n = min(dead.numel(), int((err > 0).sum()))
        if n == 0:
            return 0
        dead = dead[:n]
        self.w[dead] = _unit_rows(winner_take_all(residual[err.topk(n).indices], self.m))
        self.c[dead, :] = 0
        self.c[:, dead] = 0
        self.b[dead] = 0
        self.since_fired[dead] = 0
        return n

    def finish(self) -> SNMFDictionary:
        if self.w is None:
            raise FeaturekitError("the SNMF fit saw no tokens: the activation stream was empty")
        dictionary = SNMFDictionary(self.d_in, self.n_latents, sparsity=self.sparsity, nnls_iters=self.nnls_iters)
        dictionary.set_features(self.w)
        return dictionary


# -- the dictionary -------------------------------------------------------------------------------------
@dataclass
class SNMFParams:
    sparsity: float = 0.01  #: share of neurons kept per feature, ⌈s·d⌉ (n_latents = the rank; chunks = train.batch_size); 1 = dense
    nnls_iters: int = 30  #: FISTA iterations of the nonnegative least-squares codes, in the fit and at inference
    decay: float = 0.8  #: β, per-chunk discount of the fit's statistics (memory ≈ 1/(1−β) chunks)
    passes: int = 3  #: passes over the training tokens (read in order)


@register(SNMFParams, legacy={"snmf_sparsity": "sparsity", "snmf_nnls_iters": "nnls_iters", "snmf_decay": "decay", "snmf_passes": "passes"})
class SNMFDictionary(Dictionary):
    """Features W_dec (k, d): signed, ⌈s·d⌉ neurons each, unit-norm rows; codes = nonnegative least squares.

    W_enc mirrors W_dec (the inference rule reads W_dec only: pre = (x − b_dec) W_decᵀ are the correlations
    P that the NNLS solver starts from). Fitted by `SNMFFitter` (pipeline) or `train.fit.fit_snmf`, not by gradient.
    """

    method = "snmf"
    fitter = SNMFFitter

    def __init__(self, d_in: int, n_latents: int, sparsity: float = 0.01, nnls_iters: int = 30, seed: int | None = None):
        super().__init__(d_in, n_latents)
        _check(d_in, n_latents, sparsity, nnls_iters)
        self.sparsity, self.nnls_iters = float(sparsity), int(nnls_iters)
        self._gram_cache: tuple | None = None
        with torch.no_grad():  # random features of ⌈s·d⌉ neurons (the fitters replace them)
            self.init_tied(seed)
            self.set_features(winner_take_all(self.W_dec, active_neurons(self.sparsity, d_in)))

    @torch.no_grad()
    def set_features(self, w: torch.Tensor) -> None:
        """Install features (k, d): rows scaled to unit norm (a zero row stays zero); W_enc = W_dec."""
        self.W_dec.copy_(_unit_rows(w.float()))
        self.W_enc.copy_(self.W_dec)

    def _gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q = W_dec W_decᵀ (fp32) and λ_max(Q), cached until W_dec changes."""
        key = (self.W_dec._version, self.W_dec.data_ptr(), self.W_dec.device)
        if self._gram_cache is None or self._gram_cache[0] != key:
            with torch.no_grad():
                w = self.W_dec.detach().float()
                q = w @ w.T
                self._gram_cache = (key, q, lipschitz(q))
        return self._gram_cache[1], self._gram_cache[2]

    def pre_activation(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """P = (x − b_dec) W_decᵀ: each feature's correlation with the token."""
        return (x_scaled - self.b_dec) @ self.W_dec.T

    @torch.no_grad()
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        q, lip = self._gram()
        shape = pre.shape
        codes = nnls(pre.detach().float().reshape(-1, shape[-1]), q, self.nnls_iters, lip)
        return codes.reshape(shape).to(self.W_dec.dtype)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "nnls", "problem": "argmin_{g >= 0} ||x - b_dec - g W_dec||^2", "solver": "fista_adaptive_restart",
                "iters": self.nnls_iters, "init": "clamped ridge least squares", "ridge": RIDGE}

    def hyperparams(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "nnls_iters": self.nnls_iters}


# -- helpers ------------------------------------------------------------------------------------------
def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _check(d_in: int, n_latents: int, sparsity: float, nnls_iters: int) -> None:
    if not 0 < sparsity <= 1:
        raise FeaturekitError(f"sparsity is the fraction of neurons kept per feature and must lie in (0, 1], got {sparsity}")
    if nnls_iters < 1 or n_latents < 1 or d_in < 1:
        raise FeaturekitError(f"SNMF needs nnls_iters, n_latents and d_in >= 1, got {nnls_iters}, {n_latents}, {d_in}")
