"""Transcoder sets for circuits, trained in one command (`featurekit circuits train-set`).

Per-layer transcoders (PLT: `transcoder`, `skiptranscoder`) go layer by layer, each an ordinary run with
site `mlp_in.L` (its config is the base config with that site) in a scratch folder inside the set:

    OUT/.runs/layer_L/   harvest (activation cache) → train (checkpoints) → dictionary
    OUT/layer_L/         the finished dictionary, moved out of the scratch run, whose folder is then deleted

so the disk holds one layer's activation cache at a time and memory one layer's transcoder. Each layer's harvest
runs the model up to that layer; `--layers-per-pass N` harvests N layers' caches in one pass instead (the same
caches: `training.run_harvests`), for N times the disk and about 1/N of the model passes. A layer whose
OUT/layer_L holds the dictionary of this very config (its provenance's config digest) is skipped, so a
killed command continues where it stopped (inside a layer from the run's last checkpoint). When every
asked layer is done, OUT/transcoder_set.json (circuits.transcoder_set) is written, last.

A cross-layer transcoder (CLT, `dictionaries.clt`) reads every layer at once, so it is trained in one
loop streamed from the model (`train_clt`): nothing is cached on disk, memory holds one buffer of
(MLP in, MLP out) rows of all its layers (`train.buffer_tokens`; a training set that fits in one buffer is
harvested once and reshuffled every epoch, a larger one harvested again each epoch). Every `train.checkpoint_every`
steps the CLT, Adam's state and the scales go to OUT/.clt_checkpoint (train.checkpoint's format); a killed training
continues from there over the same batch stream (the harvest is deterministic, each epoch's order seeded), and a
finished one (same config digest) is skipped. `dictionary.n_latents` and `dictionary.k` are per layer for both kinds, so a PLT
set and a CLT with the same settings have the same total number of latents.
"""

from __future__ import annotations

import copy
import itertools
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__, rundir
from ..circuits import transcoder_set
from ..config import RunConfig, validate
from ..data.harvest import choose_dtype, harvest
from ..dictionaries import CrossLayerTranscoder, read_meta
from ..errors import FeaturekitError
from ..models import load_model
from ..models.loading import LoadedModel
from ..models.sites import blocks, site_dim
from ..train.checkpoint import load_checkpoint, optimizer_tensors, read_checkpoint_meta, restore_optimizer, save_checkpoint
from ..train.init import mean_norm_scale
from ..train.schedule import lr_factor
from .setup import config_digest, contexts, resolve, start
from .training import run_harvests, run_train, training_cache

PLT_METHODS = ("transcoder", "skiptranscoder")
Log = Callable[[str], None]


