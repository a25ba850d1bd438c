"""`torchrun --nproc_per_node=2 -m featurekit train` on the tiny model (2 CPU processes, gloo) against
`pipeline.run_train` in one process on the same activation cache: same dictionary file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from featurekit import pipeline
from featurekit.config import load_config
from featurekit.dictionaries import load

from . import distributed_workers as W
from .test_distributed import free_port

SETS = ["model.dtype=float32", "site=resid_post.1", "data.context_len=16", "data.train_tokens=4000", "data.shard_tokens=1000",
        "dictionary.n_latents=64", "dictionary.k=4", "train.batch_size=256", "train.buffer_tokens=1024", "train.epochs=1",
        "train.log_every=1", "train.threads=1", "train.lr=1e-2", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def harvested(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_pipeline")
    sets = [f"out_dir={out}", f"model.name={tiny / 'model'}", f"data.source={tiny / 'text.txt'}", *SETS]
    cfg = pipeline.resolve(load_config(None, [*sets, "name=ref"]))
    pipeline.run_harvest(cfg, progress=False)
    pipeline.run_train(cfg, progress=False)
    return out, sets, cfg


@pytest.mark.parametrize("shard", [False, True], ids=["data_parallel", "latent_sharded"])
def test_torchrun_featurekit_train_matches_one_process(harvested, shard):
    out, sets, ref_cfg = harvested
    name = "sharded" if shard else "dp"
    args = [a for s in [*sets, f"name={name}", f"train.shard_latents={str(shard).lower()}"] for a in ("--set", s)]
    (out / name).mkdir()
    os.symlink(ref_cfg.run_dir / "activations", out / name / "activations")  # the same cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           "-m", "featurekit", "train", *args, "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("dictionary:") == 1  # rank 0 reports
    got, want = load(out / name / "dictionary"), load(ref_cfg.run_dir / "dictionary")
    assert got.method == "topk" and got.n_latents == 64
    for key, value in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    rows, ref_rows = (W.metrics(run) for run in (out / name, ref_cfg.run_dir))
    assert len(rows) == len(ref_rows) > 1
    for a, b in zip(rows, ref_rows):  # tokens: each data-parallel rank read half of every batch
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert (out / name / "shards" / "rank1" / "checkpoint").exists() == shard  # a shard's own checkpoint


def test_featurekit_command_leaves_the_process_group(harvested, monkeypatch):
    """The command joins torchrun's group and leaves it before returning, so that gloo is never torn down
    by the interpreter's exit (which can abort a successful run): here a 1-rank group, in-process."""
    import torch.distributed as dist

    from featurekit.cli import main

    out, sets, ref_cfg = harvested
    (out / "leave").mkdir()
    os.symlink(ref_cfg.run_dir / "activations", out / "leave" / "activations")
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = [a for s in [*sets, "name=leave"] for a in ("--set", s)]
    try:
        assert main(["train", *args, "--quiet"]) == 0
        assert (out / "leave" / "dictionary").is_dir()
        assert not dist.is_initialized()
    finally:  # never leave a group behind for the tests that follow
        if dist.is_initialized():
            dist.destroy_process_group()
