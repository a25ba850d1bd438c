"""Training memory: flat in the number of steps (tokens), and `train.keep_freed_memory` (glibc keeps
freed blocks for the next step instead of unmapping them) does not raise the peak. Measured in fresh
subprocesses with ru_maxrss, on a TopK step whose (batch × latents) pre-activation matrix (64 MiB) is above
glibc's largest mmap threshold, i.e. the case the setting is for."""

import json
import os
import subprocess
import sys

import pytest

from featurekit.train.memory import keep_freed_memory

PROBE = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
from featurekit.config import TrainConfig
from featurekit.dictionaries import METHODS
from featurekit.train import Trainer
from featurekit.train.trainer import RECON_LOSSES

steps, keep = int(sys.argv[1]), sys.argv[2] == "1"
if keep:  # what the featurekit command does for train.keep_freed_memory
    from featurekit.train.memory import keep_freed_memory
    keep_freed_memory()
sae = METHODS["topk"](64, 4096, k=16, seed=0)
gen = torch.Generator().manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(sae, TrainConfig(batch_size=4096, lr=1e-3, keep_freed_memory=keep), Path(tmp) / "r", steps)
    batches = (torch.randn(4096, 64, generator=gen) for _ in range(steps))
    first = next(batches)
    trainer.init_from_data(first)
    recon = RECON_LOSSES[sae.recon_loss]
    trainer.train_step(first, recon)
    after_one = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for x in batches:
        trainer.train_step(x, recon)
print(json.dumps({"after_one": after_one / 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _probe(steps: int, keep: bool) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, str(steps), "1" if keep else "0"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_keep_freed_memory_is_idempotent_and_reports_whether_it_applied():
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        assert first is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and glibc malloc: Linux")
def test_training_memory_is_flat_in_steps_and_keeping_freed_memory_does_not_raise_the_peak():
    short, long = _probe(4, keep=True), _probe(36, keep=True)
    # a step's temporaries are ≈ 100 MiB: holding on to one step's worth per step would add GBs
    assert long["peak"] < short["peak"] + 48, (short, long)
    plain = _probe(36, keep=False)
    assert long["peak"] < plain["peak"] * 1.1 + 32, (long, plain)


CHECKPOINT_PROBE = r"""
import json, resource, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
from featurekit.config import TrainConfig
from featurekit.dictionaries import METHODS
from featurekit.train import Trainer
from featurekit.train.trainer import RECON_LOSSES

sae = METHODS["topk"](256, 32768, k=8, seed=0)  # weights 64 MiB, with Adam's two moments 192 MiB
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(sae, TrainConfig(batch_size=64, lr=1e-3), Path(tmp) / "r", 2)
    x = torch.randn(64, 256)
    trainer.init_from_data(x)
    trainer.train_step(x, RECON_LOSSES[sae.recon_loss])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.save()
    size = sum(f.stat().st_size for f in (Path(tmp) / "r" / "checkpoint").glob("*.safetensors"))
    print(json.dumps({"growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "file": size / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
def test_a_checkpoint_is_written_from_the_tensors_without_a_copy_in_memory(tmp_path):
    res = subprocess.run([sys.executable, "-c", CHECKPOINT_PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "FEATUREKIT_CACHE": str(tmp_path)})  # its kernel probes
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["file"] > 190  # the weights and both moments are in it
    assert out["growth"] < 0.25 * out["file"], out  # serialising in memory first grew the peak by ≈ 2× the file
