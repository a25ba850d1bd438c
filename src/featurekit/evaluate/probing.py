"""Sparse probing (SAEBench's `sparse_probing`), offline: can a few latents tell labelled documents apart?

1. Each document's first `n_tokens` tokens run through the model; the site's activations and the dictionary's
   codes are mean-pooled over the tokens the token policy keeps (position 0, special tokens and norm
   outliers dropped), one dense vector and one code vector per document.
2. Per class, one-vs-rest: the class's documents against as many others (drawn with a fixed seed), on the
   training documents and, separately, the held-out ones, so chance is 0.5.
3. Per task: k latents chosen by class mean difference on the training documents, a logistic probe on them,
   accuracy on the held-out documents (`sae_top_k_test_accuracy`); the same on all latents
   (`sae_test_accuracy`), on all dense dimensions (`llm_test_accuracy`), on k dense dimensions chosen the
   same way (`llm_top_k_test_accuracy`, SAEBench's baseline) and on the top-k principal components of the
   training documents' dense vectors (`pca_top_k_test_accuracy`, ours). Accuracies are averaged over classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.harvest import norm_outliers
from ..data.tokens import pack, token_mask
from ..errors import FeaturekitError
from ..models.hooks import capture_activations
from .probes import fit_logistic, mean_difference_latents, pca_basis


@torch.no_grad()
def pooled_documents(model, tokenizer, sae, site: str, docs: Sequence[str], n_tokens: int, *, batch_size: int = 16,
                     exclude_first: bool = True, exclude_special: bool = True,
                     max_norm_multiple: float | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(dense (n, d), codes (n, m), kept): mean-pooled activations and codes of the documents that fill
    `n_tokens` tokens and keep at least one under the token policy; `kept` indexes them into `docs`."""
    rows, kept = [], []
    for i, doc in enumerate(docs):
        try:
            rows.append(pack([doc], tokenizer, n_tokens, max_contexts=1))
            kept.append(i)
        except FeaturekitError:  # shorter than n_tokens
            continue
    if not rows:
        raise FeaturekitError(f"no document fills {n_tokens} tokens: lower eval.probing_tokens")
    ids = torch.cat(rows)
    mask = token_mask(ids, tokenizer, exclude_first=exclude_first, exclude_special=exclude_special)
    device = next(model.parameters()).device
    dense, codes, nonempty = [], [], []
    for start in range(0, len(ids), batch_size):
        batch, keep = ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device)
        acts = capture_activations(model, batch, [site])[site].float()
        keep = keep & ~norm_outliers(acts, keep, max_norm_multiple)
        doc = torch.arange(len(batch), device=device)[:, None].expand_as(keep)[keep]
        count = keep.sum(1, keepdim=True).clamp_min(1).float()
        x = acts[keep]
        c = sae.encode(x).float()
        dense.append((torch.zeros(len(batch), x.shape[1], device=device).index_add_(0, doc, x) / count).cpu())
        codes.append((torch.zeros(len(batch), c.shape[1], device=device).index_add_(0, doc, c) / count).cpu())
        nonempty.append(keep.any(1).cpu())
    ok = torch.cat(nonempty)
    return torch.cat(dense)[ok], torch.cat(codes)[ok], [i for i, good in zip(kept, ok.tolist()) if good]


