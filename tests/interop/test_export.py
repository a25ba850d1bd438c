"""`featurekit export saelens|sparsify RUN_DIR`: written folders read back (by featurekit here; by the libraries
themselves in the slow round trip, benchmarks/interop_roundtrip.py), and the methods that do not map refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import featurekit
from featurekit.dictionaries import build
from featurekit.dictionaries.registry import param_names
from featurekit.errors import FeaturekitError
from featurekit.interop import export

ROOT = Path(__file__).parents[2]


def dictionary(method: str, **hyper):
    d = build(method, 12, 24, seed=0, **hyper)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        d.input_scale.fill_(0.5)  # not folded yet: the export folds it
        if hasattr(d, "theta"):
            d.theta.copy_(d.theta.abs() + 0.1)
    return d


@pytest.mark.parametrize("fmt,method,site", [("saelens", "relu", "resid_post.2"), ("saelens", "jumprelu", "attn_z.1"),
                                             ("saelens", "matryoshka", "resid_post.2"), ("sparsify", "topk", "mlp_out.2"),
                                             ("sparsify", "skiptranscoder", "mlp_in.2")])
def test_cli_export_reads_back_with_the_same_outputs(tmp_path, fmt, method, site):
    hyper = {"prefixes": [6, 12, 24], "k": 4} if method == "matryoshka" else {"k": 4} if "k" in param_names(method) else {}
    d = dictionary(method, **hyper)
    source = {"model": "gpt2", "site": site, **({"output_site": "mlp_out.2"} if d.transcodes else {})}
    featurekit.save(d, tmp_path / "run" / "dictionary", metadata={"source": source})
    done = subprocess.run([sys.executable, "-m", "featurekit", "export", fmt, str(tmp_path / "run")], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    sub = {"sparsify": {"mlp_out.2": "layers.2.mlp", "mlp_in.2": "layers.2.mlp"}[site]} if fmt == "sparsify" else {}
    folder = tmp_path / "run" / "exports" / fmt / sub.get("sparsify", "")
    back = featurekit.load(folder, model="gpt2")
    assert back.method == method and back.metadata["source"]["site"] == site
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), d.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.reconstruct(x), d.reconstruct(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,method,says", [("saelens", "mpsae", "matching pursuit"), ("sparsify", "relu", "export saelens"),
                                             ("saelens", "transcoder", "export sparsify"),
                                             ("saelens", "featurechoice", "Feature Choice"),
                                             ("sparsify", "batchabstopk", "signed")])
def test_methods_that_do_not_map_are_refused_with_why_and_what_instead(tmp_path, fmt, method, says):
    d = build(method, 8, 16, seed=0, **({"k": 2} if "k" in param_names(method) else {}))
    with pytest.raises(FeaturekitError, match=says) as err:
        export(d, fmt, tmp_path / "out")
    assert "cannot be written" in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_round_trip_through_saelens_and_sparsify(tmp_path):
    """Trained by featurekit, exported, loaded by the real libraries in their venvs: equal outputs (skips without venvs)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from interop_roundtrip import PEER_VENV, peers_dir

    if not all((peers_dir() / v / "bin" / "python").is_file() for v in PEER_VENV.values()):
        pytest.skip("no SAELens/sparsify venvs (benchmarks/peers/setup_venv.sh)")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "interop_roundtrip.py"), "--steps", "10", "--out",
                           str(tmp_path)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("same latents True") == 9
