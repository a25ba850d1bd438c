"""`bench synthetic`'s results as a markdown table with the claims, and as a plot (matplotlib, PNG + SVG)."""

from __future__ import annotations

from pathlib import Path

from .._io import atomic_write

#: (column title, row key, format) of the markdown table; a missing value prints as "–".
COLUMNS = [
    ("FVU", "fvu", ".4f"), ("L0", "l0", ".2f"), ("dead", "dead_fraction", ".3f"),
    ("MMCS t→l", "mmcs_true_to_learned", ".3f"), ("MMCS l→t", "mmcs_learned_to_true", ".3f"),
    ("recovered", "recovered_fraction", ".3f"), ("absorption", "absorption_rate", ".3f"),
    ("parent silent", "parent_silent_rate", ".3f"), ("children rec.", "children_recovered", ".3f"),
    ("bidir. coverage", "bidirectional_coverage", ".3f"), ("latents/bidir.", "latents_per_bidirectional", ".2f"),
    ("L0 std", "l0_std", ".2f"), ("r(L0, true)", "l0_true_corr", ".2f"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "–" if value is None else format(value, fmt)


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        "# Synthetic ground-truth benchmark",
        "",
        f"d={cfg['d']}, {cfg['n_features']} true features, true k={cfg['k']}, {cfg['latents']} latents, "
        f"{cfg['tokens']:,} training tokens (batch {cfg['batch_size']}, lr {cfg['lr']}), {cfg['eval_tokens']:,} held-out tokens, "
        f"seed {cfg['seed']}, recovery threshold cos ≥ {cfg['threshold']}.",
        "",
        "| dataset | method | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for row in results["rows"]:
        if "error" in row:
            message = row["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['dataset']} | {row['method']} | error: {message} |" + " |" * (len(COLUMNS) - 1))
        else:
            lines.append(f"| {row['dataset']} | {row['method']} | " + " | ".join(_cell(row, k, f) for _, k, f in COLUMNS) + " |")
    notes = sorted({f"{r['method']}: {r['note']}" for r in results["rows"] if r.get("note")})
    if notes:
        lines += ["", *(f"Note — {n}." for n in notes)]
    settings = {m: s for m, s in results["method_settings"].items() if s}
    if settings:
        lines += ["", "Per-method settings: " + "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in s.items())
                                                         for m, s in settings.items()) + " (every other method: defaults, k = true k)."]
    lines += ["", "## Claims", "", "| claim | dataset | verdict | numbers |", "|---|---|---|---|"]
    for c in results["claims"]:
        lines.append(f"| {c['claim']} | {c['dataset']} | **{c['verdict']}** | {c.get('detail', '')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> list[Path]:
    """bench.png and bench.svg: per dataset, MMCS true→learned and recovered fraction per method (bars)
    and FVU against L0 (one point per method). Raises ImportError without matplotlib."""
    import matplotlib
    from matplotlib.figure import Figure

    datasets = list(results["datasets"])
    fig = Figure(figsize=(13, 3.6 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 2, squeeze=False, width_ratios=[1.6, 1])
    for (bars, scatter), name in zip(axes, datasets):
        rows = [r for r in results["rows"] if r["dataset"] == name]
        ok = [r for r in rows if "error" not in r]
        pos = range(len(rows))
        width = 0.4
        bars.bar([p - width / 2 for p in pos], [r.get("mmcs_true_to_learned", 0) for r in rows], width, label="MMCS true→learned")
        bars.bar([p + width / 2 for p in pos], [r.get("recovered_fraction", 0) for r in rows], width,
                 label=f"recovered (cos ≥ {results['config']['threshold']})")
        bars.set_xticks(list(pos), [r["method"] + (" (error)" if "error" in r else "") for r in rows], rotation=45, ha="right")
        bars.set_ylim(0, 1.22)
        bars.set_title(f"{name}: feature recovery")
        bars.legend(loc="upper right", ncols=2, fontsize="small")
        for i, r in enumerate(ok):  # labels alternate above/below: many methods sit near L0 = k
            scatter.scatter(r["l0"], r["fvu"])
            scatter.annotate(r["method"], (r["l0"], r["fvu"]), fontsize="x-small", xytext=(4, 4 if i % 2 else -9),
                             textcoords="offset points")
        scatter.axvline(results["config"]["k"], color="grey", linestyle=":", linewidth=1)
        scatter.set_xscale("log")
        scatter.set_yscale("log")
        scatter.set_xlabel("L0 (held-out)")
        scatter.set_ylabel("FVU (held-out)")
        scatter.set_title(f"{name}: FVU vs L0 (dotted: true k)")
    paths = []
    for ext in ("png", "svg"):
        path = out / f"bench.{ext}"
        meta = {"Date": None} if ext == "svg" else {}
        with matplotlib.rc_context({"svg.hashsalt": "featurekit"}):  # stable element ids: the same results give the same SVG
            atomic_write(path, lambda tmp, ext=ext, meta=meta: fig.savefig(tmp, format=ext, dpi=120, metadata=meta))
        paths.append(path)
    return paths
