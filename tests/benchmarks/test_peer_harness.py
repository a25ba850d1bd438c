"""benchmarks/peers: the featurekit driver runs featurekit's real training loop as a subprocess and prints
one parseable result line; run.py drives it, skips a peer whose venv is missing, and writes jsonl + markdown.
Peers are not installed here (they live in their own venvs), and no timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

PEERS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
PREFIX = "FKBENCH "


def load_run_module():
    spec = importlib.util.spec_from_file_location("peer_bench_run", PEERS_DIR / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def result_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(PREFIX)]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len(PREFIX):])


def test_pool_is_deterministic_and_shaped(tmp_path):
    run = load_run_module()
    run.make_pool(tmp_path / "a.npy", rows=512, d=32, seed=3)
    run.make_pool(tmp_path / "b.npy", rows=512, d=32, seed=3)
    run.make_pool(tmp_path / "c.npy", rows=512, d=32, seed=4)
    a, b, c = (np.load(tmp_path / f"{x}.npy") for x in "abc")
    assert a.shape == (512, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std(0).min() > 0  # every column varies


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_featurekit_driver_prints_one_result(tmp_path, arch):
    run = load_run_module()
    data = tmp_path / "pool.npy"
    run.make_pool(data, rows=512, d=32, seed=0)
    cmd = [sys.executable, str(PEERS_DIR / "drivers" / "featurekit_driver.py"), "--data", str(data), "--arch", arch,
           "--n-latents", "128", "--k", "8", "--batch", "256", "--warmup", "1", "--steps", "1", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = result_line(proc.stdout)
    assert row["library"] == "featurekit" and row["arch"] == arch and row["n_latents"] == 128 and row["d"] == 32
    assert row["k"] == (None if arch == "jumprelu" else 8)
    assert row["tokens_per_s"] > 0 and row["step_s_median"] > 0 and row["peak_rss_mib"] > 0 and row["cpu_share"] > 0
    assert row["tokens_per_s"] == pytest.approx(256 / row["step_s_median"], rel=1e-3)
    assert row["loss_first"] is not None and row["loss_last"] is not None  # the loop logged every step


def load_common():
    spec = importlib.util.spec_from_file_location("peer_bench_common", PEERS_DIR / "drivers" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 64), n=st.integers(1, 40), share=st.floats(0.01, 0.99), seed=st.integers(0, 2**31 - 1))
def test_thresholds_for_l0_make_each_latent_fire_on_its_share_of_rows(rows, n, share, seed):
    import torch

    common = load_common()
    pre = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # distinct values
    theta = common.thresholds_for_l0(pre, share * n)
    m = min(max(round(rows * share), 1), rows - 1)
    assert ((pre > theta).sum(0) == m).all()  # every latent fires on exactly m of the rows
    assert common.mean_l0(pre, theta) == pytest.approx(m * n / rows)


def test_featurekit_driver_starts_jumprelu_at_the_requested_l0(tmp_path):
    run = load_run_module()
    data = tmp_path / "pool.npy"
    run.make_pool(data, rows=512, d=32, seed=0)
    cmd = [sys.executable, str(PEERS_DIR / "drivers" / "featurekit_driver.py"), "--data", str(data), "--arch", "jumprelu",
           "--n-latents", "128", "--batch", "256", "--warmup", "1", "--steps", "1", "--threads", "1", "--jumprelu-l0", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = result_line(proc.stdout)
    assert 4 <= row["l0_last"] <= 16  # the last step's L0: 8 on the init batch, moved a little by two steps


def test_drivers_reject_bad_step_counts(capsys):
    common = load_common()
    ok = common.parse_args(["--data", "x.npy", "--arch", "topk", "--n-latents", "16"])
    assert (ok.warmup, ok.steps, ok.threads, ok.batch) == (2, 4, 1, 4096)
    assert common.total_steps(ok) == 7  # warm-up + measured + the one whose start ends the last measured step
    with pytest.raises(SystemExit):
        common.parse_args(["--data", "x.npy", "--arch", "topk", "--n-latents", "16", "--warmup", "0"])
    assert "--warmup and --steps must be at least 1" in capsys.readouterr().err


def test_peers_that_cannot_run_are_skipped_with_a_reason(tmp_path):
    run = load_run_module()
    args = run.argparse.Namespace(threads=1, venvs=tmp_path / "no-venvs", precision="fp32", device="cpu", python=None)
    na = run.run_one("sparsify", "batchtopk", 64, 4, args, tmp_path / "pool.npy")
    assert na["skipped"] == "sparsify has no batchtopk SAE"
    missing = run.run_one("saelens", "topk", 64, 4, args, tmp_path / "pool.npy")
    assert "no venv" in missing["skipped"] and "setup_venv.sh" in missing["skipped"]
    args.precision = "bf16"
    bf16 = run.run_one("saelens", "topk", 64, 4, args, tmp_path / "pool.npy")
    assert bf16["skipped"] == "bf16 runs cover featurekit and sparsify only" and bf16["precision"] == "bf16"
    args.precision, args.device = "fp32", "cuda"
    gpu = run.run_one("dictionary_learning", "topk", 64, 4, args, tmp_path / "pool.npy")
    assert gpu["skipped"] == "GPU runs cover featurekit and sparsify only"


def run_harness(tmp_path, tag: str, *options: str) -> tuple[Path, list[dict]]:
    """run.py on a tiny workload (no peer venvs): its results folder and the jsonl's rows."""
    out = tmp_path / "results"
    cmd = [sys.executable, str(PEERS_DIR / "run.py"), *options, "--sizes", "64", "--d", "16", "--rows", "256", "--batch", "128",
           "--warmup", "1", "--steps", "1", "--gemm-size", "128", "--venvs", str(tmp_path / "no-venvs"), "--out", str(out), "--tag", tag]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, [json.loads(ln) for ln in (out / f"{tag}-threads1.jsonl").read_text().splitlines()]


