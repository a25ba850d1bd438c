"""`featurekit itda-match`: the ITDA layer-matching experiment (Leask et al. 2025, §5), on one model's
layers in two text orders and across two models. The metrics (atom labels, Jaccard, matching score,
chance, Spearman's ρ) are pure functions in `featurekit.evaluate.layer_matching`; this module harvests,
fits and writes.

The experiment.  The paper compares five GPT-2 instances trained from different seeds on the same data,
with one τ (0.0004) everywhere; with one model at hand we compare two fits of the same model on the same
tokens in two orders (a permutation of the documents), with one τ: a layer's dictionary should be closer to
the same layer's other-order dictionary than to any other layer's. Across two models (SmolLM2-135M vs
Gemma-3-270M) there is no ground truth; S shows which layers correspond (summarised by Spearman's ρ between
a layer and its best match).

Sizes across models (ours).  Jaccard depends on the two set sizes, and τ means different sizes in
different geometries: Gemma-3-270M's residual stream has one dimension holding ~80% of ‖x‖² and a mean
pairwise cosine of 0.81–0.97 between tokens (SmolLM2: ~0.5), so at τ = 0.0004 its dictionaries keep 1–335
atoms where SmolLM2's keep 880–2,200 (measured on 160 BBC documents), and every SmolLM2 layer then
"matches" the largest Gemma dictionary. For the cross-model matrix τ is therefore calibrated per
dictionary (`fit_to_size`) so every dictionary has the same number of atoms (± 10%); the paper's
fixed-size comparisons crop dictionaries instead (the code's `crop_dict_size`: the first m atoms), which
would put all atoms in the first documents. `chance_jaccard` is the Jaccard expected of random atom sets
of the same sizes.

Data.  Each document is one context: its first `context_len` tokens (the tokenizer's own BOS when it adds
one), right-padded (`data.tokens.document_contexts`, which also gives each token's character end offset);
padding, special tokens, position 0 and norm outliers (`max_norm_multiple` × the batch median, as the
pipeline) are excluded. Activations of every requested `resid_post` layer come from one forward pass per
batch (`data.harvest.harvest`); with a cache folder they are kept as an activation cache (`data.cache`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, atomic_write_json, atomic_write_text
from ..data.batch import ActivationBatch
from ..data.cache import write_cache
from ..data.harvest import harvest
from ..data.sources import load_texts
from ..data.tokens import document_contexts, token_mask
from ..dictionaries.itda import ITDADictionary, ITDAFitter
from ..errors import FeaturekitError
from ..evaluate.layer_matching import chance_jaccard, compare, matching_score, rank_correlation

CACHE_SHARD_TOKENS = 4096  #: tokens per shard of the activation cache


@dataclass
class Harvested:
    """Residual-stream activations of `layers` for the kept tokens of one model, in context-major order."""

    name: str
    layers: list[int]
    acts: dict[int, torch.Tensor]  # layer -> (n, d) float32
    context: torch.Tensor  # (n,)
    position: torch.Tensor  # (n,)
    token: torch.Tensor  # (n,)
    ends: torch.Tensor  # (N, T) character end offset of each token in its document (-1: BOS, padding)
    seconds: float


def harvest_layers(loaded: Any, texts: Sequence[str], layers: Sequence[int], context_len: int = 128, batch_contexts: int = 8,
                   max_norm_multiple: float | None = 50.0, progress: bool = False, cache: str | Path | None = None) -> Harvested:
    """Activations (float32) at resid_post.L for every L in `layers`, one context per document, one forward pass per
    batch of contexts. With `cache` (a folder) they are written there as an activation cache (`data.cache`; resumable)
    and, once it is complete, read from it instead of running the model; `seconds` is the time of this call."""
    start = time.time()
    ids, present, ends = document_contexts(texts, loaded.tokenizer, context_len)
    mask = present & token_mask(ids, loaded.tokenizer)
    sites = [f"resid_post.{layer}" for layer in layers]
    batches: Iterator[ActivationBatch] = (
        ActivationBatch({s: b.acts[s].float() for s in sites}, b.token_ids, b.context_idx, b.position)
        for b in harvest(loaded.model, ids, sites, batch_size=batch_contexts, mask=mask, progress=progress,
                         max_norm_multiple=max_norm_multiple))
    if cache is not None:
        meta = {"model": loaded.name, "sites": sites, "documents": len(texts), "text_sha256": text_digest(texts),
                "context_len": context_len, "batch_contexts": batch_contexts, "max_norm_multiple": max_norm_multiple}
        batches = write_cache(cache, batches, meta, CACHE_SHARD_TOKENS).iter_shards()
    parts = list(batches)
    if not parts:
        raise FeaturekitError("no tokens to harvest: the documents are empty after the token mask")
    return Harvested(name=loaded.name, layers=list(layers),
                     acts={layer: torch.cat([b.acts[s] for b in parts]) for layer, s in zip(layers, sites)},
                     context=torch.cat([b.context_idx for b in parts]), position=torch.cat([b.position for b in parts]),
                     token=torch.cat([b.token_ids for b in parts]), ends=ends, seconds=time.time() - start)


def text_digest(texts: Sequence[str]) -> str:
    """sha256 of the documents (as a JSON list): an activation cache is reused only for the same text."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def fit_layers(h: Harvested, order: torch.Tensor | None, k: int, threshold: float, max_atoms: int | None,
               chunk_tokens: int = 1024) -> dict[int, ITDADictionary]:
    """One ITDA per layer on the tokens of `h`, contexts taken in `order` (a permutation of context indices; None: as harvested)."""
    rows = torch.arange(h.context.shape[0])
    if order is not None:
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        rows = torch.argsort(rank[h.context] * (h.position.max() + 1) + h.position)
    out = {}
    for layer in h.layers:
        fitter = ITDAFitter(h.acts[layer].shape[1], k, threshold, max_atoms=max_atoms, chunk_tokens=chunk_tokens)
        fitter.update(h.acts[layer][rows], h.context[rows], h.position[rows], h.token[rows])
        out[layer] = fitter.finish()
    return out


