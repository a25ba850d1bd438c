"""The one gradient trainer for every dictionary method.

Per step: scale the batch by c, forward, reconstruction loss
(+ method terms + aux-k for dead latents), backward, project decoder gradients onto the tangent of
the unit sphere (unit-norm methods), optional clipping, Adam step, renormalise decoder rows, update
the dead-latent counters. Checkpoints every `checkpoint_every` steps hold everything needed to
continue exactly: a run killed at any point and resumed with `resume=True` replays the
deterministic batch stream past the steps already done and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import atomic_write_text
from ..config import TrainConfig
from ..dictionaries import Dictionary
from ..dictionaries.kernels import plain_active
from ..dictionaries.protocols import RampedPenalty
from ..errors import FeaturekitError
from . import distributed
from .checkpoint import load_checkpoint, optimizer_tensors, read_checkpoint_meta, restore_optimizer, save_checkpoint
from .dead import DeadLatentTracker
from .init import geometric_median, mean_norm_scale
from .losses import aux_zipf_loss, auxk_loss, fvu_loss, squared_error_loss
from .schedule import lr_factor
from .threads import ThreadProbe

RECON_LOSSES = {"fvu": fvu_loss, "squared_error": squared_error_loss}
PRECISIONS = ("fp32", "bf16")


def _fusable(params) -> bool:
    return all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)


class Trainer:
    """`digest` identifies what the run trains on and with (config, data); a checkpoint made under
    another digest is refused on resume, and discarded by a fresh start."""

    def __init__(self, dictionary: Dictionary, cfg: TrainConfig, run_dir: Path, total_steps: int, digest: str = ""):
        self.sae, self.cfg, self.run_dir, self.total_steps = dictionary, cfg, Path(run_dir), total_steps
        self.digest = digest
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.named = dict(dictionary.named_parameters())
        # fused Adam (one kernel for all parameters) unless the plain reference path is asked for
        self.opt = torch.optim.Adam(self.named.values(), lr=cfg.lr, fused=not plain_active() and _fusable(self.named.values()))
        if cfg.precision not in PRECISIONS:
            raise FeaturekitError(f"train.precision must be one of {list(PRECISIONS)}, got {cfg.precision!r}")
        self.dead = DeadLatentTracker(dictionary.n_latents, 10_000_000 if cfg.dead_tokens is None else cfg.dead_tokens)
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else dictionary.W_dec.shape[1] // 2  # half the output width
        self.step, self.tokens = 0, 0
        self.threads: int | None = None  # the thread probe's choice (train/threads.py), once made
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.ckpt_dir = self.run_dir / "checkpoint"

    # -- initialisation and resume ----------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, *extra: torch.Tensor) -> None:
        """Set the input scale c and b_dec from raw activations (fresh runs only).

        `extra` are the per-token inputs that travel beside the sample (as in `fit`'s tuples). A
        transcoder's first one is its target y: c_out is set from y by the same rule as c from x,
        and b_dec (then the output bias) from y·c_out — in general b_dec comes from `target`."""
        sample, *extra = [t.float() for t in (sample, *extra)]
        if not all(torch.isfinite(t).all() for t in (sample, *extra)):
            raise FeaturekitError("the activation sample holds NaN/Inf; harvest in float32 or exclude the bad tokens")
        if self.cfg.normalize not in ("mean_norm", "none"):
            raise FeaturekitError(f"train.normalize must be 'mean_norm' or 'none', got {self.cfg.normalize!r}")
        scale = mean_norm_scale if self.cfg.normalize == "mean_norm" else (lambda t: 1.0)
        c = scale(sample)
        self.sae.input_scale.fill_(c)
        scaled = sample * c
        if self.sae.transcodes:  # without a target it autoencodes: y = x, c_out = c
            self.sae.output_scale.fill_(scale(extra[0]) if extra else c)
        target = self.sae.target(scaled, *extra)
        rule = self.cfg.b_dec_init
        if rule == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(target))
        elif rule == "mean":
            self.sae.b_dec.copy_(target.mean(0))
        elif rule != "zero":
            raise FeaturekitError(f"train.b_dec_init must be geometric_median, mean or zero, got {rule!r}")
        self.sae.init_from_sample(scaled, target)
        if self.metrics_path.exists():
            self.metrics_path.unlink()
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)  # a fresh start never resumes an older run

    def resume(self) -> None:
        meta = read_checkpoint_meta(self.ckpt_dir)
        if meta is not None and (meta.get("digest") != self.digest or meta["total_steps"] != self.total_steps):
            raise FeaturekitError(
                f"the checkpoint in {self.ckpt_dir} belongs to another config or activation set (digest or step count "
                f"differs); resume with the run's own config.json, or start afresh under a new run name"
            )
        tensors, meta = load_checkpoint(self.ckpt_dir)
        model_state = {k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")}
        self.sae.load_state_dict(model_state)
        restore_optimizer(self.opt, self.named, tensors, meta["optimizer_scalars"])
        self.dead.tokens_since_fired = tensors["dead.tokens_since_fired"].clone()
        if "dead.density" in tensors:
            self.dead.density = tensors["dead.density"].clone()
        torch.set_rng_state(tensors["rng"])
        if "cuda_rng" in tensors and self.sae.W_dec.is_cuda:
            torch.cuda.set_rng_state(tensors["cuda_rng"], self.sae.W_dec.device)
        self.step, self.tokens = meta["step"], meta["tokens"]
        if self.cfg.threads is None:
            self.threads = meta.get("threads")  # the interrupted run's probe choice, if it had made one
        self._truncate_metrics()

    def save(self) -> None:
        if not distributed.writes():  # data parallel: rank 0 writes
            return
        opt_tensors, opt_scalars = optimizer_tensors(self.opt, {p: n for n, p in self.named.items()})
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors.update(opt_tensors)
        tensors["dead.tokens_since_fired"] = self.dead.tokens_since_fired
        tensors["dead.density"] = self.dead.density
        tensors["rng"] = torch.get_rng_state()
        if self.sae.W_dec.is_cuda:  # stochastic methods (vSAE) draw from the device's generator
            tensors["cuda_rng"] = torch.cuda.get_rng_state(self.sae.W_dec.device)
        meta = {"step": self.step, "tokens": self.tokens, "total_steps": self.total_steps, "digest": self.digest,
                "optimizer_scalars": opt_scalars, "threads": self.threads}
        save_checkpoint(self.ckpt_dir, tensors, meta)

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, batches: Iterable[torch.Tensor], progress: bool = True) -> dict:
        """Train until `total_steps`; `batches` starts at batch number `self.step` (the caller skips).
        Each batch is a (B, d) tensor of raw activations or a tuple (activations, *extra inputs)."""
        stream = iter(batches)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
        start = time.time()
        recon = RECON_LOSSES[self.sae.recon_loss]
        self.sae.train()
        probe = None
        if self.threads:
            torch.set_num_threads(self.threads)
        else:  # train.threads unset on CPU: the first steps time the thread counts (train/threads.py)
            probe = ThreadProbe.for_run(self.cfg.threads, self.sae.W_dec.device, self.total_steps - self.step, distributed.world_size())
        while self.step < self.total_steps:
            try:
                batch = next(stream)
            except StopIteration:
                raise FeaturekitError(
                    f"the activation stream ended after {self.step} of {self.total_steps} steps; harvest more tokens or lower train.epochs"
                ) from None
            if probe is not None:
                torch.set_num_threads(probe.threads())
                began = time.perf_counter()
            row = self.train_step(batch, recon)  # synchronous on CPU (it reads the loss)
            if not math.isfinite(row["loss"]):
                raise self._diverged(f"the loss is {row['loss']}")
            if probe is not None:
                probe.record(time.perf_counter() - began)
                if probe.chosen is not None:
                    self.threads, probe = probe.chosen, None
                    torch.set_num_threads(self.threads)
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                row = distributed.reduce_metrics(row)  # data parallel: the global batch's values (one process: as is)
                row["elapsed_s"] = round(time.time() - start, 2)
                self._log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}",
                                dead=f"{row['dead_fraction']:.3f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total_steps:
                bad = [name for name, p in self.named.items() if not torch.isfinite(p).all()]
                if bad:  # the loss was finite before this step's update, the weights are not after it
                    raise self._diverged(f"{', '.join(bad)} hold NaN/Inf after the update")
                self.save()
            bar.update(1)
        bar.close()
        self.sae.eval()
        summary = {"steps": self.step, "tokens": self.tokens, "device": str(self.sae.W_dec.device)}
        if self.sae.W_dec.device.type == "cpu":
            summary["threads"] = torch.get_num_threads()
        return summary

    def train_step(self, batch: torch.Tensor | tuple[torch.Tensor, ...], recon: Callable) -> dict:
        """One step on a (B, d) batch of raw activations, or a tuple (activations, *per-token inputs)
        for dictionaries that take more than x (g-SAE: the LM-loss gradient), passed on to forward."""
        cfg, sae = self.cfg, self.sae
        batch, *extra = batch if isinstance(batch, (tuple, list)) else (batch,)
        # a finite sum proves every entry finite (one reduction); only a non-finite sum needs the full check
        if not torch.isfinite(batch.sum()) and not torch.isfinite(batch).all():
            raise FeaturekitError(f"training batch at step {self.step} holds NaN/Inf activations; "
                                  "check the model dtype and the token exclusions")
        factor = lr_factor(self.step, self.total_steps, cfg.warmup_steps, cfg.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * factor
        if isinstance(sae, RampedPenalty):  # penalty methods: λ ramps linearly from 0
            ramp = max(1, int(cfg.sparsity_warmup_fraction * self.total_steps))
            sae.sparsity_scale = min(1.0, (self.step + 1) / ramp)
        # the last step's gradients go before the forward: the memory they free takes this step's temporaries
        self.opt.zero_grad(set_to_none=True)
        x = batch.float() * sae.input_scale
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = sae(x, *extra)
        target = sae.target(x, *extra)  # x, or a transcoder's y·c_out
        losses = {"recon": recon(target, out.x_hat), **{name: recon(target, x_hat) for name, x_hat in out.partial.items()},
                  **out.losses}
        if sae.uses_auxk and cfg.auxk_coef > 0:
            dead = self.dead.dead.to(x.device)
            losses["aux"] = cfg.auxk_coef * auxk_loss(
                target - out.x_hat, out.top_pre, sae.W_dec, dead, self.k_aux, pre_at=out.pre_at,
                signed=sae.signed,
            )
        if cfg.aux_zipf_coef > 0 and out.has_pre and not torch.isnan(self.dead.density).any():
            losses["aux_zipf"] = cfg.aux_zipf_coef * aux_zipf_loss(
                target - out.x_hat, out.top_pre, sae.W_dec, self.dead.density.to(x.device), self.k_aux, tau=cfg.aux_zipf_tau,
                pre_at=out.pre_at, signed=sae.signed,
            )
        loss = sum(losses.values())
        loss.backward()
        if sae.unit_norm_decoder:
            sae.project_decoder_grad()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.max_grad_norm)
        self.opt.step()
        if sae.unit_norm_decoder:
            sae.normalize_decoder()
        sae.after_step(out)
        self.dead.update_counts(out.fire_counts(), batch.shape[0])
        self.step += 1
        self.tokens += distributed.global_rows(batch.shape[0])
        with torch.no_grad():
            row = {
                "step": self.step,
                "tokens": self.tokens,
                "loss": loss.item(),
                "fvu": (losses["recon"] if recon is fvu_loss else fvu_loss(target, out.x_hat)).item(),
                "l0": out.l0(),
                "dead_fraction": self.dead.dead_fraction(),
                "lr": cfg.lr * factor,
            }
            row.update({f"{k}_loss": v.item() for k, v in losses.items()})
        return row

    # -- helpers --------------------------------------------------------------------------------
    def _diverged(self, what: str) -> FeaturekitError:
        """Training stops at the first non-finite loss or weights: the last good checkpoint stays as it is."""
        meta = read_checkpoint_meta(self.ckpt_dir) if distributed.writes() else None
        kept = (f"the last good checkpoint (step {meta['step']}) is kept in {self.ckpt_dir}" if meta
                else "no checkpoint had been written yet")
        return FeaturekitError(f"training diverged at step {self.step} of {self.total_steps}: {what} (train.lr={self.cfg.lr}, "
                               f"max_grad_norm={self.cfg.max_grad_norm}); nothing non-finite was saved and {kept}. Start again "
                               f"with a lower train.lr or with train.max_grad_norm set (--overwrite, or a new --name)")

    def _log(self, row: dict) -> None:
        if not distributed.writes():
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint (they will be written again)."""
        if not self.metrics_path.exists() or not distributed.writes():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by the crash: it will be written again
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
