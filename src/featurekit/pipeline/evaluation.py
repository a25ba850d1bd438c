"""Evaluation of a run's dictionary: held-out reconstruction, the splice into the model, feature examples.

The run's own evaluation writes `RUN_DIR/eval.json` and `RUN_DIR/features/`. An evaluation on other text
(`featurekit eval RUN_DIR --text SOURCE`, `other_text`) writes `RUN_DIR/evals/LABEL/` beside them, never
over them. eval.json is written as soon as the reconstruction metrics exist, again after the splice, and
marked complete once the feature examples are written, with the sha256 of the dictionary's weights it
scored: `eval_complete` tells a rerun whether there is anything left to do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .._io import atomic_write_json, sha256_file
from ..config import RunConfig, load_config
from ..data.harvest import harvest
from ..dictionaries import load
from ..errors import FeaturekitError, warn
from ..evaluate.splice import reconstruction_eval, splice_eval
from ..evaluate.transcoders import transcoder_splice_eval
from ..features.examples import FeatureStats, build_examples, choose_latents, write_features
from ..features.heads import head_summary
from ..models.hooks import capture_activations
from ..models.loading import LoadedModel, has_lm_head
from ..models.sites import n_heads, parse_site
from .setup import contexts, dtype_name, eval_split_warning, harvest_sites, is_vision, open_model, read_run_json, resolve, token_policy

OTHER_TEXT_KEYS = ("data.", "eval.", "report.")  # what an evaluation on other text may change


def run_eval(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True, split: str = "test",
             out_dir: Path | None = None) -> dict:
    """Reconstruction metrics on `split` of cfg.data.source, the splice CE/KL and feature examples →
    OUT/eval.json and OUT/features/, OUT = the run folder or `out_dir` (module docstring)."""
    if is_vision(cfg):  # images (pipeline/vision.py): the run's held-out images, or another image source
        from .vision import run_image_eval

        return run_image_eval(cfg, loaded, progress, split=split, out_dir=out_dir)
    out = Path(out_dir or cfg.run_dir)
    loaded = loaded or open_model(cfg)
    weights = cfg.run_dir / "dictionary" / "model.safetensors"
    sae = load(cfg.run_dir / "dictionary", device=next(loaded.model.parameters()).device)
    check_dictionary(cfg, loaded, sae)
    plan = evaluations(cfg, loaded)
    ids, mask = contexts(loaded, cfg, split, cfg.eval.tokens)
    warnings = [w for w in [eval_split_warning(cfg, split, ids, mask)] if w]
    for w in warnings:
        warn(w)
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
              "dtype": dtype_name(loaded.model.dtype), "source": cfg.data.source, "split": split, "token_policy": token_policy(cfg),
              "dictionary_sha256": sha256_file(weights), "evaluations": plan}
    recon = reconstruction_eval(sae, eval_batches(), on_codes=feature_stats)
    recon.pop("density")
    bad = [k for k, v in recon.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FeaturekitError(f"the evaluation of {cfg.run_dir / 'dictionary'} gave non-finite {', '.join(bad)} on {cfg.data.source!r}: "
                              f"the model's activations overflow in {dtype_name(loaded.model.dtype)} (try model.dtype=float32) "
                              f"or the text holds tokens the model cannot represent; nothing was written")
    result.update(recon)
    result["norm_outliers_excluded"] = int(mask.sum()) - recon["n_tokens"]
    if warnings:
        result["warnings"] = warnings
    atomic_write_json(out / "eval.json", result)  # the reconstruction metrics are kept whatever happens next
    if "splice" in plan:
        result.update(_splice(cfg, loaded, sae, ids, mask, progress))
    else:
        result["splice"] = {"skipped": f"{cfg.model.name} has no language-model head (an encoder such as BERT): there is no "
                                       f"next-token loss to splice into, so CE, loss recovered and KL are not computed"}
    atomic_write_json(out / "eval.json", result)

    @torch.no_grad()
    def activation_fn(context_indices: torch.Tensor) -> torch.Tensor:
        acts = capture_activations(loaded.model, ids[context_indices], [cfg.site])[cfg.site].float()
        return (sae.encode(acts) * mask[context_indices, :, None].to(acts.device)).cpu()

    latents = choose_latents(stats, cfg.report.n_features, seed=cfg.train.seed)
    examples = build_examples(stats, latents, ids, lambda t: loaded.tokenizer.decode([t]), activation_fn)
    write_features(out / "features", stats, examples)
    if "heads" in plan:
        atomic_write_json(out / "features" / "heads.json", head_summary(sae.W_dec, n_heads(loaded.model), stats.density()))
    result["complete"] = True
    atomic_write_json(out / "eval.json", result)
    return result


def check_dictionary(cfg: RunConfig, loaded: LoadedModel, sae) -> None:
    """Refuse a dictionary trained on another site or model than the config names."""
    source = sae.metadata.get("source", {})
    if (source.get("site"), source.get("output_site")) != (cfg.site, cfg.output_site) or not _same_model(source, cfg, loaded):
        raise FeaturekitError(f"the dictionary in {cfg.run_dir / 'dictionary'} was trained on {source.get('site')} "
                              f"(output {source.get('output_site')}) of {source.get('model')}, but the config asks for {cfg.site} "
                              f"(output {cfg.output_site}) of {cfg.model.name}; evaluate it with the config it was trained with")


def _same_model(source: dict, cfg: RunConfig, loaded: LoadedModel) -> bool:
    """Whether the loaded model is the one the dictionary was trained on: by the digest of its weights where the
    file records one for the dtype the model runs in now; otherwise (files written before the digests, or
    another dtype) by name, a moved local folder matching by its folder name."""
    from ..models.identity import model_digest

    recorded = source.get("identity", {}).get("model_digest")
    if recorded and source.get("harvest_dtype") == dtype_name(loaded.model.dtype):  # the digest is of the weights in that dtype
        return recorded == model_digest(loaded.model)
    name = str(source.get("model"))
    return name == cfg.model.name or (Path(name).name == Path(cfg.model.name).name and Path(cfg.model.name).exists())


def evaluations(cfg: RunConfig, loaded: LoadedModel) -> list[str]:
    """The evaluations a run's dictionary gets, decided here only: the reconstruction metrics and the feature
    examples always; the splice into the model where it predicts tokens (a transcoder's output site is
    replaced by its prediction); per-head attribution for a dictionary of per-head attention outputs."""
    plan = ["reconstruction"] + (["splice"] if has_lm_head(loaded.model) else []) + ["features"]
    return plan + (["heads"] if parse_site(cfg.site).kind == "attn_z" else [])


def _splice(cfg: RunConfig, loaded: LoadedModel, sae, ids: torch.Tensor, mask: torch.Tensor, progress: bool) -> dict:
    """CE / KL with the dictionary spliced in (a transcoder: its output site replaced by its prediction)."""
    n_splice = min(cfg.eval.splice_contexts, len(ids))
    if cfg.output_site:  # the output site replaced by the prediction from the input site of the same forward pass
        return transcoder_splice_eval(loaded.model, [(cfg.site, cfg.output_site, sae)], ids[:n_splice], mask[:n_splice],
                                      cfg.eval.batch_contexts, progress, max_norm_multiple=cfg.data.max_norm_multiple)
    return splice_eval(loaded.model, sae, cfg.site, ids[:n_splice], mask[:n_splice], cfg.eval.batch_contexts, progress,
                       max_norm_multiple=cfg.data.max_norm_multiple)


def eval_complete(cfg: RunConfig) -> bool:
    """Whether the run's eval.json and features/ are complete and scored the dictionary now in the run."""
    result = read_run_json(cfg.run_dir / "eval.json")
    weights = cfg.run_dir / "dictionary" / "model.safetensors"
    return bool(result and result.get("complete") and weights.is_file() and (cfg.run_dir / "features" / "top_examples.json").is_file()
                and result.get("dictionary_sha256") == sha256_file(weights))


