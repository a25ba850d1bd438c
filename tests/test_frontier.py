"""`bench frontier` on a tiny random Llama: one harvest, several methods × sparsities, calibrated knobs, resumable
results, the suite at matched L0, a transcoder frontier and the combined table."""

import json
import math

import pytest

from featurekit.bench.frontier import FrontierConfig, combine, run_config, run_frontier
from featurekit.bench.frontier_calibration import CALIBRATED, Knob, next_trial, sweep
from featurekit.bench.frontier_suite import SuiteSettings, matched_points
from featurekit.errors import FeaturekitError


def tiny_config(tiny, methods, **options):
    return FrontierConfig(model=str(tiny / "model"), site=options.pop("site", "resid_post.1"), source=str(tiny / "text.txt"),
                          train_tokens=3000, epochs=2, latents=64, batch_size=256, ks=[2, 6], methods=methods, eval_tokens=600,
                          splice_contexts=8, **options)


def test_frontier_rows_files_and_resume(tiny, tmp_path):
    fc = tiny_config(tiny, ["topk", "jumprelu", "gsae"])
    lines = []
    result = run_frontier(fc, tmp_path / "f", log=lines.append)
    rows = result["rows"]
    assert [(r["method"], r["value"]) for r in rows if r["method"] != "jumprelu"] == [("topk", 2), ("topk", 6), ("gsae", 2), ("gsae", 6)]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    topk = {r["value"]: r for r in rows if r["method"] == "topk"}
    assert topk[2]["l0"] <= 2 < topk[6]["l0"] <= 6 and topk[6]["fvu"] < topk[2]["fvu"]  # more latents, better fit
    assert all(0 < r["fvu"] < 1.5 and r["kl_clean_spliced"] >= 0 and "loss_recovered" in r for r in rows)
    # JumpReLU's initial firing rate is searched toward the targets: first the middle target (6 of 64 latents)
    jump = [r for r in rows if r["method"] == "jumprelu"]
    assert 2 <= len(jump) <= CALIBRATED["jumprelu"].max_trials and jump[0]["value"] == 6 / 64 and jump[0]["target_l0"] == 6
    assert [r["trial"] for r in jump] == list(range(1, len(jump) + 1))
    assert any(abs(math.log(r["l0"] / 6)) <= math.log1p(fc.l0_tolerance) for r in jump), [r["l0"] for r in jump]
    out = tmp_path / "f"
    assert (out / "frontier.png").stat().st_size > 0 and (out / "frontier.svg").is_file()
    assert "| topk | k=2 |" in (out / "results.md").read_text() and "(→ 6)" in (out / "results.md").read_text()
    assert not (out / "topk-k2").exists()  # dictionaries are removed after scoring
    # a second run with the same options keeps every finished row and trains nothing
    lines.clear()
    again = run_frontier(fc, out, log=lines.append)
    assert again["rows"] == json.loads((out / "results.json").read_text())["rows"] == rows and len(lines) == 1


def test_next_trial_is_a_secant_search_in_log_log_space():
    knob = Knob("x", 1.0, rises=False)
    assert next_trial(knob, [], [16, 32, 64], 0.15, 2304) == (32, 1.0)  # the middle target first, at the start value
    target, value = next_trial(knob, [(1.0, 64.0)], [16, 32, 64], 0.15, 2304)  # one point: slope −1 (L0 falls with x)
    assert (target, value) == (32, 2.0)
    # L0 = 64 / x² measured at x = 1 and 2: the secant finds the exact power law, x = √2 for 32
    assert next_trial(knob, [(1.0, 64.0), (2.0, 16.0)], [16, 32, 64], 0.15, 2304) == (32, 1.41)
    # every target within 15 %: done; a knob that does not move L0: give up
    assert next_trial(knob, [(1.0, 17.0), (2.0, 30.0), (3.0, 70.0)], [16, 32, 64], 0.15, 2304) is None
    assert next_trial(knob, [(1.0, 100.0), (2.0, 100.5)], [16, 32, 64], 0.15, 2304) is None
    # steps are capped at a factor 16 and a rate stays below its bound
    assert next_trial(knob, [(1.0, 64000.0)], [32], 0.15, 2304) == (32, 16.0)
    rate = Knob("r", None, rises=True, high=0.5)
    assert next_trial(rate, [], [16, 32, 64], 0.15, 2304) == (32, 32 / 2304)
    assert next_trial(rate, [(0.3, 1.0), (0.4, 2.0)], [32], 0.15, 2304)[1] < 0.5
    # and above its lower bound (GBA's freq_high may not fall below freq_low: the real frontier's trial 0.000397 did)
    floor = Knob("f", 0.05, rises=True, high=0.5, low=0.001)
    assert next_trial(floor, [(0.006, 23.0), (0.05, 26.0)], [16], 0.15, 2304)[1] >= 0.001


def test_a_sweep_of_a_setting_the_method_lacks_is_refused(tiny, tmp_path):
    """SNMF has no k: the frontier used to set an attribute its fit never read (three identical points); a setting
    a method lacks is refused, and SNMF sweeps its share of neurons per feature instead."""
    fc = tiny_config(tiny, ["snmf"])
    with pytest.raises(FeaturekitError, match="no setting 'k'"):
        run_config(fc, tmp_path, "p", {"method": "snmf", "k": 16})
    assert run_config(fc, tmp_path, "p", {"method": "snmf", "sparsity": 0.05}).dictionary.params.sparsity == 0.05
    assert sweep("snmf", [16, 32, 64])[0] == "sparsity"


