"""Harvest and training: the activation cache, the trainer or fitter, and the saved dictionary.

The cache's identity (`harvest_meta`) holds the data settings and content digests of the text, and (from
the harvest) of the model's weights and tokenizer: a cache harvested from other text, weights or
tokenizer is refused, never silently trained on. The saved dictionary records the same identity and a
digest of the config (`dictionary_complete`), so a rerun of a finished run skips to what is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..config import RunConfig
from ..data.cache import ActivationCache, write_cache
from ..data.harvest import harvest, select_sites
from ..data.prefetch import Prefetcher, split_threads
from ..data.shuffle import ShuffleBuffer, batches_per_epoch, iter_epochs
from ..dictionaries import METHODS, Dictionary, build_from_config, read_meta, save
from ..dictionaries.kernels import kernel_choices
from ..dictionaries.protocols import FoldsDecoderNorms
from ..errors import FeaturekitError, warn
from ..models.hooks import gradient_key
from ..models.loading import LoadedModel
from ..models.sites import site_dim
from ..train import Trainer, distributed
from ..train.fit import fit_stream
from .setup import config_digest, contexts, data_digest, dtype_name, harvest_sites, is_vision, open_model, token_policy

INIT_SAMPLE_TOKENS = 32_768
CALIBRATION_BATCHES = 16  #: training batches a dictionary's inference threshold is re-estimated on after training
TRANSCODER_SCALE_RULE = ("; target y (output_site): c_out = sqrt(d_out) / mean ||y|| on the same tokens (1 with normalize=none); "
                         "folded: b_enc/c, W_dec*c/c_out, W_skip*c/c_out, b_dec/c_out, so the weights map raw x to raw y")


# -- what identifies the training data ---------------------------------------------------------------
def harvest_meta(cfg: RunConfig) -> dict:
    """What identifies a training activation set without loading the model: the data settings and the
    text's content digest (stored in the cache manifest, checked before training). A vision run: the image
    settings and the images' digest (under the same key, text_digest)."""
    if is_vision(cfg):
        return {"model": cfg.model.name, "sites": harvest_sites(cfg), "source": cfg.data.source, "split": "train",
                "images": dataclasses.asdict(cfg.images), "tokens": cfg.data.train_tokens, "seed": cfg.train.seed,
                "harvest_batch": cfg.data.harvest_batch, "text_digest": data_digest(cfg)}
    return {"model": cfg.model.name, "sites": harvest_sites(cfg), "source": cfg.data.source, "split": "train",
            "context_len": cfg.data.context_len, "token_policy": token_policy(cfg), "tokens": cfg.data.train_tokens,
            "harvest_batch": cfg.data.harvest_batch, **({"gradients": True} if cfg.data.gradients else {}),
            **({"holdout": cfg.data.holdout} if cfg.data.holdout != "documents" else {}),
            "text_digest": data_digest(cfg)}


def loaded_identity(loaded: LoadedModel) -> dict:
    """The digests of the loaded model's weights and tokenizer, and the dtype it runs in."""
    from ..models.identity import model_digest, tokenizer_digest

    return {"dtype": dtype_name(loaded.model.dtype), "model_digest": model_digest(loaded.model),
            "tokenizer_digest": None if loaded.tokenizer is None else tokenizer_digest(loaded.tokenizer)}  # vision: no tokenizer


IDENTITY_KEYS = ("text_digest", "model_digest", "tokenizer_digest")
_CHANGED = {"text_digest": "the text of {source}", "model_digest": "the weights of model {model}",
            "tokenizer_digest": "the tokenizer of model {model}"}


def mismatch(where: str, stored: dict, expected: dict) -> FeaturekitError | None:
    """The error for data harvested under another identity (None when `stored` agrees with `expected`)."""
    differs = sorted(k for k in expected if stored.get(k) != expected[k])
    if not differs:
        return None
    changed = [_CHANGED[k].format(source=expected.get("source"), model=expected.get("model")) for k in differs if k in _CHANGED]
    settings = [k for k in differs if k not in _CHANGED]
    what = "; ".join(([f"{' and '.join(changed)} changed since"] if changed else [])
                     + ([f"other settings ({', '.join(settings)})"] if settings else []))
    return FeaturekitError(f"{where} was harvested from other data: {what}. Its activations are not this run's; start a new "
                           f"run (--name NEW), or pass --overwrite to discard this run's results and harvest again")


