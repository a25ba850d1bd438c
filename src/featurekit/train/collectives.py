"""The collectives of distributed training: data-parallel batch statistics (each rank's slice of the global batch,
sums and denominators over ranks, logged metrics), gradient and parameter synchronisation (`GradSync`), the
autograd-aware sum of a latent-sharded dictionary's partial results, and object gathers for the feature store.
Each is the identity (or a no-op) in one process. Part of `train.distributed` (its docstring has the overview)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FeaturekitError
from .process_group import data_parallel, enable_data_parallel, is_initialized, is_main, rank, world_size


# -- data-parallel batch statistics -----------------------------------------------------------------
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


# -- gradients and parameters -------------------------------------------------------------------
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


# -- autograd-aware sums and gathers (latent shards) ---------------------------------------------
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


# -- objects (the feature store under torchrun) -------------------------------------------------
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