def fit_to_size(x: torch.Tensor, labels: Sequence[torch.Tensor], k: int, target: int, threshold: float = 4e-4, tol: float = 0.1,
                max_fits: int = 10, chunk_tokens: int = 1024) -> tuple[ITDADictionary, float, int]:
    """An ITDA of target ± tol·target atoms: τ found by bracketing and log-log interpolation of m(τ) (m falls as
    τ grows). Fits are capped at 2·target atoms, so a too-small τ stops early. Returns (dictionary, τ, fits run);
    after `max_fits` the closest fit is returned."""
    cap, lo, hi, best = 2 * target, None, None, None  # lo: (τ, m) with m > target; hi: with m < target
    tau = min(threshold, 0.99 / x.shape[1])
    fits = 0
    while fits < max_fits:
        fits += 1
        fitter = ITDAFitter(x.shape[1], k, tau, max_atoms=cap, chunk_tokens=chunk_tokens)
        fitter.update(x, *labels)
        m = fitter.n_atoms
        if best is None or abs(m - target) < abs(best[1].n_atoms - target):
            best = (tau, fitter)
        if abs(m - target) <= tol * target:
            break
        if m > target:
            lo = (tau, m)
        else:
            hi = (tau, m)
        if lo is None:
            tau = tau / 4
        elif hi is None:
            tau = min(tau * 4, 0.99 / x.shape[1])
        else:  # interpolate log m against log τ between the bracket ends
            (t0, m0), (t1, m1) = lo, (hi[0], max(hi[1], 1))
            w = (math.log(target) - math.log(m0)) / (math.log(m1) - math.log(m0))
            tau = math.exp(math.log(t0) + min(max(w, 0.1), 0.9) * (math.log(t1) - math.log(t0)))
    return best[1].finish(), best[0], fits


def fit_layers_to_size(h: Harvested, k: int, target: int, threshold: float = 4e-4, chunk_tokens: int = 1024,
                       ) -> tuple[dict[int, ITDADictionary], dict[int, float]]:
    """`fit_to_size` for every layer of `h` (contexts as harvested); returns the dictionaries and their τ."""
    out, taus = {}, {}
    for layer in h.layers:
        out[layer], taus[layer], _ = fit_to_size(h.acts[layer], (h.context, h.position, h.token), k, target, threshold,
                                                 chunk_tokens=chunk_tokens)
    return out, taus


def token_labels(h: Harvested) -> set[tuple[int, int]]:
    """The labels (context, character end) of all kept tokens of `h`."""
    return set(zip(h.context.tolist(), h.ends[h.context, h.position].tolist()))


def default_layers(n_layers: int, count: int = 10) -> list[int]:
    """About `count` evenly spaced layers ending at the last one."""
    step = max(1, round(n_layers / count))
    return list(range(n_layers - 1, -1, -step))[::-1][-count:]


