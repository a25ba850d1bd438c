"""Feature absorption on a first-letter task (Chanin et al. 2024, "A is for Absorption"; SAEBench's
`absorption_first_letter`), from activations, codes and the decoder: no model in this module.

Given, for single-token words split into training and held-out words, the site's activation x at the word's
token, the dictionary's codes f and the word's first letter:

1. **Ground-truth probes.** One logistic probe per letter on x (`fit_logistic`, classes weighted to equal
   total weight as SAEBench's `pos_weight`/`class_weight="balanced"` do), scored by F1 on the held-out
   words at logit > 0. Letters whose probe F1 is ≤ `min_probe_f1` (SAEBench: 0.6), or with fewer than
   `min_words` training or held-out words, are skipped.
2. **k-sparse probing / feature splitting.** An L1-penalised multi-letter probe on all codes ranks the latents
   per letter (largest positive weight first); for k = 1..`max_k` a balanced logistic probe on the top k
   latents is scored by held-out F1; the letter's *main* latents are the top-k set grown while each step raises
   F1 by more than `f1_jump` (SAEBench: 0.03). `num_split_features` is their count.
3. **Absorption** on the held-out words of the letter that the ground-truth probe calls positive (its
   true positives): with p̂ the unit probe direction, the token's probe projection is x·p̂ and latent j's is
   f_j (W_dec[j]·p̂) (SAEBench's f_j·cos(p̂, W_dec[j]) for its unit-norm decoder rows; for other norms this is
   the latent's actual contribution along p̂). With M = Σ_main projections and A = the sum of the ≤ 3
   largest positive projections of other latents with cos(p̂, W_dec[j]) ≥ 0.1:
       fraction = 0                      if M ≥ x·p̂ or A < 0.4 · x·p̂
                = 1                      elif M ≤ 0
                = a / (a + M), a = min(A, x·p̂ − M), clipped to [0, 1]   otherwise;
   *full absorption*: every main latent is zero (|f| < 1e-8), the top-projecting latent has cos ≥ 0.025,
   x·p̂ ≥ 0 and that latent supplies ≥ 0.4 of x·p̂.
   Per letter: the mean fraction and the full-absorption rate over the true positives; the evaluation's
   scores are their means over the letters that were not skipped (lower is better).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import FeaturekitError
from .probes import fit_logistic

EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionSettings:
    max_k: int = 10  #: k-sparse probes for k = 1..max_k
    f1_jump: float = 0.03  #: a larger k joins the main latents while F1 rises by more than this
    min_probe_f1: float = 0.6  #: letters whose ground-truth probe F1 is at most this are skipped
    min_words: int = 2  #: letters with fewer training or held-out words than this are skipped
    l1: float = 0.01  #: L1 penalty of the latent-ranking probe (SAEBench's k_sparse_probe_l1_decay)
    l1_steps: int = 300  #: Adam steps of the latent-ranking probe (full batch)
    absorber_cos: float = 0.1  #: cos(p̂, W_dec[j]) a latent needs to count as an absorber (fraction)
    full_absorber_cos: float = 0.025  #: the same for the top latent of full absorption
    share: float = 0.4  #: share of the probe projection the absorbers must supply
    max_absorbers: int = 3


def f1_score(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """F1 of boolean predictions (0 when there is no true or predicted positive)."""
    tp = int((predicted & truth).sum())
    denominator = int(predicted.sum()) + int(truth.sum())
    return 2 * tp / denominator if denominator else 0.0


def balanced_weights(y: torch.Tensor) -> torch.Tensor:
    """Per-row weights giving each class the same total weight, averaging 1 (scikit-learn's "balanced")."""
    n_pos = int(y.sum())
    return torch.where(y, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos))).double()


