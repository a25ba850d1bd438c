"""The trainer: a tiny end-to-end run, its run folder, a refused config change, and SIGKILL → resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featurekit.errors import FeaturekitError
from featurekit.models.loading import load_model
from featurekit.models.moexlm.folder import load_lm
from featurekit.models.moexlm.lm import LMConfig
from featurekit.moex.train import TrainSettings, train_lm


def _stream(n: int = 6000, vocab: int = 12) -> torch.Tensor:
    """A learnable stream: a repeating 0..9 pattern with 10% of tokens replaced at random."""
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(n) % 10
    noise = torch.randint(0, vocab, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.1, noise, base)


TINY = dict(vocab_size=12, d_model=16, n_layer=1, n_head=2, seq_len=16, n_experts=4)
FAST = dict(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=10, log_every=5, val_batches=2)


def test_tiny_end_to_end_dense_then_upcycled_moex(tmp_path):
    tokens = _stream()
    dense = train_lm(tmp_path / "dense", tokens, LMConfig(**TINY, mlp="dense_relu"), TrainSettings(**FAST), progress=False)
    assert dense["val_loss"] < 1.9  # ln(12) = 2.48 at chance; the pattern makes ~1.0 reachable
    for name in ("config.json", "metrics.jsonl", "model.json", "model.safetensors", "summary.json", "checkpoint/state.json"):
        assert (tmp_path / "dense" / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 41, 5))
    model = load_lm(tmp_path / "dense")
    assert model.config.mlp == "dense_relu" and not model.training
    with pytest.raises(FeaturekitError, match="no vocab.json"):  # trained on ids: no tokenizer to build
        load_model(str(tmp_path / "dense"))

    moex_cfg = LMConfig(**TINY, mlp="moex", expert_hidden=64)
    up = train_lm(tmp_path / "up", tokens, moex_cfg, TrainSettings(**{**FAST, "steps": 10}), upcycle_from=tmp_path / "dense",
                  progress=False)
    assert up["val_loss"] < 1.9  # starts from the dense model's function, not from chance
    assert up["params"]["activated_mlp"] == dense["params"]["activated_mlp"]  # top_k=1, expert_hidden = H
    with pytest.raises(FeaturekitError, match="upcycling starts from a dense model"):
        train_lm(tmp_path / "bad", tokens, moex_cfg, TrainSettings(**FAST), upcycle_from=tmp_path / "up", progress=False)
    with pytest.raises(FeaturekitError, match="holds no trained moex model"):
        train_lm(tmp_path / "bad", tokens, moex_cfg, TrainSettings(**FAST), upcycle_from=tmp_path / "nothing", progress=False)
    assert not (tmp_path / "bad").exists()


def test_another_config_in_the_same_folder_is_refused(tmp_path):
    tokens = _stream()
    train_lm(tmp_path / "run", tokens, LMConfig(**TINY, mlp="dense_gelu"), TrainSettings(**{**FAST, "steps": 5}), progress=False)
    with pytest.raises(FeaturekitError, match="another config.*lm.mlp"):
        train_lm(tmp_path / "run", tokens, LMConfig(**TINY, mlp="switch"), TrainSettings(**{**FAST, "steps": 5}), progress=False)
    out = train_lm(tmp_path / "run", tokens, LMConfig(**TINY, mlp="switch"), TrainSettings(**{**FAST, "steps": 5}),
                   overwrite=True, progress=False)
    assert out["mlp"] == "switch"


def test_bad_streams_are_refused(tmp_path):
    cfg = LMConfig(**TINY, mlp="moex")
    with pytest.raises(FeaturekitError, match="1-D LongTensor"):
        train_lm(tmp_path / "a", _stream().float(), cfg, progress=False)
    with pytest.raises(FeaturekitError, match=r"token ids must lie in \[0, vocab_size=12\)"):
        train_lm(tmp_path / "b", _stream(vocab=20), cfg, progress=False)
    with pytest.raises(FeaturekitError, match="too short"):
        train_lm(tmp_path / "c", _stream(100), cfg, progress=False)
    assert not (tmp_path / "a").exists()


KILLED = dict(steps=60, checkpoint_every=7)


def _train_killable(run_dir, pace: float = 0.0):
    torch.manual_seed(0)
    return train_lm(run_dir, _stream(), LMConfig(**TINY, mlp="moex", top_k=2), TrainSettings(**{**FAST, **KILLED}),
                    progress=False, on_step=lambda step: time.sleep(pace))


SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from moex.test_train import _train_killable
    _train_killable(sys.argv[1], pace=0.05)
""")


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """A real process is SIGKILLed mid-run (between checkpoints); resuming here ends with the weights of a run
    never killed, bit for bit (both on one thread, so the float reductions are the same)."""
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1])))
    killed = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed")], stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_killable(tmp_path / "reference")  # meanwhile, the uninterrupted run
        state = tmp_path / "killed" / "checkpoint" / "state.json"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.loads(state.read_text())["step"] >= 21:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert killed.poll() is None, killed.communicate()[1].decode()[-2000:]
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
        at_kill = json.loads(state.read_text())["step"]
        assert 21 <= at_kill < 60 and not (tmp_path / "killed" / "model.safetensors").exists()
        _train_killable(tmp_path / "killed")  # resumes from the checkpoint
    finally:
        torch.set_num_threads(threads)
    a = load_file(tmp_path / "reference" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no step logged twice after the resume


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_missing_or_bad_device_is_refused_before_anything_is_written(tmp_path):
    for device, words in (("cuda", "no CUDA GPU"), ("tpu-ish", "not a torch device")):
        with pytest.raises(FeaturekitError, match=words):
            train_lm(tmp_path / device, _stream(), LMConfig(**TINY, mlp="moex"), TrainSettings(**FAST), progress=False,
                     device=device)
        assert not (tmp_path / device / "config.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_the_gpu_learns_and_saves_a_cpu_model(tmp_path):
    summary = train_lm(tmp_path / "run", _stream(), LMConfig(**TINY, mlp="moex"), TrainSettings(**FAST), progress=False,
                       device="cuda")
    assert summary["val_loss"] < 1.9
    assert load_lm(tmp_path / "run").tok.weight.device.type == "cpu"