def other_text(cfg: RunConfig, overrides: list[str], split: str | None = None,
               label: str | None = None) -> tuple[RunConfig, str, Path]:
    """The config, split and output folder of an evaluation of the run's dictionary on other text.

    `overrides` (KEY=VALUE) may change data.*, eval.* and report.* only (not what the dictionary is).
    `split` defaults to "test" on the run's own source (the held-out documents) and "all" on another.
    The results go to RUN_DIR/evals/LABEL (LABEL defaults to the source's name and the split)."""
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(OTHER_TEXT_KEYS)]
    if bad:
        raise FeaturekitError(f"featurekit eval may change only {', '.join(k + '*' for k in OTHER_TEXT_KEYS)} (the text and how it "
                              f"is evaluated), not {', '.join(bad)}: the dictionary was trained with the run's config")
    new = load_config(cfg.run_dir / "config.json", overrides)
    new.out_dir, new.name = cfg.out_dir, cfg.name
    new = resolve(new)
    own = new.data.source == cfg.data.source
    split = split or ("test" if own else "all")
    if own and split != "test":
        warn(f"evaluating on the {split} split of {cfg.data.source!r}, which the dictionary was trained on: in-sample numbers")
    label = label or f"{_slug(new.data.source)}-{split}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", label) or label in (".", ".."):
        raise FeaturekitError(f"--label {label!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    return new, split, cfg.run_dir / "evals" / label


def _slug(source: str) -> str:
    name = Path(source).stem if not source.startswith("hf:") and ("/" in source or "." in source) else source
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "text"

