"""Absorption and steering of a transcoder run (mlp_in.1 → mlp_out.1) on the tiny random Llama: absorption's codes are
the encoder's on the input site and its probes and decoder projections are on the output site (checked against the
scoring function called by hand on those activations); steering adds the decoder rows at the output site, where
adding a vector is the same as adding it to the residual stream after the block (checked by hand), and the strength
search reaches its targets there."""

from __future__ import annotations

import json

import pytest
import torch

from featurekit import pipeline
from featurekit.config import load_config
from featurekit.dictionaries import Transcoder, fileformat
from featurekit.evaluate.absorption import AbsorptionSettings, first_letter_absorption
from featurekit.evaluate.first_letter import LETTERS, alpha_tokens, split_words, word_activations_at
from featurekit.models.hooks import add
from featurekit.models.loading import load_model
from featurekit.pipeline.absorption import TRAIN_FRACTION, run_absorption
from featurekit.pipeline.steering import run_steering


@pytest.fixture(scope="module")
def transcoder_run(tiny, tmp_path_factory):
    """A run folder holding a random transcoder mlp_in.1 → mlp_out.1 of the tiny model (no training needed)."""
    model = str((tiny / "model").resolve())
    cfg = pipeline.resolve(load_config(None, [
        f"out_dir={tmp_path_factory.mktemp('tc_runs')}", "name=tc", f"model.name={model}", "model.dtype=float32",
        f"data.source={tiny / 'text.txt'}", "data.context_len=16", "site=mlp_in.1", "output_site=mlp_out.1",
        "dictionary.method=transcoder", "dictionary.n_latents=48", "dictionary.k=4",
        "eval.absorption_words=0", "eval.absorption_icl=2", "eval.absorption_words_per_sequence=4", "eval.absorption_max_k=3",
        "eval.absorption_l1_steps=20", "eval.steering_features=2", "eval.steering_baselines=1", "eval.steering_targets=0.001,0.002",
        "eval.steering_prompts=2", "eval.steering_prompt_tokens=8", "eval.steering_tokens=256", "eval.steering_top_tokens=3"]))
    torch.manual_seed(0)
    tc = Transcoder(32, 48, k=4, d_out=32)
    with torch.no_grad():
        tc.W_dec.normal_(0, 0.2)
    fileformat.save(tc, cfg.run_dir / "dictionary",
                    metadata={"source": {"model": model, "site": "mlp_in.1", "output_site": "mlp_out.1"}})
    cfg.run_dir.joinpath("config.json").write_text(json.dumps(cfg.to_dict()))
    return cfg, tc.eval()


def test_absorption_of_a_transcoder_reads_its_encoder_on_the_input_and_probes_the_output(transcoder_run):
    cfg, tc = transcoder_run
    loaded = load_model(cfg.model.name, dtype=torch.float32)
    result = run_absorption(cfg, loaded)
    assert result["eval_config"]["site"] == "mlp_in.1" and result["eval_config"]["probe_site"] == "mlp_out.1"
    assert (cfg.run_dir / "evals" / "absorption_first_letter.json").is_file()

    ev = cfg.eval  # the same evaluation by hand
    train, test = split_words(alpha_tokens(loaded.tokenizer), None, TRAIN_FRACTION, cfg.train.seed)
    parts = []
    for words in (train, test):
        seen, y = word_activations_at(loaded.model, loaded.tokenizer, ["mlp_in.1", "mlp_out.1"], words, ev.absorption_icl,
                                      ev.absorption_words_per_sequence, cfg.train.seed, batch_size=ev.batch_contexts)
        with torch.no_grad():
            parts += [seen["mlp_out.1"], tc.encode(seen["mlp_in.1"]).float(), y]
    by_hand = first_letter_absorption(*parts, tc.W_dec.detach().float(), LETTERS,
                                      AbsorptionSettings(max_k=ev.absorption_max_k, l1_steps=ev.absorption_l1_steps))
    assert result["eval_result_unstructured"]["probe_f1"] == {k: v.get("probe_f1") for k, v in by_hand["letters"].items()}
    assert result["eval_result_metrics"]["mean"] == by_hand["mean"]


@torch.no_grad()
def test_steering_a_transcoder_adds_decoder_rows_at_its_output_site(transcoder_run, tiny):
    cfg, tc = transcoder_run
    loaded = load_model(cfg.model.name, dtype=torch.float32)
    result = run_steering(cfg, loaded)
    assert result["eval_config"]["site"] == "mlp_out.1" and result["eval_config"]["input_site"] == "mlp_in.1"
    features = [r for r in result["eval_result_details"] if r["kind"] == "feature"]
    assert features and {r["feature"] for r in features} <= set(range(48))
    reached = [r for r in features if r["reached"]]
    assert reached and all(abs(r["kl"] / r["target_kl"] - 1) <= 0.051 for r in reached if r["within_tolerance"])

    # a vector added to the MLP output reaches the residual stream after the block unchanged
    ids = torch.randint(4, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    v = tc.W_dec[features[0]["feature"]] / tc.W_dec[features[0]["feature"]].norm()
    with add(loaded.model, "mlp_out.1", v, 3.0):
        at_mlp = loaded.model(input_ids=ids).logits
    with add(loaded.model, "resid_post.1", v, 3.0):
        at_resid = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(at_mlp, at_resid, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(at_mlp, loaded.model(input_ids=ids).logits, atol=1e-3)
