"""`featurekit eval --suite absorption,steering` on the tiny random model: both write SAEBench-shaped JSON with
their settings, the skipped letters say why, and the steering search reaches its targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featurekit.cli import main
from featurekit.config.checks import steering_targets
from featurekit.dictionaries import TopKSAE
from featurekit.errors import FeaturekitError
from featurekit.interop import export

ROOT = Path(__file__).parents[2]
FIELDS = ("eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics", "eval_result_details",
          "eval_result_unstructured", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_lens_version",
          "sae_cfg_dict")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurekit.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_eval_suite_absorption_and_steering_write_saebench_fields(tiny, tmp_path, capsys):
    model = str((tiny / "model").resolve())
    sae = TopKSAE(32, 64, k=4, seed=0)
    sae.metadata = {"source": {"model": model, "site": "resid_post.1"}}
    folder = export(sae, "saelens", tmp_path / "saelens_sae")
    assert main(["import", str(folder), "--name", "r", "--set", f"out_dir={tmp_path / 'runs'}", "--set", "model.dtype=float32",
                 "--set", f"data.source={tiny / 'text.txt'}", "--set", "data.context_len=16"]) == 0  # in-process: quicker
    run = tmp_path / "runs" / "r"
    config = json.loads((run / "config.json").read_text())
    config["eval"].update(absorption_words=0, absorption_icl=2, absorption_words_per_sequence=4, absorption_max_k=3,
                          absorption_l1_steps=20, steering_features=2, steering_baselines=2, steering_targets="0.001,0.002",
                          steering_prompts=2, steering_prompt_tokens=8, steering_tokens=256, steering_top_tokens=3)
    (run / "config.json").write_text(json.dumps(config))

    done = cli("eval", str(run), "--suite", "absorption,steering", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "absorption (first letter)" in done.stdout and "KL-matched steering" in done.stdout
    absorption = json.loads((run / "evals" / "absorption_first_letter.json").read_text())
    steering = json.loads((run / "evals" / "steering_kl_matched.json").read_text())
    for result in (absorption, steering):
        assert all(field in result for field in FIELDS) and result["sae_cfg_dict"]["d_sae"] == 64
    assert absorption["eval_type_id"] == "absorption_first_letter"
    assert absorption["eval_config"]["n_words"] == absorption["eval_config"]["n_vocabulary_words"] == 28  # tests/tiny.py's words
    letters = absorption["eval_result_unstructured"]["letters"]
    assert set(letters) == set("abcdefghijklmnopqrstuvwxyz")
    assert "fewer than" in letters["z"]["skipped"]  # no tiny word starts with z
    scored = [letter for letter, row in letters.items() if "skipped" not in row]
    assert [d["first_letter"] for d in absorption["eval_result_details"]] == scored
    assert absorption["eval_result_unstructured"]["warnings"]  # far fewer than SAEBench's 20 letters

    assert steering["eval_type_id"] == "steering_kl_matched"
    assert set(steering["eval_result_metrics"]) == {"feature", "random", "diff_of_means", "pca"}
    rows = steering["eval_result_details"]
    assert {(r["kind"], r["sign"]) for r in rows} == {(k, s) for k in ("feature", "random", "diff_of_means", "pca") for s in (1, -1)}
    assert len(rows) == 4 * 2 * 2 * 2  # kinds × directions × signs × targets
    reached = [r for r in rows if r["reached"]]
    assert len(reached) >= len(rows) // 2
    assert all(abs(r["kl"] / r["target_kl"] - 1) <= 0.051 for r in reached if r["within_tolerance"])
    assert all(len(r["promoted_tokens"]) == 3 for r in rows)

    # --full swaps in the full settings: 32-token prompts do not fit this run's 16-token contexts, and the error says so
    assert main(["eval", str(run), "--suite", "steering", "--full", "--quiet"]) != 0
    assert "eval.steering_prompt_tokens = 32" in capsys.readouterr().err


def test_steering_targets_parse_and_refuse_bad_values():
    assert steering_targets("2,0.5,1,1") == [0.5, 1.0, 2.0]
    for bad in ("", "0,1", "a", "-1", "inf"):
        with pytest.raises(FeaturekitError, match="eval.steering_targets"):
            steering_targets(bad)
