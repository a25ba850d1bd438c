"""Karvonen et al. 2024's supervised metrics of a set of features on board-state properties, and the
legal-move rate of a model's sampled moves.

Features are read as classifiers: feature f at threshold t fires on a position when its activation
exceeds ``t · max_f`` (max_f: its largest activation on the data; a feature that never goes above
zero never fires). t runs over `THRESHOLDS` = 0.0, 0.1, ..., 1.0 as in their code.

* **BSP coverage** — for each threshold, each property's best F1 over all features, averaged over
  properties; the coverage is that average at the best threshold (one threshold for all
  properties). A property that never holds in the data scores 0, as in their averages over all
  12 × 64 piece-on-square properties; `CoverageResult.mean_present` averages only those that hold.
* **Board reconstruction** — on a training split, label each (feature, threshold) with the
  properties it predicts with precision ≥ 0.95 (and, as in their code, at least 10 true positives);
  on a test split, a position's reconstructed board is the union of the labels of its firing
  features; the score is the F1 of reconstructed against true board, averaged over test positions,
  at the best threshold. Meant for the ``board`` group (piece on square), as in the paper.

The MoE-X paper (Yang et al., ICML 2025) reports both metrics on its chess models' MLP units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import chess
import numpy as np
import torch

from ...errors import FeaturekitError
from .pgn import STOI, board_of, decode, encode

THRESHOLDS = tuple(i / 10 for i in range(11))
PRECISION = 0.95
MIN_COUNT = 10


def _acts(acts, name: str) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(acts) if not isinstance(acts, torch.Tensor) else acts)
    if a.dim() != 2:
        raise FeaturekitError(f"{name} must be a 2-D (positions × features) array; got shape {tuple(a.shape)}")
    a = a.detach().to(torch.float32)
    if not torch.isfinite(a).all():
        raise FeaturekitError(f"{name} has NaN or infinite activations; drop or fix those positions first")
    return a


def _bsp(bsp, n: int, name: str) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(bsp) if not isinstance(bsp, torch.Tensor) else bsp)
    if b.dim() != 2 or b.shape[0] != n:
        raise FeaturekitError(f"{name} must be (positions × properties) with {n} rows, one per activation row; "
                              f"got shape {tuple(b.shape)}")
    if b.dtype != torch.bool:
        if not ((b == 0) | (b == 1)).all():
            raise FeaturekitError(f"{name} must be boolean (0/1); build it with bsp_table")
        b = b.bool()
    return b


def _thresholds(thresholds: Sequence[float]) -> list[float]:
    ts = [float(t) for t in thresholds]
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise FeaturekitError(f"thresholds are fractions of each feature's max activation in [0, 1]; got {thresholds}")
    return ts


def firing(acts: torch.Tensor, t: float, fmax: torch.Tensor) -> torch.Tensor:
    """(N, F) bool: feature f fires where its activation exceeds t · fmax[f] (never when fmax[f] ≤ 0)."""
    return (acts > t * fmax) & (fmax > 0)


def _f1(tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    denom = predicted + actual
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))


@dataclass
class CoverageResult:
    mean: float  # the coverage: mean over all properties of the best feature's F1, at `threshold`
    mean_present: float  # the same over the properties that hold somewhere in the data
    threshold: float
    per_property: list[float]  # best F1 per property at `threshold`
    best_feature: list[int]  # the feature reaching it (-1 if no feature fires on any positive)
    present: list[bool]
    per_threshold: list[float]  # the mean at every threshold

    def as_dict(self) -> dict:
        return asdict(self)


def _best_f1(a: torch.Tensor, b: torch.Tensor, ts: list[float], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    fmax = a.max(0).values if a.shape[0] else torch.zeros(a.shape[1])
    bf = b.to(torch.float32)
    actual = bf.sum(0)
    best = torch.zeros(len(ts), b.shape[1])
    arg = torch.full((len(ts), b.shape[1]), -1, dtype=torch.long)
    for ti, t in enumerate(ts):
        for f0 in range(0, a.shape[1], chunk):
            on = firing(a[:, f0:f0 + chunk], t, fmax[f0:f0 + chunk]).to(torch.float32)
            f1 = _f1(on.T @ bf, on.sum(0)[:, None], actual[None, :])  # (Fc, P)
            value, idx = f1.max(0)
            better = value > best[ti]
            best[ti] = torch.where(better, value, best[ti])
            arg[ti] = torch.where(better, idx + f0, arg[ti])
    return best, arg


def best_f1(acts, bsp, thresholds: Sequence[float] = THRESHOLDS, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, P) best F1 over features of each property at each threshold, and (T, P) the feature reaching it
    (-1 where no feature reaches an F1 above 0)."""
    a = _acts(acts, "feature_acts")
    return _best_f1(a, _bsp(bsp, a.shape[0], "bsp"), _thresholds(thresholds), chunk)


