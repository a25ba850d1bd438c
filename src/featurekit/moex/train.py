"""Train a MoexLM on a token stream, in a run folder, resumable after any kill.

The data is a 1-D LongTensor of token ids and a vocabulary size (character-level PGN, a tokenised
corpus, ...). The last ``val_fraction`` of the stream is held out for validation. Batch ``s`` is
``batch_size`` windows of ``seq_len + 1`` tokens starting at offsets drawn by a generator seeded with
``(seed, s)``: a batch depends on its step number alone, so a resumed run sees exactly the batches an
uninterrupted one would.

Run folder (``RUN_DIR``)::

    config.json        the LM config, the train settings, the data's size and sha256 (a different config is refused)
    checkpoint/        featurekit's checkpoint (train/checkpoint.py): weights, AdamW state, step; every checkpoint_every steps
    metrics.jsonl      one line per logged step (loss, aux, lr); lines after the last checkpoint are dropped on resume
    model.safetensors  the final weights;  model.json  the LM config (load_lm reads both)
    summary.json       final train/validation loss, parameter counts, seconds
    vocab.json         the token strings, when given (a character-level stream's characters)

Everything is written atomically; the folder is locked while a process trains in it (rundir.py).
Resuming (call ``train_lm`` again on the same folder and settings) continues from the checkpoint and
ends with the same weights, bit for bit on the same machine and thread count, as a run never killed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import atomic_write_json, atomic_write_text
from ..errors import FeaturekitError
from ..models.moexlm.folder import load_lm, save_lm
from ..models.moexlm.lm import LMConfig, MoexLM, parameter_counts, upcycle
from ..rundir import check_config, locked, sweep
from ..train.checkpoint import load_checkpoint, optimizer_tensors, read_checkpoint_meta, restore_optimizer, save_checkpoint
from ..train.schedule import lr_factor


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 10
    val_fraction: float = 0.05
    val_batches: int = 8
    seed: int = 0
    upcycle_noise: float = 0.01

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise FeaturekitError("steps, batch_size, checkpoint_every and log_every must be ≥ 1")
        if not 0 < self.val_fraction < 1:
            raise FeaturekitError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def split_stream(tokens: torch.Tensor, vocab_size: int, seq_len: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) parts of a 1-D token stream, checked."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.dtype != torch.long:
        raise FeaturekitError("the training data must be a 1-D LongTensor of token ids (e.g. torch.tensor(ids, dtype=torch.long))")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise FeaturekitError(f"token ids must lie in [0, vocab_size={vocab_size}); found {tokens.min().item()}..{tokens.max().item()}")
    n_val = int(tokens.numel() * val_fraction)
    if n_val < seq_len + 1 or tokens.numel() - n_val < seq_len + 1:
        raise FeaturekitError(f"a stream of {tokens.numel()} tokens is too short for seq_len={seq_len} with val_fraction="
                              f"{val_fraction}: both parts need at least seq_len + 1 tokens; give more data or a shorter seq_len")
    return tokens[:-n_val], tokens[-n_val:]


def batch_at(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, seq_len): the windows of batch number ``step`` (module docstring)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
    windows = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


EVAL_STEP = 1 << 40  # evaluation batches are numbered from here: never a training step


@torch.no_grad()
def evaluate_loss(model: MoexLM, stream: torch.Tensor, batches: int, batch_size: int, seed: int) -> float:
    """Mean cross-entropy (nats/token) on ``batches`` fixed batches of ``stream`` (eval mode)."""
    was = model.training
    model.eval()
    seq, device = model.config.seq_len, model.tok.weight.device
    total = 0.0
    for i in range(batches):
        inputs, targets = batch_at(stream, EVAL_STEP + i, batch_size, seq, seed)
        total += model.loss(inputs.to(device), targets.to(device))[0].item()
    model.train(was)
    return total / batches


def data_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def train_lm(run_dir: str | Path, tokens: torch.Tensor, lm: LMConfig, settings: TrainSettings | None = None, *,
             upcycle_from: str | Path | None = None, vocab: list[str] | None = None, overwrite: bool = False,
             progress: bool = True, on_step: Callable[[int], None] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train (or resume) the LM of config ``lm`` on ``tokens`` in ``run_dir``; returns the summary.

    ``upcycle_from``: the run folder of a trained dense model; the MoE-X experts start from its MLPs
    (lm.upcycle). ``vocab``: the token strings (a character-level stream's characters), kept as
    ``vocab.json``. ``on_step(step)`` is called after every step (tests use it to pace a run). ``device``: where
    the model trains (checkpoints and the saved model are on the CPU; a resume may change it; bit-identical
    resumes are promised on the CPU only)."""
    settings = settings or TrainSettings()
    run_dir = Path(run_dir)
    train_part, val_part = split_stream(tokens, lm.vocab_size, lm.seq_len, settings.val_fraction)
    config = {"lm": lm.to_dict(), "train": asdict(settings), "data": {"tokens": tokens.numel(), "sha256": data_digest(tokens)},
              "upcycle_from": str(upcycle_from) if upcycle_from else None, "vocab": vocab}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    with locked(run_dir, "moex train"):
        sweep(run_dir)
        check_config(run_dir, config, overwrite)
        trainer = _Trainer(run_dir, lm, settings, digest, upcycle_from, device)  # before writing: a bad upcycle source leaves nothing
        atomic_write_json(run_dir / "config.json", config)
        if vocab is not None:
            atomic_write_json(run_dir / "vocab.json", vocab)
        return trainer.run(train_part, val_part, progress, on_step)


