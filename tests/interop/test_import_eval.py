"""A foreign dictionary through the rest of featurekit: `featurekit import` makes a run folder of a SAELens folder,
`featurekit eval` splices it into the model its file names (the tiny random Llama) and `featurekit features` builds
its feature store — the same command line a user runs, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import featurekit
from featurekit.dictionaries import TopKSAE
from featurekit.interop import export

ROOT = Path(__file__).parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurekit", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_import_a_saelens_folder_and_evaluate_it_spliced_into_its_model(tiny, tmp_path):
    model = str((tiny / "model").resolve())
    sae = TopKSAE(32, 64, k=4, seed=0)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    sae.metadata = {"source": {"model": model, "site": "resid_post.1"}}
    folder = export(sae, "saelens", tmp_path / "saelens_sae")
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_post"

    done = cli("import", str(folder), "--name", "imported", "--set", f"out_dir={tmp_path / 'runs'}",
               "--set", f"data.source={tiny / 'text.txt'}", "--set", "data.context_len=16", "--set", "eval.tokens=400",
               "--set", "eval.splice_contexts=4", "--set", "eval.batch_contexts=8", "--set", "model.dtype=float32",
               "--set", "features.tokens=600", "--set", "features.cofire_tokens=256")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "imported"
    loaded = featurekit.load(run / "dictionary")
    assert loaded.method == "topk" and loaded.metadata["provenance"]["imported_from"]["format"] == "saelens"

    done = cli("eval", str(run))
    assert done.returncode == 0, done.stderr
    result = json.loads((run / "eval.json").read_text())
    assert result["site"] == "resid_post.1" and result["model"] == model
    assert 0 < result["l0"] <= 4 and result["fvu"] > 0
    assert {"ce_clean", "ce_spliced", "kl_clean_spliced"} <= set(result)  # spliced into the model

    done = cli("features", str(run))  # the feature store over the imported dictionary
    assert done.returncode == 0, done.stderr
    from featurekit.features.store import FeatureStore

    store = FeatureStore(run)
    assert store.n_latents == 64


def test_import_needs_the_site_when_the_file_has_none(tmp_path):
    done = cli("import", str(ROOT / "tests/fixtures/interop/sparsify/sae/layers.6"), "--name", "x",
               "--set", f"out_dir={tmp_path}")
    assert done.returncode != 0 and "--model" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()
