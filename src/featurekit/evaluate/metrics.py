"""Evaluation metrics as pure, documented functions (conventions: the README's "Metric conventions").

    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²      over the whole evaluation set (x̄ its mean, not zero, not per batch)
    explained variance = 1 − FVU
    L0 = mean over tokens of #{j : f_j ≠ 0}          (signed codes count when non-zero)
    dead fraction = share of latents with no non-zero code on the whole evaluation set
    dense fraction = share of latents non-zero on more than 10% of tokens
    CE = mean over scored positions of −log p(next token)
    loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)    (1 = perfect, 0 = as bad as zero-ablation)
    KL(clean ‖ spliced) = mean over scored positions of Σ_v p_clean(v) (log p_clean(v) − log p_spliced(v))
"""

from __future__ import annotations

import torch

from ..errors import FeaturekitError

DENSE_THRESHOLD = 0.1


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained of a whole set x (n, d)."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def l0(codes: torch.Tensor) -> float:
    """Mean number of non-zero codes per token."""
    return float((codes.detach() != 0).sum(-1).double().mean())


def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean)."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token CE, shape (B, T−1): position t predicts token t+1."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p ‖ q) over the vocabulary, shape (B, T)."""
    logp, logq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


class ReconstructionStats:
    """Streaming FVU / L0 / dead / dense over an evaluation set, exact (float64 sums).

    Σ‖x − x̄‖² is computed as Σ‖x‖² − n‖x̄‖² at the end, so the set mean is the whole set's.
    """

    def __init__(self, n_latents: int):
        self.n = 0
        self.sum_sq_err = 0.0
        self.sum_x = None
        self.sum_sq_x = 0.0
        self.nonzero_total = 0
        self.fire_counts = torch.zeros(n_latents, dtype=torch.long)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x, x_hat, codes = x.detach().double(), x_hat.detach().double(), codes.detach()
        self.n += x.shape[0]
        self.sum_sq_err += float((x - x_hat).pow(2).sum())
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_x += float(x.pow(2).sum())
        nz = codes != 0
        self.nonzero_total += int(nz.sum())
        self.fire_counts += nz.sum(0).cpu()

    def result(self) -> dict:
        if self.n == 0:
            raise FeaturekitError("no tokens were evaluated: the evaluation set is empty after masking; raise eval.tokens")
        total_var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n
        if total_var <= 0:
            raise FeaturekitError(f"the {self.n} evaluation activations are all equal, so FVU is undefined; evaluate on more text")
        density = self.fire_counts.double() / self.n
        value = self.sum_sq_err / total_var
        return {
            "n_tokens": self.n,
            "fvu": value,
            "explained_variance": 1.0 - value,
            "mse": self.sum_sq_err / self.n,
            "l0": self.nonzero_total / self.n,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).double().mean()),
            "density": density.tolist(),
        }
