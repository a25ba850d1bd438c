"""The pool: a seeded sample of the run's contexts (the ones its feature store was built from) with the exact
activations of every unit the examples need, computed in one pass of the model.

Non-activating examples must be verified non-activating, and the store holds a feature's activations only on its
own examples; so negatives (random, neighbour and semantic ones) are cut from the pool, where every needed unit's
value is known on every token. Controls (neurons, random directions) also take their activating examples from
it. Tokens the run's token policy drops (position 0, special tokens, norm outliers) count as silent.

    pool.safetensors  ids (P, T) int32 token ids · keep (P, T) bool · source (P,) int64 (context index in the
                      store's token stream) · ctx/pos/unit/val: the non-zero values (after thresholding, for
                      dense units)
    pool.json         units, thresholds (dense units), token texts, settings
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, atomic_write_json
from ..data.harvest import harvest


class Pool:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.ids, self.keep, self.source = tensors["ids"].long(), tensors["keep"].bool(), tensors["source"].long()
        self.meta = meta
        self.texts = {int(k): v for k, v in meta["texts"].items()}
        self.units = [int(u) for u in meta["units"]]
        self.thresholds = {int(k): v for k, v in (meta.get("thresholds") or {}).items()}
        order = torch.argsort(tensors["unit"].long(), stable=True)
        unit = tensors["unit"].long()[order]
        self._ctx, self._pos, self._val = tensors["ctx"].long()[order], tensors["pos"].long()[order], tensors["val"].float()[order]
        bounds = torch.searchsorted(unit, torch.tensor(self.units, dtype=torch.long))
        ends = torch.searchsorted(unit, torch.tensor(self.units, dtype=torch.long), right=True)
        self._span = {u: (int(a), int(b)) for u, a, b in zip(self.units, bounds, ends)}
        self._dense: dict[int, torch.Tensor] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)  # type: ignore[return-value]

    def acts(self, unit: int) -> torch.Tensor:
        """The unit's (P, T) values on the pool (0 where silent or dropped)."""
        if unit not in self._dense:
            if unit not in self._span:
                raise KeyError(f"unit {unit} is not in the pool")
            a, b = self._span[unit]
            dense = torch.zeros(self.shape)
            dense[self._ctx[a:b], self._pos[a:b]] = self._val[a:b]
            self._dense[unit] = dense
        return self._dense[unit]

    def tokens(self, row: int, start: int, stop: int) -> list[str]:
        return [self.texts[int(t)] for t in self.ids[row, start:stop].tolist()]


def load_pool(folder: Path) -> Pool | None:
    try:
        meta = json.loads((folder / "pool.json").read_text(encoding="utf-8"))
        return Pool(load_file(folder / "pool.safetensors"), meta)
    except (OSError, ValueError, KeyError):
        return None


def build_pool(folder: Path, model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, units: Any, wanted: list[int], *,
               n_contexts: int, seed: int, batch_contexts: int, max_norm_multiple: float | None, density: float | None,
               settings: dict, progress: bool = False) -> Pool:
    """Compute and write the pool (module docstring) for the units `wanted` of `units`, from the contexts `ids` with
    their token `mask`. Dense units are thresholded at their (1 − density) quantile over the pool."""
    gen = torch.Generator().manual_seed(int(seed))
    rows = torch.sort(torch.randperm(len(ids), generator=gen)[:n_contexts]).values
    p_ids, p_mask = ids[rows], mask[rows]
    wanted = sorted(set(int(u) for u in wanted))
    keep = torch.zeros_like(p_mask)
    parts_ctx, parts_pos, parts_val = [], [], []
    for batch in harvest(model, p_ids, [units.site], batch_size=batch_contexts, mask=p_mask, progress=progress,
                         max_norm_multiple=max_norm_multiple):
        keep[batch.context_idx, batch.position] = True
        parts_ctx.append(batch.context_idx)
        parts_pos.append(batch.position)
        parts_val.append(units.encode(batch.acts[units.site], wanted))
    ctx = torch.cat(parts_ctx) if parts_ctx else torch.zeros(0, dtype=torch.long)
    pos = torch.cat(parts_pos) if parts_pos else torch.zeros(0, dtype=torch.long)
    values = torch.cat(parts_val) if parts_val else torch.zeros(0, len(wanted))
    thresholds = None
    if units.dense and len(values):
        q = 1.0 - float(density)
        tau = torch.stack([torch.quantile(values[:, j].double(), q).float() for j in range(values.shape[1])])
        values = (values - tau).clamp_min(0.0)
        thresholds = {str(u): float(t) for u, t in zip(wanted, tau)}
    r, c = values.nonzero(as_tuple=True)
    tensors = {"ids": p_ids.int().contiguous(), "keep": keep.contiguous(), "source": rows.long().contiguous(),
               "ctx": ctx[r].int().contiguous(), "pos": pos[r].short().contiguous(),
               "unit": torch.tensor(wanted, dtype=torch.int32)[c].contiguous(), "val": values[r, c].float().contiguous()}
    distinct = sorted(set(p_ids.flatten().tolist()))
    texts = dict(zip(distinct, tokenizer.batch_decode([[i] for i in distinct]))) if distinct else {}
    meta = {"units": wanted, "thresholds": thresholds, "density": density, "texts": {str(k): v for k, v in texts.items()},
            "settings": settings}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "pool.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_json(folder / "pool.json", meta)  # written last: its presence marks a complete pool
    return Pool(tensors, meta)
