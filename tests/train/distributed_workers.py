"""Worker code for tests/train/test_distributed.py: what each of 2 gloo processes runs, and the same
training in one process (the reference). Shared by both sides so that they train on identical data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from featurekit.config import TrainConfig
from featurekit.dictionaries import TopKSAE, save
from featurekit.train import Trainer
from featurekit.train import distributed as D
from featurekit.train.losses import fvu_loss
from featurekit.train.sharded import ShardedTopKSAE

D_IN, N_LATENTS, K, BATCH, STEPS = 16, 64, 4, 64, 6


def data() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An init sample and STEPS global batches of raw activations (sparse mixtures plus an offset)."""
    gen = torch.Generator().manual_seed(7)
    feats = torch.nn.functional.normalize(torch.randn(40, D_IN, generator=gen), dim=1)

    def draw(n: int) -> torch.Tensor:
        coeff = (torch.rand(n, 40, generator=gen) < 0.1) * torch.rand(n, 40, generator=gen) * 3
        return coeff @ feats + 0.5 + 0.1 * torch.randn(n, D_IN, generator=gen)

    return draw(256), [draw(BATCH) for _ in range(STEPS)]


def dp_config() -> TrainConfig:
    # a short dead window so that latents die and the aux-k loss is part of the compared loss
    return TrainConfig(lr=1e-2, warmup_steps=1, log_every=1, checkpoint_every=3, dead_tokens=2 * BATCH, max_grad_norm=0.05)


def shard_config() -> TrainConfig:
    return TrainConfig(lr=1e-2, warmup_steps=1, log_every=1, checkpoint_every=1000, dead_tokens=10**9)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def first_step_grads(sae, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x̂ and the gradients of the FVU loss on one batch (left zeroed afterwards)."""
    x = batch * sae.input_scale
    out = sae(x)
    fvu_loss(x, out.x_hat).backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    return out.x_hat.detach(), grads


def reference(out: Path) -> dict:
    """Everything in one process: data-parallel reference, unsharded TopK reference, both on whole batches."""
    torch.set_num_threads(1)
    sample, batches = data()
    res = {}
    sae = TopKSAE(D_IN, N_LATENTS, k=K, seed=0)
    trainer = Trainer(sae, dp_config(), out / "ref_dp", total_steps=STEPS)
    trainer.init_from_data(sample)
    trainer.fit(iter(batches), progress=False)
    res["dp_state"], res["dp_metrics"] = sae.state_dict(), metrics(out / "ref_dp")
    sae = TopKSAE(D_IN, N_LATENTS, k=K, seed=1)
    res["init_state"] = {k: v.clone() for k, v in sae.state_dict().items()}
    trainer = Trainer(sae, shard_config(), out / "ref_shard", total_steps=STEPS)
    trainer.init_from_data(sample)
    res["first_x_hat"], res["first_grads"] = first_step_grads(sae, batches[0])
    trainer.fit(iter(batches), progress=False)
    res["shard_state"], res["shard_metrics"] = sae.state_dict(), metrics(out / "ref_shard")
    return res


def worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a torchrun-like launch (the environment torchrun would set, then `init_from_env`)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(out)
    assert D.init_from_env() and D.world_size() == world and D.rank() == rank
    sample, batches = data()

    # (a) data parallel: each rank its half of every global batch; rank 1 is given its own folder (must stay empty)
    sae = TopKSAE(D_IN, N_LATENTS, k=K, seed=0 if rank == 0 else 123)  # rank 1 starts elsewhere: broadcast fixes it
    trainer = Trainer(sae, dp_config(), out / ("dp" if rank == 0 else "dp_rank1"), total_steps=STEPS)
    trainer.init_from_data(sample)
    sync = D.data_parallel_setup(sae)
    trainer.fit(D.shard_batches(iter(batches)), progress=False)
    sync.remove()
    D.enable_data_parallel(False)
    torch.save(sae.state_dict(), out / f"dp_state_{rank}.pt")

    # (b) latent sharded: every rank sees every whole batch, holds 32 of the 64 latents
    shard = ShardedTopKSAE(D_IN, N_LATENTS, k=K, seed=1)
    same_init = ShardedTopKSAE.from_dictionary(TopKSAE(D_IN, N_LATENTS, k=K, seed=1))
    init_equal = all(torch.equal(a, b) for a, b in zip(shard.state_dict().values(), same_init.state_dict().values()))
    trainer = Trainer(shard, shard_config(), out / f"shard_rank{rank}", total_steps=STEPS)
    trainer.init_from_data(sample)
    first_x_hat, grads = first_step_grads(shard, batches[0])
    grads = {name: D.all_gather_cat(g, dim=0) if name != "b_dec" else g for name, g in grads.items()}
    trainer.fit(iter(batches), progress=False)
    full = shard.gather()
    x = torch.cat(batches[:2])
    local_codes = shard.encode(x)
    codes = D.all_gather_cat(local_codes.contiguous())
    recon = shard.decode(local_codes)
    if rank == 0:
        save(full, out / "dictionary")  # (c) a plain topk file
        torch.save({"state": full.state_dict(), "first_x_hat": first_x_hat, "first_grads": grads, "codes": codes, "recon": recon, "x": x,
                    "init_equal": init_equal, "local_latents": shard.n_latents}, out / "shard.pt")
    D.destroy()
