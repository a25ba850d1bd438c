"""Ground-truth recovery scores: how well a dictionary's decoder rows and codes match known features.

Inputs are plain tensors: the true features F (n, d, unit rows), a decoder D (F_lat, d; rows need not
be unit-norm, cosines normalise them), codes in the units that make x̂ = codes·D + b (what
`Dictionary.encode` returns against `W_dec`), and the true codes A (tokens, n) of the same tokens.

Similarity.  s_ij = cos(f_i, d_j); compared **up to sign** (|s_ij|) when the dictionary is signed
(AbsTopK: (f, d) and (−f, −d) are the same latent) or the true feature i is bidirectional (a
non-negative latent along −f_i represents f_i's negative use); otherwise signed.

    MMCS true→learned  = mean_i max_j s_ij          over live latents j (fired on the held-out tokens)
    MMCS learned→true  = mean_j max_i s_ij          over live latents j
    recovered fraction = #{i : max_j s_ij ≥ τ} / n  (τ = 0.9 by default)

Absorption (hierarchical data; after Chanin et al. 2024, "A is for Absorption", made exact with
ground truth).  For a parent P with unit direction f_P, its latents are the live latents that
recovered it, L_P = {j : s_Pj ≥ τ} (possibly none). On a token t where child c (hence P) fires
with parent magnitude a_P > 0:

    silent_t   = codes[t, j] = 0 for every j ∈ L_P                    (no parent latent fires)
    carried_t  = Σ_{j ∉ L_P} codes[t, j] ⟨d_j, f_P⟩                   (what the other latents put along f_P)
    expected_t = Σ_{i ≠ P} A[t, i] ⟨f_i, f_P⟩                         (what the other true features put there)
    absorbed_t = silent_t  and  carried_t − expected_t ≥ ½ a_P

i.e. no latent of the parent fires although the parent does, and other latents (in practice the
child's) reconstruct at least half of the parent's magnitude along the parent direction beyond
the interference the other active features cause. Latents that learned f_P + f_c instead of f_c
give absorbed_t = true on every token of c (and, with no latent of P's own, on every child: rate
1); a parent missing from the reconstruction gives silent_t without absorption. A latent close to
f_P but below τ counts as absorbing, not as the parent's latent: it has not recovered P.
Rates are per child (tokens where that child fires), then averaged over children:

    absorption rate      = mean_c  P(absorbed_t | c fires)
    parent silent rate   = mean_c  P(silent_t | c fires)
    absorbed children    = #{c : absorption rate of c > ½} / #children

Bidirectional coverage.  A bidirectional feature f is covered in the + direction when some latent
with s ≥ τ takes positive codes or one with s ≤ −τ takes negative codes (and symmetrically for −f);
`coverage` is the share of bidirectional features covered in both directions, and
`latents_per_covered` the mean number of live latents with |s| ≥ τ per covered feature (TopK needs
two, one per sign; a signed latent does it with one).
"""

from __future__ import annotations

import torch

from . import metrics

ABSORPTION_FRACTION = 0.5


