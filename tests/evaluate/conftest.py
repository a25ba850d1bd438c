"""Shared fixtures of the evaluation tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featurekit.dictionaries import TopKSAE
from featurekit.interop import export

ROOT = Path(__file__).parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m featurekit.cli ARGS` in the repository, one thread."""
    return subprocess.run([sys.executable, "-m", "featurekit.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.fixture
def probing_run(tiny, tmp_path) -> Path:
    """A run folder made by `featurekit import` of a random TopK SAE at the tiny model's resid_post.1, its config cut
    to tiny probing settings (6 training and 4 held-out documents of 16 tokens, k ∈ {1, 2})."""
    model = str((tiny / "model").resolve())
    sae = TopKSAE(32, 64, k=4, seed=0)
    sae.metadata = {"source": {"model": model, "site": "resid_post.1"}}
    folder = export(sae, "saelens", tmp_path / "saelens_sae")
    done = cli("import", str(folder), "--name", "r", "--set", f"out_dir={tmp_path / 'runs'}", "--set", "model.dtype=float32",
               "--set", f"data.source={tiny / 'text.txt'}", "--set", "data.context_len=16")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "r"
    config = json.loads((run / "config.json").read_text())
    config["eval"].update(probing_train_docs=6, probing_test_docs=4, probing_tokens=16, probing_ks="1,2")
    (run / "config.json").write_text(json.dumps(config))
    return run