def test_harness_runs_featurekit_and_writes_jsonl_and_markdown(tmp_path):
    out, lines = run_harness(tmp_path, "t", "--libs", "sparsify,featurekit", "--archs", "topk", "--ks", "4")
    machine, rows = lines[0], lines[1:]
    assert machine["kind"] == "machine" and machine["threads"] == 1 and machine["cpu"] and machine["torch"]
    by = {r["library"]: r for r in rows}
    assert set(by) == {"sparsify", "featurekit"} and "no venv" in by["sparsify"]["skipped"]
    fk = by["featurekit"]
    assert "skipped" not in fk and fk["tokens_per_s"] > 0 and fk["gemm_gflops_before"] > 0 and fk["gemm_gflops_after"] > 0
    assert fk["loadavg_1m_before"] >= 0 and fk["loadavg_1m_after"] >= 0
    md = (out / "latest.md").read_text()
    assert md == (out / "t-threads1.md").read_text()
    assert "| 64 | topk | 4 | " in md and "## Skipped" in md and "sparsify topk n=64" in md
    # the report mode rebuilds the same table from the saved rows
    (out / "latest.md").unlink()
    assert load_run_module().main(["--report", str(out / "t-threads1.jsonl"), "--out", str(out)]) == 0
    assert (out / "latest.md").read_text() == md


def test_harness_reports_jumprelu_at_an_operating_point_as_its_own_workload(tmp_path):
    out, lines = run_harness(tmp_path, "j", "--libs", "dictionary_learning,featurekit", "--archs", "jumprelu", "--jumprelu-l0", "4")
    assert lines[0]["jumprelu_l0"] == 4 and all(r["jumprelu_l0"] == 4 for r in lines[1:])
    md = (out / "latest.md").read_text()
    assert "| 64 | jumprelu@L0 4 | – | " in md and "dictionary_learning jumprelu@L0 4 n=64" in md  # the skipped peer, by workload


def test_one_interpreter_for_every_peer_and_a_missing_gpu_is_refused(tmp_path):
    # --python: the peer runs under the given interpreter (featurekit's, where sparsify is not installed), not "no venv"
    _, lines = run_harness(tmp_path, "p", "--libs", "sparsify", "--archs", "topk", "--ks", "4", "--python", sys.executable)
    assert "No module named 'sparsify'" in lines[1]["skipped"]
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(PEERS_DIR / "run.py"), "--device", "cuda", "--out", str(tmp_path / "g")],
                              capture_output=True, text=True, env=env(), timeout=120)
        assert proc.returncode == 2 and "torch sees no CUDA GPU" in proc.stderr
