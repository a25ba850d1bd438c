"""ITDA: Inference-Time Decomposition of Activations (Leask, Nanda & Al Moubayed, ICML 2025, arXiv 2505.17769).

The dictionary is a set of *real activations*: m atoms d_j = x_j/‖x_j‖, each the normalised activation of
one token of the fitting stream, labelled with where it came from (context index, position, token id).
Sources: the official code github.com/pleask/itda, read in its fork davidkaczer/itda (`train.py` and
`dl_train.py`: class ITDA, `mp_encode`, `ITDATrainer.update` / `MultiLayerITDATrainer.update`;
`layer_similarity.py`: `get_similarity_measure`, GPT2_MODELS settings); the paper (Leask et al. 2025,
"Inference-Time Decomposition of Activations") only through secondary notes, not re-read
against the PDF.

Encoder = matching pursuit over the atoms, k steps (the paper's Algorithm 2; code `mp_encode`):

    r⁰ = x,  a = 0
    for t = 1..k:   c = r^{t−1} Dᵀ;   j = argmax_j |c_j|;   a_j += c_j;   r^t = r^{t−1} − c_j d_j
    x̂ = a D        (no bias: the paper and the code decode with the atoms alone; b_dec stays 0)

* Selection by |c| and signed coefficients (the code's `argmax(abs(correlations))`): codes are signed,
  "fired" means a ≠ 0; an atom chosen twice gets the sum of its coefficients, so L0 ≤ k. With unit atoms
  ‖r^t‖² = ‖r^{t−1}‖² − c_j², so the residual never grows. The stopping rule is the paper's: a fixed k.
* Batched on CPU with the atom Gram matrix G = D Dᵀ (ours, exact in exact arithmetic): c⁰ = x Dᵀ once,
  then c ← c − c_j G_j per step (B·m work instead of a B·m·d matmul). Used while m ≤ `GRAM_MAX_ATOMS`
  (G is m² floats), the direct form (recompute r Dᵀ) beyond; both give the same codes (tested).

Fitting (`ITDAFitter`; code `ITDATrainer.update`): stream the activations in
order; a token whose MP reconstruction error exceeds τ becomes a new atom. The error is the code's

    e(x) = ‖x/‖x‖ − x̂/‖x̂‖‖² / d  = 2(1 − cos(x, x̂)) / d          (x̂ = 0 gives 1/d)

i.e. a threshold on the cosine between x and its reconstruction; τ = `threshold` is in the code's
units (the paper's GPT-2 layer-similarity runs use τ = 0.0004 with k = 40). Choices of ours, documented:
* Tokens are judged in chunks against the dictionary as it stood at the chunk's start (the code: one
  batch of prompts per update). A chunk holds min(`chunk_tokens`, max(1, m)) tokens, so the dictionary
  at most doubles per chunk and the first atoms are chosen nearly one token at a time. The code instead
  seeds the empty dictionary with d "most frequent" rows of the first batch and then judges a whole
  first batch against them.
* Within a chunk, a candidate identical in direction (cos ≥ 1 − 1e-6) to an earlier candidate is dropped
  (the paper's "remove duplicate atoms"; the code read has no such step); tokens with ‖x‖ = 0 are never added.
* The dictionary size is capped at `max_atoms` (= config `dictionary.n_latents`): once full the fit stops
  taking atoms, like the code's `max_dict_size`/`crop_dict_size` (the paper crops to fixed sizes). The
  saved file's n_latents is the final size m ≤ the cap.
Provenance: `atom_context`, `atom_position`, `atom_token` (int64 buffers, saved in model.safetensors) give
each atom's source token; two dictionaries fitted on the same ordered stream are compared by these
labels (Jaccard, `featurekit.evaluate.layer_matching`). W_enc mirrors W_dec (tied, a buffer); nothing is
trained by gradient, so every weight is a buffer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError
from .base import Dictionary, Output
from .registry import register

#: Use the Gram-matrix pursuit while the dictionary has at most this many atoms (G takes m² floats: 256 MB at 8192).
GRAM_MAX_ATOMS = 8192
#: Elements of the (rows, m) correlation buffer per pursuit block: rows = clamp(this / m, 64, 4096), so the
#: buffers of a block stay near the CPU cache (measured ~25% faster than one 1024-row block at m = 2000).
BLOCK_ELEMENTS = 1 << 18
#: Candidates this close in direction to an earlier candidate of the same chunk are duplicates.
DUPLICATE_COS = 1 - 1e-6


def matching_pursuit(x: torch.Tensor, atoms: torch.Tensor, k: int, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k steps of matching pursuit of x (B, d) over unit-norm `atoms` (m, d).

    Returns (idx (B, k) int64, values (B, k)): step t chose atom idx[:, t] with coefficient values[:, t].
    With `gram` (= atoms atomsᵀ) the correlations are updated (c ← c − c_j G_j); without, recomputed.
    """
    if atoms.shape[0] == 0:
        raise FeaturekitError("matching pursuit needs at least one atom")
    n = x.shape[0]
    idx = torch.zeros(n, k, dtype=torch.long, device=x.device)
    values = torch.zeros(n, k, dtype=x.dtype, device=x.device)
    rows = max(64, min(4096, BLOCK_ELEMENTS // atoms.shape[0]))
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        idx[sl], values[sl] = _pursuit_rows(x[sl], atoms, k, gram)
    return idx, values


def _pursuit_rows(x: torch.Tensor, atoms: torch.Tensor, k: int, gram: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(x.shape[0], device=x.device)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    values = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    c = x @ atoms.T
    mag = torch.empty_like(c)
    g_rows = torch.empty_like(c) if gram is not None else None
    r = None if gram is not None else x.clone()
    for t in range(k):
        j = torch.abs(c, out=mag).argmax(dim=-1)
        v = c[rows, j]
        idx[:, t], values[:, t] = j, v
        if t == k - 1:
            break
        if gram is not None:
            torch.index_select(gram, 0, j, out=g_rows)
            c.addcmul_(g_rows, v[:, None], value=-1.0)
        else:
            r.addcmul_(atoms[j], v[:, None], value=-1.0)
            torch.matmul(r, atoms.T, out=c)
    return idx, values


def gather_decode(idx: torch.Tensor, values: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """x̂ = Σ_t values[:, t] · atoms[idx[:, t]]  (B, d), one (B, d) gather per step."""
    x_hat = torch.zeros(idx.shape[0], atoms.shape[1], dtype=atoms.dtype, device=atoms.device)
    for t in range(idx.shape[1]):
        x_hat.addcmul_(atoms[idx[:, t]], values[:, t, None])
    return x_hat


def itda_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-row e = ‖x/‖x‖ − x̂/‖x̂‖‖² / d (the official code's normalised MSE; x̂ = 0 counts as the zero vector)."""
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    v = x_hat / x_hat.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return (u - v).pow(2).mean(dim=-1)


class ITDAFitter:
    """The greedy ITDA construction over an ordered token stream (module docstring); the `Dictionary.fitter` protocol.

    `update(x, context_idx, position, token_ids)` judges the tokens in order, appends those whose error
    exceeds τ, and returns metrics (`fvu` of the tokens against the dictionary before they were judged,
    atoms added, dictionary size); `finish()` builds the `ITDADictionary`; `state()` / `load_state()` hold
    everything needed to continue (atoms, labels, tokens seen).
    """

    passes = 1  # one ordered pass: a token is judged against the atoms chosen before it

    def __init__(self, d_in: int, k: int, threshold: float, max_atoms: int | None = None, chunk_tokens: int = 1024,
                 dtype: torch.dtype = torch.float32):
        if not 0 < threshold < 1 / d_in:
            raise FeaturekitError(f"ITDA threshold τ must lie in (0, 1/d) = (0, {1 / d_in:.3g}): with τ ≥ 1/d no token is "
                                  f"ever added to an empty dictionary (its error is 1/d); got {threshold}")
        if k < 1 or chunk_tokens < 1 or (max_atoms is not None and max_atoms < 1):
            raise FeaturekitError(f"ITDA needs k ≥ 1, chunk_tokens ≥ 1 and max_atoms ≥ 1 (got {k}, {chunk_tokens}, {max_atoms})")
        self.d_in, self.k, self.threshold, self.max_atoms, self.chunk_tokens = d_in, k, float(threshold), max_atoms, chunk_tokens
        self.dtype = dtype
        self.n_atoms = 0
        self.tokens_seen = 0
        self._atoms = torch.zeros(0, d_in, dtype=dtype)
        self._labels = torch.zeros(0, 3, dtype=torch.long)  # (context, position, token)
        self._gram = torch.zeros(0, 0, dtype=dtype)

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, *, seed: int | None = None, batch_size: int = 1024) -> ITDAFitter:
        """From a `DictionaryConfig`: k, τ = threshold, the cap n_latents; chunks of ≤ batch_size tokens (seed unused)."""
        return cls(d_in, cfg.params.k, cfg.params.threshold, max_atoms=cfg.n_latents, chunk_tokens=batch_size)

    # -- state ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """The dictionary reached max_atoms: later tokens are not read."""
        return self.max_atoms is not None and self.n_atoms >= self.max_atoms

    @property
    def atoms(self) -> torch.Tensor:
        return self._atoms[:self.n_atoms]

    @property
    def labels(self) -> torch.Tensor:
        """(m, 3) int64: context index, position, token id of each atom."""
        return self._labels[:self.n_atoms]

    def _gram_view(self) -> torch.Tensor | None:
        return self._gram[:self.n_atoms, :self.n_atoms] if self.n_atoms <= GRAM_MAX_ATOMS else None

    def state(self) -> dict[str, torch.Tensor]:
        return {"atoms": self.atoms.clone(), "labels": self.labels.clone(), "tokens_seen": torch.tensor(self.tokens_seen)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.n_atoms:
            raise FeaturekitError("load_state needs a fresh ITDAFitter")
        self.tokens_seen = int(state["tokens_seen"])
        self._append(state["atoms"].to(self.dtype), state["labels"])

    # -- the construction -----------------------------------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """MP reconstruction of x (n, d) with the current dictionary (zeros when it is empty)."""
        x = x.to(self.dtype)
        if self.n_atoms == 0:
            return torch.zeros_like(x)
        idx, values = matching_pursuit(x, self.atoms, self.k, self._gram_view())
        return gather_decode(idx, values, self.atoms)

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's error e(x) against the current dictionary (1/d when it is empty)."""
        return itda_error(x.to(self.dtype), self.reconstruct(x))

    @torch.no_grad()
    def update(self, x: torch.Tensor, context_idx: torch.Tensor, position: torch.Tensor, token_ids: torch.Tensor) -> dict[str, float]:
        """Judge the tokens x (n, d) in order, chunk by chunk; append those whose error exceeds τ."""
        x = x.to(self.dtype)
        labels = torch.stack([context_idx, position, token_ids], dim=1).long()
        added, pos, sse = 0, 0, 0.0
        while pos < x.shape[0] and not self.done:
            size = min(self.chunk_tokens, max(1, self.n_atoms), x.shape[0] - pos)
            xc = x[pos:pos + size]
            x_hat = self.reconstruct(xc)
            sse += float((xc - x_hat).pow(2).sum())
            keep = (itda_error(xc, x_hat) > self.threshold) & (xc.norm(dim=-1) > 0)
            cand = keep.nonzero().flatten()
            cand = cand[_first_of_duplicates(xc[cand])]
            if self.max_atoms is not None:
                cand = cand[:self.max_atoms - self.n_atoms]
            self._append(xc[cand], labels[pos:pos + size][cand])
            added += cand.numel()
            pos += size
        self.tokens_seen += pos
        seen = x[:pos]
        sst = float((seen - seen.mean(0)).pow(2).sum()) if pos > 1 else 0.0
        return {"tokens_judged": pos, "added": added, "n_atoms": self.n_atoms,
                "added_fraction": added / max(pos, 1), "fvu": sse / sst if sst > 0 else None}

    def _append(self, new: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows `new` (normalised here) with their labels; grow the buffers by doubling; extend G."""
        n_new = new.shape[0]
        if n_new == 0:
            return
        new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
        m, total = self.n_atoms, self.n_atoms + n_new
        if total > self._atoms.shape[0]:
            cap = max(total, 2 * self._atoms.shape[0], 64)
            atoms = torch.zeros(cap, self.d_in, dtype=self.dtype)
            atoms[:m] = self.atoms
            lab = torch.zeros(cap, 3, dtype=torch.long)
            lab[:m] = self.labels
            self._atoms, self._labels = atoms, lab
            if m <= GRAM_MAX_ATOMS:
                gcap = min(cap, GRAM_MAX_ATOMS)
                gram = torch.zeros(gcap, gcap, dtype=self.dtype)
                gram[:m, :m] = self._gram[:m, :m]
                self._gram = gram
        self._atoms[m:total] = new
        self._labels[m:total] = labels
        if total <= GRAM_MAX_ATOMS:
            cross = new @ self._atoms[:total].T  # (n_new, total)
            self._gram[m:total, :total] = cross
            self._gram[:total, m:total] = cross.T
        self.n_atoms = total

    def finish(self, k: int | None = None) -> ITDADictionary:
        """The fitted dictionary (n_latents = the number of atoms; k defaults to the fit's k)."""
        if self.n_atoms == 0:
            raise FeaturekitError("the ITDA fit has no atoms: the stream was empty (or every token had norm 0)")
        d = ITDADictionary(self.d_in, self.n_atoms, k=k or self.k, threshold=self.threshold)
        lab = self.labels
        d.set_atoms(self.atoms.float(), lab[:, 0], lab[:, 1], lab[:, 2])
        return d


@dataclass
class ITDAParams:
    k: int = 32  #: matching-pursuit steps per token (n_latents caps the dictionary's size)
    threshold: float = 4e-4  #: add a token when ‖x/‖x‖ − x̂/‖x̂‖‖²/d exceeds this (needs < 1/d)


@register(ITDAParams, legacy={"itda_threshold": "threshold"})
class ITDADictionary(Dictionary):
    """A dictionary of unit-normalised real activations (W_dec rows) with per-atom provenance; MP encoder."""

    method = "itda"
    signed = True
    fitter = ITDAFitter  # built from the ordered activation stream (pipeline.run_fit), not by the gradient trainer

    def __init__(self, d_in: int, n_latents: int, k: int = 32, threshold: float = 4e-4, seed: int | None = None):
        super().__init__(d_in, n_latents)
        del self.W_enc, self.b_enc, self.W_dec, self.b_dec  # nothing is trained: all weights are buffers
        self.register_buffer("W_dec", torch.zeros(n_latents, d_in))
        self.register_buffer("W_enc", torch.zeros(n_latents, d_in))
        self.register_buffer("b_enc", torch.zeros(n_latents))
        self.register_buffer("b_dec", torch.zeros(d_in))
        for name in ("atom_context", "atom_position", "atom_token"):
            self.register_buffer(name, torch.full((n_latents,), -1, dtype=torch.long))
        self.k = k
        self.threshold = float(threshold)
        self._gram_key: tuple | None = None
        self._gram: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise FeaturekitError(f"ITDA k (matching-pursuit steps) must be a positive integer, got {value!r}")
        self._k = value

    @torch.no_grad()
    def set_atoms(self, atoms: torch.Tensor, context: torch.Tensor, position: torch.Tensor, token: torch.Tensor) -> None:
        """Fill the dictionary: atoms (m, d) are normalised to unit rows; W_enc mirrors W_dec."""
        if atoms.shape != (self.n_latents, self.d_in):
            raise FeaturekitError(f"ITDA atoms must be ({self.n_latents}, {self.d_in}), got {tuple(atoms.shape)}")
        self.W_dec.copy_(atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.W_enc.copy_(self.W_dec)
        self.atom_context.copy_(context)
        self.atom_position.copy_(position)
        self.atom_token.copy_(token)

    def atom_labels(self) -> list[tuple[int, int]]:
        """Each atom's (context index, position) in the stream it was fitted on: its identity for Jaccard."""
        return list(zip(self.atom_context.tolist(), self.atom_position.tolist()))

    def gram(self) -> torch.Tensor | None:
        """G = W_dec W_decᵀ (cached; recomputed when W_dec changes), or None when m > GRAM_MAX_ATOMS."""
        if self.n_latents > GRAM_MAX_ATOMS:
            return None
        w = self.W_dec
        key = (id(w), w._version, w.device, w.dtype)
        if self._gram_key != key:
            self._gram, self._gram_key = w @ w.T, key
        return self._gram

    def pursuit(self, x_scaled: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, values) of `k` (default self.k) MP steps on already-scaled, flattened input (B, d)."""
        with torch.no_grad():
            return matching_pursuit(x_scaled - self.b_dec, self.W_dec, self.k if k is None else k, self.gram())

    def _codes(self, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        codes = torch.zeros(idx.shape[0], self.n_latents, dtype=values.dtype, device=values.device)
        return codes.scatter_add_(-1, idx, values)

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Raw activations (..., d) → signed codes (..., m), at most k non-zero per token (k overrides self.k)."""
        x = self._check_input(x)
        if k is not None and (not isinstance(k, int) or k < 1):
            raise FeaturekitError(f"ITDA k (matching-pursuit steps) must be a positive integer, got {k!r}")
        shape = x.shape
        idx, values = self.pursuit(x.reshape(-1, self.d_in) * self.input_scale, k)
        return (self._codes(idx, values) / self.input_scale).reshape(*shape[:-1], self.n_latents)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise FeaturekitError("ITDA has no pointwise activation: its codes come from matching pursuit; use encode(x)")

    def forward(self, x: torch.Tensor) -> Output:
        """x (already scaled by c) → codes from the pursuit and x̂ = codes · W_dec + b_dec; no graph, no pre."""
        x = self._check_input(x)
        shape = x.shape
        idx, values = self.pursuit(x.reshape(-1, self.d_in))
        codes = self._codes(idx, values)
        x_hat = codes @ self.W_dec + self.b_dec
        return Output(x_hat=x_hat.reshape(shape), codes=codes.reshape(*shape[:-1], self.n_latents))

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "matching_pursuit", "k": self.k, "stopping": "fixed k steps (L0 ≤ k)",
                "selection": "argmax_j |⟨r, d_j⟩| over the unit-norm W_dec rows; coefficient ⟨r, d_j⟩ (signed); r⁰ = x·c − b_dec",
                "offset": "none (b_dec = 0: x̂ = codes · W_dec)", "signed": True}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "threshold": self.threshold}

    def file_metadata(self) -> dict[str, Any]:
        ctx = self.atom_context
        return {"atoms": {
            "count": self.n_latents, "kind": "normalised real activations (ITDA): row j of W_dec is x_j/‖x_j‖",
            "provenance": "model.safetensors tensors atom_context, atom_position, atom_token: the context index and position "
                          "in the fitting stream's contexts (as harvested: runs/NAME/activations or the training contexts) "
                          "and the token id of each atom's source token; -1 = unknown",
            "contexts": int(ctx.unique().numel()) if self.n_latents else 0,
            "first": [list(t) for t in zip(ctx[:5].tolist(), self.atom_position[:5].tolist(), self.atom_token[:5].tolist())],
        }}


def _first_of_duplicates(x: torch.Tensor) -> torch.Tensor:
    """Indices of rows of x not identical in direction (cos ≥ DUPLICATE_COS) to an earlier row."""
    if x.shape[0] <= 1:
        return torch.arange(x.shape[0])
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dup = torch.triu(u @ u.T >= DUPLICATE_COS, diagonal=1).any(dim=0)  # row j duplicates some i < j
    return (~dup).nonzero().flatten()


def fit_itda(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], d_in: int, *, k: int = 32,
             threshold: float = 4e-4, max_atoms: int | None = None, chunk_tokens: int = 1024) -> ITDADictionary:
    """Fit on an ordered stream of (x, context_idx, position, token_ids) and return the dictionary."""
    fitter = ITDAFitter(d_in, k, threshold, max_atoms, chunk_tokens)
    for x, ctx, pos, tok in batches:
        fitter.update(x, ctx, pos, tok)
        if fitter.done:
            break
    return fitter.finish()
