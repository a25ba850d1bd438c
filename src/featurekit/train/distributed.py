"""Training in several processes with `torch.distributed` (launched by `torchrun`).

Two layouts, both driven by the one `Trainer`:

* **Data parallel** (`enable_data_parallel()`): every rank holds the whole dictionary and trains on its
  contiguous slice of each global batch (`shard_rows`). Each rank's loss is scaled so that the *mean*
  over ranks is the single-process loss of the global batch — batch-mean terms stay local; the FVU
  and aux-k denominators (the batch's total variance, `centered_sum_sq`) are reduced across ranks —
  and `GradSync` averages the gradients at the end of every backward pass. The dead-latent counters
  see the global batch (`batch_sum`). So N ranks on B/N rows each make the same update as one
  process on B rows, up to fp32 summation order. Only rank 0 writes files (`writes()`).
* **Latent sharded** (`featurekit.train.sharded.ShardedTopKSAE`): every rank sees the whole
  batch and holds a contiguous slice of the latents; the global top-k is taken across ranks.

Not launched by torchrun (no RANK/WORLD_SIZE in the environment), everything here is a no-op and
training is the plain single-process path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..dictionaries.protocols import Gathers
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


def shard_rows(batch: torch.Tensor, r: int | None = None, n: int | None = None) -> torch.Tensor:
    """Rows [r·B/N, (r+1)·B/N) of a global batch (B must be divisible by N: equal shards keep
    batch-mean loss terms exact)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    if batch.shape[0] % n:
        raise FeaturekitError(f"the global batch of {batch.shape[0]} rows does not split into {n} equal shards; "
                              f"make train.batch_size a multiple of the number of processes")
    per = batch.shape[0] // n
    return batch[r * per:(r + 1) * per]


def shard_batches(batches: Iterable, r: int | None = None, n: int | None = None) -> Iterator:
    """This rank's slice of every global batch (tensors or tuples of per-token tensors)."""
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            yield type(batch)(shard_rows(t, r, n) for t in batch)
        else:
            yield shard_rows(batch, r, n)


def batch_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of a per-rank batch statistic in data-parallel runs (no gradient); t itself otherwise."""
    if not data_parallel():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def global_rows(n: int) -> int:
    """Rows in the global batch, given this rank's n (equal shards)."""
    return n * world_size() if data_parallel() else n


def centered_sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Σ‖x − mean(x)‖² over the rows — the denominator of the batch FVU.

    Data parallel: the global batch's value (global mean, then the global sum) divided by the number
    of ranks, so that each rank's FVU term Σ_local‖x − x̂‖² / this averages over the ranks to the global
    batch's FVU. The denominator is treated as a constant (it is one: it depends only on the data)."""
    if not data_parallel():
        return (x - x.mean(0)).pow(2).sum()
    x = x.detach()
    stats = torch.cat([x.sum(0), x.new_tensor([x.shape[0]])])
    dist.all_reduce(stats)
    mean = stats[:-1] / stats[-1]
    total = (x - mean).pow(2).sum()
    dist.all_reduce(total)
    return total / world_size()


#: metrics that are the same on every rank (not averaged)
_SHARED_METRICS = {"step", "tokens", "lr", "elapsed_s", "dead_fraction"}


def reduce_metrics(row: dict) -> dict:
    """Mean over data-parallel ranks of each per-rank metric (loss terms, FVU, L0): the global batch's value."""
    if not data_parallel():
        return row
    keys = [k for k, v in row.items() if k not in _SHARED_METRICS and isinstance(v, (int, float))]
    values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64)
    if _backend_needs_cuda():
        values = values.cuda()
    dist.all_reduce(values)
    return {**row, **{k: v / world_size() for k, v in zip(keys, values.tolist())}}


def _backend_needs_cuda() -> bool:
    return is_initialized() and dist.get_backend() == "nccl"