def rank_latents(codes: torch.Tensor, labels: torch.Tensor, n_classes: int, l1: float, steps: int) -> torch.Tensor:
    """(n_classes, m) weights of a one-vs-rest logistic probe on all latents with an L1 penalty
    (SAEBench's `train_sparse_multi_probe`: BCE with positive weights neg/pos, l1 · mean over classes of
    Σ|w|, Adam lr 0.01 decaying exponentially to 1e-5), full batch from zero weights."""
    x = codes.float()
    target = torch.nn.functional.one_hot(labels, n_classes).float()
    pos = target.sum(0)
    pos_weight = torch.where(pos > 0, (len(x) - pos) / pos.clamp_min(1), torch.ones_like(pos))
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(1e-5 / 1e-2) ** (1 / max(steps, 1)))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(x @ w.T + b, target) + l1 * w.abs().sum(1).mean()
            loss.backward()
            opt.step()
            sched.step()
    return w.detach()


def split_latents(f1s: Sequence[float], order: torch.Tensor, jump: float) -> list[int]:
    """The main latents: the top-k of `order` for the largest k reached while each step raised F1 by more than `jump`
    (k = 1 always)."""
    best, k = -float("inf"), 0
    for f1 in f1s:
        if f1 <= best + jump:
            break
        best, k = f1, k + 1
    return order[:k].tolist()


def absorption_fractions(probe_proj: torch.Tensor, latent_proj: torch.Tensor, codes: torch.Tensor, cos: torch.Tensor,
                         main: Sequence[int], settings: AbsorptionSettings = AbsorptionSettings()) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction (n,), full (n,) bool) for n tokens: `probe_proj` (n,) = x·p̂, `latent_proj` (n, m) = f_j W_dec[j]·p̂,
    `codes` (n, m), `cos` (m,) = cos(p̂, W_dec[j]); `main` the letter's main latents (module docstring, step 3)."""
    probe_proj, latent_proj, codes, cos = probe_proj.double(), latent_proj.double(), codes.double(), cos.double()
    main_idx = torch.as_tensor(list(main), dtype=torch.long)
    is_main = torch.zeros(latent_proj.shape[1], dtype=torch.bool)
    is_main[main_idx] = True
    main_proj = latent_proj[:, main_idx].sum(1)
    candidate = ~is_main & (cos >= settings.absorber_cos)
    absorbing = torch.where(candidate[None] & (latent_proj > 0), latent_proj, torch.zeros_like(latent_proj))
    top = absorbing.topk(min(settings.max_absorbers, absorbing.shape[1]), dim=1).values.sum(1)
    share = torch.where(probe_proj != 0, top / torch.where(probe_proj != 0, probe_proj, torch.ones_like(probe_proj)),
                        torch.zeros_like(probe_proj))
    absorbed = torch.minimum(top, probe_proj - main_proj)
    partial = (absorbed / (absorbed + main_proj).clamp_min(EPS)).clamp(0, 1)
    fraction = torch.where((main_proj >= probe_proj) | (share < settings.share), torch.zeros_like(probe_proj),
                           torch.where(main_proj <= 0, torch.ones_like(probe_proj), partial))
    top_value, top_index = latent_proj.max(1)
    silent = (codes[:, main_idx].abs() < EPS).all(1) if len(main_idx) else torch.ones_like(probe_proj, dtype=torch.bool)
    top_share = torch.where(probe_proj > 0, top_value / probe_proj.clamp_min(EPS), torch.zeros_like(probe_proj))
    full = silent & (cos[top_index] >= settings.full_absorber_cos) & (probe_proj >= 0) & (top_share >= settings.share)
    return fraction.float(), full


