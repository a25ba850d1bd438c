"""KL-matched steering of a run's dictionary features against baseline directions (evaluate/kl_steering.py) →
OUT/steering_kl_matched.json in SAEBench's result format (SAEBench has no steering evaluation: the type id is
featurekit's), OUT = RUN_DIR/evals or the folder of an evaluation with other settings.

Held-out text of the run (its test split) gives two things: the first contexts' kept tokens (up to
eval.steering_tokens) are where features are chosen (alive ones, drawn with train.seed), difference-of-means
directions are measured, principal components are taken and the strength unit s (mean activation norm) is
set; the last eval.steering_prompts contexts, cut to eval.steering_prompt_tokens tokens, are the prompts
the KL and the output score average over. Directions, each steered with both signs:
  feature        the chosen features' decoder rows
  random         Gaussian directions
  diff_of_means  per chosen feature, mean activation where it fires − where it does not
  pca            the top principal components of the held-out activations

A transcoder (site → output_site) steers where it writes: directions are added at the output site (its decoder
rows live there), features are chosen by its codes (its encoder on the input site), and the differences of
means, principal components and strength unit are measured on the output site's activations.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .._io import atomic_write_json, read_json, sha256_file
from ..config import RunConfig
from ..config.checks import steering_targets
from ..data.harvest import norm_outliers
from ..dictionaries import load
from ..errors import FeaturekitError
from ..evaluate.kl_steering import GRID, SteeringProbe, choose_features, difference_of_means, kl_matched, random_directions
from ..evaluate.plots import write_plot
from ..evaluate.probes import pca_basis
from ..evaluate.saebench import eval_output
from ..models.hooks import capture_activations
from ..models.loading import LoadedModel, has_lm_head
from .evaluation import check_dictionary
from .setup import contexts, dtype_name, open_model, token_policy

EVAL_TYPE = "steering_kl_matched"
KINDS = ("feature", "random", "diff_of_means", "pca")
TOLERANCE = 0.05  #: relative KL tolerance of the strength search
MAX_ITER = 8
#: `featurekit eval --full`
FULL_SETTINGS = {"steering_features": 32, "steering_baselines": 32, "steering_prompts": 16, "steering_prompt_tokens": 32,
                 "steering_tokens": 65_536}


def run_steering(cfg: RunConfig, loaded: LoadedModel | None = None, out_dir: Path | None = None) -> dict:
    """KL-matched steering with cfg.eval.steering_*; returns the result (module docstring)."""
    out = Path(out_dir or cfg.run_dir / "evals")
    loaded = loaded or open_model(cfg)
    if not has_lm_head(loaded.model):
        raise FeaturekitError(f"{cfg.model.name} has no LM head: steering's KL and output score need next-token predictions")
    device = next(loaded.model.parameters()).device
    sae = load(cfg.run_dir / "dictionary", device=device)
    check_dictionary(cfg, loaded, sae)
    ev, targets = cfg.eval, steering_targets(cfg.eval.steering_targets)
    start = time.perf_counter()
    ids, mask = contexts(loaded, cfg, "test", ev.steering_tokens + ev.steering_prompts * cfg.data.context_len)
    if len(ids) <= ev.steering_prompts or ids.shape[1] < ev.steering_prompt_tokens:
        raise FeaturekitError(f"the held-out text gives {len(ids)} contexts of {ids.shape[1]} tokens: steering needs more than "
                              f"eval.steering_prompts = {ev.steering_prompts} of at least eval.steering_prompt_tokens = "
                              f"{ev.steering_prompt_tokens} tokens; lower them or give more text")
    prompts = ids[-ev.steering_prompts:, :ev.steering_prompt_tokens]
    steer_site = cfg.output_site or cfg.site  # a transcoder steers where it writes (module docstring)
    seen = _kept_activations(loaded.model, cfg, ids[:-ev.steering_prompts], mask[:-ev.steering_prompts], [cfg.site, steer_site])
    x_in, x = seen[cfg.site][:ev.steering_tokens], seen[steer_site][:ev.steering_tokens]
    with torch.no_grad():
        codes = torch.cat([sae.encode(x_in[i:i + 1024].to(device)).float().cpu() for i in range(0, len(x_in), 1024)])
    scale = float(x.norm(dim=1).mean())
    features = choose_features(codes, ev.steering_features, cfg.train.seed)
    directions: dict[str, tuple[list, torch.Tensor]] = {}
    if features:
        directions["feature"] = (features, sae.W_dec.detach().float().cpu()[features])
        directions["diff_of_means"] = (features[:ev.steering_baselines], difference_of_means(x, codes, features[:ev.steering_baselines]))
    if ev.steering_baselines:
        directions["random"] = (list(range(ev.steering_baselines)), random_directions(x.shape[1], ev.steering_baselines, cfg.train.seed))
        n_pc = min(ev.steering_baselines, *x.shape)
        directions["pca"] = (list(range(n_pc)), pca_basis(x, n_pc)[1].T.float())
    labels = [(kind, ident, sign) for kind, (idents, _) in directions.items() for sign in (1, -1) for ident in idents]
    signed = torch.cat([sign * vectors for kind, (_, vectors) in directions.items() for sign in (1, -1)])
    setup_seconds = time.perf_counter() - start
    probe = SteeringProbe(loaded.model, steer_site, prompts, signed, scale, top_tokens=ev.steering_top_tokens,
                          rows_per_pass=max(ev.batch_contexts, 2 * ev.steering_prompts))
    found = kl_matched(probe, targets, tol=TOLERANCE, max_iter=MAX_ITER)
    details = []
    for row, (kind, ident, sign) in enumerate(labels):
        for t, target in enumerate(targets):
            details.append({"kind": kind, ("feature" if kind in ("feature", "diff_of_means") else "index"): ident, "sign": sign,
                            "target_kl": target, "strength": float(found["r"][row, t]),
                            "alpha": float(found["r"][row, t]) * scale, "kl": float(found["kl"][row, t]),
                            "reached": bool(found["reached"][row, t]), "within_tolerance": bool(found["within_tol"][row, t]),
                            "prob_gain": float(found["prob_gain"][row, t]), "log_rank_gain": float(found["log_rank_gain"][row, t]),
                            "promoted_tokens": loaded.tokenizer.convert_ids_to_tokens(probe.promoted[row].tolist())})
    metrics = {kind: _summary([d for d in details if d["kind"] == kind], targets) for kind in directions}
    config = {"model_name": cfg.model.name, "site": steer_site, **({"input_site": cfg.site} if cfg.output_site else {}),
              "dtype": dtype_name(loaded.model.dtype), "random_seed": cfg.train.seed,
              "target_kls": targets, "kl": "mean over prompts and positions t >= 1 of KL(p_clean || p_steered), nats",
              "n_prompts": len(prompts), "prompt_tokens": prompts.shape[1], "held_out_tokens": len(x),
              "strength_unit": "mean activation norm at the site on the held-out tokens", "strength_unit_value": scale,
              "strength_grid": list(GRID), "tolerance": TOLERANCE, "max_iterations": MAX_ITER, "top_tokens": ev.steering_top_tokens,
              "positions_steered": "all", "directions": {kind: len(idents) for kind, (idents, _) in directions.items()},
              "signs": [1, -1], "token_policy": token_policy(cfg)}
    unstructured = {"model_evaluations": probe.evaluations,
                    "dictionary_sha256": sha256_file(cfg.run_dir / "dictionary" / "model.safetensors"),
                    "seconds": {"setup": round(setup_seconds, 2), "total": round(time.perf_counter() - start, 2)}}
    result = eval_output(EVAL_TYPE, config, metrics, details, unstructured, read_json(cfg.run_dir / "dictionary" / "featurekit.json"))
    atomic_write_json(out / f"{EVAL_TYPE}.json", result)
    write_plot(result, out / EVAL_TYPE)
    return result


def _summary(rows: list[dict], targets: list[float]) -> dict:
    """Per target KL: the mean output score over the kind's signed directions that reached it, and how many did."""
    out = {}
    for target in targets:
        hit = [r for r in rows if r["target_kl"] == target and r["reached"]]
        key = f"{target:g}"
        out[f"prob_gain_at_kl_{key}"] = sum(r["prob_gain"] for r in hit) / len(hit) if hit else None
        out[f"log_rank_gain_at_kl_{key}"] = sum(r["log_rank_gain"] for r in hit) / len(hit) if hit else None
        out[f"strength_at_kl_{key}"] = sum(r["strength"] for r in hit) / len(hit) if hit else None
        out[f"fraction_reached_kl_{key}"] = len(hit) / max(1, sum(r["target_kl"] == target for r in rows))
    return out


@torch.no_grad()
def _kept_activations(model, cfg: RunConfig, ids: torch.Tensor, mask: torch.Tensor, sites: list[str]) -> dict[str, torch.Tensor]:
    """{site: (n, d) float32 activations} of the tokens the token policy keeps (not a norm outlier at any of the sites)."""
    sites = list(dict.fromkeys(sites))
    rows: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    for start in range(0, len(ids), cfg.eval.batch_contexts):
        keep = mask[start:start + cfg.eval.batch_contexts]
        seen = capture_activations(model, ids[start:start + cfg.eval.batch_contexts], sites)
        acts = {site: seen[site].float().cpu() for site in sites}
        for site in sites:
            keep = keep & ~norm_outliers(acts[site], keep, cfg.data.max_norm_multiple)
        for site in sites:
            rows[site].append(acts[site][keep])
    return {site: torch.cat(parts) for site, parts in rows.items()}
