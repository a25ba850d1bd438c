"""The frontier's output: the progress line of a point, results.md (the frontier table and the suite at matched L0)
and frontier.png / frontier.svg."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import atomic_write


def progress_line(row: dict) -> str:
    """One point's line in the log: its setting and scores, or its error."""
    if "error" in row:
        return f"{row['method']:<14} {row['param']}={row['value']:<6} ERROR {row['error']}"
    return (f"{row['method']:<14} {row['param']}={row['value']:<6} L0 {row['l0']:7.2f}  FVU {row['fvu']:.4f}  "
            f"dead {100 * row['dead_fraction']:5.2f}%  loss recovered {row['loss_recovered']:.4f}  KL {row['kl_clean_spliced']:.4f}  "
            f"({row['train_seconds']} s)")


def markdown(result: dict) -> str:
    """results.md: the table of every point (error rows included), then the suite's table when there is one."""
    cfg = result["config"]
    site = f"{cfg['site']}` → `{cfg['output_site']}" if cfg.get("output_site") else cfg["site"]
    lines = [f"# FVU against L0 on {cfg['model']} `{site}` ({cfg['source']})", "",
             f"{cfg['latents']} latents, {cfg['train_tokens']:,} harvested tokens × {cfg['epochs']} epochs per point, "
             f"held-out {cfg['eval_tokens']:,} tokens (splice: {cfg['splice_contexts']} contexts).", "",
             "| method | setting | L0 | FVU | dead % | loss recovered | ΔCE | KL | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['param']}={r['value']} | error: {r['error'][:80]} | | | | | | |")
            continue
        target = f" (→ {r['target_l0']})" if "target_l0" in r else ""
        lines.append(f"| {r['method']} | {r['param']}={r['value']}{target} | {r['l0']:.2f} | {r['fvu']:.4f} | "
                     f"{100 * r['dead_fraction']:.2f} | {r['loss_recovered']:.4f} | {r['delta_ce']:.4f} | "
                     f"{r['kl_clean_spliced']:.4f} | {r['train_seconds']} |")
    if result.get("suite"):
        lines += ["", *suite_markdown(result["suite"])]
    return "\n".join(lines) + "\n"


def suite_markdown(suite: dict) -> list[str]:
    """The table of the suite at matched L0: one row per method, then the random steering baseline."""
    st = suite["settings"]
    ks = st["probing_ks"]
    target = f"{st['steering_targets'][len(st['steering_targets']) // 2]:g}"
    lines = [f"## The suite at matched L0 (each method's point nearest L0 = {st['target_l0']:g})", "",
             f"Probing: BBC topics, {st['probing_train_docs']} / ≤ {st['probing_test_docs']} articles per topic × "
             f"{st['probing_tokens']} tokens; absorption: {st['absorption_words']} words; steering: {st['steering_features']} "
             f"features × 2 signs per method at KL {target} nat on {st['steering_prompts']} prompts × "
             f"{st['steering_prompt_tokens']} tokens.", "",
             "| method | setting | L0 | FVU | loss recovered | KL | " + " | ".join(f"probe top-{k}" for k in ks)
             + " | probe all | absorption | full absorption | letters | steer log-rank gain | steer prob gain | reached |",
             "|---|---|---|---|---|---|" + "---|" * len(ks) + "---|---|---|---|---|---|---|"]

    def num(value: Any, digits: int = 3) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    for method, p in sorted(suite["points"].items()):
        r, pr, ab, sg = p["row"], p.get("probing", {}), p.get("absorption", {}), p.get("steering", {})
        cells = [method, f"{r['param']}={r['value']}", f"{r['l0']:.1f}", f"{r['fvu']:.4f}", f"{r['loss_recovered']:.4f}",
                 f"{r['kl_clean_spliced']:.4f}", *(num(pr.get(f"sae_top_{k}_test_accuracy")) for k in ks),
                 num(pr.get("sae_test_accuracy")), num(ab.get("mean_absorption_fraction_score")),
                 num(ab.get("mean_full_absorption_score")), str(ab.get("n_scored_letters", "—")),
                 num(sg.get(f"log_rank_gain_at_kl_{target}")), num(sg.get(f"prob_gain_at_kl_{target}"), 4),
                 num(sg.get(f"fraction_reached_kl_{target}"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    rnd = suite.get("random", {}).get("steering")
    if rnd:
        lines.append("| random directions | | | | | | " + "| " * (len(ks) + 4) + f"{num(rnd.get(f'log_rank_gain_at_kl_{target}'))} | "
                     f"{num(rnd.get(f'prob_gain_at_kl_{target}'), 4)} | {num(rnd.get(f'fraction_reached_kl_{target}'), 2)} |")
    first = next(iter(suite["points"].values()), {}).get("probing", {})
    if first:
        lines += ["", "Dense baselines of the probing (the same for every method): "
                  + ", ".join(f"top-{k} {first[f'llm_top_{k}_test_accuracy']:.3f}" for k in ks)
                  + f", all dimensions {first['llm_test_accuracy']:.3f}; PCA "
                  + ", ".join(f"top-{k} {first[f'pca_top_{k}_test_accuracy']:.3f}" for k in ks
                              if f"pca_top_{k}_test_accuracy" in first) + "."]
    lines += ["", "Seconds per evaluation (all methods together; shared = running the model once for all): "
              + "; ".join(f"{e} {v['total']} s (shared {v['shared_model_work']} s, {v['dictionaries']} dictionaries)"
                          for e, v in suite["seconds"].items()) + "."]
    return lines


def plot(result: dict, out: Path) -> None:
    """frontier.png and frontier.svg: FVU and loss recovered against L0, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.8))
    colours, markers = plt.get_cmap("tab20").colors, "osD^vP*Xh<>"
    for i, method in enumerate(sorted({r["method"] for r in rows})):  # 17+ methods: colour and marker tell them apart
        pts = sorted((r["l0"], r["fvu"], r["loss_recovered"]) for r in rows if r["method"] == method)
        l0 = [p[0] for p in pts]
        style = {"color": colours[(2 * i) % 20 + (2 * i) // 20 % 2], "marker": markers[i % len(markers)], "label": method}
        axes[0].plot(l0, [p[1] for p in pts], **style)
        axes[1].plot(l0, [p[2] for p in pts], **style)
    for ax, label in zip(axes, ("FVU (lower is better)", "loss recovered (higher is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    cfg = result["config"]
    fig.suptitle(f"{cfg['model']} {cfg['site']}: {cfg['latents']} latents, {cfg['train_tokens'] * cfg['epochs']:,} tokens per point")
    fig.tight_layout()
    for ext in ("png", "svg"):
        atomic_write(out / f"frontier.{ext}", lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=120))
    plt.close(fig)
