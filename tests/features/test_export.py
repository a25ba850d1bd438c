"""The Neuronpedia / SAEDashboard batch JSON export (`featurekit export neuronpedia`) on a tiny run's store:
every file holds the format's keys with the format's types (the schema below, after SAEDashboard's
`neuronpedia_dashboard.py` and the reader in its `neuronpedia_export.py`), and the numbers are the store's."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from featurekit.cli import main
from featurekit.errors import FeaturekitError
from featurekit.features.export import export_neuronpedia, parse_features
from featurekit.features.store import FILENAME, FeatureStore

from .test_store import tiny_run

NUMBER = (int, float)
# key → type of the value, or [type] for a list of that type
BATCH = {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": (str, type(None)), "features": [dict]}
FEATURE = {
    "feature_index": int,
    "neuron_alignment_indices": [int], "neuron_alignment_values": [NUMBER], "neuron_alignment_l1": [NUMBER],
    "correlated_neurons_indices": [int], "correlated_neurons_l1": [NUMBER], "correlated_neurons_pearson": [NUMBER],
    "correlated_features_indices": [int], "correlated_features_l1": [NUMBER], "correlated_features_pearson": [NUMBER],
    "neg_str": [str], "neg_values": [NUMBER], "pos_str": [str], "pos_values": [NUMBER],
    "frac_nonzero": NUMBER,
    "freq_hist_data_bar_values": [NUMBER], "freq_hist_data_bar_heights": [NUMBER],
    "logits_hist_data_bar_heights": [NUMBER], "logits_hist_data_bar_values": [NUMBER],
    "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str,
    "decoder_weights_dist": [NUMBER], "vector": [NUMBER], "activations": [dict],
}
ACTIVATION = {"bin_min": NUMBER, "bin_max": NUMBER, "bin_contains": NUMBER, "tokens": [str], "values": [NUMBER],
              "qualifying_token_index": int}
SKIPPED = {"model_id": str, "layer": str, "sae_set": str, "log_sparsity": NUMBER, "skipped_indexes": [int]}
SAME_LENGTH = [("pos_str", "pos_values"), ("neg_str", "neg_values"),
               ("freq_hist_data_bar_values", "freq_hist_data_bar_heights"),
               ("logits_hist_data_bar_values", "logits_hist_data_bar_heights"),
               ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1"),
               ("correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson"),
               ("correlated_features_indices", "correlated_features_l1", "correlated_features_pearson")]
ODD_TOKENS = [" the", "  two spaces", "\n", "\t", "", "é", "日本", "🙂", '"quoted"', "back\\slash", "<|endoftext|>",
              "\u00a0nbsp", "\u200b", "\ufffd", "</script>", "Ġspace"]


def check(obj: dict, schema: dict, where: str) -> None:
    """Every key of `schema` in `obj` with its type (bools are not numbers); lists hold one type."""
    missing = set(schema) - set(obj)
    assert not missing, f"{where}: missing {sorted(missing)}"
    for key, kind in schema.items():
        value = obj[key]
        if isinstance(kind, list):
            assert isinstance(value, list), f"{where}.{key} is not a list"
            assert all(isinstance(v, kind[0]) and not isinstance(v, bool) for v in value), f"{where}.{key}: {value}"
        else:
            assert isinstance(value, kind) and not isinstance(value, bool), f"{where}.{key} = {value!r}"


def load(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def batches(out):
    files = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    assert [p.name for p in files] == [f"batch-{i}.json" for i in range(len(files))]
    return [load(p) for p in files]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    return tiny_run(tiny, tmp_path_factory.mktemp("export"))


def test_batch_json_has_the_format_and_the_stores_numbers(run, tmp_path):
    store = FeatureStore(run.run_dir)
    out = tmp_path / "np"
    written = export_neuronpedia(store, out, batch_size=16, model_id="tiny-llama")
    assert {p.name for p in written} == {p.name for p in out.iterdir()}
    data = batches(out)
    meta = store.meta
    live = {f["id"] for f in store.list_features(sort="id", limit=store.n_latents, live_only=True)}
    exported = [f["feature_index"] for b in data for f in b["features"]]
    assert exported == sorted(live) and all(len(b["features"]) <= 16 for b in data)
    skipped = load(out / "skipped_indexes.json")
    check(skipped, SKIPPED, "skipped_indexes")
    assert skipped["skipped_indexes"] == sorted(set(range(store.n_latents)) - live)
    settings = load(out / "run_settings.json")
    assert settings["featurekit"]["dictionary_sha256"] == meta["dictionary_sha256"]
    for b in data:
        check(b, BATCH, "batch")
        assert (b["model_id"], b["layer"], b["sae_set"]) == ("tiny-llama", 1, "featurekit-topk-resid-post")
        for feat in b["features"]:
            f = feat["feature_index"]
            where = f"feature {f}"
            check(feat, FEATURE, where)
            for keys in SAME_LENGTH:
                assert len({len(feat[k]) for k in keys}) == 1, (where, keys)
            page = store.feature(f)
            # density, histogram and logit effects are the store's
            assert feat["frac_nonzero"] == page["density"]
            assert sum(feat["freq_hist_data_bar_heights"]) == page["fires"]
            assert feat["freq_hist_data_bar_values"] == sorted(feat["freq_hist_data_bar_values"])
            bars = feat["freq_hist_data_bar_values"]  # centres of log bins 10^(1/8) wide: within a factor 1.155
            assert bars[0] / 1.16 <= page["min"] <= bars[0] * 1.16 and bars[-1] / 1.16 <= page["max"] <= bars[-1] * 1.16
            assert feat["pos_str"] == [page["token_text"][t] for t, _ in page["logits_pos"]]
            assert feat["neg_values"] == pytest.approx([v for _, v in page["logits_neg"]])
            assert (feat["n_prompts_total"], feat["n_tokens_in_prompt"]) == (meta["n_contexts"], meta["context_len"])
            # activations: tokens and per-token values of the store's examples, the top group first (descending),
            # then the quantile groups from the highest band down, each example inside its group's range
            acts = feat["activations"]
            store_examples = [e for kind in ["top"] + [f"band{b}" for b in reversed(range(5))]
                              for e in page["examples"].get(kind, [])]
            assert len(acts) == len(store_examples) > 0
            by_position = {(tuple(e["tokens"]), e["position"]) for e in store_examples}
            for i, a in enumerate(acts):
                check(a, ACTIVATION, f"{where} activation {i}")
                assert len(a["tokens"]) == len(a["values"]) == meta["context_len"]
                assert (tuple(a["tokens"]), a["qualifying_token_index"]) in by_position
                assert 0 <= a["qualifying_token_index"] < len(a["values"])
                assert a["values"][a["qualifying_token_index"]] > 0
            top = [a for a in acts if a["bin_min"] == -1]
            assert acts[:len(top)] == top and len(top) == len(page["examples"]["top"])
            assert all(a["bin_max"] == pytest.approx(page["max"], rel=1e-5) and a["bin_contains"] == -1 for a in top)
            qualifying = [a["values"][a["qualifying_token_index"]] for a in top]
            assert qualifying == sorted(qualifying, reverse=True)
            assert max(max(a["values"]) for a in acts) == pytest.approx(page["max"], rel=1e-5)
            assert max(acts[0]["values"]) == qualifying[0] == pytest.approx(page["max"], rel=1e-5)
            groups = [a for a in acts if a["bin_min"] != -1]
            lows = [a["bin_min"] for a in groups]
            assert lows == sorted(lows, reverse=True)
            for a in groups:
                assert a["bin_min"] <= a["values"][a["qualifying_token_index"]] <= a["bin_max"]
                assert a["bin_contains"] == pytest.approx(page["fires"] / 5 / meta["n_tokens"], rel=1e-5)
            total = sum(len(examples) for examples in page["examples"].values())
            assert total == len(acts)


def test_token_strings_survive_exactly(run, tmp_path):
    """Spaces, control characters, non-ASCII, quotes and markup in token texts come out as the store holds them."""
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run.run_dir / FILENAME, copy / FILENAME)
    db = sqlite3.connect(copy / FILENAME)
    ids = [r[0] for r in db.execute("SELECT id FROM tokens ORDER BY id")]
    db.executemany("UPDATE tokens SET text = ? WHERE id = ?", [(ODD_TOKENS[i % len(ODD_TOKENS)], t) for i, t in enumerate(ids)])
    db.commit()
    db.close()
    store = FeatureStore(copy)
    export_neuronpedia(store, tmp_path / "np", features=range(8))
    seen = set()
    for feat in batches(tmp_path / "np")[0]["features"]:
        page = store.feature(feat["feature_index"])
        assert feat["pos_str"] == [page["token_text"][t] for t, _ in page["logits_pos"]]
        store_tokens = {tuple(e["tokens"]) for examples in page["examples"].values() for e in examples}
        for a in feat["activations"]:
            assert tuple(a["tokens"]) in store_tokens
            seen.update(a["tokens"])
    assert len(seen & set(ODD_TOKENS)) >= 8


def test_signed_codes_export_the_positive_tail(run, tmp_path):
    """A signed store: the format shows positive activations, so negative examples and counts stay out."""
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run.run_dir / FILENAME, copy / FILENAME)
    store = FeatureStore(copy)
    f = store.list_features(limit=1)[0]["id"]
    page = store.feature(f)
    negative = [0] * 64
    negative[30] = 7
    top = page["examples"]["top"][0]
    db = sqlite3.connect(copy / FILENAME)
    db.execute("UPDATE meta SET value = 'true' WHERE key = 'signed'")
    db.execute("UPDATE features SET hist = ?, fires = fires + 7 WHERE id = ?",
               (json.dumps({**page["hist"], "negative": negative}), f))
    acts = db.execute("SELECT acts FROM examples WHERE feature = ? AND kind = 'top' AND rank = 0", (f,)).fetchone()[0]
    db.execute("INSERT INTO examples VALUES (?, 'bottom', 0, ?, ?, -0.25, ?)", (f, top["context"], top["position"], acts))
    db.execute("INSERT INTO examples VALUES (?, 'negband0', 0, ?, ?, -0.25, ?)", (f, top["context"], top["position"], acts))
    db.commit()
    db.close()
    store = FeatureStore(copy)
    export_neuronpedia(store, tmp_path / "np", features=[f])
    feat = batches(tmp_path / "np")[0]["features"][0]
    assert feat["frac_nonzero"] == pytest.approx(page["fires"] / store.meta["n_tokens"])
    assert sum(feat["freq_hist_data_bar_heights"]) == page["fires"]
    assert len(feat["activations"]) == sum(len(v) for v in page["examples"].values())


def test_command_line_and_feature_selection(run, tmp_path):
    out = tmp_path / "np"
    assert main(["export", "neuronpedia", str(run.run_dir), "--out", str(out), "--features", "0-3,9", "--batch-size", "2"]) == 0
    assert sorted(p.name for p in out.glob("batch-*.json")) == ["batch-0.json", "batch-1.json", "batch-2.json"]
    live = {f["id"] for f in FeatureStore(run.run_dir).list_features(limit=64, live_only=True)}
    assert [f["feature_index"] for b in batches(out) for f in b["features"]] == [f for f in (0, 1, 2, 3, 9) if f in live]
    # a smaller export replaces the earlier batches
    assert main(["export", "neuronpedia", str(run.run_dir), "--out", str(out), "--features", "9"]) == 0
    assert [p.name for p in out.glob("batch-*.json")] == ["batch-0.json"]
    assert main(["export", "neuronpedia", str(run.run_dir), "--out", str(out), "--features", "60-70"]) == 2
    assert main(["export", "neuronpedia", str(tmp_path / "no_run")]) == 2
    assert not (tmp_path / "no_run").exists()


def test_parse_features():
    assert parse_features("0-3, 9,2", 10) == [0, 1, 2, 3, 9]
    for bad in ("3-1", "10", "a", "1-", ""):
        with pytest.raises(FeaturekitError):
            parse_features(bad, 10)
