"""Fault injection on a real file system: a full disk and a read-only folder.

As root, a private 2 MiB tmpfs is mounted; a dictionary, cache shards and checkpoints are written
into it until it is full. Each failed write must raise a FeaturekitError naming the file and 'No space
left', leave no temporary file, and leave the previous file whole. Then the tmpfs is remounted
read-only and every writer must say so clearly. Skipped where mounting is not permitted.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import featurekit
from featurekit._io import FileError, atomic_write_json
from featurekit.data.batch import ActivationBatch
from featurekit.data.cache import ActivationCache, write_cache
from featurekit.dictionaries import TopKSAE, save
from featurekit.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A fresh 2 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        gc.collect()  # tensors read with safetensors may still map files on the disk
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)  # detached now, freed when the last map goes


def fill(disk: Path, leave: int) -> None:
    """Fill the disk, then free `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65_536)
                fh.flush()
        except OSError:
            pass
    with open(filler, "r+b") as fh:
        fh.truncate(max(0, filler.stat().st_size - leave))


def no_temporaries(disk: Path) -> None:
    left = [p for p in disk.rglob("*") if p.name.endswith(".tmp") or (p.is_dir() and p.name.startswith("."))]
    assert not left, left


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_full_disk_then_read_only(small_disk):
    # a dictionary: the new one does not fit, the old one stays
    old = TopKSAE(32, 1024, k=4, seed=0)  # ≈ 260 KB
    save(old, small_disk / "dictionary")
    fill(small_disk, leave=100_000)
    with pytest.raises(FileError) as caught:
        save(TopKSAE(32, 1024, k=4, seed=1), small_disk / "dictionary")
    message = str(caught.value)
    assert f"could not write {small_disk / 'dictionary'}" in message and "No space left on device" in message, message
    no_temporaries(small_disk)
    assert same_weights(featurekit.load(small_disk / "dictionary"), old)

    # checkpoints: the tensor file of the next one does not fit, the previous one stays
    (small_disk / "filler").unlink()
    meta = {"step": 1, "tokens": 10, "total_steps": 9, "digest": "", "optimizer_scalars": {}, "threads": None}
    save_checkpoint(small_disk / "checkpoint", {"w": torch.ones(64, 1024)}, meta)  # 256 KB
    fill(small_disk, leave=100_000)
    with pytest.raises(FileError) as caught:
        save_checkpoint(small_disk / "checkpoint", {"w": torch.zeros(64, 1024)}, {**meta, "step": 2})
    message = str(caught.value)
    assert f"could not write {small_disk / 'checkpoint' / 'state-000000002.safetensors'}: No space left on device" in message
    no_temporaries(small_disk)
    tensors, got = load_checkpoint(small_disk / "checkpoint")
    assert got["step"] == 1 and torch.equal(tensors["w"], torch.ones(64, 1024))

    # cache shards until the disk is full: the complete shards stay readable and listed
    (small_disk / "filler").unlink()
    gen = torch.Generator().manual_seed(0)
    batches = (ActivationBatch(acts={"resid_post.1": torch.randn(1024, 64, generator=gen)}, token_ids=torch.arange(1024),
                               context_idx=torch.zeros(1024, dtype=torch.long), position=torch.arange(1024)) for _ in range(40))
    with pytest.raises(FileError) as caught:  # 40 shards of 288 KB: the disk fills after a few
        write_cache(small_disk / "cache", batches, {"model": "tiny"}, shard_tokens=1024)
    message = str(caught.value)
    assert f"could not write {small_disk / 'cache'}" in message and "No space left on device" in message, message
    no_temporaries(small_disk)
    cache = ActivationCache(small_disk / "cache")
    assert cache.n_shards >= 1 and not cache.complete
    assert sum(b.n_tokens for b in cache.iter_shards()) == cache.n_tokens  # every listed shard verifies

    # the same disk read-only: each writer says so, naming the file; what is there still loads
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    writes = {
        small_disk / "dictionary": lambda: save(old, small_disk / "dictionary"),
        small_disk / "checkpoint" / "state-000000003.safetensors":
            lambda: save_checkpoint(small_disk / "checkpoint", {"w": torch.ones(1)}, {**meta, "step": 3}),
        small_disk / "eval.json": lambda: atomic_write_json(small_disk / "eval.json", {"fvu": 0.1}),
        small_disk / "cache2": lambda: write_cache(small_disk / "cache2", iter([next(iter(cache.iter_shards()))]), {}, 8),
    }
    for path, write in writes.items():
        with pytest.raises(FileError) as caught:
            write()
        message = str(caught.value)
        assert f"could not write {path}" in message and "Read-only file system; the folder is read-only" in message, message
    assert same_weights(featurekit.load(small_disk / "dictionary"), old)
    assert load_checkpoint(small_disk / "checkpoint")[1]["step"] == 1
