"""One figure per evaluation result (the SAEBench-shaped JSON of `evaluate.saebench`), written beside it:

    sparse_probing            held-out accuracy against k: the dictionary's latents, dense dimensions, PCA components
    absorption_first_letter   absorption fraction and full-absorption rate per letter, the probe's F1 beside them
    steering_kl_matched       output score (probability gain, log-rank gain) against target KL, one line per kind
    splice_all                ΔCE, KL and loss recovered per layer: each dictionary alone and layers 0..L together

    write_plot(result, path_without_suffix)  → the .png and .svg written (atomically), or [] for a type with no figure
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .._io import atomic_write

FORMATS = ("png", "svg")


def write_plot(result: dict, stem: str | Path) -> list[Path]:
    """Draw `result`'s figure and write STEM.png and STEM.svg; returns the paths (none for an unknown type)."""
    draw = PLOTS.get(result.get("eval_type_id", ""))
    if draw is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt, result)
    fig.tight_layout()
    stem = Path(stem)
    paths = []
    for ext in FORMATS:
        paths.append(atomic_write(stem.with_suffix(f".{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=110)))
    plt.close(fig)
    return paths


def _title(result: dict) -> str:
    cfg, dictionary = result.get("eval_config", {}), result.get("sae_cfg_dict", {})
    return f"{dictionary.get('architecture') or ''} at {cfg.get('site') or dictionary.get('hook_name') or ''} ({cfg.get('model_name', '')})"


def probing(plt, result: dict):
    """Mean held-out accuracy over every task of every dataset, against k; 'all' at the right."""
    metrics = {k: v for group in result["eval_result_metrics"].values() for k, v in group.items()}
    ks = sorted({int(key.rsplit("_top_", 1)[1].split("_")[0]) for key in metrics if "_top_" in key})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for prefix, label, marker in (("sae", "dictionary latents", "o"), ("llm", "dense dimensions", "s"), ("pca", "PCA components", "^")):
        ys = [metrics.get(f"{prefix}_top_{k}_test_accuracy") for k in ks]
        points = [(k, y) for k, y in zip(ks, ys) if y is not None]
        if points:
            line, = ax.plot(*zip(*points), marker=marker, label=label)
            every = metrics.get(f"{prefix}_test_accuracy")
            if every is not None:
                ax.axhline(every, color=line.get_color(), ls=":", lw=1, label=f"{label}, all ({every:.3f})")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("k (latents / dimensions / components)")
    ax.set_ylabel("held-out accuracy (chance 0.5)")
    datasets = ", ".join(d.get("dataset_name", "?") for d in result.get("eval_result_details", []))
    ax.set_title(f"sparse probing: {datasets}\n{_title(result)}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def absorption(plt, result: dict):
    letters = result["eval_result_unstructured"].get("letters", {})
    names = sorted(letters)
    f1 = [letters[n].get("probe_f1") or 0.0 for n in names]
    scored = {d["first_letter"]: d for d in result.get("eval_result_details", [])}
    frac = [scored[n]["mean_absorption_fraction"] if n in scored else 0.0 for n in names]
    full = [scored[n]["full_absorption_rate"] if n in scored else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], frac, width=0.4, label="absorption fraction")
    ax.bar([i + 0.2 for i in x], full, width=0.4, label="full absorption rate")
    ax.plot(list(x), f1, "k.", label="ground-truth probe F1")
    for i, n in enumerate(names):
        if n not in scored:
            ax.text(i, 0.02, "skip", rotation=90, ha="center", fontsize=7, color="grey")
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.2)
    ax.set_xlabel("first letter")
    mean = result["eval_result_metrics"].get("mean") or {}
    ax.set_title(f"first-letter absorption: mean fraction {mean.get('mean_absorption_fraction_score', float('nan')):.3f}, "
                 f"full {mean.get('mean_full_absorption_score', float('nan')):.3f}\n{_title(result)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    return fig


def steering(plt, result: dict):
    targets = result["eval_config"]["target_kls"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, score, label in ((axes[0], "prob_gain", "probability gain of promoted tokens"),
                             (axes[1], "log_rank_gain", "log-rank gain of promoted tokens")):
        for kind, metrics in result["eval_result_metrics"].items():
            points = [(t, metrics.get(f"{score}_at_kl_{t:g}")) for t in targets]
            points = [(t, y) for t, y in points if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=kind)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("target KL(clean ‖ steered), nats")
        ax.set_ylabel(label)
        ax.set_xticks(targets)
        ax.legend(fontsize=7)
    fig.suptitle(f"KL-matched steering (means over signed directions)\n{_title(result)}", fontsize=9)
    return fig


def splice_all(plt, result: dict):
    rows = result["eval_result_details"]
    labels = [r["output_site"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    every = result["eval_result_metrics"]["all"]
    for ax, key, label in ((axes[0], "delta_ce", "ΔCE (nats)"), (axes[1], "kl_clean_spliced", "KL(clean ‖ spliced), nats"),
                           (axes[2], "loss_recovered", f"loss recovered ({result['eval_config']['ablation']}-ablation)")):
        for curve, marker, name in (("alone", "o-", "each alone"), ("cumulative", "s-", "layers 0..L together")):
            points = [(i, r[curve][key]) for i, r in zip(x, rows) if r.get(curve)]  # a curve may be scored at some layers only
            if points:
                ax.plot(*zip(*points), marker, label=name)
        ax.axhline(every[key], color="grey", ls=":", label=f"all at once ({every[key]:.3f})")
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    cfg = result["eval_config"]
    fig.suptitle(f"{len(rows)} dictionaries spliced into {cfg['model_name']} on {cfg['scored_tokens']} held-out tokens", fontsize=9)
    return fig


PLOTS: dict[str, Callable] = {"sparse_probing": probing, "absorption_first_letter": absorption,
                              "steering_kl_matched": steering, "splice_all": splice_all}