def balanced_task(labels: Sequence[str], cls: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, targets): every document of `cls` (or a random subset) and as many others drawn at random."""
    pos = torch.tensor([i for i, label in enumerate(labels) if label == cls], dtype=torch.long)
    neg = torch.tensor([i for i, label in enumerate(labels) if label != cls], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    n = min(len(pos), len(neg))
    if n == 0:
        raise FeaturekitError(f"class {cls!r} has {len(pos)} documents against {len(neg)} others: a probe needs both")
    pos, neg = pos[torch.randperm(len(pos), generator=g)[:n]], neg[torch.randperm(len(neg), generator=g)[:n]]
    return torch.cat([pos, neg]), torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])


def probe_accuracies(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                     train_labels: Sequence[str], test_labels: Sequence[str], ks: Sequence[int], seed: int = 0,
                     classes: Sequence[str] | None = None) -> dict:
    """Per class and averaged: the accuracies of the module docstring. `train`/`test` are (dense, codes).
    `classes` (default: every label) are the classes probed one-vs-rest, e.g. only "yes" of a binary task."""
    (dense_tr, codes_tr), (dense_te, codes_te) = train, test
    every = sorted(set(train_labels))
    classes = list(classes) if classes is not None else every
    if len(every) < 2 or set(test_labels) - set(every) or not set(test_labels) or set(classes) - set(every):
        raise FeaturekitError(f"probing needs two or more classes in the training documents and only those in the held-out ones "
                              f"(train: {every}, held out: {sorted(set(test_labels))})")
    pca_mean, pca = pca_basis(dense_tr, min(max(ks), *dense_tr.shape))
    per_class = {}
    for j, cls in enumerate(classes):
        tr, y_tr = balanced_task(train_labels, cls, seed + 2 * j)
        te, y_te = balanced_task(test_labels, cls, seed + 2 * j + 1)
        acc = {"llm_test_accuracy": fit_logistic(dense_tr[tr], y_tr).accuracy(dense_te[te], y_te),
               "sae_test_accuracy": fit_logistic(codes_tr[tr], y_tr).accuracy(codes_te[te], y_te)}
        chosen = {}
        for k in ks:
            for name, x_tr, x_te in (("llm", dense_tr, dense_te), ("sae", codes_tr, codes_te)):
                cols = mean_difference_latents(x_tr[tr], y_tr, min(k, x_tr.shape[1]))
                acc[f"{name}_top_{k}_test_accuracy"] = fit_logistic(x_tr[tr][:, cols], y_tr).accuracy(x_te[te][:, cols], y_te)
                if name == "sae" and k == max(ks):
                    chosen = cols.tolist()
            if k <= pca.shape[1]:
                p_tr, p_te = (dense_tr[tr].double() - pca_mean) @ pca[:, :k], (dense_te[te].double() - pca_mean) @ pca[:, :k]
                acc[f"pca_top_{k}_test_accuracy"] = fit_logistic(p_tr, y_tr).accuracy(p_te, y_te)
        per_class[cls] = {**acc, "n_train": len(tr), "n_test": len(te), f"sae_top_{max(ks)}_latents": chosen}
    keys = [k for k in per_class[classes[0]] if k.endswith("_accuracy")]
    mean = {k: sum(per_class[c][k] for c in classes) / len(classes) for k in keys}
    return {"mean": mean, "per_class": per_class}


@torch.no_grad()
def token_documents(tokenizer, docs: Sequence[str], n_tokens: int, *, exclude_first: bool = True,
                    exclude_special: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids (n, n_tokens), kept-token mask (n, n_tokens), kept): each document's first n_tokens tokens, for the
    documents that fill them; `kept` indexes them into `docs`."""
    rows, kept = [], []
    for i, doc in enumerate(docs):
        try:
            rows.append(pack([doc], tokenizer, n_tokens, max_contexts=1))
            kept.append(i)
        except FeaturekitError:
            continue
    if not rows:
        raise FeaturekitError(f"no document fills {n_tokens} tokens: lower eval.probing_tokens")
    ids = torch.cat(rows)
    return ids, token_mask(ids, tokenizer, exclude_first=exclude_first, exclude_special=exclude_special), kept


@torch.no_grad()
def token_codes(model, sae, site: str, ids: torch.Tensor, positions: torch.Tensor, *,
                batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense (p, d), codes (p, m)): the site's activation and the dictionary's code at each (row, column) of
    `positions` (p, 2), per token, not pooled; rows are run through the model in batches."""
    device = next(model.parameters()).device
    dense = [None] * len(positions)
    codes = [None] * len(positions)
    for start in range(0, len(ids), batch_size):
        inside = ((positions[:, 0] >= start) & (positions[:, 0] < start + batch_size)).nonzero().flatten()
        if not len(inside):
            continue
        acts = capture_activations(model, ids[start:start + batch_size].to(device), [site])[site].float()
        x = acts[positions[inside, 0] - start, positions[inside, 1]]
        c = sae.encode(x).float().cpu()
        for j, i in enumerate(inside.tolist()):
            dense[i], codes[i] = x[j].cpu(), c[j]
    return torch.stack(dense), torch.stack(codes)
