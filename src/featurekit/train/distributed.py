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

This module is the one namespace the trainer, the pipeline and the feature store use: the process group and
the data-parallel switch live in `process_group`, the collectives (batch statistics, `GradSync`, `AllReduceSum`,
object gathers) in `collectives`, both re-exported here; the pipeline's entry points (`prepare`, `after_init`,
`rank_batches`, `finish`) are below.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..dictionaries.protocols import Gathers
from ..errors import FeaturekitError
from .collectives import (
    AllReduceSum,
    GradSync,
    all_gather_cat,
    all_reduce_grads,
    all_reduce_sum,
    batch_sum,
    broadcast_object,
    broadcast_params,
    centered_sum_sq,
    data_parallel_setup,
    gather_objects,
    global_rows,
    reduce_metrics,
    shard_batches,
    shard_rows,
)
from .process_group import (
    barrier,
    data_parallel,
    destroy,
    device,
    enable_data_parallel,
    init_from_env,
    is_initialized,
    is_main,
    launched,
    local_rank,
    rank,
    train_device,
    world_size,
    writes,
)

#: the one namespace the trainer, the pipeline, the feature store and the tests use (`distributed.rank()`, ...)
__all__ = [
    "AllReduceSum", "GradSync", "after_init", "all_gather_cat", "all_reduce_grads", "all_reduce_sum", "barrier", "batch_sum",
    "broadcast_object", "broadcast_params", "centered_sum_sq", "data_parallel", "data_parallel_setup", "destroy", "device",
    "enable_data_parallel", "finish", "gather_objects", "global_rows", "init_from_env", "is_initialized", "is_main", "launched",
    "local_rank", "prepare", "rank", "rank_batches", "reduce_metrics", "shard_batches", "shard_rows", "train_device",
    "world_size", "writes",
]


# -- the pipeline's entry points (featurekit train / run under torchrun) ----------------------------
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