def all_reduce_grads(params: Sequence[nn.Parameter], average: bool = True) -> None:
    """Sum (or average) the gradients of `params` over ranks in one flat all_reduce.

    A parameter whose gradient is None on every rank stays None (as Adam would skip it in one
    process); one that has a gradient somewhere counts as zero where it has none."""
    if not is_initialized() or world_size() == 1:
        return
    params = list(params)
    if not params:
        return
    ref = params[0]
    flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=ref.dtype, device=ref.device)
            for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
    buf = torch.cat([*flat, has])
    dist.all_reduce(buf)
    if average:
        buf[:-len(params)] /= world_size()
    offset = 0
    for p, anywhere in zip(params, buf[-len(params):].tolist()):
        chunk = buf[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is not None:
            p.grad.copy_(chunk)
        elif anywhere > 0:
            p.grad = chunk.clone()


def broadcast_params(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (same start everywhere)."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


class GradSync:
    """All-reduces the gradients of `params` once per backward pass, after the whole pass.

    The first parameter whose gradient is accumulated queues a callback on the autograd engine (as
    torch's FSDP does) that runs `all_reduce_grads` when the backward pass ends — before the
    trainer projects, clips or steps, so clipping sees the global gradient. No trainer code changes.
    `average=True`: data parallel (each rank's loss is a per-rank mean); False: sum (the replicated
    parameters of a latent-sharded dictionary, whose per-rank gradients are partial sums)."""

    def __init__(self, params: Iterable[nn.Parameter], average: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.average = average
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync)

    def _sync(self) -> None:
        self._queued = False
        all_reduce_grads(self.params, average=self.average)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def data_parallel_setup(module: nn.Module) -> GradSync | None:
    """Start data-parallel training of `module`: same weights everywhere (rank 0's), gradient averaging,
    global batch statistics. Returns the GradSync (None in one process)."""
    if not is_initialized() or world_size() == 1:
        return None
    broadcast_params(module)
    enable_data_parallel(True)
    return GradSync(module.parameters(), average=True)


class AllReduceSum(torch.autograd.Function):
    """Σ over ranks in the forward; the gradient passes through unchanged in the backward.

    For partial results (each rank's share of x̂) that every rank then feeds into the *same* loss:
    ∂L/∂partial_r = ∂L/∂x̂, which every rank already holds."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if is_initialized() and world_size() > 1:
            dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return AllReduceSum.apply(t)


def all_gather_cat(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `t` (same shape) along `dim`, rank order (no gradient)."""
    if not is_initialized() or world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


# -- the pipeline's entry points (featurekit train / run under torchrun) ----------------------------
def gather_objects(obj: object) -> list[object] | None:
    """Every rank's `obj` on rank 0, in rank order (None on the other ranks); [obj] in one process. The objects
    travel between this job's own processes (torch's object collectives), never from a file."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare(sae: nn.Module, cfg, run_dir) -> tuple[nn.Module, object]:
    """The dictionary and run folder this rank trains with. One process: both as given. Data parallel:
    the same dictionary (rank 0's weights, gradient averaging), the same folder (only rank 0 writes).
    `cfg.shard_latents` (a TrainConfig): this rank's `ShardedTopKSAE` slice, trained in its own folder (rank 0: the run
    folder; rank r: run_dir/shards/rank{r}) — each checkpoint holds its shard, so resume works per rank."""
    if not is_initialized() or world_size() == 1:
        return sae, run_dir
    if cfg.shard_latents:
        if cfg.max_grad_norm:
            raise FeaturekitError("train.max_grad_norm is not supported with train.shard_latents (the clipping norm would be "
                                  "each shard's, not the dictionary's); unset one of them")
        from .sharded import ShardedTopKSAE  # it uses this module's collectives

        return ShardedTopKSAE.from_dictionary(sae), run_dir if is_main() else run_dir / "shards" / f"rank{rank()}"
    enable_data_parallel(True)
    sae._grad_sync = GradSync(sae.parameters(), average=True)
    return sae, run_dir


def after_init(sae: nn.Module) -> None:
    """After `init_from_data` or `resume`: rank 0's replicated tensors everywhere (all of a data-parallel
    dictionary; b_dec and the input scale of a latent shard)."""
    if not is_initialized() or world_size() == 1:
        return
    if data_parallel():
        broadcast_params(sae)
    else:
        with torch.no_grad():
            for t in [sae.b_dec, *sae.buffers()]:
                dist.broadcast(t.data, 0)


def rank_batches(batches: Iterable, sae: nn.Module) -> Iterator:
    """This rank's share of the global batches: its rows (data parallel) or all of them (latent shards; one
    process: every batch), moved to the dictionary's device (from the CPU cache, or from the model's GPU when
    streaming). Host-to-GPU copies are queued (non-blocking); copies to the CPU wait for their data."""
    if data_parallel():
        batches = shard_batches(batches)
    dev = sae.W_dec.device
    queued = dev.type == "cuda"
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            yield type(batch)(t.to(dev, non_blocking=queued) for t in batch)
        else:
            yield batch.to(dev, non_blocking=queued)


def finish(sae: nn.Module) -> nn.Module | None:
    """The trained dictionary to save: as is in one process; on rank 0 the (gathered) full dictionary,
    None on the other ranks."""
    if not is_initialized() or world_size() == 1:
        return sae
    for name in ("_grad_sync", "grad_sync"):
        if getattr(sae, name, None) is not None:
            getattr(sae, name).remove()
            setattr(sae, name, None)
    enable_data_parallel(False)
    if isinstance(sae, Gathers):
        return sae.gather()
    return sae if is_main() else None