def training_device(name: str) -> torch.device:
    """The torch device named ``name``, refused with the fix when it is not a device or not present here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FeaturekitError(f"device {name!r} is not a torch device: use cpu or cuda (or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FeaturekitError(f"device {name!r}: this machine has no CUDA GPU that torch can use; use --device cpu")
    return device


class _Trainer:
    def __init__(self, run_dir: Path, lm: LMConfig, settings: TrainSettings, digest: str, upcycle_from: str | Path | None,
                 device: str):
        self.run_dir, self.cfg, self.s, self.digest = run_dir, lm, settings, digest
        self.ckpt_dir = run_dir / "checkpoint"
        torch.manual_seed(settings.seed)
        self.model = upcycle(load_lm(upcycle_from), lm, settings.upcycle_noise, settings.seed) if upcycle_from else MoexLM(lm)
        self.device = training_device(device)
        self.model.to(self.device)
        self.named = dict(self.model.named_parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.step = 0

    def resume(self) -> None:
        meta = read_checkpoint_meta(self.ckpt_dir)
        if meta is None:
            return
        if meta.get("digest") != self.digest or meta["total_steps"] != self.s.steps:
            raise FeaturekitError(f"the checkpoint in {self.ckpt_dir} belongs to another config; delete it to start afresh")
        tensors, meta = load_checkpoint(self.ckpt_dir)
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_optimizer(self.opt, self.named, tensors, meta["optimizer_scalars"])
        self.step = meta["step"]
        self._truncate_metrics()

    def save(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_tensors, scalars = optimizer_tensors(self.opt, {p: n for n, p in self.named.items()})
        tensors.update(opt_tensors)
        save_checkpoint(self.ckpt_dir, tensors, {"step": self.step, "tokens": self.step * self.s.batch_size * self.cfg.seq_len,
                                                 "total_steps": self.s.steps, "digest": self.digest,
                                                 "optimizer_scalars": scalars})

    def run(self, train_part, val_part, progress, on_step) -> dict[str, Any]:
        self.resume()
        s, seq = self.s, self.cfg.seq_len
        bar = tqdm(total=s.steps, initial=self.step, desc=f"moex train ({self.cfg.mlp})", unit="step",
                   disable=not progress, dynamic_ncols=True)
        start = time.time()
        self.model.train()
        while self.step < s.steps:
            for group in self.opt.param_groups:
                group["lr"] = s.lr * lr_factor(self.step, s.steps, s.warmup_steps, s.decay_fraction)
            inputs, targets = batch_at(train_part, self.step, s.batch_size, seq, s.seed)
            ce, aux = self.model.loss(inputs.to(self.device), targets.to(self.device))
            loss = ce + self.cfg.aux_weight * aux
            if not math.isfinite(loss.item()):
                raise FeaturekitError(f"training diverged at step {self.step}: the loss is {loss.item()}; lower lr "
                                      f"(now {s.lr}) and start again with overwrite")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
            self.opt.step()
            self.step += 1
            if self.step % s.log_every == 0 or self.step == s.steps:
                row = {"step": self.step, "loss": ce.item(), "aux": aux.item(), "lr": self.opt.param_groups[0]["lr"]}
                with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", aux=f"{row['aux']:.3f}")
            if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                self.save()
            bar.update(1)
            if on_step is not None:
                on_step(self.step)
        bar.close()
        self.model.eval()
        save_lm(self.model, self.run_dir)
        summary = {"mlp": self.cfg.mlp, "steps": self.step, "tokens": self.step * s.batch_size * seq,
                   "train_loss": evaluate_loss(self.model, train_part, s.val_batches, s.batch_size, s.seed),
                   "val_loss": evaluate_loss(self.model, val_part, s.val_batches, s.batch_size, s.seed),
                   "params": parameter_counts(self.model), "seconds_this_process": round(time.time() - start, 2),
                   "device": str(self.device), "threads": torch.get_num_threads()}
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _truncate_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by the kill
        atomic_write_text(path, "".join(line + "\n" for line in kept))
