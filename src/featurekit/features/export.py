"""The feature store as Neuronpedia / SAEDashboard batch JSON (`featurekit export neuronpedia RUN_DIR`).

SAEDashboard's `neuronpedia-runner` writes one `batch-N.json` per batch of features plus
`skipped_indexes.json` and `run_settings.json`; Neuronpedia's importers (SAEDashboard's
`neuronpedia_export.py`, `neuronpedia-utils`) read those files. This module writes the same files from
the store, with every field filled from what the store measured (docs/neuronpedia.md says what each
field holds and what featurekit approximates):

    batch-N.json  {model_id, layer, sae_set, sae_id_suffix,
                   features: [{feature_index, pos_str, pos_values, neg_str, neg_values, frac_nonzero,
                               freq_hist_data_bar_values, freq_hist_data_bar_heights, activations: [
                                   {bin_min, bin_max, bin_contains, tokens, values, qualifying_token_index}],
                               n_prompts_total, n_tokens_in_prompt, dataset, decoder_weights_dist, vector,
                               neuron_alignment_*, correlated_neurons_*, correlated_features_*,
                               logits_hist_data_bar_*: [] (the store holds nothing they could be filled from)}]}
    skipped_indexes.json  {model_id, layer, sae_set, log_sparsity, skipped_indexes}: dead or unselected features
    run_settings.json     the settings this export stands for, and featurekit's provenance
    explanations.json     only when the store holds explanations (`featurekit explain`): the batch format has no
                          field for them, so they go beside it as Neuronpedia explanation records
                          [{modelId, layer: "LAYER-SAE_SET", index, description, typeName, explanationModelName,
                          score, scores}]

Activations come in the format's order: the top group first (`bin_min` = `bin_contains` = -1, `bin_max`
the feature's maximum), then one group per activation-quantile band, highest band first. The format's
groups are equal-width intervals of [0, max]; the store's bands are equal-count (each holds a fifth of the
feature's non-zero codes), so `bin_min`/`bin_max` are the band's range estimated from the store's exact
histogram (widened to hold the examples shown) and `bin_contains` is the band's share of all tokens.

Signed codes: the format shows positive activations only, so the negative tail (bottom examples, negative
bands and histogram) stays in the store and `frac_nonzero` counts the positive codes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from .._io import atomic_write_json, atomic_write_text
from ..errors import FeaturekitError
from .store import FeatureStore

BATCH_SIZE = 128  # SAEDashboard's n_features_at_a_time
BATCH_FILE = re.compile(r"^batch-(\d+)\.json$")
# fields the store holds nothing for (the decoder's neuron basis, activation correlations, every token's logit):
# written empty, as SAEDashboard writes a table it did not compute
TABLE_FIELDS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson")
LOGITS_HIST_FIELDS = ("logits_hist_data_bar_heights", "logits_hist_data_bar_values")


def _num(value: float) -> float:
    """A value as the export writes it: 6 significant digits (float32 codes hold about 7)."""
    return float(f"{value:.6g}")


def parse_features(spec: str, n_latents: int) -> list[int]:
    """'0-99,120,130-140' → the sorted feature ids it names; an id outside 0..n_latents-1 is refused."""
    ids: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise FeaturekitError(f"bad --features {spec!r}: use ids and ranges like 0-99,120,130-140")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= n_latents:
            raise FeaturekitError(f"--features {part.strip()!r} is outside this store's features 0-{n_latents - 1}")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def _ids(store: FeatureStore, model_id: str | None, layer: int | None, sae_set: str | None) -> tuple[str, int, str]:
    """Neuronpedia's model id, layer and SAE set name: given, or from the store's model, site and method."""
    site = str(store.meta.get("site") or "")
    kind, _, number = site.rpartition(".")
    if layer is None:
        if not number.isdigit():
            raise FeaturekitError(f"the store's site {site!r} names no layer: pass --layer")
        layer = int(number)
    if model_id is None:
        model_id = re.sub(r"\.gguf$", "", Path(str(store.meta.get("model") or "model").rstrip("/\\")).name.lower())
    if sae_set is None:
        sae_set = re.sub(r"[^a-z0-9]+", "-", f"featurekit-{store.meta.get('method', 'sae')}-{kind}".lower()).strip("-")
    return model_id, layer, sae_set


def _histogram(counts: list[int], edges: list[float]) -> tuple[list[float], list[int]]:
    """The store's log-spaced bins from the first to the last non-empty one: (bar centres, counts)."""
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return [], []
    bins = range(used[0], used[-1] + 1)
    return [_num(math.sqrt(edges[i] * edges[i + 1])) for i in bins], [int(counts[i]) for i in bins]