def cosine_matrix(features: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """cos(f_i, d_j) as an (n, F) float64 matrix; all-zero decoder rows give 0."""
    f = torch.nn.functional.normalize(features.detach().double(), dim=1)
    d = torch.nn.functional.normalize(decoder.detach().double(), dim=1)
    return f @ d.T


def similarity(features: torch.Tensor, decoder: torch.Tensor, up_to_sign: torch.Tensor | bool) -> torch.Tensor:
    """s_ij: the cosine, or its absolute value for rows where `up_to_sign` (bool or (n,) bool) holds."""
    cos = cosine_matrix(features, decoder)
    mask = torch.as_tensor(up_to_sign, dtype=torch.bool).expand(cos.shape[0])
    return torch.where(mask[:, None], cos.abs(), cos)


def recovery(features: torch.Tensor, decoder: torch.Tensor, up_to_sign: torch.Tensor | bool = False,
             live: torch.Tensor | None = None, threshold: float = 0.9) -> dict:
    """MMCS in both directions and the recovered fraction (module docstring); `live` masks latents."""
    sim = similarity(features, decoder, up_to_sign)
    if live is not None:
        sim = sim[:, live.bool()]
    if sim.shape[1] == 0:
        return {"mmcs_true_to_learned": 0.0, "mmcs_learned_to_true": 0.0, "recovered_fraction": 0.0,
                "best_similarity": [0.0] * sim.shape[0]}
    best = sim.max(dim=1).values
    return {
        "mmcs_true_to_learned": float(best.mean()),
        "mmcs_learned_to_true": float(sim.max(dim=0).values.mean()),
        "recovered_fraction": float((best >= threshold).double().mean()),
        "best_similarity": best.tolist(),
    }


def absorption(features: torch.Tensor, parents: torch.Tensor, children: torch.Tensor, true_codes: torch.Tensor,
               codes: torch.Tensor, decoder: torch.Tensor, signed: bool = False, live: torch.Tensor | None = None,
               threshold: float = 0.9) -> dict:
    """Absorption of parents into children (module docstring).

    parents (P,) feature indices; children (P, m) the exclusive children of each parent; true_codes
    (T, n) and codes (T, F) of the same T tokens; `signed` compares the parent direction up to sign;
    `threshold` is τ, the cosine at which a latent has recovered its parent.
    """
    codes, true_codes = codes.detach().double(), true_codes.detach().double()
    decoder, features = decoder.detach().double(), features.detach().double()
    f_parent = features[parents]  # (P, d)
    own = similarity(f_parent, decoder, signed) >= threshold  # (P, F): L_P
    if live is not None:
        own &= live.bool()[None, :]
    along = decoder @ f_parent.T  # (F, P): ⟨d_j, f_P⟩
    true_along = true_codes @ (features @ f_parent.T)  # (T, P): Σ_i A_ti ⟨f_i, f_P⟩ (includes P itself)
    rates, silent_rates = [], []
    for q in range(len(parents)):
        a_parent = true_codes[:, parents[q]]
        carried = codes[:, ~own[q]] @ along[~own[q], q]
        expected = true_along[:, q] - a_parent
        silent = (codes[:, own[q]] == 0).all(dim=1)
        absorbed = silent & (carried - expected >= ABSORPTION_FRACTION * a_parent)
        for c in children[q].tolist():
            on = true_codes[:, c] != 0
            if bool(on.any()):
                rates.append(float(absorbed[on].double().mean()))
                silent_rates.append(float(silent[on].double().mean()))
    if not rates:
        return {"absorption_rate": None, "parent_silent_rate": None, "absorbed_children": None, "child_absorption": []}
    return {
        "absorption_rate": sum(rates) / len(rates),
        "parent_silent_rate": sum(silent_rates) / len(silent_rates),
        "absorbed_children": sum(r > 0.5 for r in rates) / len(rates),
        "child_absorption": rates,
    }


def bidirectional_coverage(features: torch.Tensor, decoder: torch.Tensor, codes: torch.Tensor, threshold: float = 0.9) -> dict:
    """Coverage of both signs of each (bidirectional) feature and latents used per covered feature."""
    cos = cosine_matrix(features, decoder)
    codes = codes.detach()
    pos, neg = (codes > 0).any(dim=0), (codes < 0).any(dim=0)
    plus = ((cos >= threshold) & pos) | ((cos <= -threshold) & neg)
    minus = ((cos <= -threshold) & pos) | ((cos >= threshold) & neg)
    both = plus.any(dim=1) & minus.any(dim=1)
    count = ((cos.abs() >= threshold) & (pos | neg)).sum(dim=1).double()
    return {
        "coverage": float(both.double().mean()) if len(both) else None,
        "latents_per_covered": float(count[both].mean()) if bool(both.any()) else None,
    }


def per_token_l0(codes: torch.Tensor, true_codes: torch.Tensor) -> dict:
    """Spread of the number of active latents per token, and its Pearson correlation with the true
    number of active features (None when either is constant)."""
    l0 = (codes.detach() != 0).sum(dim=1).double()
    true = (true_codes.detach() != 0).sum(dim=1).double()
    std = float(l0.std(correction=0))
    if std == 0 or float(true.std(correction=0)) == 0:
        return {"l0_std": std, "l0_true_corr": None}
    corr = float(((l0 - l0.mean()) * (true - true.mean())).mean() / (std * true.std(correction=0)))
    return {"l0_std": std, "l0_true_corr": corr}


def score(data, x: torch.Tensor, true_codes: torch.Tensor, codes: torch.Tensor, x_hat: torch.Tensor, decoder: torch.Tensor,
          signed: bool = False, threshold: float = 0.9) -> dict:
    """Every score for one dictionary on held-out synthetic tokens of `data` (a `SyntheticData`).

    FVU and L0 follow `metrics` (the README's metric conventions); dead fraction = latents with no non-zero code on these
    tokens. Hierarchy and bidirectional scores appear when the data has parents / bidirectional features.
    """
    live = (codes != 0).any(dim=0)
    up_to_sign = data.bidirectional | signed
    rec = recovery(data.features, decoder, up_to_sign, live, threshold)
    result = {
        "fvu": metrics.fvu(x, x_hat),
        "l0": metrics.l0(codes),
        "dead_fraction": float((~live).double().mean()),
        "mmcs_true_to_learned": rec["mmcs_true_to_learned"],
        "mmcs_learned_to_true": rec["mmcs_learned_to_true"],
        "recovered_fraction": rec["recovered_fraction"],
        **per_token_l0(codes, true_codes),
    }
    best = torch.tensor(rec["best_similarity"])
    if data.cfg.n_parents:
        parents = torch.arange(data.cfg.n_parents)
        result.update(absorption(data.features, parents, data.children, true_codes, codes, decoder, signed, live, threshold))
        result.pop("child_absorption")
        result["parents_recovered"] = float((best[parents] >= threshold).double().mean())
        result["children_recovered"] = float((best[data.children.flatten()] >= threshold).double().mean())
    if bool(data.bidirectional.any()):
        cov = bidirectional_coverage(data.features[data.bidirectional], decoder, codes, threshold)
        result["bidirectional_coverage"] = cov["coverage"]
        result["latents_per_bidirectional"] = cov["latents_per_covered"]
    return result