def parse_layers(text: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """"all" (or None), "0,3,5", "2-6" or a list → sorted layer numbers, each checked against the model."""
    if text is None or text == "all":
        return list(range(n_layers))
    if isinstance(text, str):
        layers: set[int] = set()
        try:
            for part in filter(None, (p.strip() for p in text.split(","))):
                lo, _, hi = part.partition("-")
                layers.update(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise FeaturekitError(f"--layers {text!r}: give 'all', a list like 0,3,5 or a range like 2-6") from None
    else:
        layers = {int(x) for x in text}
    bad = sorted(x for x in layers if not 0 <= x < n_layers)
    if not layers or bad:
        raise FeaturekitError(f"layers {sorted(layers) if not bad else bad} are not layers of this model (0..{n_layers - 1})")
    return sorted(layers)


def open_set_model(cfg: RunConfig) -> LoadedModel:
    return load_model(cfg.model.name, dtype=choose_dtype(cfg.model.dtype, cfg.model.device), device=cfg.model.device)


def train_set(cfg: RunConfig, out: str | Path, layers: str | Sequence[int] | None = None, progress: bool = True,
              log: Log = print, per_pass: int = 1) -> Path:
    """Train the set `cfg.dictionary.method` asks for (PLT methods or clt) into `out`; returns `out`.
    ``per_pass``: PLT layers harvested together in one model pass (`train_plt_set`)."""
    out = Path(out)
    method = cfg.dictionary.method
    if method not in (*PLT_METHODS, "clt"):
        raise FeaturekitError(f"a transcoder set is made of transcoders: --method must be one of {[*PLT_METHODS, 'clt']}, "
                              f"got {method!r}")
    loaded = open_set_model(cfg)
    chosen = parse_layers(layers, len(blocks(loaded.model)))
    with rundir.locked(out, f"circuits train-set --method {method}"):  # one process per set folder
        if method == "clt":
            return train_clt(cfg, out, chosen, loaded, progress, log)
        return train_plt_set(cfg, out, chosen, loaded, progress, log, per_pass)


# -- per-layer transcoders ------------------------------------------------------------------------------
def layer_config(cfg: RunConfig, out: Path, layer: int) -> RunConfig:
    """The run config of layer `layer`: the base config reading mlp_in.L (→ mlp_out.L) in OUT/.runs/layer_L."""
    one = copy.deepcopy(cfg)
    one.site, one.output_site = f"mlp_in.{layer}", None
    one.out_dir, one.name = str(out / ".runs"), f"layer_{layer}"
    return resolve(one)


def _finished(folder: Path, digest: str) -> bool | None:
    """True: `folder` holds the dictionary of the config with this digest; False: another config's; None: nothing."""
    try:
        meta = read_meta(folder)
    except FeaturekitError:
        return None
    return meta.get("provenance", {}).get("config_digest") == digest


def train_plt_set(cfg: RunConfig, out: Path, layers: list[int], loaded: LoadedModel, progress: bool = True,
                  log: Log = print, per_pass: int = 1) -> Path:
    """One transcoder per layer, streamed layer by layer (module docstring); with ``per_pass`` > 1 the layers
    still to train are harvested ``per_pass`` at a time in one model pass (`run_harvests`: the same caches, so
    the same transcoders, as one pass per layer), holding that many layers' caches on disk at once."""
    if per_pass < 1:
        raise FeaturekitError(f"--layers-per-pass must be at least 1, got {per_pass}")
    todo = []
    for layer in layers:
        one = layer_config(cfg, out, layer)
        dest, scratch = out / f"layer_{layer}", one.run_dir
        done = _finished(dest, config_digest(one))
        if done is False:
            raise FeaturekitError(f"{dest} holds a transcoder trained with another config; train this set into a new "
                                  "folder, or delete that layer's folder to retrain it")
        if done:
            log(f"layer {layer}: {dest} already trained with this config, skipped")
            shutil.rmtree(scratch, ignore_errors=True)  # a kill between the move and the cleanup leaves it behind
        else:
            todo.append((layer, one))
    for lo in range(0, len(todo), per_pass):
        group = todo[lo:lo + per_pass]
        began = time.time()
        for _, one in group:
            start(one, overwrite=True)  # the scratch run continues only its own config (else it starts afresh)
        need = [one for _, one in group if one.data.cache and not _cache_complete(one)]
        if need:
            run_harvests(need, loaded, progress=progress)
        for layer, one in group:
            dest, scratch = out / f"layer_{layer}", one.run_dir
            log(f"layer {layer}: training {one.dictionary.method} {one.site} -> {one.output_site}")
            run_train(one, resume=(scratch / "checkpoint" / "state.json").is_file(), progress=progress, loaded=loaded)
            if dest.exists():
                shutil.rmtree(dest)
            (scratch / "dictionary").replace(dest)
            shutil.rmtree(scratch)
            log(f"layer {layer}: done in {time.time() - began:.0f} s -> {dest}")
            began = time.time()
    shutil.rmtree(out / ".runs", ignore_errors=True)
    return transcoder_set.write_manifest(out, cfg.model.name, {layer: f"layer_{layer}" for layer in layers})


def _cache_complete(cfg: RunConfig) -> bool:
    try:
        training_cache(cfg)
        return True
    except FeaturekitError:
        return False


# -- the cross-layer transcoder ---------------------------------------------------------------------------
def clt_digest(cfg: RunConfig, layers: list[int]) -> str:
    one = copy.deepcopy(cfg)
    one.site, one.output_site = "mlp_in", None
    return config_digest(one) + f":layers={layers}"


def _rows(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, layers: list[int], cfg: RunConfig) -> Iterator[tuple]:
    """(x, y) batches: every layer's MLP input and output of the kept tokens, side by side (N, L·d), float32."""
    sites = [f"{kind}.{layer}" for layer in layers for kind in ("mlp_in", "mlp_out")]
    for batch in harvest(loaded.model, ids, sites, batch_size=cfg.data.harvest_batch, mask=mask, progress=False,
                         max_norm_multiple=cfg.data.max_norm_multiple):
        yield (torch.cat([batch.acts[f"mlp_in.{layer}"].float() for layer in layers], 1),
               torch.cat([batch.acts[f"mlp_out.{layer}"].float() for layer in layers], 1))


def _buffers(rows: Iterator[tuple], buffer_tokens: int) -> Iterator[tuple]:
    """The rows gathered into buffers of about `buffer_tokens` rows (the last one shorter)."""
    xs, ys, held = [], [], 0
    for x, y in rows:
        xs.append(x), ys.append(y)
        held += len(x)
        if held >= buffer_tokens:
            yield torch.cat(xs), torch.cat(ys)
            xs, ys, held = [], [], 0
    if xs:
        yield torch.cat(xs), torch.cat(ys)


def _drain(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[tuple]:
    """Minibatches of one buffer in a random order (whole batches only)."""
    order = torch.randperm(len(x), generator=gen)
    for lo in range(0, len(x) - batch_size + 1, batch_size):
        sel = order[lo:lo + batch_size]
        yield x[sel], y[sel]


def train_clt(cfg: RunConfig, out: Path, layers: list[int], loaded: LoadedModel, progress: bool = True,
              log: Log = print) -> Path:
    """Train one CLT on `layers` jointly (module docstring), streamed from the model; save it as a set."""
    tc, params = cfg.train, cfg.dictionary.params
    validate(cfg)
    digest = clt_digest(cfg, layers)
    done = _finished(out / "clt", digest)
    if done:
        log(f"{out / 'clt'} already trained with this config, skipped")
        return out
    if done is False:
        raise FeaturekitError(f"{out / 'clt'} holds a CLT trained with another config; train into a new folder")
    d, d_out = site_dim(loaded.model, f"mlp_in.{layers[0]}"), site_dim(loaded.model, f"mlp_out.{layers[0]}")
    L, F = len(layers), cfg.dictionary.n_latents
    clt = CrossLayerTranscoder(L * d, L * F, k=params.k, n_layers=L, d_out=L * d_out, seed=tc.seed)
    torch.manual_seed(tc.seed)
    ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
    total_steps = tc.epochs * (int(0.99 * int(mask.sum())) // tc.batch_size)
    if total_steps == 0:
        raise FeaturekitError(f"fewer training tokens than one batch of {tc.batch_size}; raise data.train_tokens")

    # per-layer scales (mean norm √d) and the initial biases from the first buffer's rows. When the whole training
    # set fits in one buffer it is harvested once and every epoch reshuffles it; otherwise every epoch harvests again.
    stream = _buffers(_rows(loaded, ids, mask, layers, cfg), tc.buffer_tokens)
    first = next(stream)
    sample = torch.randperm(len(first[0]), generator=torch.Generator().manual_seed(tc.seed))[:4096]
    x0, y0 = first[0][sample], first[1][sample]
    per = [(x0[:, i * d:(i + 1) * d], y0[:, i * d_out:(i + 1) * d_out]) for i in range(L)]
    one = (lambda t: 1.0) if tc.normalize == "none" else mean_norm_scale
    c_in = torch.tensor([one(x) for x, _ in per])
    c_out = torch.tensor([one(y) for _, y in per])
    s_in, s_out = c_in.repeat_interleave(d), c_out.repeat_interleave(d_out)
    with torch.no_grad():
        clt.b_dec.copy_((y0 * s_out).mean(0))                                      # sparsify's output-bias rule
        xs = (x0 * s_in).mean(0).view(L, d)
        clt.b_enc.copy_(-torch.einsum("ld,lfd->lf", xs, clt.W_enc.view(L, F, d)).flatten())  # π centred on the sample

    opt = torch.optim.Adam(clt.parameters(), lr=tc.lr)
    named = dict(clt.named_parameters())
    ckpt = out / ".clt_checkpoint"
    step, tokens, epoch, in_epoch, began, last = 0, 0, 0, 0, time.time(), {}
    state = read_checkpoint_meta(ckpt)
    if state is not None and state.get("digest") == digest and state["total_steps"] == total_steps:
        tensors, state = load_checkpoint(ckpt)
        clt.load_state_dict({k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")})
        restore_optimizer(opt, named, tensors, state["optimizer_scalars"])
        c_in, c_out = tensors["c_in"], tensors["c_out"]
        s_in, s_out = c_in.repeat_interleave(d), c_out.repeat_interleave(d_out)
        step, tokens, epoch, in_epoch = state["step"], state["tokens"], state["epoch"], state["in_epoch"]
        log(f"CLT: continuing from the checkpoint at step {step}")

    def save_state() -> None:
        opt_t, opt_s = optimizer_tensors(opt, {p: n for n, p in named.items()})
        save_checkpoint(ckpt, {**{f"sae.{k}": v for k, v in clt.state_dict().items()}, **opt_t, "c_in": c_in, "c_out": c_out},
                        {"step": step, "tokens": tokens, "total_steps": total_steps, "digest": digest,
                         "optimizer_scalars": opt_s, "epoch": epoch, "in_epoch": in_epoch})

    def epoch_batches(epoch: int) -> Iterator[tuple]:
        """Epoch `epoch`'s minibatches, the same on every run (the harvest is deterministic, the order seeded)."""
        if epoch == 0:
            buffers = itertools.chain([first], stream)
        elif int(mask.sum()) <= tc.buffer_tokens:
            buffers = iter([first])
        else:
            buffers = _buffers(_rows(loaded, ids, mask, layers, cfg), tc.buffer_tokens)
        gen = torch.Generator().manual_seed(tc.seed + epoch)
        return (batch for buffer in buffers for batch in _drain(*buffer, tc.batch_size, gen))

    log(f"CLT over layers {layers}: {L} x {F} latents, k={params.k} per layer, {total_steps} steps of {tc.batch_size} tokens")
    while step < total_steps:
        for x, y in itertools.islice(epoch_batches(epoch), in_epoch, None):
            if step >= total_steps:
                break
            for group in opt.param_groups:
                group["lr"] = tc.lr * lr_factor(step, total_steps, tc.warmup_steps, tc.decay_fraction)
            x, y = x * s_in, y * s_out
            outp = clt(x)
            err = (y - outp.x_hat).view(len(y), L, d_out)
            per_layer = err.pow(2).mean((0, 2))                                    # MSE of each output layer
            loss = per_layer.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clt.mask_decoder_grad()
            opt.step()
            step, tokens, in_epoch = step + 1, tokens + len(x), in_epoch + 1
            if step % max(1, tc.log_every) == 0 or step == total_steps:
                with torch.no_grad():
                    var = (y.view(len(y), L, d_out) - y.view(len(y), L, d_out).mean(0)).pow(2).mean((0, 2))
                    last = {"step": step, "loss": float(loss), "fvu": [round(float(v), 4) for v in per_layer / var],
                            "l0": outp.l0()}
                if progress:
                    log(f"step {step}/{total_steps}: loss {last['loss']:.4f}, FVU per layer {last['fvu']}")
            if step % max(1, tc.checkpoint_every) == 0 and step < total_steps:
                save_state()
        epoch, in_epoch = epoch + 1, 0
    clt.eval()
    clt.fold_layer_scales(c_in, c_out)
    seconds = time.time() - began
    meta = {"normalization": {"rule": "per layer: c = sqrt(d) / mean ||x|| (inputs and outputs), folded into the weights",
                              "input_scales": c_in.tolist(), "output_scales": c_out.tolist()},
            "source": {"corpus": cfg.data.source, "context_len": cfg.data.context_len},
            "provenance": {"featurekit_version": __version__, "tokens_seen": tokens, "steps": step, "train_seconds": round(seconds, 1),
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "last_log": last,
                           "config_digest": digest, "threads": torch.get_num_threads()}}
    transcoder_set.save_clt(clt.cpu(), layers, out, cfg.model.name, meta)
    shutil.rmtree(ckpt, ignore_errors=True)
    log(f"CLT done in {seconds:.0f} s ({step} steps, {tokens} tokens) -> {out}")
    return out


def check_method(method: str) -> None:
    if method not in (*PLT_METHODS, "clt"):
        raise FeaturekitError(f"--method {method}: a transcoder set needs transcoders ({', '.join(PLT_METHODS)}) or clt")