def run_itda_match(model_a: str = "smollm2-135m", layers_a: Sequence[int] | None = None, model_b: str | None = None,
                   layers_b: Sequence[int] | None = None, *, source: str = "bbc", split: str = "train", docs: int = 160,
                   context_len: int = 128, k: int = 40, threshold: float = 4e-4, max_atoms: int | None = 4096,
                   chunk_tokens: int = 1024, seed: int = 0, device: str = "cpu", progress: bool = True,
                   cache_dir: str | Path | None = None, target_atoms: int | None = 1500) -> dict[str, Any]:
    """The layer-matching experiment (module docstring): model_a fitted on the documents in two orders (fixed τ =
    `threshold`), and (with `model_b`) model_a against model_b on the same documents, every dictionary calibrated
    to `target_atoms` ± 10% (None: the fixed τ). Returns a JSON-ready dict. With `cache_dir` the harvested
    activations are kept there (an activation cache per model, layers and text) and reused by later calls."""
    from ..models import load_model  # imported here to keep the module light

    texts = load_texts(source, split)[:docs]
    if len(texts) < 2:
        raise FeaturekitError(f"the text source {source!r} ({split}) has fewer than 2 documents; use another source")
    permuted = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    result: dict[str, Any] = {"config": {"model_a": model_a, "model_b": model_b, "source": source, "split": split, "docs": len(texts),
                                         "context_len": context_len, "k": k, "threshold": threshold, "max_atoms": max_atoms,
                                         "chunk_tokens": chunk_tokens, "seed": seed, "site": "resid_post", "target_atoms": target_atoms,
                                         "label": "(document index, character offset where the atom's token ends)"}}

    def harvested(name: str, layers: Sequence[int] | None) -> tuple[Harvested, int]:
        loaded = load_model(name, device=device)
        layers = list(layers) if layers is not None else default_layers(loaded.n_layers)
        key = json.dumps([name, layers, text_digest(texts), context_len, loaded.n_layers])
        cache = Path(cache_dir) / f"acts-{hashlib.sha256(key.encode()).hexdigest()[:16]}" if cache_dir else None
        return harvest_layers(loaded, texts, layers, context_len, progress=progress, cache=cache), loaded.n_layers

    ha, n_a = harvested(model_a, layers_a)
    start = time.time()
    fits_a = fit_layers(ha, None, k, threshold, max_atoms, chunk_tokens)
    fits_p = fit_layers(ha, permuted, k, threshold, max_atoms, chunk_tokens)
    sim = compare(fits_a, ha.ends, fits_p, ha.ends)
    result["order"] = {"rows": f"{model_a}, documents in order", "cols": f"{model_a}, documents permuted (seed {seed})",
                       "row_layers": ha.layers, "col_layers": ha.layers, "n_layers": [n_a, n_a], "jaccard": sim.tolist(),
                       **matching_score(sim), "atoms_rows": [d.n_latents for d in fits_a.values()],
                       "atoms_cols": [d.n_latents for d in fits_p.values()], "tokens": int(ha.context.numel()),
                       "harvest_s": round(ha.seconds, 1), "fit_s": round(time.time() - start, 1)}
    n_tok = len(token_labels(ha))
    result["order"]["chance_mean"] = round(sum(chance_jaccard(a, b, n_tok, n_tok, n_tok) for a, b in
                                               zip(result["order"]["atoms_rows"], result["order"]["atoms_cols"])) / len(ha.layers), 4)
    if model_b is not None:
        hb, n_b = harvested(model_b, layers_b)
        start = time.time()
        if target_atoms:  # both models' dictionaries calibrated to one size (module docstring)
            rows_d, taus_a = fit_layers_to_size(ha, k, target_atoms, threshold, chunk_tokens)
            cols_d, taus_b = fit_layers_to_size(hb, k, target_atoms, threshold, chunk_tokens)
        else:
            rows_d, taus_a = fits_a, dict.fromkeys(ha.layers, threshold)
            cols_d, taus_b = fit_layers(hb, None, k, threshold, max_atoms, chunk_tokens), dict.fromkeys(hb.layers, threshold)
        sim = compare(rows_d, ha.ends, cols_d, hb.ends)
        best = [hb.layers[j] for j in sim.argmax(dim=1).tolist()]
        atoms_a, atoms_b = [d.n_latents for d in rows_d.values()], [d.n_latents for d in cols_d.values()]
        lab_a, lab_b = token_labels(ha), token_labels(hb)
        shared = len(lab_a & lab_b)
        chance = [[chance_jaccard(ma, mb, len(lab_a), len(lab_b), shared) for mb in atoms_b] for ma in atoms_a]
        result["cross_model"] = {"rows": model_a, "cols": model_b, "row_layers": ha.layers, "col_layers": hb.layers,
                                 "n_layers": [n_a, n_b], "jaccard": sim.tolist(), "row_argmax_layer": best,
                                 "row_depth": [round((la + 1) / n_a, 3) for la in ha.layers],
                                 "argmax_depth": [round((lb + 1) / n_b, 3) for lb in best],
                                 "depth_rank_correlation": round(rank_correlation(ha.layers, best), 3),
                                 "target_atoms": target_atoms, "atoms_rows": atoms_a, "atoms_cols": atoms_b,
                                 "thresholds_rows": list(taus_a.values()), "thresholds_cols": list(taus_b.values()),
                                 "chance_mean": round(sum(map(sum, chance)) / (len(atoms_a) * len(atoms_b)), 4),
                                 "tokens_b": int(hb.context.numel()), "shared_label_fraction": round(shared / max(len(lab_a), 1), 4),
                                 "harvest_s": round(hb.seconds, 1), "fit_s": round(time.time() - start, 1)}
    return result


