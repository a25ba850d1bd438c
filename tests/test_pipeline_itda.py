"""`dictionary.method=itda` through the whole job on the tiny model: fitted (not trained), evaluated, reported,
and resumable like a trained run."""

import json

import pytest

import featurekit
from featurekit import pipeline
from featurekit.dictionaries.itda import ITDAFitter

from .test_pipeline import config


@pytest.mark.parametrize("cache", [True, False])
def test_itda_end_to_end(tiny, tmp_path, cache):
    cfg = config(tiny, tmp_path, "name=itda", "dictionary.method=itda", "dictionary.threshold=0.002",
                 f"data.cache={str(cache).lower()}", "dictionary.n_latents=1024")
    report = pipeline.run_all(cfg, progress=False)
    run = cfg.run_dir
    assert report.is_file()
    sae = featurekit.load(run / "dictionary")
    assert sae.method == "itda" and 0 < sae.n_latents < 1024 and sae.d_in == 32
    meta = sae.metadata
    assert meta["inference_rule"]["activation"] == "matching_pursuit" and meta["provenance"]["tokens_seen"] > 0
    # every atom is a real training token: its provenance points into the training contexts
    ids, mask = pipeline.contexts(pipeline.open_model(cfg), cfg, "train", cfg.data.train_tokens)
    assert mask[sae.atom_context, sae.atom_position].all()
    assert (ids[sae.atom_context, sae.atom_position] == sae.atom_token).all()
    result = json.loads((run / "eval.json").read_text())
    assert 0 < result["fvu"] < 1 and 0 < result["l0"] <= 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["n_atoms"] == sae.n_latents and [r["n_atoms"] for r in rows] == sorted(r["n_atoms"] for r in rows)
    assert rows[-1]["added_fraction"] < rows[0]["added_fraction"] / 2  # the dictionary saturates
    examples = json.loads((run / "features" / "top_examples.json").read_text())
    # codes are signed; the feature store keeps positive activations only, so a latent used only negatively has none
    assert len(examples) == 3 and any(ex["examples"] for ex in examples)


def test_itda_run_resumes_after_a_kill(tiny, tmp_path, monkeypatch):
    base = ("dictionary.method=itda", "dictionary.threshold=0.002", "dictionary.n_latents=1024", "train.checkpoint_every=3")
    ref = config(tiny, tmp_path, "name=ref", *base)
    pipeline.run_all(ref, progress=False)
    cfg = config(tiny, tmp_path, "name=res", *base)
    cfg.run_dir.mkdir(parents=True)
    pipeline.save_config(cfg)
    pipeline.run_harvest(cfg, progress=False)
    update, calls = ITDAFitter.update, []

    def killed_after_7_steps(self, *args):
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt("killed")
        return update(self, *args)

    monkeypatch.setattr(ITDAFitter, "update", killed_after_7_steps)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_train(cfg, progress=False)
    monkeypatch.setattr(ITDAFitter, "update", update)
    state = json.loads((cfg.run_dir / "checkpoint" / "state.json").read_text())
    assert state["kind"] == "fitter" and state["step"] == 6 and not (cfg.run_dir / "dictionary").exists()
    pipeline.run_all(cfg, progress=False)  # finds the checkpoint and no dictionary: resumes
    a, b = featurekit.load(ref.run_dir / "dictionary"), featurekit.load(cfg.run_dir / "dictionary")
    assert a.atom_labels() == b.atom_labels() and a.n_latents == b.n_latents