def bsp_coverage(feature_acts, bsp, thresholds: Sequence[float] = THRESHOLDS, chunk: int = 2048) -> CoverageResult:
    """Karvonen et al.'s coverage of properties `bsp` (N × P bool) by features `feature_acts` (N × F)."""
    a = _acts(feature_acts, "feature_acts")
    b = _bsp(bsp, a.shape[0], "bsp")
    if b.shape[1] == 0 or a.shape[1] == 0:
        raise FeaturekitError(f"need at least one feature and one property; got {a.shape[1]} features, {b.shape[1]} properties")
    ts = _thresholds(thresholds)
    best, arg = _best_f1(a, b, ts, chunk)
    present = b.any(0)
    means = best.mean(1)
    ti = int(means.argmax())
    row = best[ti]
    mean_present = float(row[present].mean()) if present.any() else 0.0
    return CoverageResult(mean=float(means[ti]), mean_present=mean_present, threshold=ts[ti], per_property=row.tolist(),
                          best_feature=arg[ti].tolist(), present=present.tolist(), per_threshold=means.tolist())


@dataclass
class ReconstructionResult:
    score: float  # mean over test positions of the reconstructed board's F1, at `threshold`
    threshold: float
    per_threshold: list[float]
    micro_f1: float  # F1 over all (position, property) cells pooled, at `threshold` (their code's per-square F1)
    labelled_features: list[int]  # at each threshold: features with at least one high-precision property
    labels: int  # (feature, property) labels at `threshold`

    def as_dict(self) -> dict:
        return asdict(self)


def feature_labels(acts, bsp, t: float, fmax: torch.Tensor, precision: float = PRECISION,
                   min_count: int = MIN_COUNT) -> torch.Tensor:
    """(F, P) bool: feature f, firing at threshold t, predicts property p with precision ≥ `precision`
    over at least `min_count` true positives in (acts, bsp)."""
    on = firing(acts, t, fmax).to(torch.float32)
    tp = on.T @ bsp.to(torch.float32)
    fired = on.sum(0)[:, None]
    return (tp >= precision * fired) & (tp >= max(min_count, 1)) & (fired > 0)


def board_reconstruction(train_acts, train_bsp, test_acts, test_bsp, thresholds: Sequence[float] = THRESHOLDS,
                         precision: float = PRECISION, min_count: int = MIN_COUNT) -> ReconstructionResult:
    """Karvonen et al.'s board reconstruction: labels from the training split, boards rebuilt and scored on the test split."""
    a_tr = _acts(train_acts, "train_acts")
    b_tr = _bsp(train_bsp, a_tr.shape[0], "train_bsp")
    a_te = _acts(test_acts, "test_acts")
    b_te = _bsp(test_bsp, a_te.shape[0], "test_bsp")
    if a_tr.shape[1] != a_te.shape[1] or b_tr.shape[1] != b_te.shape[1]:
        raise FeaturekitError(f"train and test must have the same features and properties; got acts {a_tr.shape[1]} vs "
                              f"{a_te.shape[1]} features, bsp {b_tr.shape[1]} vs {b_te.shape[1]} properties")
    if not 0.0 < precision <= 1.0:
        raise FeaturekitError(f"precision={precision}: use a value in (0, 1] (Karvonen et al. use 0.95)")
    if a_tr.shape[0] == 0 or a_te.shape[0] == 0:
        raise FeaturekitError("train and test splits need at least one position each")
    ts = _thresholds(thresholds)
    fmax = a_tr.max(0).values
    truth = b_te
    scores, micro, counted, n_labels = [], [], [], []
    for t in ts:
        labels = feature_labels(a_tr, b_tr, t, fmax, precision, min_count)
        on = firing(a_te, t, fmax).to(torch.float32)
        predicted = (on @ labels.to(torch.float32)) > 0  # (M, P)
        tp = (predicted & truth).sum(1).to(torch.float32)
        pred_n, true_n = predicted.sum(1).to(torch.float32), truth.sum(1).to(torch.float32)
        per_board = torch.where(pred_n + true_n > 0, 2 * tp / (pred_n + true_n).clamp(min=1), torch.ones_like(tp))
        scores.append(float(per_board.mean()))
        total = float(pred_n.sum() + true_n.sum())
        micro.append(2 * float(tp.sum()) / total if total else 1.0)
        counted.append(int(labels.any(1).sum()))
        n_labels.append(int(labels.sum()))
    ti = int(np.argmax(scores))
    return ReconstructionResult(score=scores[ti], threshold=ts[ti], per_threshold=scores, micro_f1=micro[ti],
                                labelled_features=counted, labels=n_labels[ti])


