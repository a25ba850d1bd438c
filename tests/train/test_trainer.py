"""The trainer learns (ground-truth recovery) and resumes exactly after SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from featurekit.config import TrainConfig, load_config
from featurekit.data.cache import write_cache
from featurekit.dictionaries import ReLUSAE, TopKSAE
from featurekit.errors import FeaturekitError
from featurekit.evaluate.metrics import fvu
from featurekit.pipeline import harvest_meta
from featurekit.train import Trainer

from .synthetic import batches, sample, true_features


def endless(features, size):
    gen = torch.Generator().manual_seed(5)
    while True:
        yield sample(features, size, gen)


@pytest.mark.parametrize("cls,kw,lr", [(TopKSAE, {"k": 4}, 3e-3), (ReLUSAE, {"l1_coefficient": 0.3}, 3e-3)])
def test_recovers_ground_truth_features(tmp_path, cls, kw, lr):
    features = true_features(48, 24)
    sae = cls(24, 96, seed=0, **kw)
    cfg = TrainConfig(lr=lr, warmup_steps=10, log_every=25, checkpoint_every=1000, dead_tokens=4096)
    trainer = Trainer(sae, cfg, tmp_path, total_steps=500)
    trainer.init_from_data(sample(features, 4096, torch.Generator().manual_seed(9)))
    trainer.fit(endless(features, 256), progress=False)
    x = sample(features, 4096, torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert fvu(x, sae.reconstruct(x)) < 0.2
        cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ features.T
    # mean max cosine similarity over the true features; measured 0.99 (TopK), 0.91 (ReLU)
    assert cos.max(0).values.mean() > (0.95 if cls is TopKSAE else 0.86)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 500 and rows[-1]["fvu"] < rows[0]["fvu"]


def test_nan_batch_is_refused(tmp_path):
    trainer = Trainer(TopKSAE(4, 8, k=2), TrainConfig(), tmp_path, total_steps=1)
    with pytest.raises(FeaturekitError, match="NaN/Inf"):
        trainer.fit(iter([torch.full((8, 4), float("nan"))]), progress=False)


def make_run(root, name, features):
    cfg = load_config(None, [
        f"out_dir={root}", f"name={name}", "site=resid_post.0", "dictionary.n_latents=1024", "dictionary.k=8",
        "train.batch_size=256", "train.epochs=3", "train.checkpoint_every=20", "train.log_every=10",
        "train.buffer_tokens=2048", "train.dead_tokens=2048", "data.train_tokens=25600",
    ])
    meta = {**harvest_meta(cfg), "dtype": "float32"}
    write_cache(cfg.run_dir / "activations", batches(features, 25, 1024, "resid_post.0"), meta, 8192)
    (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    return cfg.run_dir


def featurekit(*args):
    return [sys.executable, "-m", "featurekit.cli", *args, "--quiet"] if args[0] == "train" else None


def test_sigkill_then_resume_gives_the_same_weights(tmp_path):
    features = true_features(200, 48)
    ref, killed = make_run(tmp_path, "ref", features), make_run(tmp_path, "killed", features)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(featurekit("train", "--config", str(ref / "config.json")), check=True, env=env, timeout=300)

    proc = subprocess.Popen(featurekit("train", "--config", str(killed / "config.json")), env=env)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["step"] >= 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "dictionary").exists(), "the run finished before it could be killed; make it longer"
    step_at_kill = json.loads(state.read_text())["step"]
    assert 40 <= step_at_kill < 300

    subprocess.run([sys.executable, "-m", "featurekit.cli", "train", "--resume", str(killed), "--quiet"], check=True, env=env, timeout=300)
    a, b = load_file(ref / "dictionary" / "model.safetensors"), load_file(killed / "dictionary" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # no duplicated or missing log lines


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    features = true_features(200, 48)
    run = make_run(tmp_path, "r", features)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "featurekit.cli", "train", "--config", str(run / "config.json"), "--quiet"]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "featurekit.cli", "train", "--resume", str(run), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "belongs to another config" in done.stderr
    done = subprocess.run([*cmd[:4], "--resume", str(run), "--set", "train.lr=1"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "--resume continues a run with its own config.json" in done.stderr


def test_a_torn_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import featurekit.train.checkpoint as ckpt

    sae = TopKSAE(8, 32, k=2, seed=0)
    trainer = Trainer(sae, TrainConfig(), tmp_path, total_steps=10, digest="d")
    trainer.init_from_data(torch.randn(64, 8))
    trainer.step = 3
    trainer.save()
    saved = {k: v.clone() for k, v in sae.state_dict().items()}
    with torch.no_grad():
        sae.W_dec.add_(1.0)
    trainer.step = 6

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing state.json")

    monkeypatch.setattr(ckpt, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    fresh = Trainer(TopKSAE(8, 32, k=2, seed=1), TrainConfig(), tmp_path, total_steps=10, digest="d")
    fresh.resume()
    assert fresh.step == 3
    for key, value in saved.items():
        assert torch.equal(fresh.sae.state_dict()[key], value), key


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    """A learning rate that blows the weights up: the run stops with a clear error at the first NaN/Inf loss or
    weights; the checkpoint on disk is the last finite one, and nothing non-finite was written."""
    from safetensors.torch import load_file

    features = true_features(48, 24)
    sae = TopKSAE(24, 96, seed=0, k=4)
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, log_every=1, checkpoint_every=5, dead_tokens=4096)
    trainer = Trainer(sae, cfg, tmp_path, total_steps=40)
    trainer.init_from_data(sample(features, 4096, torch.Generator().manual_seed(9)))
    stream = endless(features, 256)

    def poisoned():  # after 12 good steps, the learning rate jumps to 1e38: the weights overflow
        for i, batch in enumerate(stream):
            if i == 12:
                cfg.lr = 1e38
            yield batch

    with pytest.raises(FeaturekitError, match=r"diverged at step 1[3-5] of 40.*last good checkpoint \(step 10\)"):
        trainer.fit(poisoned(), progress=False)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10
    tensors = load_file(tmp_path / "checkpoint" / state["tensors"])
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
