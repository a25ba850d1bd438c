"""Comparing ITDA dictionaries by the tokens their atoms came from (Leask et al. 2025, §5; official code
`layer_similarity.py` / `model_similarity.py`, read in the fork davidkaczer/itda): pure functions. The
experiment that fits and compares dictionaries layer by layer is `featurekit.bench.itda_match`.

Identity of an atom.  An ITDA atom is a real activation, so it is named by its source token. The paper's code
names it by (prompt index, token index) in one fixed, ordered prompt stream and compares two dictionaries
as sets of these labels:

    J(D₀, D₁) = |L(D₀) ∩ L(D₁)| / |L(D₀) ∪ L(D₁)|          (1 when both are empty)

Two dictionaries are comparable only when fitted on the same text. Across models with *different
tokenizers* a (prompt, token index) pair names different text, so here (ours) an atom's label is
(document index, character offset where its token ends) in the shared text (`char_labels`, with the offsets
of `data.tokens.document_contexts`): both tokenizations give the same label to a token that ends at the same
character (a word, typically; a token with no counterpart simply never matches). Within one tokenizer this
is the same identity as (prompt, token index). Token identity alone (the token id) is not used: it would call
every occurrence of "the" the same atom. Tokens that split one character (byte-level pieces) share that
character's label.

Layer matching (the paper's benchmark, after Kornblith et al. 2019).  With dictionaries D^a_i (layers i of
run a) and D^b_j, S_ij = J(D^a_i, D^b_j) (`compare`); the score is the fraction of layers i with
argmax_j S_ij = i, computed both ways, rows and columns, as the paper's loop over ordered model pairs
(`matching_score`). Where there is no ground truth (two models), `rank_correlation` (Spearman's ρ) summarises
how a layer's depth follows its best match's.

Chance.  Jaccard depends on the two set sizes: `chance_jaccard` is the Jaccard expected of random atom sets
of the same sizes drawn from the two label sets.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch

from ..dictionaries.itda import ITDADictionary
from ..errors import FeaturekitError


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """|a ∩ b| / |a ∪ b| of two label collections (as sets); 1.0 when both are empty."""
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def jaccard_matrix(rows: Sequence[set], cols: Sequence[set]) -> torch.Tensor:
    """S_ij = jaccard(rows[i], cols[j]) as a float64 (len(rows), len(cols)) tensor."""
    return torch.tensor([[jaccard(r, c) for c in cols] for r in rows], dtype=torch.float64).reshape(len(rows), len(cols))


def matching_score(sim: torch.Tensor) -> dict[str, Any]:
    """For a square S: the fraction of rows i with argmax_j S_ij = i (`row_fraction`), the same for columns, and their mean."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise FeaturekitError(f"layer matching needs a non-empty square similarity matrix, got shape {tuple(sim.shape)}")
    diag = torch.arange(sim.shape[0])
    rows = (sim.argmax(dim=1) == diag).double().mean().item()
    cols = (sim.argmax(dim=0) == diag).double().mean().item()
    return {"score": (rows + cols) / 2, "row_fraction": rows, "col_fraction": cols,
            "row_argmax": sim.argmax(dim=1).tolist(), "col_argmax": sim.argmax(dim=0).tolist()}


def char_labels(dictionary: ITDADictionary, ends: torch.Tensor) -> set[tuple[int, int]]:
    """An atom's label (context index, character offset where its token ends), from the (N, T) table `ends`."""
    ctx, pos = dictionary.atom_context, dictionary.atom_position
    if (ctx < 0).any():
        raise FeaturekitError("the dictionary has atoms without provenance (context -1); fit it with ITDAFitter")
    return set(zip(ctx.tolist(), ends[ctx, pos].tolist()))


def compare(dicts_a: dict[int, ITDADictionary], ends_a: torch.Tensor, dicts_b: dict[int, ITDADictionary],
            ends_b: torch.Tensor) -> torch.Tensor:
    """S_ij = Jaccard of the char-end labels of layer i of a and layer j of b."""
    rows = [char_labels(d, ends_a) for d in dicts_a.values()]
    cols = [char_labels(d, ends_b) for d in dicts_b.values()]
    return jaccard_matrix(rows, cols)


def chance_jaccard(m_a: int, m_b: int, n_a: int, n_b: int, shared: int) -> float:
    """Expected Jaccard of random subsets of m_a of n_a labels and m_b of n_b labels, `shared` labels in common."""
    inter = m_a * m_b * shared / max(n_a * n_b, 1)
    return inter / max(m_a + m_b - inter, 1e-12)


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (tied values share their mean rank); 0 if a side is constant."""
    def ranks(v: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        r = (t[None, :] < t[:, None]).sum(1) + ((t[None, :] == t[:, None]).sum(1) + 1) / 2
        return r - r.mean()

    ra, rb = ranks(a), ranks(b)
    denom = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denom if denom > 0 else 0.0