# --- legal-move rate -------------------------------------------------------------------------------

def move_prefixes(game: str, white: bool = True, black: bool = True) -> list[str]:
    """Prefixes of `game` after which a move is due: ending in a move number's ``.`` (white to move)
    and ending in the space before a black move (black to move: the 1st, 3rd, 5th... space)."""
    out, spaces = [], 0
    for i, c in enumerate(game):
        if c == "." and white:
            out.append(game[: i + 1])
        elif c == " ":
            if black and spaces % 2 == 0:
                out.append(game[: i + 1])
            spaces += 1
    return out


def first_move(continuation: str) -> str:
    """The first half-move written in a continuation: leading spaces and a move number dropped, up to the next space or ``;``."""
    text = continuation.lstrip(" ")
    head = text.split(" ", 1)[0].split(";", 1)[0]
    if "." in head:
        number, _, head = head.partition(".")
        if not number.isdigit():
            return ""
    return head


def is_legal(board: chess.Board, san: str, strict: bool = False) -> bool:
    """Whether `san` names a legal move on `board`. Lenient by default, like Karvonen et al.'s
    ``push_san`` (python-chess reads e.g. ``e2e4`` or a missing ``+``); `strict`: only the move's
    exact SAN as the format writes it. A null move is never legal."""
    if not san or san in ("--", "Z0", "0000", "@@@@"):
        return False
    try:
        move = board.parse_san(san)
    except ValueError:
        return False
    return not strict or board.san(move) == san


@dataclass
class LegalMoveResult:
    rate: float
    legal: int
    total: int

    def as_dict(self) -> dict:
        return asdict(self)


def legal_move_rate(prefixes: Sequence[str], continuations: Sequence[str] | None = None,
                    sample: Callable[[str], str] | None = None, strict: bool = False) -> LegalMoveResult:
    """The fraction of positions where the model's next move is legal. Give the model's text after each
    prefix in `continuations`, or a `sample(prefix) -> text` callable to produce it. Prefixes are legal
    game prefixes (see `move_prefixes`); only the first move of each continuation counts; `strict`: see `is_legal`."""
    if (continuations is None) == (sample is None):
        raise FeaturekitError("give exactly one of continuations (the model's texts) or sample (a callable prefix -> text)")
    if continuations is not None and len(continuations) != len(prefixes):
        raise FeaturekitError(f"{len(prefixes)} prefixes but {len(continuations)} continuations; give one per prefix")
    if not prefixes:
        raise FeaturekitError("no prefixes given; build them with move_prefixes(game)")
    legal = 0
    for i, prefix in enumerate(prefixes):
        board = board_of(prefix)
        text = continuations[i] if continuations is not None else sample(prefix)
        legal += is_legal(board, first_move(text), strict)
    return LegalMoveResult(rate=legal / len(prefixes), legal=legal, total=len(prefixes))


def greedy_sampler(model: Callable, max_new: int = 10, context: int | None = None) -> Callable[[str], str]:
    """A `sample` for `legal_move_rate`: greedy (argmax) characters from `model` after the prefix, until a
    space or ``;`` follows at least one other character, or `max_new` characters. `model(ids)` takes a
    (1, T) int64 tensor and returns (1, T, 32) logits or an object with ``.logits`` (HF style);
    `context`: keep only the last `context` characters of the prefix (the model's sequence length)."""
    stops = {STOI[" "], STOI[";"]}

    @torch.no_grad()
    def sample(prefix: str) -> str:
        ids = encode(prefix)
        out: list[int] = []
        for _ in range(max_new):
            window = ids if context is None else ids[-context:]
            logits = model(window[None])
            logits = getattr(logits, "logits", logits)
            if logits.dim() != 3 or logits.shape[-1] != len(STOI):
                raise FeaturekitError(f"the model returned logits of shape {tuple(logits.shape)}; expected (1, T, {len(STOI)}) "
                                      "over the chess vocabulary")
            nxt = int(logits[0, -1].argmax())
            if nxt in stops and any(i not in stops for i in out):
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
        return decode(out)

    return sample
