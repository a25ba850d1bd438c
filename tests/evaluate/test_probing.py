"""Sparse probing: the probe and the latent selection on hand-built cases, and `featurekit eval --suite probing`
on the tiny random model writing SAEBench's fields."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.errors import FeaturekitError
from featurekit.evaluate.probes import fit_logistic, mean_difference_latents, pca_basis
from featurekit.evaluate.probing import balanced_task, probe_accuracies

from .conftest import cli


def separable(seed: int, n: int = 120, d: int = 8, column: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian rows whose label is the sign of one column, pushed at least 1 away from the boundary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % 2 == 0
    x[:, column] = torch.where(y, 1.0, -1.0) * (1 + x[:, column].abs())
    return x, y


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_probe_reaches_one_on_a_separable_task_and_chance_on_shuffled_labels(seed):
    x, y = separable(seed, n=400)
    assert fit_logistic(x[:200], y[:200]).accuracy(x[200:], y[200:]) == 1.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
    assert abs(fit_logistic(x[:200], shuffled[:200]).accuracy(x[200:], shuffled[200:]) - 0.5) < 0.15


def test_mean_difference_picks_the_columns_whose_class_means_differ_most():
    y = torch.tensor([True, True, False, False])
    x = torch.tensor([[0.0, 5.0, 1.0, 0.0, 2.0],
                      [0.0, 5.0, 1.0, 0.0, 2.0],
                      [0.0, 0.0, 4.0, 0.0, 1.0],
                      [0.0, 0.0, 4.0, 0.0, 1.0]])  # differences 0, +5, -3, 0, +1
    assert mean_difference_latents(x, y, 1).tolist() == [1]
    assert mean_difference_latents(x, y, 3).tolist() == [1, 2, 4]  # a negative difference counts by its size
    assert mean_difference_latents(x, y, 5).tolist() == [1, 2, 4, 0, 3]  # ties: the lower index first
    with pytest.raises(FeaturekitError, match="between 1 and"):
        mean_difference_latents(x, y, 6)
    with pytest.raises(FeaturekitError, match="both classes"):
        mean_difference_latents(x, torch.ones(4, dtype=torch.bool), 1)


def test_pca_basis_finds_the_direction_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g) * torch.tensor([0.1, 3.0, 0.1, 0.1])
    mean, comps = pca_basis(x, 1)
    assert comps.shape == (4, 1) and abs(float(comps[1, 0])) > 0.99


def test_k_sparse_probes_find_the_one_informative_latent_and_beat_the_dense_noise():
    """Three classes, each marked by its own latent among 30; the dense vector is noise except through them."""
    g = torch.Generator().manual_seed(1)
    labels = [["a", "b", "c"][i % 3] for i in range(180)]
    codes = torch.rand(180, 30, generator=g) * 0.1
    for i, label in enumerate(labels):
        codes[i, {"a": 4, "b": 17, "c": 25}[label]] += 1.0
    dense = codes @ torch.randn(30, 12, generator=g)
    train, test = slice(0, 120), slice(120, 180)
    acc = probe_accuracies((dense[train], codes[train]), (dense[test], codes[test]), labels[:120], labels[120:], [1, 2, 5])
    assert acc["mean"]["sae_top_1_test_accuracy"] == 1.0
    assert {c: acc["per_class"][c]["sae_top_5_latents"][0] for c in "abc"} == {"a": 4, "b": 17, "c": 25}
    assert set(acc["mean"]) >= {"llm_test_accuracy", "sae_test_accuracy", "llm_top_2_test_accuracy", "pca_top_5_test_accuracy"}
    idx, target = balanced_task(labels[:120], "a", seed=0)
    assert int(target.sum()) == 40 and len(idx) == 80 and all((labels[i] == "a") == t for i, t in zip(idx.tolist(), target.tolist()))


def test_eval_suite_probing_writes_saebench_fields(probing_run):
    run = probing_run
    bad = cli("eval", str(run), "--suite", "core,probes", "--quiet")
    assert bad.returncode != 0 and "valid: core, probing, probing_source, probing_tokens, absorption, steering" in bad.stderr
    done = cli("eval", str(run), "--suite", "probing", "--quiet")
    assert done.returncode == 0, done.stderr
    assert not (run / "eval.json").exists()  # core was not asked for
    result = json.loads((run / "evals" / "sparse_probing.json").read_text())
    for field in ("eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics", "eval_result_details",
                  "eval_result_unstructured", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_cfg_dict"):
        assert field in result, field
    assert result["eval_type_id"] == "sparse_probing" and result["sae_bench_commit_hash"] is None
    assert result["eval_config"]["k_values"] == [1, 2] and result["sae_cfg_dict"]["d_sae"] == 64
    sae_metrics = result["eval_result_metrics"]["sae"]
    assert set(sae_metrics) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"}
    assert all(0.0 <= v <= 1.0 for group in result["eval_result_metrics"].values() for v in group.values())
    assert set(result["eval_result_unstructured"]["per_class"]) == {"business", "entertainment", "politics", "sports", "tech"}


def test_probing_ks_parse_and_refuse_bad_values():
    from featurekit.config.checks import probing_ks

    assert probing_ks("20,1,5,2,5") == [1, 2, 5, 20]
    for bad in ("", "0,1", "1,a", "-2"):
        with pytest.raises(FeaturekitError, match="eval.probing_ks"):
            probing_ks(bad)
