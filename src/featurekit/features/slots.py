"""Mergeable per-group selections: the k best entries of each group, the same whatever the order.

`TopSlots` keeps, for each of G groups, the k entries with the largest `score`, ties broken by the
smaller `key` (an int64 unique per entry: context · T + position). The kept set is a function of the
set of entries offered, not of how they were cut into batches or spread over processes: `merge` of
two `TopSlots` equals the one built from the union of their entries. That makes the feature store's
examples exact under torchrun (each rank builds on its tokens, rank 0 merges) and after a resume.

Used with score = activation for the top examples, and with score = −u, u = `uniform_key(key, group)`
(a hash of the entry into [0, 1)), for uniform samples without replacement: the k entries with the
smallest random keys are a uniform sample, and the smallest keys of a union are among the smallest
keys of its parts, so a sample drawn per part and merged is the sample of the whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FeaturekitError

_EMPTY = -1  # key of an empty slot


def uniform_key(key: Tensor, salt: Tensor | int) -> Tensor:
    """A deterministic pseudo-random float in [0, 1) per (key, salt): splitmix64-style mix of key and salt, 24 of its bits.
    The same entry gets the same number in every process and every run."""
    x = key.long() * 0x632BE59BD9B4E019 + torch.as_tensor(salt, dtype=torch.long, device=key.device) * 0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed int64
    x = (x ^ (x >> 27)) * -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB
    x = x ^ (x >> 31)
    return ((x >> 39) & 0xFFFFFF).float() / float(1 << 24)  # bits 39..62 (the last xor leaves bit 63 clear)


def sortable(scores: Tensor) -> Tensor:
    """An int64 per float32 score that sorts like the float (−0.0 after +0.0 aside; NaN is never offered)."""
    bits = scores.float().contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # negative floats: larger magnitude → smaller


class TopSlots:
    """The k entries with the largest score per group (module docstring). Empty slots have key −1 and
    score −inf. `value` is a float carried along (the activation); all state is on the CPU.

    Offered entries that can still enter (score ≥ the group's k-th score, a floor that only rises) wait in
    a buffer and are merged in one sort when the buffer is large, or when the result is read: the merge
    costs O(G·k) whatever the number of entries, so it is paid once per many batches."""

    def __init__(self, n_groups: int, k: int) -> None:
        if n_groups < 1 or k < 1:
            raise FeaturekitError(f"TopSlots needs n_groups >= 1 and k >= 1, got {n_groups} and {k}")
        self.n_groups, self.k = int(n_groups), int(k)
        self.score = torch.full((n_groups, k), float("-inf"))
        self.key = torch.full((n_groups, k), _EMPTY, dtype=torch.long)
        self.value = torch.zeros(n_groups, k)
        self.pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.pending_size = 0

    def floor(self) -> Tensor:
        """(G,) the score an entry must reach to enter its group: the k-th score, −inf while a slot is free
        (a lower bound while entries wait in the buffer)."""
        return self.score[:, -1]

    def offer(self, groups: Tensor, scores: Tensor, keys: Tensor, values: Tensor) -> None:
        """Offer entries (1-D tensors of one length); those that rank among their group's k best are kept."""
        groups, scores, keys, values = groups.long().cpu(), scores.float().cpu(), keys.long().cpu(), values.float().cpu()
        keep = scores >= self.floor()[groups]  # ties with the k-th are kept here; the merge resolves them by key
        if not bool(keep.any()):
            return
        self.pending.append((groups[keep], scores[keep], keys[keep], values[keep]))
        self.pending_size += int(keep.sum())
        if self.pending_size >= max(self.n_groups * self.k // 2, 1 << 16):
            self.flush()

    def flush(self) -> None:
        """Merge the waiting entries into the slots: one sort of (group, −score, key), the first k of each group."""
        if not self.pending:
            return
        groups, scores, keys, values = (torch.cat(t) for t in zip(*self.pending))
        self.pending, self.pending_size = [], 0
        touched = torch.zeros(self.n_groups, dtype=torch.bool)
        touched[groups] = True
        old_g, old_s = ((self.key >= 0) & touched[:, None]).nonzero(as_tuple=True)
        g = torch.cat([old_g, groups])
        s = torch.cat([self.score[old_g, old_s], scores])
        key = torch.cat([self.key[old_g, old_s], keys])
        v = torch.cat([self.value[old_g, old_s], values])
        order = torch.sort(key, stable=True).indices  # minor: key ascending
        major = (g[order] << 32) - sortable(s[order])  # group ascending, then score descending (sortable fits in 32 bits)
        order = order[torch.sort(major, stable=True).indices]
        g, s, key, v = g[order], s[order], key[order], v[order]
        first = torch.ones_like(g, dtype=torch.bool)
        first[1:] = (g[1:] != g[:-1]) | (key[1:] != key[:-1])  # an entry offered twice counts once
        g, s, key, v = g[first], s[first], key[first], v[first]
        per_group = torch.bincount(g, minlength=self.n_groups)
        rank = torch.arange(g.numel()) - (torch.cumsum(per_group, 0) - per_group)[g]
        kept = rank < self.k
        self.score[touched], self.key[touched], self.value[touched] = float("-inf"), _EMPTY, 0.0
        self.score[g[kept], rank[kept]] = s[kept]
        self.key[g[kept], rank[kept]] = key[kept]
        self.value[g[kept], rank[kept]] = v[kept]

    def merge(self, other: TopSlots) -> None:
        """Add every entry of `other` (same shape): the result is the selection of the union."""
        if (other.n_groups, other.k) != (self.n_groups, self.k):
            raise FeaturekitError(f"cannot merge TopSlots of shape {(other.n_groups, other.k)} into {(self.n_groups, self.k)}")
        other.flush()
        g, s = (other.key >= 0).nonzero(as_tuple=True)
        self.offer(g, other.score[g, s], other.key[g, s], other.value[g, s])
        self.flush()

    def entries(self, group: int) -> list[tuple[float, int, float]]:
        """(score, key, value) of a group's kept entries, best first."""
        self.flush()
        keep = self.key[group] >= 0
        return list(zip(self.score[group][keep].tolist(), self.key[group][keep].tolist(), self.value[group][keep].tolist()))

    def state(self) -> dict[str, Tensor]:
        self.flush()
        return {"score": self.score, "key": self.key, "value": self.value}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> TopSlots:
        slots = cls(*state["key"].shape)
        slots.score, slots.key, slots.value = state["score"].float(), state["key"].long(), state["value"].float()
        return slots
