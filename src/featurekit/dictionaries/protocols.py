"""The interfaces a method may implement beyond `Dictionary`, declared instead of found by `hasattr`.

The trainer, the pipeline and the distributed helpers test for these with `isinstance` (the protocols
are runtime-checkable); the registry's `HyperParams` is the one for a method's Params. A method needs
none of them to work: each adds one optional behaviour.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Fitter(Protocol):
    """A closed-form or greedy fitter (`Dictionary.fitter`: ITDA, SNMF) instead of the gradient trainer.

    `pipeline.run_fit` (and `train.fit.fit_stream`) build it with `from_config`, then feed it the training
    activations in stream order — no shuffle, `passes` passes — cut into steps of `train.batch_size`
    tokens, until the stream ends or `done`. `update` returns the metrics logged to metrics.jsonl;
    `state`/`load_state` are the checkpoint (a resume skips the tokens already read); `finish` returns
    the fitted Dictionary."""

    passes: int

    @property
    def done(self) -> bool: ...

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, *, seed: int | None = None, batch_size: int = ...) -> Fitter: ...

    def update(self, x: torch.Tensor, context_idx: torch.Tensor, position: torch.Tensor,
               token_ids: torch.Tensor) -> dict[str, float]: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def finish(self) -> Any: ...


@runtime_checkable
class RampedPenalty(Protocol):
    """A sparsity penalty the trainer ramps in: it sets `sparsity_scale` from 0 to 1 over the first
    `train.sparsity_warmup_fraction` of the steps, and the method multiplies its λ by it (ReLU, JumpReLU)."""

    sparsity_scale: float


@runtime_checkable
class FoldsDecoderNorms(Protocol):
    """A method trained with decoder rows of free norm that can move the norms into the encoder side
    without changing what it computes (ReLU + L1): the saved file then has unit-norm decoder rows."""

    def fold_decoder_norms(self) -> None: ...


@runtime_checkable
class Gathers(Protocol):
    """A dictionary split across processes (latent-sharded training) that assembles the whole one."""

    def gather(self) -> Any: ...
