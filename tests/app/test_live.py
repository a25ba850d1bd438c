"""The explorer's live calls in process: try-a-text equals the dictionary on a capture of the same text, requests
that arrive while the model loads wait for the one load, steering with strength 0 changes nothing and a real
strength changes the continuation (at a transcoder's output site too)."""

from __future__ import annotations

import threading

import pytest
import torch

from featurekit import tokenize
from featurekit.app import live
from featurekit.app.runs import Runs
from featurekit.data.harvest import norm_outliers
from featurekit.models.hooks import capture_activations

TEXT = "the big cat sat on the red mat under a green tree"


@pytest.fixture(scope="module")
def runs(app_runs):
    r = Runs(list(app_runs.values()))
    yield r
    r.close()


def test_concurrent_first_use_loads_the_model_once(runs):
    models = live.Models()
    results, errors = [], []

    def call(name: str) -> None:
        try:
            results.append((name, live.text_codes(models, runs.get(name), TEXT)))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=call, args=(name,)) for name in ("topk", "topk", "abstopk", "itda")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4
    assert len(models._entries) == 1  # the runs share one model (same name, dtype, device)
    assert models.use(runs.get("topk"))[0] is models.use(runs.get("itda"))[0]
    topk = [r for name, r in results if name == "topk"]
    assert topk[0].per_token == topk[1].per_token


@pytest.mark.parametrize("name", ["topk", "abstopk", "transcoder", "snmf"])
def test_try_a_text_equals_the_dictionary_on_a_capture(runs, name):
    run = runs.get(name)
    models = live.Models()
    got = live.text_codes(models, run, TEXT)
    loaded, _ = models.use(run)
    sae = run.dictionary()
    policy = sae.metadata["special_tokens"]
    ids, keep = tokenize(loaded.tokenizer, [TEXT], policy)
    acts = capture_activations(loaded.model, ids, [run.site])[run.site].float()
    keep = (keep & ~norm_outliers(acts, keep, policy.get("max_norm_multiple")))[0]
    with torch.no_grad():
        codes = sae.encode(acts[0]) * keep[:, None]
    assert got.kept == keep.tolist() and "".join(got.tokens) == TEXT
    peaks = run.store.peaks()
    for t, row in enumerate(got.per_token):
        nz = codes[t].nonzero().flatten().tolist()
        assert {f for f, *_ in row} <= set(nz) and len(row) == min(len(nz), live.PER_TOKEN)
        for f, value, rel in row:
            assert value == pytest.approx(float(codes[t, f]), rel=1e-5, abs=1e-6)
            if peaks[f]:
                assert rel == pytest.approx(abs(value) / peaks[f], rel=1e-5)
        rels = [r for *_, r in row]
        assert rels == sorted(rels, reverse=True)
    for f, value, rel, fired, acts_f in got.on_text:
        assert fired == int((codes[:, f] != 0).sum()) and acts_f == pytest.approx(codes[:, f].tolist(), abs=1e-4)
        assert abs(value) == pytest.approx(float(codes[:, f].abs().max()), rel=1e-5)
        assert rel == (pytest.approx(abs(value) / peaks[f], rel=1e-5) if peaks[f] else pytest.approx(0, abs=1e-9))


@pytest.mark.parametrize("name", ["topk", "transcoder"])
def test_steering(runs, name):
    run = runs.get(name)
    models = live.Models()
    f = run.store.list_features("fires", True, 0, 1)[0]["id"]
    zero = live.steer_text(models, run, "the cat sat on", [(f, 0.0)], 8)
    assert zero.steered == zero.plain and zero.site == run.decoder_site and zero.reference_norm > 0
    strong = live.steer_text(models, run, "the cat sat on", [(f, 40.0)], 8)
    assert strong.plain == zero.plain and strong.steered != strong.plain
    assert strong.added == [(f, 40.0, pytest.approx(40.0 * strong.reference_norm))]


def test_limits(runs):
    run, models = runs.get("topk"), live.Models()
    with pytest.raises(live.TooLarge, match="4,000"):
        live.text_codes(models, run, "a" * 4001)
    with pytest.raises(live.BadRequest, match="type a text"):
        live.text_codes(models, run, "   ")
    with pytest.raises(live.BadRequest, match="not a feature"):
        live.parse_steering([("64", "1")], run.n_latents)
    assert live.parse_steering([("3", "-2.5"), ("", "1")], run.n_latents) == [(3, -2.5)]