def first_letter_absorption(x_train: torch.Tensor, codes_train: torch.Tensor, y_train: torch.Tensor,
                            x_test: torch.Tensor, codes_test: torch.Tensor, y_test: torch.Tensor, decoder: torch.Tensor,
                            letters: Sequence[str], settings: AbsorptionSettings = AbsorptionSettings()) -> dict:
    """The evaluation of the module docstring. x (n, d) activations, codes (n, m), y (n,) class indices into
    `letters`, decoder (m, d). Returns {"mean": {...} or None, "letters": {letter: {...}}, "n_scored_letters": int}."""
    if x_train.ndim != 2 or codes_train.ndim != 2 or decoder.ndim != 2 or decoder.shape != (codes_train.shape[1], x_train.shape[1]):
        raise FeaturekitError(f"absorption needs activations (n, d), codes (n, m) and a decoder (m, d); got {tuple(x_train.shape)}, "
                              f"{tuple(codes_train.shape)} and {tuple(decoder.shape)}")
    if not (len(x_train) == len(codes_train) == len(y_train) and len(x_test) == len(codes_test) == len(y_test)):
        raise FeaturekitError("absorption: activations, codes and labels must have one row per word")
    decoder = decoder.double()
    ranking = rank_latents(codes_train, y_train, len(letters), settings.l1, settings.l1_steps)
    per_letter: dict[str, dict] = {}
    for c, letter in enumerate(letters):
        pos_tr, pos_te = y_train == c, y_test == c
        row: dict = {"n_train_words": int(pos_tr.sum()), "n_test_words": int(pos_te.sum())}
        per_letter[letter] = row
        if min(row["n_train_words"], row["n_test_words"]) < settings.min_words or bool(pos_tr.all()):
            row["skipped"] = f"fewer than {settings.min_words} training or held-out words"
            continue
        probe = fit_logistic(x_train, pos_tr, weights=balanced_weights(pos_tr))
        scores = probe.logits(x_test)
        predicted = scores > 0
        row.update(probe_f1=f1_score(predicted, pos_te),
                   probe_precision=int((predicted & pos_te).sum()) / max(int(predicted.sum()), 1),
                   probe_recall=int((predicted & pos_te).sum()) / max(int(pos_te.sum()), 1))
        order = torch.argsort(-ranking[c], stable=True)
        f1s = []
        for k in range(1, min(settings.max_k, codes_train.shape[1]) + 1):
            sparse = fit_logistic(codes_train[:, order[:k]], pos_tr, weights=balanced_weights(pos_tr))
            f1s.append(f1_score(sparse.logits(codes_test[:, order[:k]]) > 0, pos_te))
        main = split_latents(f1s, order, settings.f1_jump)
        row.update(k_sparse_f1=f1s, main_latents=main, num_split_features=len(main))
        if row["probe_f1"] <= settings.min_probe_f1:
            row["skipped"] = f"ground-truth probe F1 {row['probe_f1']:.3f} <= {settings.min_probe_f1}"
            continue
        direction = probe.weight / probe.scale  # the probe's weights on raw activations
        p_hat = direction / direction.norm()
        true_pos = pos_te & predicted
        row["num_probe_true_positives"] = int(true_pos.sum())
        if not true_pos.any():
            row["skipped"] = "the ground-truth probe finds no held-out word of this letter"
            continue
        cos = (decoder @ p_hat) / decoder.norm(dim=1).clamp_min(EPS)
        codes = codes_test[true_pos].double()
        projections = codes * (decoder @ p_hat)[None]
        fraction, full = absorption_fractions(x_test[true_pos].double() @ p_hat, projections, codes, cos, main, settings)
        row.update(mean_absorption_fraction=float(fraction.mean()), full_absorption_rate=float(full.double().mean()),
                   num_full_absorption=int(full.sum()))
    scored = [r for r in per_letter.values() if "skipped" not in r]
    mean = None
    if scored:
        def stats(key: str) -> tuple[float, float]:
            values = torch.tensor([float(r[key]) for r in scored], dtype=torch.float64)
            return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0
        (fr, fr_sd), (full_m, full_sd), (split_m, split_sd) = (stats(k) for k in
                                                              ("mean_absorption_fraction", "full_absorption_rate", "num_split_features"))
        mean = {"mean_absorption_fraction_score": fr, "mean_full_absorption_score": full_m, "mean_num_split_features": split_m,
                "std_dev_absorption_fraction_score": fr_sd, "std_dev_full_absorption_score": full_sd,
                "std_dev_num_split_features": split_sd}
    return {"mean": mean, "letters": per_letter, "n_scored_letters": len(scored)}
