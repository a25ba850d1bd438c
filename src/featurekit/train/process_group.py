"""The process group of a torchrun launch and this process's place in it: joining it from torchrun's environment,
rank / world size / device, the training device `train.device` names, and the data-parallel switch (whether batch
statistics are global, whether this process writes files). Outside torchrun every function answers for one process.
Part of `train.distributed` (its docstring has the overview)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import FeaturekitError

_DATA_PARALLEL = False


# -- process group ----------------------------------------------------------------------------
def launched() -> bool:
    """True when torchrun (or another launcher) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(backend: str | None = None, timeout: timedelta = timedelta(hours=2)) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); nccl when CUDA is available (and the rank's GPU is selected), gloo
    otherwise. Returns whether a process group is active; a no-op outside torchrun or when the
    group already exists. `timeout` bounds every collective — long, because under `featurekit run`
    the other ranks wait in a barrier while rank 0 harvests."""
    if dist.is_initialized():
        return True
    if not launched():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its local GPU under nccl, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def train_device(spec: str = "auto") -> torch.device:
    """The device `train.device` names. "auto": this rank's device under torchrun (its GPU under nccl), else the
    GPU when torch sees CUDA, else the CPU. An explicit device must exist, and under torchrun be the rank's own."""
    if spec == "auto":
        if is_initialized():
            return device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FeaturekitError(f"train.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise FeaturekitError(f"train.device={spec!r}: featurekit trains on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FeaturekitError(f"train.device={spec!r} but torch sees no CUDA GPU (torch {torch.__version__}, "
                                  f"CUDA build: {torch.version.cuda or 'none'}); set train.device=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FeaturekitError(f"train.device={spec!r} but torch sees {torch.cuda.device_count()} GPU(s); "
                                  f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if is_initialized():
        own = device()
        if dev.type != own.type or (dev.index is not None and dev.index != own.index):
            raise FeaturekitError(f"train.device={spec!r} under torchrun, where rank {rank()} trains on {own} "
                                  f"({dist.get_backend()} backend); set train.device=auto")
    return dev


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy(sync: bool = True) -> None:
    """Leave the process group. `sync`: first wait in a barrier until every rank is done with its
    collectives (a gloo rank that tears its group down while a peer still talks to it can abort with
    "terminate called without an active exception"); False after an error, where the peers may never come."""
    global _DATA_PARALLEL
    _DATA_PARALLEL = False
    if is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


# -- data parallel --------------------------------------------------------------------------------
def enable_data_parallel(on: bool = True) -> None:
    """Switch the trainer's batch statistics (loss denominators, dead-latent counts, logged metrics)
    to the global batch. Has an effect only with an active process group of more than one rank."""
    global _DATA_PARALLEL
    _DATA_PARALLEL = bool(on)


def data_parallel() -> bool:
    return _DATA_PARALLEL and is_initialized() and world_size() > 1


def writes() -> bool:
    """Whether this process writes the run's files: always in one process and in latent-sharded
    runs (each rank its own run folder), only rank 0 in data-parallel runs."""
    return not data_parallel() or is_main()