def run_digest(cfg: RunConfig, data_id: object) -> str:
    """sha256 of everything that determines the training trajectory (checked when resuming)."""
    blob = json.dumps({"train": dataclasses.asdict(cfg.train), "dictionary": dataclasses.asdict(cfg.dictionary),
                       "site": cfg.site, "data": data_id, **({"output_site": cfg.output_site} if cfg.output_site else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def dictionary_complete(cfg: RunConfig, loaded: LoadedModel | None = None) -> bool:
    """Whether runs/NAME/dictionary is this config's finished dictionary, trained on this text (and, given
    the loaded model, this model's weights and tokenizer): then a rerun need not harvest or train again."""
    try:
        meta = read_meta(cfg.run_dir / "dictionary")
    except FeaturekitError:
        return False
    identity = meta.get("source", {}).get("identity", {})
    expected = {"text_digest": data_digest(cfg), **(loaded_identity(loaded) if loaded is not None else {})}
    expected.pop("dtype", None)
    return (meta.get("provenance", {}).get("config_digest") == config_digest(cfg)
            and all(identity.get(k) == v for k, v in expected.items()))


# -- steps ------------------------------------------------------------------------------------------
def run_harvest(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True) -> ActivationCache:
    """Harvest the training activations into runs/NAME/activations (resumes an interrupted harvest; a cache
    of other text, weights, tokenizer or settings is refused)."""
    if is_vision(cfg):
        from .vision import run_image_harvest

        return run_image_harvest(cfg, loaded, progress)
    loaded = loaded or open_model(cfg)
    meta = {**harvest_meta(cfg), **loaded_identity(loaded)}
    folder = cfg.run_dir / "activations"
    if (folder / "manifest.json").is_file():
        error = mismatch(f"the activation cache in {folder}", ActivationCache(folder).meta, meta)
        if error:
            raise error
    ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
    stream = harvest(loaded.model, ids, harvest_sites(cfg), batch_size=cfg.data.harvest_batch, mask=mask, progress=progress,
                     max_norm_multiple=cfg.data.max_norm_multiple, gradients=cfg.data.gradients)
    return write_cache(folder, stream, meta, cfg.data.shard_tokens)


def run_harvests(cfgs: list[RunConfig], loaded: LoadedModel, progress: bool = True) -> list[ActivationCache]:
    """Harvest several runs that read other sites of the same model and text in ONE model pass, each into its
    own runs/NAME/activations, equal to what `run_harvest` writes for it alone (same rows, same outlier cut:
    `select_sites`; same identity). Memory holds the pass's batches until every cache has taken them (one
    cache is written after the other). A cache already complete is kept; an interrupted one resumes."""
    if len(cfgs) == 1:
        return [run_harvest(cfgs[0], loaded, progress)]
    metas = [{**harvest_meta(c), **loaded_identity(loaded)} for c in cfgs]
    shared = [{k: v for k, v in m.items() if k != "sites"} for m in metas]
    if any(m != shared[0] for m in shared) or any(c.data.gradients or is_vision(c) for c in cfgs):
        raise FeaturekitError("runs harvested in one pass must read one model's activations (no gradients) on the same "
                              "text with the same data settings; harvest them one by one instead")
    for c, meta in zip(cfgs, metas):
        folder = c.run_dir / "activations"
        if (folder / "manifest.json").is_file():
            error = mismatch(f"the activation cache in {folder}", ActivationCache(folder).meta, meta)
            if error:
                raise error
    ids, mask = contexts(loaded, cfgs[0], "train", cfgs[0].data.train_tokens)
    sites = list(dict.fromkeys(site for c in cfgs for site in harvest_sites(c)))
    stream = harvest(loaded.model, ids, sites, batch_size=cfgs[0].data.harvest_batch, mask=mask, progress=progress)
    copies = itertools.tee(stream, len(cfgs))
    return [write_cache(c.run_dir / "activations", (select_sites(b, harvest_sites(c), c.data.max_norm_multiple) for b in copy),
                        meta, c.data.shard_tokens)
            for c, meta, copy in zip(cfgs, metas, copies)]


def training_cache(cfg: RunConfig, cache_dir: Path | None = None) -> ActivationCache:
    """The run's activation cache (or `cache_dir`), checked complete and harvested with this config's data
    settings from the same text (the model's digests were checked by the harvest that wrote it)."""
    cache = ActivationCache(cache_dir or cfg.run_dir / "activations")
    if not cache.complete:
        raise FeaturekitError(f"the activation cache in {cache.dir} is incomplete; run `featurekit harvest` to finish it")
    error = mismatch(f"the activation cache in {cache.dir}", cache.meta, harvest_meta(cfg))
    if error:
        raise error
    return cache


@dataclass
class TrainingData:
    """Where a run's training activations come from — the activation cache (`data.cache`, the default) or
    the model, harvested again on every pass (streamed: nothing on disk) — and what identifies them.

    `d`, `d_out`: the widths at `site` and `output_site`; `dtype`: the harvest dtype; `identity`: the text,
    model and tokenizer digests (recorded in the dictionary); `data_id`: what a checkpoint's digest binds
    (the cache's shard digests, or the harvest's identity)."""

    cfg: RunConfig
    d: int
    d_out: int | None
    dtype: str | None
    identity: dict
    data_id: object
    cache: ActivationCache | None = None
    loaded: LoadedModel | None = None
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    views: object = None  # a streamed vision run: its training views (`vision.images.Views`)

    def ordered(self, sites: list[str], gradients: bool = False) -> Iterator:
        """One pass over the training activations in stream order (the cache's shards, or a fresh harvest)."""
        if self.cache is not None:
            return self.cache.iter_shards(sites=sites)
        cfg = self.cfg
        if self.views is not None:
            from ..vision.harvest import harvest_views

            return harvest_views(self.loaded, self.views, sites, batch_size=cfg.data.harvest_batch, tokens=cfg.images.tokens,
                                 progress=False)
        return harvest(self.loaded.model, self.ids, sites, batch_size=cfg.data.harvest_batch, mask=self.mask, progress=False,
                       max_norm_multiple=cfg.data.max_norm_multiple, gradients=gradients)

    def batches_per_epoch(self, batch_size: int) -> int:
        """Whole batches per epoch. A streamed epoch is cut to ⌊0.99 · kept tokens / batch_size⌋ batches, the
        slack absorbing tokens dropped as norm outliers (their number is known only once harvested)."""
        if self.cache is not None:
            return batches_per_epoch(self.cache.n_tokens, batch_size)
        if self.views is not None:  # image views drop no tokens: as many as a cache of them holds
            return batches_per_epoch(int(self.mask.sum()), batch_size)
        return int(0.99 * int(self.mask.sum())) // batch_size


def training_data(cfg: RunConfig, loaded: LoadedModel | None = None, cache_dir: Path | None = None) -> TrainingData:
    """The run's training activations (`TrainingData`): its cache (or `cache_dir`, another run's cache of the same
    data settings), checked; or, without `data.cache`, the model and the packed training contexts."""
    if cfg.data.cache:
        cache = training_cache(cfg, cache_dir)
        return TrainingData(cfg, cache.d(cfg.site), cache.d(cfg.output_site) if cfg.output_site else None, cache.meta.get("dtype"),
                            cache.meta, [shard["sha256"] for shard in cache.manifest["shards"]], cache=cache)
    loaded = loaded or open_model(cfg)
    if is_vision(cfg):  # streamed views: the same seeded views the harvest would cache, made again every pass
        from ..vision.harvest import capture_pixels, token_mask
        from .vision import views

        train = views(cfg, loaded, "train", cfg.data.train_tokens)
        keep = token_mask(loaded, cfg.images.size, cfg.images.tokens)
        identity = {**harvest_meta(cfg), **loaded_identity(loaded)}
        with torch.no_grad():
            d = capture_pixels(loaded, train.pixels([0]), [cfg.site])[cfg.site].shape[-1]
        return TrainingData(cfg, d, None, dtype_name(loaded.model.dtype), identity, identity, loaded=loaded,
                            mask=keep.repeat(train.n_views, 1), views=train)
    ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
    identity = {**harvest_meta(cfg), **loaded_identity(loaded)}
    return TrainingData(cfg, site_dim(loaded.model, cfg.site), site_dim(loaded.model, cfg.output_site) if cfg.output_site else None,
                        dtype_name(loaded.model.dtype), identity, identity, loaded=loaded, ids=ids, mask=mask)


def run_fit(cfg: RunConfig, resume: bool = False, progress: bool = True, loaded: LoadedModel | None = None,
            cache_dir: Path | None = None) -> Dictionary:
    """Fit a method with a `Dictionary.fitter` (ITDA, SNMF): `fitter.passes` passes over the training activations
    in stream order, no shuffle and no input scaling; steps, metrics.jsonl, checkpoints and `resume` as in
    `train.fit.fit_stream`."""
    tc = cfg.train
    resume = resumable(cfg, resume)
    data = training_data(cfg, loaded, cache_dir)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    fitter = METHODS[cfg.dictionary.method].fitter.from_config(cfg.dictionary, data.d, seed=tc.seed, batch_size=tc.batch_size)
    batches = itertools.chain.from_iterable(data.ordered([cfg.site]) for _ in range(fitter.passes))  # each pass read lazily
    start = time.time()
    summary = fit_stream(fitter, batches, cfg.site, cfg.run_dir, tc, digest=run_digest(cfg, data.data_id), resume=resume,
                         progress=progress)
    sae = fitter.finish()
    save_dictionary(sae, cfg, data.dtype, summary, time.time() - start, data.identity)
    return sae


def resumable(cfg: RunConfig, resume: bool) -> bool:
    """Resume only where a checkpoint exists: a run killed before its first checkpoint starts afresh."""
    if resume and not (cfg.run_dir / "checkpoint" / "state.json").is_file():
        warn(f"{cfg.run_dir} has no checkpoint yet (it stopped before its first one): training starts from step 0")
        return False
    return resume


def shuffled_batches(data: TrainingData, sites: list[str], skip: int, gradients: bool, producer_threads: int) -> Iterator[torch.Tensor]:
    """The trainer's batches from batch number `skip` on: token-level shuffled rows [site | extras] of
    `train.epochs` epochs. From the cache: `iter_epochs`. Streamed: every epoch harvests the training
    contexts again into a shuffle buffer, in a background thread (`data.prefetch`) that runs ahead of the
    trainer by half a buffer of batches (whole epochs before `skip` are not harvested)."""
    tc = data.cfg.train
    if data.cache is not None:
        return iter_epochs(data.cache, sites, tc.epochs, tc.buffer_tokens, tc.batch_size, tc.seed, skip_batches=skip)
    per_epoch = data.batches_per_epoch(tc.batch_size)

    def harvested() -> Iterator[torch.Tensor]:
        for epoch in range(skip // max(per_epoch, 1), tc.epochs):
            shuffled = ShuffleBuffer(data.ordered(harvest_sites(data.cfg), gradients), sites, tc.buffer_tokens, tc.batch_size,
                                     tc.seed + epoch)
            first = skip % per_epoch if epoch == skip // per_epoch else 0
            yield from itertools.islice(shuffled, first, per_epoch)

    # the queue holds one shuffle-buffer burst + 1 batches, so emitting a burst never stalls the next harvest
    return Prefetcher(harvested(), depth=max(1, tc.buffer_tokens // 2 // tc.batch_size) + 1, threads=producer_threads)


def run_train(cfg: RunConfig, resume: bool = False, progress: bool = True, loaded: LoadedModel | None = None,
              cache_dir: Path | None = None) -> Dictionary:
    """Train the dictionary; `resume` continues from the checkpoint (`resumable`).

    `cache_dir` reads another run's activation cache (harvested with the same data settings; several
    dictionaries trained on one harvest, as `bench frontier` does) instead of runs/NAME/activations.
    Batches come from `shuffled_batches` (the cache, or streamed from the model without `data.cache`;
    then the threads are split between the harvesting thread and the trainer, `split_threads`: one each
    on 2). Methods with a `Dictionary.fitter` (ITDA, SNMF) are fitted by `run_fit` instead.
    """
    if METHODS[cfg.dictionary.method].fitter is not None:
        return run_fit(cfg, resume=resume, progress=progress, loaded=loaded, cache_dir=cache_dir)
    tc = cfg.train
    resume = resumable(cfg, resume)
    with_grad = METHODS[cfg.dictionary.method].needs_gradient  # rows are then [activation | gradient]
    # one shuffled row per token: [activation | gradient] (g-SAE) or [input | target] (transcoders)
    sites = [cfg.site] + ([gradient_key(cfg.site)] if with_grad else []) + ([cfg.output_site] if cfg.output_site else [])
    data = training_data(cfg, loaded, cache_dir)
    total_steps = tc.epochs * data.batches_per_epoch(tc.batch_size)
    if total_steps == 0:
        raise FeaturekitError(f"fewer training tokens than one batch of {tc.batch_size}; harvest more or lower train.batch_size")
    if tc.warmup_steps > total_steps:
        warn(f"train.warmup_steps={tc.warmup_steps} exceeds the run's {total_steps} steps: the learning rate never reaches "
             f"train.lr={tc.lr}; lower train.warmup_steps or train longer")
    sae = build_from_config(cfg.dictionary, data.d, seed=tc.seed, d_out=data.d_out)
    widths = [data.d] + ([data.d] if with_grad else []) + ([data.d_out] if data.d_out else [])
    threads = tc.threads or torch.get_num_threads()
    producer_threads, consumer_threads = split_threads(threads)
    if tc.threads or not cfg.data.cache:  # streamed: the trainer gets its share, the prefetch thread the rest
        torch.set_num_threads(threads if cfg.data.cache else consumer_threads)

    def stream(skip: int) -> Iterator[torch.Tensor]:
        return shuffled_batches(data, sites, skip, with_grad, producer_threads)

    torch.manual_seed(tc.seed)
    # under torchrun: data parallel, or this rank's latent shard (train.shard_latents); one process: unchanged
    distributed.init_from_env()
    sae = sae.to(distributed.train_device(tc.device))  # train.device: the GPU when there is one (batches follow)
    sae, rank_dir = distributed.prepare(sae, tc, cfg.run_dir)
    trainer = Trainer(sae, tc, rank_dir, total_steps, digest=run_digest(cfg, data.data_id))
    if resume:
        trainer.resume()
    else:  # c and b_dec from the first shuffled batches: a sample of the whole set, not its first documents
        sample = torch.cat(list(itertools.islice(stream(0), -(-INIT_SAMPLE_TOKENS // tc.batch_size))))[:INIT_SAMPLE_TOKENS]
        trainer.init_from_data(*sample.to(sae.W_dec.device).split(widths, dim=1))
    distributed.after_init(sae)
    batches = distributed.rank_batches(stream(trainer.step), sae)
    if len(widths) > 1:
        batches = (tuple(b.split(widths, dim=1)) for b in batches)
    start = time.time()
    summary = trainer.fit(batches, progress=progress and distributed.is_main())
    if not distributed.launched():  # one process holds every latent: re-estimate inference thresholds (BatchTopK family)
        calibration = calibrate_inference(sae, stream(0), widths[0])
        if calibration:
            summary["inference_calibration"] = calibration
    torch.set_num_threads(threads)
    full = distributed.finish(sae)  # torchrun: the (gathered) dictionary on rank 0, None elsewhere
    if full is not None:
        save_dictionary(full, cfg, data.dtype, summary, time.time() - start, data.identity)
    return full if full is not None else sae


def calibrate_inference(sae: Dictionary, batches: Iterator[torch.Tensor], d: int) -> dict | None:
    """`Dictionary.calibrate` on the first CALIBRATION_BATCHES shuffled training batches (the activations only,
    in the training scale), after training."""
    device = sae.W_dec.device
    sample = [b[:, :d].to(device).float() * sae.input_scale for b in itertools.islice(batches, CALIBRATION_BATCHES)]
    return sae.calibrate(sample) if sample else None


def save_dictionary(sae: Dictionary, cfg: RunConfig, harvest_dtype: str | None, summary: dict, seconds: float,
                    identity: dict | None = None) -> Path:
    """Save a folded copy (runs on raw activations) to runs/NAME/dictionary, with the digests of the data it was
    trained on (`identity`: text, model weights, tokenizer) and of the config (`dictionary_complete` reads both)."""
    out = copy.deepcopy(sae)
    training_scale = float(out.input_scale)
    extra = {"training_output_scale": float(out.output_scale)} if out.transcodes else {}
    out.fold_input_scale()
    if isinstance(out, FoldsDecoderNorms):
        out.fold_decoder_norms()
        extra["decoder_norms_folded"] = True
    meta = {
        "normalization": {"training_scale": training_scale, **extra,
                          "rule": f"{cfg.train.normalize}: c = sqrt(d) / mean ||x|| on {INIT_SAMPLE_TOKENS} shuffled training tokens"
                                  + (TRANSCODER_SCALE_RULE if out.transcodes else "")},
        "source": {"model": cfg.model.name, "site": cfg.site, "d_model": sae.d_in, "harvest_dtype": harvest_dtype,
                   "corpus": cfg.data.source, **({} if is_vision(cfg) else {"context_len": cfg.data.context_len}),
                   **({"output_site": cfg.output_site} if cfg.output_site else {}),
                   "identity": {k: (identity or {}).get(k) for k in IDENTITY_KEYS}},
        **({"images": dataclasses.asdict(cfg.images)} if is_vision(cfg) else {"special_tokens": token_policy(cfg)}),
        "provenance": {"featurekit_version": __version__, "tokens_seen": summary["tokens"], "steps": summary["steps"],
                       "train_seconds": round(seconds, 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       **({"threads": summary["threads"]} if "threads" in summary else {}),
                       **({"device": summary["device"]} if "device" in summary else {}),
                       **({"inference_calibration": summary["inference_calibration"]} if "inference_calibration" in summary else {}),
                       "kernels": kernel_choices(sae),  # the per-machine kernel choices the training took
                       "config": dataclasses.asdict(cfg.train), "config_digest": config_digest(cfg)},
    }
    return save(out, cfg.run_dir / "dictionary", meta)
