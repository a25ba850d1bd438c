"""The driver of closed-form / greedy fitters (`Dictionary.fitter`: ITDA, SNMF), with the trainer's run conventions.

One ordered pass over an activation stream (ActivationBatch-like objects: `acts[site]`, `context_idx`,
`position`, `token_ids`), cut into steps of `train.batch_size` tokens; each step is handed to
`fitter.update(x, context_idx, position, token_ids)`, which returns the metrics logged to
`run_dir/metrics.jsonl` (with `step`, `tokens`, `elapsed_s`) every `train.log_every` steps. The fitter's
`state()` is checkpointed to `run_dir/checkpoint` (train.checkpoint: tensors + state.json, written
atomically) every `train.checkpoint_every` steps and at the end. `resume=True` restores the state and skips
the tokens already read, so the stream must be the same ordered sequence (the run digest is checked);
a fresh start deletes an older checkpoint and log. The pass ends with the stream or when `fitter.done`.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import atomic_write_text
from ..dictionaries.snmf import DEAD_TOKENS, SNMFDictionary, SNMFFitter
from ..errors import FeaturekitError
from .checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint


def fit_stream(fitter: Any, batches: Iterable[Any], site: str, run_dir: Path, tc: Any, *, digest: str = "",
               resume: bool = False, progress: bool = True) -> dict:
    """Run `fitter` over `batches` (module docstring); returns the last metrics row with `steps` and `tokens`."""
    run_dir = Path(run_dir)
    ckpt, log_path = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    step = tokens = 0
    if resume:
        meta = read_checkpoint_meta(ckpt)
        if meta is None or meta.get("digest") != digest or meta.get("kind") != "fitter":
            raise FeaturekitError(f"no fitter checkpoint of this config and activation set in {ckpt}; resume with the run's own "
                                  f"config.json, or start afresh under a new run name")
        tensors, meta = load_checkpoint(ckpt)
        fitter.load_state(tensors)
        step, tokens = meta["step"], meta["tokens"]
        _truncate_log(log_path, step)
    else:
        log_path.unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)

    def save() -> None:
        save_checkpoint(ckpt, fitter.state(), {"kind": "fitter", "step": step, "tokens": tokens, "digest": digest})

    row: dict = {}
    start = time.time()
    bar = tqdm(desc="fit", unit="tok", unit_scale=True, initial=tokens, disable=not progress, dynamic_ncols=True)
    try:
        for x, ctx, pos, tok in _steps(batches, site, tc.batch_size, skip=tokens):
            if fitter.done:
                break
            metrics = fitter.update(x, ctx, pos, tok)
            step, tokens = step + 1, tokens + x.shape[0]
            bar.update(x.shape[0])
            row = {"step": step, "tokens": tokens, **metrics, "elapsed_s": round(time.time() - start, 2)}
            if step % tc.log_every == 0:
                _log(log_path, row)
            if step % tc.checkpoint_every == 0:
                save()
    finally:
        bar.close()
    if step == 0:
        raise FeaturekitError("the activation stream is empty: harvest some tokens before fitting")
    if row and row["step"] % tc.log_every:
        _log(log_path, row)
    save()
    return {**row, "steps": step, "tokens": tokens}


def _steps(batches: Iterable[Any], site: str, size: int, skip: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """(x, context_idx, position, token_ids) pieces of ≤ `size` tokens, in order, after skipping `skip` tokens."""
    for batch in batches:
        fields = (batch.acts[site], batch.context_idx, batch.position, batch.token_ids)
        n = fields[0].shape[0]
        start = min(skip, n)
        skip -= start
        for i in range(start, n, size):
            yield tuple(f[i:i + size] for f in fields)


def _log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# -- SNMF from tensors or a cache, without the pipeline ---------------------------------------------------
def fit_snmf(data: torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[Any]], n_latents: int, *,
             sparsity: float = 0.01, nnls_iters: int = 30, decay: float = 0.8, passes: int = 3, chunk_tokens: int = 4096,
             seed: int = 0, dead_tokens: int = DEAD_TOKENS, run_dir: str | Path | None = None, resume: bool = False,
             progress: bool = False, checkpoint_every: int = 50, log_every: int = 10) -> SNMFDictionary:
    """Fit SNMF by the streaming fitter (`dictionaries/snmf.py`) and return the dictionary.

    `data`: an (n, d) tensor, a list of (n_i, d) tensors, or a callable returning a fresh iterable of
    tensors or `ActivationBatch`es (read once per pass; e.g. `lambda: cache.iter_shards(sites=[site])`
    for an `ActivationCache`: the batch's only site is used). With `run_dir` the fit keeps
    `run_dir/checkpoint` and `run_dir/metrics.jsonl` (`fit_stream`), and `resume=True` continues
    a killed fit from its last checkpoint to the same result.
    """
    if callable(data):
        read = data
    elif torch.is_tensor(data) or isinstance(data, (list, tuple)):
        read = (lambda: [data]) if torch.is_tensor(data) else (lambda: data)
    else:
        raise FeaturekitError("fit_snmf reads the data once per pass: pass a tensor, a list of tensors or a callable "
                              "returning a fresh iterable (e.g. lambda: cache.iter_shards(sites=[site])), not an iterator")
    stream = (_as_batch(b) for _ in range(passes) for b in read())
    first = next(stream, None)
    if first is None:
        raise FeaturekitError("fit_snmf got no activations")
    stream = itertools.chain([first], stream)
    fitter = SNMFFitter(first.acts["x"].shape[-1], n_latents, sparsity, nnls_iters, decay, passes, seed, dead_tokens)
    if run_dir is None:
        for batch in stream:  # chunked within each batch, as fit_stream does
            for chunk in _chunks(batch.acts["x"], chunk_tokens):
                fitter.update(chunk)
    else:
        tc = SimpleNamespace(batch_size=chunk_tokens, log_every=log_every, checkpoint_every=checkpoint_every)
        fit_stream(fitter, stream, "x", Path(run_dir), tc, resume=resume, progress=progress,
                   digest=f"snmf:{fitter.d_in}:{n_latents}:{sparsity}:{nnls_iters}:{decay}:{passes}:{chunk_tokens}:{seed}:{dead_tokens}")
    return fitter.finish()




def _as_batch(item: Any) -> Any:
    """A tensor, or an ActivationBatch with one site, as an object with acts["x"] and index tensors."""
    if torch.is_tensor(item):
        x = item
    else:
        if len(item.acts) != 1:
            raise FeaturekitError(f"fit_snmf needs batches with one site, got {sorted(item.acts)}; "
                                  f"pass lambda: cache.iter_shards(sites=[site])")
        (x,) = item.acts.values()
    zeros = torch.zeros(x.shape[0], dtype=torch.long)
    return SimpleNamespace(acts={"x": x}, context_idx=zeros, position=zeros, token_ids=zeros)




def _chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]