def _quantile(counts: list[int], edges: list[float], q: float) -> float:
    """The q-quantile of the values behind a histogram, interpolated geometrically inside its bin."""
    target, seen = q * sum(counts), 0
    for i, c in enumerate(counts):
        if c and seen + c >= target:
            return edges[i] * (edges[i + 1] / edges[i]) ** ((target - seen) / c)
        seen += c
    return edges[-1]


def _activation(example: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains, "tokens": list(example["tokens"]),
            "values": [_num(v) for v in example["acts"]], "qualifying_token_index": int(example["position"])}


def _activations(page: dict, positive: list[int], edges: list[float], n_tokens: int, n_bands: int) -> list[dict]:
    """The top group, then the quantile bands from the highest down (module docstring)."""
    examples = page["examples"]
    top_value = _num(page["max"])
    out = [_activation(e, -1, top_value, -1) for e in examples.get("top", []) if e["value"] > 0]
    bands = [[e for e in examples.get(f"band{b}", []) if e["value"] > 0] for b in range(n_bands)]
    shown = [e["value"] for band in bands for e in band]
    if not shown or not any(positive):
        return out
    lowest = min(shown + ([page["min"]] if page["min"] > 0 else []))
    cuts = [lowest] + [_quantile(positive, edges, b / n_bands) for b in range(1, n_bands)] + [page["max"]]
    share = sum(positive) / n_bands / max(n_tokens, 1)
    for b in reversed(range(n_bands)):
        values = [e["value"] for e in bands[b]]
        if not values:
            continue
        lo, hi = _num(min([cuts[b], *values])), _num(max([cuts[b + 1], *values]))
        out += [_activation(e, lo, hi, _num(share)) for e in sorted(bands[b], key=lambda e: -e["value"])]
    return out


def feature_entry(store: FeatureStore, feature: int, *, n_prompts: int, n_tokens_in_prompt: int, dataset: str) -> dict:
    """One feature in the format's fields (module docstring)."""
    page = store.feature(feature)
    edges = store.meta["hist_edges"]
    positive = (page["hist"] or {}).get("positive", [0] * (len(edges) - 1))
    n_tokens = int(store.meta["n_tokens"])
    frac = page["density"] if not store.meta.get("signed") else sum(positive) / max(n_tokens, 1)
    bar_values, bar_heights = _histogram(positive, edges)
    text = page["token_text"]
    logits = {}
    for side in ("pos", "neg"):
        pairs = page[f"logits_{side}"] or []
        logits[f"{side}_str"] = [text.get(t, "") for t, _ in pairs]
        logits[f"{side}_values"] = [_num(v) for _, v in pairs]
    activations = _activations(page, positive, edges, n_tokens, int(store.meta.get("bands", 5))) if page["fires"] else []
    return {"feature_index": int(feature), **{k: [] for k in TABLE_FIELDS}, **logits, "frac_nonzero": frac,
            "freq_hist_data_bar_values": bar_values, "freq_hist_data_bar_heights": bar_heights,
            **{k: [] for k in LOGITS_HIST_FIELDS}, "n_prompts_total": n_prompts, "n_tokens_in_prompt": n_tokens_in_prompt,
            "dataset": dataset, "decoder_weights_dist": list((page["extra"] or {}).get("head_shares", [])),
            "activations": activations, "vector": []}


def explanation_records(store: FeatureStore, features: list[int], model_id: str, source: str) -> list[dict]:
    """The store's explanations of `features` as Neuronpedia explanation records (explainer columns look like
    EXPLAINER@JUDGE: typeName featurekit-EXPLAINER, explanationModelName JUDGE)."""
    wanted = set(features)
    rows = store.db.execute("SELECT feature, explainer, text, score, details FROM explanations ORDER BY feature, explainer").fetchall()
    out = []
    for f, explainer, text, score, details in rows:
        if f not in wanted:
            continue
        kind, _, judge = explainer.partition("@")
        out.append({"modelId": model_id, "layer": source, "index": str(f), "description": text, "typeName": f"featurekit-{kind}",
                    "explanationModelName": judge or None, "score": score, "scores": json.loads(details) if details else None})
    return out


