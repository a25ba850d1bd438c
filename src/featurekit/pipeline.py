"""The whole job, step by step: harvest → train → evaluate → report, all inside one run directory.

    runs/NAME/config.json          the resolved config (reproduces the run)
    runs/NAME/activations/         the activation cache (sharded safetensors + manifest.json)
    runs/NAME/checkpoint/          the trainer's resumable state
    runs/NAME/metrics.jsonl        training curves
    runs/NAME/dictionary/          model.safetensors + featurekit.json
    runs/NAME/eval.json            held-out metrics
    runs/NAME/features/            density.json, top_examples.json
    runs/NAME/report.html          the report
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from ._io import atomic_write_json, read_json
from .config import RunConfig, from_dict, validate
from .data.cache import ActivationCache, write_cache
from .data.harvest import choose_dtype, harvest
from .data.prefetch import Prefetcher, split_threads
from .data.shuffle import ShuffleBuffer, batches_per_epoch, iter_epochs
from .data.sources import load_texts
from .data.tokens import pack, token_mask
from .dictionaries import METHODS, Dictionary, build_from_config, load, save
from .errors import FeaturekitError
from .evaluate.splice import reconstruction_eval, splice_eval
from .evaluate.transcoders import transcoder_splice_eval
from .features.examples import FeatureStats, build_examples, choose_latents, write_features
from .features.heads import head_summary
from .models import load_model
from .models.hooks import capture_activations, gradient_key
from .models.loading import LoadedModel
from .models.sites import n_heads, parse_site, site_dim
from .report import write_report
from .train import Trainer, distributed
from .train.fit import fit_stream

INIT_SAMPLE_TOKENS = 32_768
TRANSCODER_SCALE_RULE = ("; target y (output_site): c_out = sqrt(d_out) / mean ||y|| on the same tokens (1 with normalize=none); "
                         "folded: b_enc/c, W_dec*c/c_out, W_skip*c/c_out, b_dec/c_out, so the weights map raw x to raw y")


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the config's automatic values so the saved config.json states every number."""
    cfg = copy.deepcopy(cfg)
    validate(cfg)
    site = parse_site(cfg.site)  # bad syntax fails before anything is written
    if METHODS[cfg.dictionary.method].transcodes and cfg.output_site is None:
        if site.kind != "mlp_in":
            raise FeaturekitError(f"dictionary.method={cfg.dictionary.method} predicts one site from another: with site={cfg.site} "
                                  f"set output_site too (e.g. site=mlp_in.{site.layer} output_site=mlp_out.{site.layer})")
        cfg.output_site = f"mlp_out.{site.layer}"  # a transcoder replaces the MLP of its layer
    if cfg.output_site is not None:
        parse_site(cfg.output_site)
    total = cfg.train.epochs * cfg.data.train_tokens
    if cfg.train.dead_tokens is None:
        cfg.train.dead_tokens = max(cfg.train.batch_size, min(10_000_000, total // 4))
    return cfg


def save_config(cfg: RunConfig) -> None:
    atomic_write_json(cfg.run_dir / "config.json", cfg.to_dict())


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FeaturekitError(f"{run_dir} is not a run directory: config.json is missing")
    return from_dict(RunConfig, read_json(path))


def open_model(cfg: RunConfig) -> LoadedModel:
    """Load the configured model and check that the configured site exists in it."""
    dtype = choose_dtype(cfg.model.dtype, cfg.model.device)
    loaded = load_model(cfg.model.name, dtype=dtype, device=cfg.model.device)
    for site in harvest_sites(cfg):
        site_dim(loaded.model, site)  # an unknown site fails here, listing the valid ones
    return loaded


def harvest_sites(cfg: RunConfig) -> list[str]:
    """The sites one forward pass captures: `site`, and a transcoder's `output_site` beside it."""
    return [cfg.site] + ([cfg.output_site] if cfg.output_site else [])


def contexts(loaded: LoadedModel, cfg: RunConfig, split: str, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed contexts of `split` and their token mask, cut so the mask keeps at most n_tokens."""
    per_context = max(1, cfg.data.context_len - 1)
    ids = pack(load_texts(cfg.data.source, split), loaded.tokenizer, cfg.data.context_len,
               max_contexts=math.ceil(1.05 * n_tokens / per_context) + 1)
    mask = token_mask(ids, loaded.tokenizer, exclude_first=cfg.data.exclude_first, exclude_special=cfg.data.exclude_special)
    over = mask.flatten().cumsum(0) > n_tokens
    mask = mask & ~over.view_as(mask)
    used = int(mask.any(1).nonzero().max()) + 1 if mask.any() else 0
    return ids[:used], mask[:used]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def harvest_meta(cfg: RunConfig) -> dict:
    """What identifies a training activation set (stored in the cache manifest, checked before training)."""
    return {"model": cfg.model.name, "sites": harvest_sites(cfg), "source": cfg.data.source, "split": "train",
            "context_len": cfg.data.context_len, "token_policy": token_policy(cfg), "tokens": cfg.data.train_tokens,
            "harvest_batch": cfg.data.harvest_batch, **({"gradients": True} if cfg.data.gradients else {})}


def run_digest(cfg: RunConfig, data_id: object) -> str:
    """sha256 of everything that determines the training trajectory (checked when resuming)."""
    blob = json.dumps({"train": dataclasses.asdict(cfg.train), "dictionary": dataclasses.asdict(cfg.dictionary),
                       "site": cfg.site, "data": data_id, **({"output_site": cfg.output_site} if cfg.output_site else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def token_policy(cfg: RunConfig) -> dict:
    return {"exclude_first": cfg.data.exclude_first, "exclude_special": cfg.data.exclude_special,
            "max_norm_multiple": cfg.data.max_norm_multiple}


# -- steps ------------------------------------------------------------------------------------------
def run_harvest(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True) -> ActivationCache:
    """Harvest the training activations into runs/NAME/activations (resumes an interrupted harvest)."""
    loaded = loaded or open_model(cfg)
    ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
    meta = {**harvest_meta(cfg), "dtype": dtype_name(loaded.model.dtype)}
    stream = harvest(loaded.model, ids, harvest_sites(cfg), batch_size=cfg.data.harvest_batch, mask=mask, progress=progress,
                     max_norm_multiple=cfg.data.max_norm_multiple, gradients=cfg.data.gradients)
    return write_cache(cfg.run_dir / "activations", stream, meta, cfg.data.shard_tokens)


def training_cache(cfg: RunConfig, cache_dir: Path | None = None) -> ActivationCache:
    """The run's activation cache (or `cache_dir`), checked complete and harvested with this config's data settings."""
    cache = ActivationCache(cache_dir or cfg.run_dir / "activations")
    if not cache.complete:
        raise FeaturekitError(f"the activation cache in {cache.dir} is incomplete; run `featurekit harvest` to finish it")
    expected = harvest_meta(cfg)
    differs = sorted(k for k in expected if cache.meta.get(k) != expected[k])
    if differs:
        raise FeaturekitError(f"the activation cache in {cache.dir} was harvested with other settings ({', '.join(differs)}); "
                              f"run `featurekit harvest` with this config into a new run name")
    return cache


def run_fit(cfg: RunConfig, resume: bool = False, progress: bool = True, loaded: LoadedModel | None = None,
            cache_dir: Path | None = None) -> Dictionary:
    """Fit a method with a `Dictionary.fitter` (ITDA, SNMF): `fitter.passes` (default 1) passes over the training
    activations in stream order (the cache's shards in order, or a fresh harvest without `data.cache`), no shuffle
    and no input scaling; steps, metrics.jsonl, checkpoints and `resume` as in `train.fit.fit_stream`."""
    tc = cfg.train
    if cfg.data.cache:
        cache = training_cache(cfg, cache_dir)
        d, harvest_dtype = cache.d(cfg.site), cache.meta.get("dtype")
        data_id = [shard["sha256"] for shard in cache.manifest["shards"]]

        def read() -> Iterator:
            return cache.iter_shards(sites=[cfg.site])
    else:
        loaded = loaded or open_model(cfg)
        ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
        d, harvest_dtype = site_dim(loaded.model, cfg.site), dtype_name(loaded.model.dtype)
        data_id = {**harvest_meta(cfg), "dtype": harvest_dtype}

        def read() -> Iterator:
            return harvest(loaded.model, ids, [cfg.site], batch_size=cfg.data.harvest_batch, mask=mask, progress=False,
                           max_norm_multiple=cfg.data.max_norm_multiple)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    fitter = METHODS[cfg.dictionary.method].fitter.from_config(cfg.dictionary, d, seed=tc.seed, batch_size=tc.batch_size)
    batches = itertools.chain.from_iterable(read() for _ in range(getattr(fitter, "passes", 1)))  # each pass read lazily
    start = time.time()
    summary = fit_stream(fitter, batches, cfg.site, cfg.run_dir, tc, digest=run_digest(cfg, data_id), resume=resume, progress=progress)
    sae = fitter.finish()
    save_dictionary(sae, cfg, harvest_dtype, summary, time.time() - start)
    return sae


def run_train(cfg: RunConfig, resume: bool = False, progress: bool = True, loaded: LoadedModel | None = None,
              cache_dir: Path | None = None) -> Dictionary:
    """Train the dictionary; `resume` continues from the checkpoint.

    `cache_dir` reads another run's activation cache (harvested with the same data settings; several
    dictionaries trained on one harvest, as `bench frontier` does) instead of runs/NAME/activations.

    With `data.cache` (the default) batches come from the run's activation cache, which must have
    been harvested with this config. Without it they are streamed: every epoch harvests the training
    contexts again straight into the shuffle buffer (nothing on disk; memory bounded by the buffer). A
    background thread (`data.prefetch`) harvests and shuffles ahead while the trainer steps, holding up to
    half a buffer of finished batches; the threads are split between the two (`split_threads`: one each on 2).
    A streamed epoch is cut to ⌊0.99 · kept tokens / batch_size⌋ batches, the slack absorbing tokens
    dropped as norm outliers. Resuming skips the batches already trained on (whole epochs unread).
    Methods with a `Dictionary.fitter` (ITDA, SNMF) are fitted by `run_fit` instead.
    """
    if METHODS[cfg.dictionary.method].fitter is not None:
        return run_fit(cfg, resume=resume, progress=progress, loaded=loaded, cache_dir=cache_dir)
    tc = cfg.train
    with_grad = METHODS[cfg.dictionary.method].needs_gradient  # rows are then [activation | gradient]
    # one shuffled row per token: [activation | gradient] (g-SAE) or [input | target] (transcoders)
    sites = [cfg.site] + ([gradient_key(cfg.site)] if with_grad else []) + ([cfg.output_site] if cfg.output_site else [])
    if cfg.data.cache:
        cache = training_cache(cfg, cache_dir)
        d, per_epoch, harvest_dtype = cache.d(cfg.site), batches_per_epoch(cache.n_tokens, tc.batch_size), cache.meta.get("dtype")
        d_out = cache.d(cfg.output_site) if cfg.output_site else None
        data_id = [shard["sha256"] for shard in cache.manifest["shards"]]

        def stream(skip: int) -> Iterator[torch.Tensor]:
            return iter_epochs(cache, sites, tc.epochs, tc.buffer_tokens, tc.batch_size, tc.seed, skip_batches=skip)
    else:
        loaded = loaded or open_model(cfg)
        ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
        d, per_epoch = site_dim(loaded.model, cfg.site), int(0.99 * int(mask.sum())) // tc.batch_size
        d_out = site_dim(loaded.model, cfg.output_site) if cfg.output_site else None
        harvest_dtype = dtype_name(loaded.model.dtype)
        data_id = {**harvest_meta(cfg), "dtype": harvest_dtype}

        # a producer thread harvests and shuffles the next batches while the trainer steps (data.prefetch module); its
        # queue holds one shuffle-buffer burst + 1 batches, so emitting a burst never stalls the next harvest
        producer_threads, consumer_threads = split_threads(tc.threads or torch.get_num_threads())
        depth = max(1, tc.buffer_tokens // 2 // tc.batch_size) + 1

        def stream(skip: int) -> Iterator[torch.Tensor]:
            return Prefetcher(harvested(skip), depth=depth, threads=producer_threads)

        def harvested(skip: int) -> Iterator[torch.Tensor]:
            for epoch in range(skip // max(per_epoch, 1), tc.epochs):
                batches = harvest(loaded.model, ids, harvest_sites(cfg), batch_size=cfg.data.harvest_batch, mask=mask,
                                  progress=False, max_norm_multiple=cfg.data.max_norm_multiple, gradients=with_grad)
                shuffled = ShuffleBuffer(batches, sites, tc.buffer_tokens, tc.batch_size, tc.seed + epoch)
                first = skip % per_epoch if epoch == skip // per_epoch else 0
                yield from itertools.islice(shuffled, first, per_epoch)

    total_steps = tc.epochs * per_epoch
    if total_steps == 0:
        raise FeaturekitError(f"fewer training tokens than one batch of {tc.batch_size}; harvest more or lower train.batch_size")
    sae = build_from_config(cfg.dictionary, d, seed=tc.seed, d_out=d_out)
    widths = [d] + ([d] if with_grad else []) + ([d_out] if d_out else [])
    threads = tc.threads or torch.get_num_threads()
    if tc.threads or not cfg.data.cache:  # streamed: the trainer gets its share, the prefetch thread the rest
        torch.set_num_threads(threads if cfg.data.cache else consumer_threads)
    torch.manual_seed(tc.seed)
    # under torchrun: data parallel, or this rank's latent shard (train.shard_latents); one process: unchanged
    distributed.init_from_env()
    sae = sae.to(distributed.train_device(tc.device))  # train.device: the GPU when there is one (batches follow)
    sae, rank_dir = distributed.prepare(sae, tc, cfg.run_dir)
    trainer = Trainer(sae, tc, rank_dir, total_steps, digest=run_digest(cfg, data_id))
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
    torch.set_num_threads(threads)
    full = distributed.finish(sae)  # torchrun: the (gathered) dictionary on rank 0, None elsewhere
    if full is not None:
        save_dictionary(full, cfg, harvest_dtype, summary, time.time() - start)
    return full if full is not None else sae


def save_dictionary(sae: Dictionary, cfg: RunConfig, harvest_dtype: str | None, summary: dict, seconds: float) -> Path:
    """Save a folded copy (runs on raw activations) to runs/NAME/dictionary."""
    out = copy.deepcopy(sae)
    training_scale = float(out.input_scale)
    extra = {"training_output_scale": float(out.output_scale)} if out.transcodes else {}
    out.fold_input_scale()
    if hasattr(out, "fold_decoder_norms"):
        out.fold_decoder_norms()
        extra["decoder_norms_folded"] = True
    meta = {
        "normalization": {"training_scale": training_scale, **extra,
                          "rule": f"{cfg.train.normalize}: c = sqrt(d) / mean ||x|| on {INIT_SAMPLE_TOKENS} shuffled training tokens"
                                  + (TRANSCODER_SCALE_RULE if out.transcodes else "")},
        "source": {"model": cfg.model.name, "site": cfg.site, "d_model": sae.d_in, "harvest_dtype": harvest_dtype,
                   "corpus": cfg.data.source, "context_len": cfg.data.context_len,
                   **({"output_site": cfg.output_site} if cfg.output_site else {})},
        "special_tokens": token_policy(cfg),
        "provenance": {"featurekit_version": __version__, "tokens_seen": summary["tokens"], "steps": summary["steps"],
                       "train_seconds": round(seconds, 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       **({"threads": summary["threads"]} if "threads" in summary else {}),
                       **({"device": summary["device"]} if "device" in summary else {}),
                       "config": dataclasses.asdict(cfg.train)},
    }
    return save(out, cfg.run_dir / "dictionary", meta)


def run_eval(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True) -> dict:
    """Held-out reconstruction metrics, splice CE/KL and feature examples → eval.json, features/."""
    loaded = loaded or open_model(cfg)
    sae = load(cfg.run_dir / "dictionary", device=next(loaded.model.parameters()).device)
    source = sae.metadata.get("source", {})
    if (source.get("site"), source.get("output_site"), source.get("model")) != (cfg.site, cfg.output_site, cfg.model.name):
        raise FeaturekitError(f"the dictionary in {cfg.run_dir / 'dictionary'} was trained on {source.get('site')} "
                              f"(output {source.get('output_site')}) of {source.get('model')}, but the config asks for {cfg.site} "
                              f"(output {cfg.output_site}) of {cfg.model.name}; evaluate it with the config it was trained with")
    ids, mask = contexts(loaded, cfg, "test", cfg.eval.tokens)
    stats = FeatureStats(sae.n_latents, top_n=cfg.report.top_n)
    current = []  # the batch whose codes `reconstruction_eval` hands to the feature statistics next

    def eval_batches() -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        for batch in harvest(loaded.model, ids, harvest_sites(cfg), batch_size=cfg.eval.batch_contexts, mask=mask,
                             progress=progress, max_norm_multiple=cfg.data.max_norm_multiple):
            current[:] = [batch]  # a transcoder reads site and is scored against output_site
            yield (batch.acts[cfg.site], batch.acts[cfg.output_site]) if cfg.output_site else batch.acts[cfg.site]

    def feature_stats(codes: torch.Tensor) -> None:
        stats.update(codes, current[0].context_idx, current[0].position)

    result = {"site": cfg.site, **({"output_site": cfg.output_site} if cfg.output_site else {}), "model": cfg.model.name,
              "dtype": dtype_name(loaded.model.dtype), "split": "test", "token_policy": token_policy(cfg)}
    recon = reconstruction_eval(sae, eval_batches(), on_codes=feature_stats)
    recon.pop("density")
    result.update(recon)
    result["norm_outliers_excluded"] = int(mask.sum()) - recon["n_tokens"]
    n_splice = min(cfg.eval.splice_contexts, len(ids))
    if cfg.output_site:  # the output site replaced by the prediction from the input site of the same forward pass
        result.update(transcoder_splice_eval(loaded.model, [(cfg.site, cfg.output_site, sae)], ids[:n_splice], mask[:n_splice],
                                             cfg.eval.batch_contexts, progress, max_norm_multiple=cfg.data.max_norm_multiple))
    else:
        result.update(splice_eval(loaded.model, sae, cfg.site, ids[:n_splice], mask[:n_splice], cfg.eval.batch_contexts, progress,
                                  max_norm_multiple=cfg.data.max_norm_multiple))
    atomic_write_json(cfg.run_dir / "eval.json", result)

    @torch.no_grad()
    def activation_fn(context_indices: torch.Tensor) -> torch.Tensor:
        acts = capture_activations(loaded.model, ids[context_indices], [cfg.site])[cfg.site].float()
        return (sae.encode(acts) * mask[context_indices, :, None].to(acts.device)).cpu()

    latents = choose_latents(stats, cfg.report.n_features, seed=cfg.train.seed)
    examples = build_examples(stats, latents, ids, lambda t: loaded.tokenizer.decode([t]), activation_fn)
    write_features(cfg.run_dir / "features", stats, examples)
    if parse_site(cfg.site).kind == "attn_z":  # attention-output dictionary: attribute features to heads
        atomic_write_json(cfg.run_dir / "features" / "heads.json", head_summary(sae.W_dec, n_heads(loaded.model), stats.density()))
    return result


def run_all(cfg: RunConfig, progress: bool = True) -> Path:
    """The main job. Returns the report's path."""
    cfg = resolve(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg)
    loaded = open_model(cfg)
    if cfg.data.cache:
        if distributed.init_from_env() and not distributed.is_main():  # torchrun: rank 0 harvests, the others wait
            distributed.barrier()
        else:
            run_harvest(cfg, loaded, progress)
            distributed.barrier()
    resume = (cfg.run_dir / "checkpoint" / "state.json").is_file() and not (cfg.run_dir / "dictionary" / "featurekit.json").is_file()
    run_train(cfg, resume=resume, progress=progress, loaded=loaded)
    if not distributed.is_main():
        return cfg.run_dir / "report.html"
    run_eval(cfg, loaded, progress)
    return write_report(cfg.run_dir)
