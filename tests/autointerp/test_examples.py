"""Example construction on the tiny run, checked by brute force: the pool holds the dictionary's exact codes on its
contexts, every non-activating window is silent on every kept token, a neighbour negative shows its partner
firing, explanation and test sets are disjoint windows of the store's examples, the same seed gives the same
files, units with too few examples are skipped and counted; controls are thresholded at their pool quantile."""

import json

import pytest
import torch
from safetensors.torch import load_file

from featurekit import pipeline
from featurekit.autointerp import explain_run
from featurekit.autointerp.examples import ExampleSettings, split
from featurekit.autointerp.hf import HFJudge
from featurekit.dictionaries import load
from featurekit.models.hooks import capture_activations

from .conftest import small

UNITS = [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def constant(judges):
    return HFJudge(str(judges["constant"]))


@pytest.fixture(scope="module")
def built(tiny_run, constant, tmp_path_factory):
    out = tmp_path_factory.mktemp("examples") / "a"
    summary = explain_run(tiny_run, ids=UNITS, judge=constant, out=out, settings=small(scorers=()), progress=False,
                          write_to_store=False)
    return out, summary


def pool_codes(run_dir, out, site_units):
    """The pool contexts' dense codes (P, T, F) by brute force, and the pool's keep mask."""
    cfg = pipeline.load_run_config(run_dir)
    t = load_file(out / "pool.safetensors")
    loaded = pipeline.open_model(cfg)
    acts = capture_activations(loaded.model, t["ids"].long(), [cfg.site])[cfg.site].float()
    with torch.no_grad():
        codes = load(run_dir / "dictionary").encode(acts)
    return t, codes


def test_pool_holds_exact_codes_and_negatives_are_silent(tiny_run, built):
    out, _ = built
    t, codes = pool_codes(tiny_run, out, UNITS)
    keep = t["keep"].bool()
    units = json.loads((out / "pool.json").read_text())["units"]
    assert set(UNITS) <= set(units)
    for u in units:
        dense = torch.zeros(keep.shape)
        sel = t["unit"].long() == u
        dense[t["ctx"].long()[sel], t["pos"].long()[sel]] = t["val"][sel]
        assert torch.allclose(dense, codes[..., u] * keep, atol=1e-5), u
    n_negatives = 0
    for u in UNITS:
        rec = json.loads((out / "examples" / f"{u:07d}.json").read_text())
        assert rec["skipped"] is None
        width = len(rec["negatives"][0]["tokens"])
        for w in rec["negatives"]:
            c, s = w["context"], w["start"]
            assert len(w["tokens"]) == width
            assert (codes[c, s:s + width, u] * keep[c, s:s + width] <= 0).all(), (u, w["kind"])
            if w["kind"] == "neighbour":
                assert w["marks"] and all(codes[c, s + m, w["partner"]] > 0 for m in w["marks"])
            n_negatives += 1
        kinds = {w["kind"] for w in rec["negatives"]}
        assert {"random", "semantic"} <= kinds
    assert n_negatives >= 3 * len(UNITS)


def test_activating_windows_come_from_the_store(tiny_run, built):
    from featurekit.features.store import FeatureStore

    out, _ = built
    store = FeatureStore(tiny_run)
    for u in UNITS:
        rec = json.loads((out / "examples" / f"{u:07d}.json").read_text())
        page = store.feature(u)
        by_key = {(e["context"], e["position"]): e for kind, es in page["examples"].items() for e in es}
        keys = [(w["context"], w["start"] + w["peak"]) for w in rec["explain"] + rec["test"]]
        assert len(keys) == len(set(keys))  # no window both explains and tests
        assert [w["kind"] for w in rec["explain"]] == ["top"] * len(rec["explain"])
        for w in rec["explain"] + rec["test"]:
            e = by_key[(w["context"], w["start"] + w["peak"])]
            assert w["tokens"] == e["tokens"][w["start"]:w["start"] + len(w["tokens"])]
            assert w["acts"] == pytest.approx(e["acts"][w["start"]:w["start"] + len(w["tokens"])], abs=1e-6)
            assert w["value"] == pytest.approx(e["value"]) and w["value"] > 0
        assert rec["promoted"] == [page["token_text"][t] for t, _ in page["logits_pos"]][:10]


def test_same_seed_same_examples_and_skipped_units_counted(tiny_run, built, constant, tmp_path):
    out, summary = built
    again = tmp_path / "b"
    explain_run(tiny_run, ids=UNITS, judge=constant, out=again, settings=small(scorers=()), progress=False, write_to_store=False,
                cache=out / "cache")
    for u in UNITS:
        name = f"examples/{u:07d}.json"
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert summary["skipped"] == [] and summary["with_examples"] == len(UNITS)
    strict = small(scorers=())
    strict.examples = ExampleSettings(n_explain=3, n_test=4, min_explain=50, n_semantic=0)
    s = explain_run(tiny_run, ids=[0, 1], judge=constant, out=tmp_path / "c", settings=strict, progress=False, write_to_store=False)
    assert [x["unit"] for x in s["skipped"]] == [0, 1] and "too few activating examples" in s["skipped"][0]["reason"]
    assert s["explainers"]["highlight"]["explained"] == 0


@pytest.mark.parametrize("units", ["mlp_hidden.1", "random"])
def test_controls_are_thresholded_at_their_quantile(tiny_run, constant, tmp_path, units):
    out = tmp_path / units
    s = explain_run(tiny_run, units=units, n_units=4, judge=constant, out=out, settings=small(scorers=("embedding",), shuffled=True),
                    progress=False)
    meta = json.loads((out / "pool.json").read_text())
    t = load_file(out / "pool.safetensors")
    density = meta["density"]
    assert 0 < density < 0.5
    for u in meta["units"]:
        fired = int((t["unit"] == u).sum())
        assert fired == pytest.approx(density * int(t["keep"].sum()), abs=2)  # the (1 - density) quantile: that share fires
    assert s["requested"] == 4 and "shuffled" in s["explainers"]["highlight"]
    rec = json.loads((out / "examples" / f"{s['ids'][0]:07d}.json").read_text())
    assert rec["explain"] and all(w["source"] == "pool" and w["value"] > 0 for w in rec["explain"] + rec["test"])
    assert len(rec["promoted"]) == 10


def test_split_keeps_explanation_and_test_apart_and_drops_repeats():
    def w(kind, context, tokens, peak=1):
        return {"kind": kind, "source": "store", "context": context, "start": 0, "peak": peak, "tokens": tokens, "acts": []}

    top = [w("top", 0, ["a", "b"]), w("top", 1, ["c", "d"]), w("top", 2, ["a", "b"]), w("top", 3, ["e", "f"]),
           w("top", 4, ["g", "h"])]
    bands = {"band4": [w("band4", 5, ["c", "d"]), w("band4", 6, ["i", "j"])], "band0": [w("band0", 7, ["k", "l"])]}
    explain, test = split({"top": top, **bands}, ExampleSettings(n_explain=3, n_test=10))
    assert [x["context"] for x in explain] == [0, 4]  # ranks 0, 2, 4; rank 2 repeats rank 0's text
    assert [x["context"] for x in test] == [1, 6, 7, 3]  # in turn: top, band4 (5 repeats 1), band0, then the rest
