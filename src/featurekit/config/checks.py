"""Checks of a built RunConfig before any work starts: ranges, choices, finiteness, and the method's own
hyper-parameter checks (its Params' `check`). Each error names the key and the fix."""

from __future__ import annotations

from ..dictionaries.registry import METHODS, check_params
from ..errors import FeaturekitError
from .parse import non_finite
from .schema import RunConfig


def validate(cfg: RunConfig) -> None:
    """Check ranges and choices before any work starts; each error names the key and the fix."""
    for key, value in non_finite(cfg):
        raise FeaturekitError(f"config key {key} must be a finite number, got {value} (NaN and infinities are refused)")
    positive = {
        "data.context_len": cfg.data.context_len, "data.train_tokens": cfg.data.train_tokens,
        "data.harvest_batch": cfg.data.harvest_batch, "data.shard_tokens": cfg.data.shard_tokens,
        "dictionary.n_latents": cfg.dictionary.n_latents,
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size, "train.lr": cfg.train.lr,
        "train.checkpoint_every": cfg.train.checkpoint_every, "train.log_every": cfg.train.log_every,
        "train.buffer_tokens": cfg.train.buffer_tokens, "eval.tokens": cfg.eval.tokens,
        "eval.splice_contexts": cfg.eval.splice_contexts, "eval.batch_contexts": cfg.eval.batch_contexts,
        "eval.probing_train_docs": cfg.eval.probing_train_docs, "eval.probing_test_docs": cfg.eval.probing_test_docs,
        "eval.absorption_words_per_sequence": cfg.eval.absorption_words_per_sequence,
        "eval.absorption_max_k": cfg.eval.absorption_max_k, "eval.absorption_l1_steps": cfg.eval.absorption_l1_steps,
        "eval.steering_prompts": cfg.eval.steering_prompts, "eval.steering_top_tokens": cfg.eval.steering_top_tokens,
        "eval.steering_tokens": cfg.eval.steering_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise FeaturekitError(f"config key {key} must be positive, got {value}")
    if cfg.eval.probing_tokens < 2:
        raise FeaturekitError(f"config key eval.probing_tokens must be >= 2 (position 0 is not pooled), got {cfg.eval.probing_tokens}")
    probing_ks(cfg.eval.probing_ks)
    for key, value in {"eval.absorption_words": cfg.eval.absorption_words, "eval.absorption_icl": cfg.eval.absorption_icl,
                       "eval.steering_features": cfg.eval.steering_features,
                       "eval.steering_baselines": cfg.eval.steering_baselines}.items():
        if value < 0:
            raise FeaturekitError(f"config key {key} must be >= 0, got {value}")
    if cfg.eval.steering_prompt_tokens < 2:
        raise FeaturekitError(f"config key eval.steering_prompt_tokens must be >= 2 (position 0 is not scored), "
                              f"got {cfg.eval.steering_prompt_tokens}")
    steering_targets(cfg.eval.steering_targets)
    splice_curves(cfg.eval.splice_curves)
    for key, value in {"train.dead_tokens": cfg.train.dead_tokens, "train.k_aux": cfg.train.k_aux,
                       "train.threads": cfg.train.threads, "data.max_norm_multiple": cfg.data.max_norm_multiple}.items():
        if value is not None and value <= 0:
            raise FeaturekitError(f"config key {key} must be positive or null, got {value}")
    choices = {"train.normalize": (cfg.train.normalize, ("mean_norm", "none")),
               "train.b_dec_init": (cfg.train.b_dec_init, ("geometric_median", "mean", "zero")),
               "data.holdout": (cfg.data.holdout, ("documents", "contexts")),
               "eval.splice_ablation": (cfg.eval.splice_ablation, ("zero", "mean")),
               "dictionary.method": (cfg.dictionary.method, tuple(sorted(METHODS)))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise FeaturekitError(f"config key {key} must be one of {list(allowed)}, got {value!r}")
    if cfg.output_site is not None and not METHODS[cfg.dictionary.method].transcodes:
        raise FeaturekitError(f"output_site={cfg.output_site} is for methods that predict another site (transcoder, skiptranscoder); "
                              f"dictionary.method={cfg.dictionary.method} reconstructs `site` itself: drop output_site")
    if METHODS[cfg.dictionary.method].needs_gradient and not cfg.data.gradients:
        raise FeaturekitError(f"dictionary.method={cfg.dictionary.method} trains on LM-loss gradients; set data.gradients=true "
                              f"(the harvest then runs a backward pass per batch)")
    if not isinstance(cfg.dictionary.params, METHODS[cfg.dictionary.method].Params):
        raise FeaturekitError(f"dictionary.params must be a {METHODS[cfg.dictionary.method].Params.__name__} for method "
                              f"{cfg.dictionary.method}, got {type(cfg.dictionary.params).__name__}")
    check_params(cfg.dictionary.params, cfg.dictionary.n_latents)  # the method's own checks (its Params.check)
    if cfg.data.train_tokens < cfg.train.batch_size:
        raise FeaturekitError(f"data.train_tokens ({cfg.data.train_tokens}) is less than one batch (train.batch_size="
                              f"{cfg.train.batch_size}): harvest more tokens or lower train.batch_size")
    if cfg.train.buffer_tokens < cfg.train.batch_size:
        raise FeaturekitError(f"train.buffer_tokens ({cfg.train.buffer_tokens}) must be at least train.batch_size ({cfg.train.batch_size})")
    if not 0 <= cfg.train.decay_fraction <= 1 or not 0 <= cfg.train.sparsity_warmup_fraction <= 1:
        raise FeaturekitError("train.decay_fraction and train.sparsity_warmup_fraction must lie in [0, 1]")
    if cfg.train.aux_zipf_coef < 0 or cfg.train.aux_zipf_tau <= 0:
        raise FeaturekitError(f"train.aux_zipf_coef must be ≥ 0 and train.aux_zipf_tau > 0, got {cfg.train.aux_zipf_coef}, "
                              f"{cfg.train.aux_zipf_tau}")


def probing_ks(text: str) -> list[int]:
    """eval.probing_ks ("1,2,5,20") as a sorted list of distinct positive integers."""
    try:
        ks = sorted({int(part) for part in str(text).split(",")})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise FeaturekitError(f"config key eval.probing_ks must list positive integers separated by commas (e.g. 1,2,5,20), got {text!r}")
    return ks


def splice_curves(text: str) -> list[str]:
    """eval.splice_curves ("alone,cumulative", "alone", "cumulative" or "") as a list."""
    curves = [c.strip() for c in text.split(",") if c.strip()]
    bad = sorted(set(curves) - {"alone", "cumulative"})
    if bad:
        raise FeaturekitError(f"config key eval.splice_curves lists {', '.join(bad)}; use alone, cumulative, both "
                              "(alone,cumulative) or nothing (all at once only)")
    return list(dict.fromkeys(curves))


def steering_targets(text: str) -> list[float]:
    """eval.steering_targets ("0.5,1,2") as a sorted list of distinct positive KLs in nats."""
    try:
        targets = sorted({float(part) for part in str(text).split(",")})
    except ValueError:
        targets = []
    if not targets or targets[0] <= 0 or any(t != t or t == float("inf") for t in targets):
        raise FeaturekitError(f"config key eval.steering_targets must list positive KLs in nats separated by commas "
                              f"(e.g. 0.5,1,2), got {text!r}")
    return targets
