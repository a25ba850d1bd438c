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
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from ._io import atomic_write_json, read_json
from .config import RunConfig, from_dict
from .data.cache import ActivationCache, write_cache
from .data.harvest import choose_dtype, harvest
from .data.shuffle import batches_per_epoch, iter_epochs
from .data.sources import load_texts
from .data.tokens import pack, token_mask
from .dictionaries import Dictionary, build, load, save
from .errors import FeaturekitError
from .evaluate.splice import reconstruction_eval, splice_eval
from .features.examples import FeatureStats, build_examples, choose_latents, write_features
from .models import load_model
from .models.hooks import capture_activations
from .models.loading import LoadedModel
from .report import write_report
from .train import Trainer

INIT_SAMPLE_TOKENS = 32_768


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the config's automatic values so the saved config.json states every number."""
    cfg = copy.deepcopy(cfg)
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
    dtype = choose_dtype(cfg.model.dtype, cfg.model.device)
    return load_model(cfg.model.name, dtype=dtype, device=cfg.model.device)


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


def token_policy(cfg: RunConfig) -> dict:
    return {"exclude_first": cfg.data.exclude_first, "exclude_special": cfg.data.exclude_special}


# -- steps ------------------------------------------------------------------------------------------
def run_harvest(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True) -> ActivationCache:
    """Harvest the training activations into runs/NAME/activations (resumes an interrupted harvest)."""
    loaded = loaded or open_model(cfg)
    ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
    meta = {
        "model": cfg.model.name, "sites": [cfg.site], "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "source": cfg.data.source, "split": "train", "context_len": cfg.data.context_len,
        "token_policy": token_policy(cfg), "tokens": cfg.data.train_tokens,
    }
    stream = harvest(loaded.model, ids, [cfg.site], batch_size=cfg.data.harvest_batch, mask=mask, progress=progress)
    return write_cache(cfg.run_dir / "activations", stream, meta, cfg.data.shard_tokens)


def run_train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Dictionary:
    """Train the dictionary on the run's activation cache; `resume` continues from the checkpoint."""
    cache = ActivationCache(cfg.run_dir / "activations")
    if not cache.complete:
        raise FeaturekitError(f"the activation cache in {cache.dir} is incomplete; run `featurekit harvest` to finish it")
    d = cache.d(cfg.site)
    dc, tc = cfg.dictionary, cfg.train
    params = {"k": dc.k} if dc.method == "topk" else {"l1_coefficient": dc.l1_coefficient} if dc.method == "relu" else {}
    sae = build(dc.method, d, dc.n_latents, seed=tc.seed, **params)
    total_steps = tc.epochs * batches_per_epoch(cache.n_tokens, tc.batch_size)
    if total_steps == 0:
        raise FeaturekitError(f"the cache holds {cache.n_tokens} tokens, fewer than one batch of {tc.batch_size}; harvest more or lower train.batch_size")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    trainer = Trainer(sae, tc, cfg.run_dir, total_steps)
    if resume:
        trainer.resume()
    else:
        trainer.init_from_data(_first_tokens(cache, cfg.site, INIT_SAMPLE_TOKENS))
    start = time.time()
    batches = iter_epochs(cache, cfg.site, tc.epochs, tc.buffer_tokens, tc.batch_size, tc.seed)
    summary = trainer.fit(batches, progress=progress)
    save_dictionary(sae, cfg, cache, summary, time.time() - start)
    return sae


def save_dictionary(sae: Dictionary, cfg: RunConfig, cache: ActivationCache, summary: dict, seconds: float) -> Path:
    """Save a folded copy (runs on raw activations) to runs/NAME/dictionary."""
    out = copy.deepcopy(sae)
    training_scale = float(out.input_scale)
    out.fold_input_scale()
    extra = {}
    if hasattr(out, "fold_decoder_norms"):
        out.fold_decoder_norms()
        extra["decoder_norms_folded"] = True
    meta = {
        "normalization": {"training_scale": training_scale, "rule": f"{cfg.train.normalize}: c = sqrt(d) / mean ||x|| on {INIT_SAMPLE_TOKENS} tokens", **extra},
        "source": {"model": cfg.model.name, "site": cfg.site, "d_model": sae.d_in, "harvest_dtype": cache.meta.get("dtype"),
                   "corpus": cfg.data.source, "context_len": cfg.data.context_len},
        "special_tokens": token_policy(cfg),
        "provenance": {"featurekit_version": __version__, "tokens_seen": summary["tokens"], "steps": summary["steps"],
                       "train_seconds": round(seconds, 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "config": dataclasses.asdict(cfg.train)},
    }
    return save(out, cfg.run_dir / "dictionary", meta)


def run_eval(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True) -> dict:
    """Held-out reconstruction metrics, splice CE/KL and feature examples → eval.json, features/."""
    loaded = loaded or open_model(cfg)
    sae = load(cfg.run_dir / "dictionary")
    ids, mask = contexts(loaded, cfg, "test", cfg.eval.tokens)
    stats = FeatureStats(sae.n_latents, top_n=cfg.report.top_n)

    def eval_batches() -> Iterator[torch.Tensor]:
        for batch in harvest(loaded.model, ids, [cfg.site], batch_size=cfg.eval.batch_contexts, mask=mask, progress=progress):
            x = batch.acts[cfg.site].float()
            stats.update(sae.encode(x), batch.context_idx, batch.position)
            yield x

    result = {"site": cfg.site, "model": cfg.model.name, "dtype": str(loaded.model.dtype).removeprefix("torch."),
              "split": "test", "token_policy": token_policy(cfg)}
    recon = reconstruction_eval(sae, eval_batches())
    recon.pop("density")
    result.update(recon)
    n_splice = min(cfg.eval.splice_contexts, len(ids))
    result.update(splice_eval(loaded.model, sae, cfg.site, ids[:n_splice], mask[:n_splice], cfg.eval.batch_contexts, progress))
    atomic_write_json(cfg.run_dir / "eval.json", result)

    @torch.no_grad()
    def activation_fn(context_indices: torch.Tensor) -> torch.Tensor:
        acts = capture_activations(loaded.model, ids[context_indices], [cfg.site])[cfg.site].float()
        return sae.encode(acts) * mask[context_indices, :, None]

    latents = choose_latents(stats, cfg.report.n_features, seed=cfg.train.seed)
    examples = build_examples(stats, latents, ids, lambda t: loaded.tokenizer.decode([t]), activation_fn)
    write_features(cfg.run_dir / "features", stats, examples)
    return result


def run_all(cfg: RunConfig, progress: bool = True) -> Path:
    """The main job. Returns the report's path."""
    cfg = resolve(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg)
    loaded = open_model(cfg)
    run_harvest(cfg, loaded, progress)
    resume = (cfg.run_dir / "checkpoint" / "state.json").is_file() and not (cfg.run_dir / "dictionary").exists()
    run_train(cfg, resume=resume, progress=progress)
    run_eval(cfg, loaded, progress)
    return write_report(cfg.run_dir)


def _first_tokens(cache: ActivationCache, site: str, n: int) -> torch.Tensor:
    rows, have = [], 0
    for batch in cache.iter_shards(sites=[site]):
        rows.append(batch.acts[site].float())
        have += rows[-1].shape[0]
        if have >= n:
            break
    return torch.cat(rows)[:n]
