"""A TopK SAE whose latents are split across the ranks of a `torch.distributed` process group.

For dictionaries too wide for one device: rank r of N holds the contiguous latents
[r·F/N, (r+1)·F/N) — its rows of W_enc, b_enc and W_dec — and a replica of b_dec. Every rank sees the
same (whole) batch. Forward, per token:

1. local pre-activations π_r = (x − b_dec) W_enc,rᵀ + b_enc,r and the local top-k (values, global indices);
2. all_gather of the N·k candidates, the global top-k among them — exactly TopK_k(π) of the whole dictionary;
3. each rank decodes only its own selected latents (sparse decode) and the partial x̂ are summed by an
   all_reduce whose backward passes the gradient through unchanged (`train.distributed.AllReduceSum`:
   every rank computes the same loss), so each rank's parameter gradients are its slice of the
   single-process gradients. b_dec is added once (on rank 0); its per-rank gradients are partial
   sums (decoder path on rank 0, each rank's encoder path) and are summed after every backward pass
   (`train.distributed.GradSync`, no trainer change).

Decoder renormalisation and gradient projection are per row, so they stay local; Adam is elementwise.
The one trainer trains it unchanged, each rank in its own run folder (its checkpoint is its shard).
`gather()` assembles the full `TopKSAE` on rank 0 (save it with `fileformat.save`: a plain `topk` file).

Aux-k: the trainer's aux-k loss runs per shard — each rank's dead latents (its own counters) compete
among themselves for the residual (k_aux per shard); the total objective is recon + Σ_r aux_r. It equals
the single-process aux-k loss only while no latent is dead; tests compare the regime without dead latents.
Logged `dead_fraction` is rank 0's shard; `l0` is the global count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..dictionaries import kernels
from ..dictionaries.base import Dictionary, Output
from ..dictionaries.topk import TopKSAE
from ..errors import FeaturekitError
from . import distributed as D


class _ShardOutput(Output):
    """Local sparse codes (as `Output`), and the L0 of the whole dictionary."""

    @torch.no_grad()
    def l0(self) -> float:
        """Non-zero codes per token over all shards (a collective: every rank must call it)."""
        count = (self.values.detach() != 0).sum().to(torch.float64).reshape(1)
        if D.is_initialized() and dist.get_backend() == "nccl":
            count = count.cuda()
        if D.is_initialized():
            dist.all_reduce(count)
        return count.item() / max(self.values.shape[0], 1)


class ShardedTopKSAE(Dictionary):
    """Rank `rank`'s slice of a TopK SAE with `n_latents_total` latents (`n_latents` is the local count)."""

    method = "topk_sharded"  # not in fileformat.METHODS: save the gathered TopKSAE
    uses_auxk = True

    def __init__(self, d_in: int, n_latents_total: int, k: int = 32, seed: int | None = None,
                 rank: int | None = None, world_size: int | None = None):
        rank = D.rank() if rank is None else rank
        world_size = D.world_size() if world_size is None else world_size
        if n_latents_total % world_size:
            raise FeaturekitError(f"n_latents ({n_latents_total}) must be a multiple of the number of processes ({world_size}) "
                                  f"to shard the latents")
        if not 0 < k <= n_latents_total:
            raise FeaturekitError(f"k must be in [1, n_latents={n_latents_total}], got {k}")
        local = n_latents_total // world_size
        super().__init__(d_in, local)
        self.k, self.n_latents_total, self.rank, self.world_size = k, n_latents_total, rank, world_size
        self.offset = rank * local
        self.grad_sync: D.GradSync | None = None
        # the same init as TopKSAE(d_in, n_latents_total, k, seed=seed), sliced (generated whole on the CPU)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            w = torch.randn(n_latents_total, d_in, generator=gen)[self.offset:self.offset + local]
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
            self.W_enc.copy_(self.W_dec)
        self._attach()

    @classmethod
    def from_dictionary(cls, full: TopKSAE, rank: int | None = None, world_size: int | None = None) -> ShardedTopKSAE:
        """This rank's slice of an existing TopKSAE (exact selection), input scale included."""
        if type(full) is not TopKSAE or full.selection != "exact":
            raise FeaturekitError(f"latent sharding supports the exact TopK SAE (method 'topk'), not {full.method!r}")
        shard = cls(full.d_in, full.n_latents, k=full.k, seed=0, rank=rank, world_size=world_size)
        sl = slice(shard.offset, shard.offset + shard.n_latents)
        with torch.no_grad():
            shard.W_enc.copy_(full.W_enc[sl])
            shard.b_enc.copy_(full.b_enc[sl])
            shard.W_dec.copy_(full.W_dec[sl])
            shard.b_dec.copy_(full.b_dec)
            shard.input_scale.copy_(full.input_scale)
        return shard.to(full.W_dec.device)

    def _attach(self) -> None:
        """Sum b_dec's per-rank partial gradients after every backward pass."""
        if D.is_initialized() and D.world_size() > 1 and self.grad_sync is None:
            self.grad_sync = D.GradSync([self.b_dec], average=False)

    # -- selection and decoding -------------------------------------------------------------------
    @torch.no_grad()
    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local slots of the global top-k: idx (N, k) local latent indices (0 where the slot's latent lives
        on another rank) and mine (N, k) whether it lives here."""
        values, local_idx = pre.topk(min(self.k, self.n_latents), dim=-1, sorted=False)
        cand_v = D.all_gather_cat(values.contiguous())
        cand_i = D.all_gather_cat((local_idx + self.offset).contiguous())
        chosen = cand_i.gather(-1, cand_v.topk(self.k, dim=-1, sorted=False).indices)
        mine = (chosen >= self.offset) & (chosen < self.offset + self.n_latents)
        return torch.where(mine, chosen - self.offset, torch.zeros_like(chosen)), mine

    def _decode_partial(self, idx: torch.Tensor, values: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of each rank's decoded latents, b_dec added once (rank 0's share)."""
        partial = kernels.sparse_decode(idx, values, self.W_dec)
        if self.rank == 0:
            partial = partial + b_dec
        return D.all_reduce_sum(partial)

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward (x in the training scale); every rank must call it with the same x."""
        self._attach()
        x = self._check_input(x)
        pre = self.encoder.pre(x)  # local π
        idx, mine = self._select(pre)
        values, fast = kernels.sparse_codes(x, self.encoder, kernels.Picked(idx, keep=mine, pre=pre), act=torch.relu)
        out = _ShardOutput(self._decode_partial(idx, values, self.b_dec), pre=pre, fast=fast)
        out.losses.update(self.extra_losses(x, out))
        return out

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Local codes (N, F/N) of the global top-k, from local pre-activations (a collective)."""
        idx, mine = self._select(pre)
        values = pre.gather(-1, idx).relu() * mine
        return torch.zeros_like(pre).scatter_add_(-1, idx, values)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Local codes in raw units → the full reconstruction (a collective)."""
        partial = codes @ self.W_dec
        if self.rank == 0:
            partial = partial + self.b_dec / self.input_scale
        return D.all_reduce_sum(partial)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "topk", "k": self.k}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k}

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, latents [{self.offset}, {self.offset + self.n_latents}) of {self.n_latents_total} "
                f"on rank {self.rank}/{self.world_size}, k={self.k}")

    # -- the full dictionary -------------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, dst: int = 0) -> TopKSAE | None:
        """The whole TopKSAE on rank `dst` (None elsewhere); a collective."""
        parts = {}
        for name in ("W_enc", "b_enc", "W_dec"):
            t = getattr(self, name).detach().contiguous()
            if D.is_initialized() and D.world_size() > 1:
                chunks = [torch.empty_like(t) for _ in range(D.world_size())] if D.rank() == dst else None
                dist.gather(t, chunks, dst=dst)
                parts[name] = torch.cat(chunks) if chunks is not None else None
            else:
                parts[name] = t
        if D.rank() != dst:
            return None
        full = TopKSAE(self.d_in, self.n_latents_total, k=self.k).to(device=self.W_dec.device, dtype=self.W_dec.dtype)
        for name, t in parts.items():
            getattr(full, name).copy_(t)
        full.b_dec.copy_(self.b_dec)
        full.input_scale.copy_(self.input_scale)
        return full