def write_itda_match(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """result.json, result.md (Jaccard tables and scores) and heatmaps.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": atomic_write_json(out / "result.json", result), "md": atomic_write_text(out / "result.md", to_markdown(result))}
    paths["png"] = plot_heatmaps(result, out / "heatmaps.png")
    return paths


def _table(block: dict[str, Any]) -> list[str]:
    head = "| rows \\ cols | " + " | ".join(f"L{c}" for c in block["col_layers"]) + " |"
    lines = [head, "|" + "---|" * (len(block["col_layers"]) + 1)]
    for layer, row in zip(block["row_layers"], block["jaccard"]):
        best = max(range(len(row)), key=row.__getitem__)
        cells = [f"**{v:.3f}**" if j == best else f"{v:.3f}" for j, v in enumerate(row)]
        lines.append(f"| L{layer} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = ["# ITDA layer matching", "",
             f"Text: {cfg['docs']} documents of `{cfg['source']}` ({cfg['split']}), first {cfg['context_len']} tokens each; "
             f"ITDA k = {cfg['k']}, τ = {cfg['threshold']}, at most {cfg['max_atoms']} atoms; atoms labelled by {cfg['label']}. "
             "Cells: Jaccard similarity of the two dictionaries' atom labels; bold: the row's maximum.", ""]
    o = result["order"]
    lines += [f"## {o['rows']} vs {o['cols']}", "",
              f"Layer-matching score (share of layers whose best match is the same layer): {o['score']:.3f} "
              f"(rows {o['row_fraction']:.3f}, columns {o['col_fraction']:.3f}); "
              f"{o['tokens']} tokens; atoms {o['atoms_rows']} / {o['atoms_cols']}; Jaccard of random atom sets of these "
              f"sizes ≈ {o['chance_mean']:.3f}.", "", *_table(o), ""]
    if "cross_model" in result:
        c = result["cross_model"]
        pairs = ", ".join(f"L{a}→L{b}" for a, b in zip(c["row_layers"], c["row_argmax_layer"]))
        size = (f"τ calibrated per dictionary to {c['target_atoms']} ± 10% atoms" if c["target_atoms"] else
                f"τ = {cfg['threshold']}")
        lines += [f"## {c['rows']} (rows) vs {c['cols']} (columns)", "",
                  f"Best match per row: {pairs} (Spearman ρ of layer and best-matching layer: {c['depth_rank_correlation']:.3f}). "
                  f"{size}; atoms {c['atoms_rows']} / {c['atoms_cols']}; Jaccard of random atom sets ≈ {c['chance_mean']:.3f}. "
                  f"{c['shared_label_fraction']:.1%} of the row model's tokens end at a character where a token of the column "
                  "model ends (only those can match).", "", *_table(c), ""]
    return "\n".join(lines)


def plot_heatmaps(result: dict[str, Any], path: Path) -> Path:
    """One heatmap per comparison (matplotlib, Agg backend), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [result[key] for key in ("order", "cross_model") if key in result]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4.6), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        im = ax.imshow(block["jaccard"], cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(block["col_layers"])), [str(x) for x in block["col_layers"]])
        ax.set_yticks(range(len(block["row_layers"])), [str(x) for x in block["row_layers"]])
        ax.set_xlabel(f"layer: {block['cols']}"[:60])
        ax.set_ylabel(f"layer: {block['rows']}"[:60])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Jaccard")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