def test_suite_at_matched_l0_transcoder_frontier_and_combined_table(tiny, tmp_path):
    suite = SuiteSettings(target_l0=5, probing_train_docs=6, probing_test_docs=4, probing_tokens=16, probing_ks=(1, 2),
                          absorption_words=60, absorption_icl=2, absorption_words_per_sequence=4, absorption_l1_steps=20,
                          absorption_max_k=3, steering_features=2, steering_random=2, steering_targets=(0.01,),
                          steering_prompt_tokens=8)
    a = run_frontier(tiny_config(tiny, ["topk", "batchtopk"]), tmp_path / "a", suite=suite, log=lambda line: None)
    assert set(a["suite"]["points"]) == {"topk", "batchtopk"}
    topk = a["suite"]["points"]["topk"]
    assert topk["row"]["value"] == 6  # L0 6 is nearer 5 than L0 2
    assert 0 <= topk["probing"]["sae_top_1_test_accuracy"] <= 1 and "sae_top_2_test_accuracy" in topk["probing"]
    assert "n_scored_letters" in topk["absorption"] and topk["steering"]["directions"] == 4
    assert a["suite"]["random"]["steering"]["directions"] == 4
    assert set(a["suite"]["seconds"]) == {"probing", "absorption", "steering"}
    # a rerun finds every evaluation done and runs none
    lines = []
    run_frontier(tiny_config(tiny, ["topk", "batchtopk"]), tmp_path / "a", suite=suite, log=lines.append)
    assert not any(line.startswith("suite") for line in lines)
    # the same options, another method, then one table
    run_frontier(tiny_config(tiny, ["vsae"]), tmp_path / "b", suite=suite, log=lambda line: None)
    both = combine([tmp_path / "a", tmp_path / "b"], tmp_path / "c")
    assert {r["method"] for r in both["rows"]} == {"topk", "batchtopk", "vsae"}
    assert set(both["suite"]["points"]) == {"topk", "batchtopk", "vsae"}
    md = (tmp_path / "c" / "results.md").read_text()
    assert "| vsae |" in md and "random directions" in md and (tmp_path / "c" / "frontier.png").is_file()
    # the suite once over the matched points of both folders: the same numbers as each folder's own suite
    once = combine([tmp_path / "a", tmp_path / "b"], tmp_path / "e", suite=suite, log=lambda line: None)["suite"]
    assert set(once["points"]) == {"topk", "batchtopk", "vsae"} and (tmp_path / "e" / "suite.json").is_file()
    for method in ("topk", "vsae"):
        for key in ("n_scored_letters", "mean_absorption_fraction_score"):
            assert once["points"][method]["absorption"].get(key) == both["suite"]["points"][method]["absorption"].get(key)
        top1 = "sae_top_1_test_accuracy"
        assert once["points"][method]["probing"][top1] == both["suite"]["points"][method]["probing"][top1]
    # a transcoder frontier: mlp_in.1 → mlp_out.1, spliced at mlp_out.1; it does not combine with a resid_post.1 one
    tc = run_frontier(tiny_config(tiny, ["transcoder"], site="mlp_in.1", output_site="mlp_out.1"), tmp_path / "t",
                      log=lambda line: None)["rows"]
    with pytest.raises(FeaturekitError, match="other options"):
        combine([tmp_path / "a", tmp_path / "t"], tmp_path / "d")
    assert [r["value"] for r in tc] == [2, 6] and all("error" not in r and r["delta_ce"] == r["delta_ce"] for r in tc)
    with pytest.raises(FeaturekitError, match="predict another site"):
        run_frontier(tiny_config(tiny, ["topk"], site="mlp_in.1", output_site="mlp_out.1"), tmp_path / "x")


def test_matched_points_take_the_nearest_l0_in_log_distance():
    rows = [{"method": "a", "l0": 16.0}, {"method": "a", "l0": 60.0}, {"method": "a", "error": "x"}, {"method": "b", "l0": 20.0}]
    got = matched_points(rows, 32)
    assert got["a"]["l0"] == 60.0 and got["b"]["l0"] == 20.0  # 60/32 = 1.875 is nearer than 32/16 = 2


def test_cached_splice_gives_the_numbers_of_splice_eval(tiny):
    import torch

    from featurekit.bench.frontier_splice import CachedSplice
    from featurekit.dictionaries import TopKSAE
    from featurekit.evaluate.splice import splice_eval
    from featurekit.models.loading import load_model

    loaded = load_model(str(tiny / "model"))
    ids = torch.randint(4, 30, (5, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    cached = CachedSplice(loaded.model, "resid_post.1", ids, mask, 50.0, batch_contexts=2)
    for seed in (0, 1):
        sae = TopKSAE(32, 64, k=4, seed=seed)
        got, want = cached(sae), splice_eval(loaded.model, sae, "resid_post.1", ids, mask, 2, progress=False, max_norm_multiple=50.0)
        assert set(got) == set(want)
        for key in want:
            assert abs(got[key] - want[key]) < 1e-9, key
