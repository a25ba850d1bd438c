"""`featurekit bench synthetic`: the CLI end to end, determinism, error rows and the claim rules."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from featurekit.bench.claims import CLAIMS, evaluate_claims, interpolate
from featurekit.bench.synthetic import make_config, run_benchmark
from featurekit.dictionaries import METHODS
from featurekit.errors import FeaturekitError


def test_quick_cli_run_writes_every_file_and_topk_recovers_the_features(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "featurekit.cli", "bench", "synthetic", "--quick", "--methods", "topk,relu",
                           "--dataset", "default", "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("results.json", "results.md", "timings.json", "bench.png", "bench.svg"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"topk", "relu"} and all("error" not in r for r in rows.values())
    assert rows["topk"]["mmcs_true_to_learned"] >= 0.9  # TopK at the true k recovers the features
    assert rows["topk"]["recovered_fraction"] >= 0.8
    claims = {c["id"]: c for c in results["claims"]}
    assert claims["topk_recovers"]["verdict"] == "holds"
    assert claims["topk_absorption"]["verdict"] == "not run (dataset not selected)"
    md = (out / "results.md").read_text()
    assert "| default | topk |" in md and "## Claims" in md
    assert (out / "bench.svg").read_text().lstrip().startswith("<?xml")


def tiny(**over):
    base = {"quick": True, "d": 8, "n_features": 16, "k": 2, "latents": 16, "tokens": 4096, "eval_tokens": 2048,
            "datasets": ["hierarchical"]}
    return make_config(**{**base, **over})


def test_results_json_depends_only_on_the_options(tmp_path):
    threads = torch.get_num_threads()
    cfg = tiny(methods=["topk", "batchtopk"], n_features=24)
    run_benchmark(cfg, tmp_path / "a", log=lambda line: None, figures=False)
    run_benchmark(cfg, tmp_path / "b", log=lambda line: None, figures=False)
    a, b = ((tmp_path / x / "results.json").read_bytes() for x in "ab")
    assert a == b
    assert (tmp_path / "a" / "results.md").read_bytes() == (tmp_path / "b" / "results.md").read_bytes()
    assert torch.get_num_threads() == threads  # the benchmark's one thread is not left behind
    other = tiny(methods=["topk"], n_features=24, seed=1)
    run_benchmark(other, tmp_path / "c", log=lambda line: None, figures=False)
    assert json.loads((tmp_path / "c" / "results.json").read_text())["rows"][0] != json.loads(a)["rows"][0]


def test_a_failing_method_is_an_error_row_not_the_end(tmp_path):
    cfg = tiny(methods=["topk", "relu"], latents=1, datasets=["default"])  # TopK refuses k=2 > 1 latent; ReLU trains
    results = run_benchmark(cfg, tmp_path, log=lambda line: None, figures=False)
    rows = {r["method"]: r for r in results["rows"]}
    assert "k must be in" in rows["topk"]["error"]
    assert "error" not in rows["relu"] and math.isfinite(rows["relu"]["fvu"])
    assert "| default | topk | error: " in (tmp_path / "results.md").read_text()
    assert {c["id"]: c["verdict"] for c in results["claims"]}["topk_recovers"] == "not run (method failed)"


def test_options_are_checked():
    with pytest.raises(FeaturekitError, match="unknown method"):
        make_config(methods=["topk", "nope"])
    with pytest.raises(FeaturekitError, match="unknown synthetic dataset"):
        make_config(datasets=["flat"])
    with pytest.raises(FeaturekitError, match="less than one batch"):
        make_config(tokens=10)
    assert make_config(quick=True, tokens=4096).tokens == 4096  # explicit options override --quick


def test_interpolation_at_matched_l0():
    curve = [[3.0, 0.3], [4.0, 0.2], [5.0, 0.15]]
    assert interpolate(curve, 3.5) == pytest.approx(0.25)
    assert interpolate(curve, 4.0) == pytest.approx(0.2)
    assert interpolate(curve, 2.0) == pytest.approx(0.4)  # linear extrapolation below
    assert interpolate(curve, 6.0) == pytest.approx(0.1)  # and above


def row(dataset, method, **values):
    base = {"fvu": 0.2, "l0": 4.0, "dead_fraction": 0.1, "mmcs_true_to_learned": 0.95, "recovered_fraction": 0.9,
            "l0_std": 0.0, "l0_true_corr": None}
    return {"dataset": dataset, "method": method, **base, **values}


def test_claim_verdicts_follow_the_numbers_and_what_ran():
    rows = [row("default", "topk", l0_fvu_curve=[[3.0, 0.3], [4.0, 0.2], [5.0, 0.15]]),
            row("default", "batchtopk", l0=3.5, fvu=0.24), row("default", "vsae", dead_fraction=0.05),
            row("default", "topafa", l0_std=2.0, l0_true_corr=0.5), row("default", "featurechoice", error="RuntimeError: boom")]
    registered = set(METHODS) | {"topk", "batchtopk", "vsae", "topafa", "featurechoice", "mutualchoice"}
    claims = {c["id"]: c for c in evaluate_claims(rows, ["default"], {"topk", "batchtopk", "vsae", "topafa", "featurechoice"},
                                                  registered - {"mpsae"})}
    assert claims["topk_recovers"]["verdict"] == "holds"
    assert claims["batchtopk_vs_topk"]["verdict"] == "holds"  # 0.24 < 0.25 (TopK interpolated at L0 3.5)
    assert claims["batchtopk_vs_topk"]["numbers"]["topk_fvu_at_that_l0"] == pytest.approx(0.25)
    assert claims["vsae_more_dead"]["verdict"] == "does not hold"
    assert claims["topafa_adaptive"]["verdict"] == "holds"
    assert claims["mc_fewer_dead"]["verdict"] == "not run (method not selected)"  # mutualchoice not selected
    assert claims["mpsae_hierarchy"]["verdict"] == "not run (method missing)"
    assert claims["topk_absorption"]["verdict"] == "not run (dataset not selected)"
    failed = evaluate_claims(rows, ["default"], {"topk", "featurechoice", "mutualchoice"}, registered)
    assert {c["id"]: c["verdict"] for c in failed}["fc_fewer_dead"] == "not run (method failed)"
    assert {c["id"] for c in CLAIMS} == set(claims)


@pytest.mark.skipif("itda" not in METHODS, reason="ITDA is not registered")
def test_a_fitter_reads_the_training_stream(tmp_path):
    """ITDA (a `Dictionary.fitter`) is fitted by `fit_stream` over the same synthetic tokens, not by the Trainer."""
    results = run_benchmark(tiny(methods=["itda"], datasets=["default"]), tmp_path, log=lambda line: None, figures=False)
    (row,) = results["rows"]
    assert "error" not in row, row.get("error")
    assert math.isfinite(row["fvu"]) and row["l0"] > 0