def export_neuronpedia(store: FeatureStore, out_dir: str | os.PathLike, *, features: Iterable[int] | None = None,
                       batch_size: int = BATCH_SIZE, model_id: str | None = None, layer: int | None = None,
                       sae_set: str | None = None, sae_id_suffix: str | None = None, dataset: str | None = None) -> list[Path]:
    """Write the store's features (all, or `features`) as Neuronpedia batch JSON under `out_dir` (module
    docstring). Features that never fired go to skipped_indexes.json, not into a batch. Every file is written
    atomically; batch files of an earlier export beyond this one's last are removed. Returns the files written."""
    if batch_size < 1:
        raise FeaturekitError(f"batch size must be at least 1, got {batch_size}")
    out = Path(out_dir)
    model_id, layer, sae_set = _ids(store, model_id, layer, sae_set)
    chosen = sorted(set(features)) if features is not None else list(range(store.n_latents))
    live = {r["id"] for r in store.list_features(sort="id", descending=False, limit=store.n_latents, live_only=True)}
    exported = [f for f in chosen if f in live]
    meta = store.meta
    n_prompts, n_tokens_in_prompt = int(meta.get("n_contexts", 0)), int(meta.get("context_len", 0))
    if dataset is None:
        names = [str(s.get("source", "")) for s in meta.get("sources") or []]
        dataset = ", ".join(dict.fromkeys(n for n in names if n))
    written = []
    batches = [exported[i:i + batch_size] for i in range(0, len(exported), batch_size)]
    for number, batch in enumerate(batches):
        body = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": sae_id_suffix,
                "features": [feature_entry(store, f, n_prompts=n_prompts, n_tokens_in_prompt=n_tokens_in_prompt,
                                           dataset=dataset) for f in batch]}
        written.append(atomic_write_text(out / f"batch-{number}.json", json.dumps(body, allow_nan=False)))
    n_tokens = int(meta.get("n_tokens", 0))
    skipped = sorted(set(range(store.n_latents)) - set(exported))
    written.append(atomic_write_json(out / "skipped_indexes.json", {
        "model_id": model_id, "layer": str(layer), "sae_set": sae_set,
        "log_sparsity": _num(math.log10(1 / n_tokens)) if n_tokens else None, "skipped_indexes": skipped}))
    written.append(atomic_write_json(out / "run_settings.json", {
        "model_id": model_id, "layer": layer, "sae_set": sae_set, "np_sae_id_suffix": sae_id_suffix,
        "huggingface_dataset_path": dataset, "n_prompts_total": n_prompts, "n_tokens_in_prompt": n_tokens_in_prompt,
        "n_features_at_a_time": batch_size, "n_quantiles": int(meta.get("bands", 5)),
        "top_acts_group_size": meta.get("top_n"), "quantile_group_size": meta.get("band_n"),
        "outputs_dir": str(out), "sae_path": str(store.path),
        "featurekit": {"version": __version__, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "store_built": meta.get("built"), "method": meta.get("method"), "site": meta.get("site"),
                       "signed": bool(meta.get("signed")), "dictionary_sha256": meta.get("dictionary_sha256"),
                       "n_tokens": n_tokens, "features_exported": len(exported), "features_skipped": len(skipped),
                       "hist_bins": "the store's log-spaced bins (8 per decade), not 50 equal-width bins",
                       "quantile_groups": "equal-count bands of a uniform sample, not equal-width intervals of [0, max]"}}))
    notes = explanation_records(store, exported, model_id, f"{layer}-{sae_set}" + (f"__{sae_id_suffix}" if sae_id_suffix else ""))
    if notes:
        written.append(atomic_write_json(out / "explanations.json", notes))
    else:
        (out / "explanations.json").unlink(missing_ok=True)
    for stale in out.iterdir():
        m = BATCH_FILE.match(stale.name)
        if m and int(m.group(1)) >= len(batches):
            stale.unlink(missing_ok=True)
    return written
