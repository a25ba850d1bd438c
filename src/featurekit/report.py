"""One self-contained HTML report for a run directory: metrics, curves, densities, feature cards.

`write_report(run_dir)` reads whatever the run produced and writes ``run_dir/report.html``:

- ``eval.json``                 evaluation metrics (nested objects are flattened to ``a.b`` keys);
- ``metrics.jsonl``             training curves (loss, FVU, L0, dead fraction, ... against tokens);
- ``features/density.json``     histogram of log10 firing rate, dead latents counted apart;
- ``features/top_examples.json`` feature cards: top examples, tokens shaded by activation;
- ``features/heads.json``       attention-output dictionaries only: each head's top features by decoder-norm share;
- ``features/top_patches.json``, ``token_kinds.json``, ``figures.json`` (+ ``figures/*.png``)  vision runs: image
                                features, CLS-token and patch features apart, drawn as heat-maps over their top views;
- ``config.json``               the resolved config, pretty-printed.

Every file is optional; a missing or unreadable one becomes a short note. The page has inline CSS
and inline SVG only, and a vision run's figures as inline PNG data (no scripts, no external resources), and every string that comes from the run
(config, corpus tokens, metric names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import json
import math
import unicodedata
from html import escape
from pathlib import Path
from typing import Any

from featurekit._io import atomic_write_text
from featurekit.errors import FeaturekitError
from featurekit.features.svg import density_histogram, fmt, line_chart

EVAL_LABELS = {  # known eval.json keys, in display order: label, meaning
    "fvu": ("FVU", "fraction of variance unexplained, Σ‖x−x̂‖² / Σ‖x−mean(x)‖² (lower is better)"),
    "explained_variance": ("explained variance", "1 − FVU"),
    "l0": ("L0", "mean number of non-zero codes per token"),
    "dead_fraction": ("dead fraction", "latents that never fired on the eval set"),
    "dense_fraction": ("dense fraction", "latents firing on more than 10% of tokens"),
    "n_tokens": ("tokens", "tokens evaluated"),
    "ce_clean": ("CE clean", "cross-entropy of the unmodified model"),
    "ce_spliced": ("CE spliced", "cross-entropy with the reconstruction spliced in"),
    "ce_zero_ablated": ("CE zero-ablated", "cross-entropy with the site set to zero"),
    "loss_recovered": ("loss recovered", "(CE_zero − CE_spliced) / (CE_zero − CE_clean)"),
    "kl_clean_spliced": ("KL(clean ‖ spliced)", "mean per-token KL divergence"),
    "cls_cosine": ("CLS cosine", "vision: cos(final CLS clean, final CLS with the reconstruction spliced in), mean over views"),
    "cls_cosine_zero": ("CLS cosine, zero-ablated", "vision: the same with the site's tokens set to zero"),
    "patch_rel_change": ("patch change", "vision: ‖P_spliced − P_clean‖ / ‖P_clean‖ of the final patch tokens, mean over views"),
    "patch_rel_change_zero": ("patch change, zero-ablated", "vision: the same with the site's tokens set to zero"),
}
CURVES = [("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction"),
          ("aux_loss", "aux loss"), ("lr", "learning rate")]
LOG_CURVES = {"loss", "fvu", "aux_loss"}
MAX_CARDS = 200

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2937;background:#f8fafc}
main{max-width:1120px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:22px;margin:0 0 4px;word-break:break-all}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
nav a{margin-right:14px;color:#2563eb;text-decoration:none}.note{color:#6b7280;font-style:italic}
table{border-collapse:collapse;background:#fff;min-width:60%}td,th{border:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.desc{color:#6b7280;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
.chart{width:100%;height:auto;background:#fff;border:1px solid #e5e7eb;border-radius:6px}
.chart .ct{font-size:12px;font-weight:600;text-anchor:middle;fill:#111827}.chart .ctl{text-anchor:start}.chart .al{font-size:10px;text-anchor:middle;fill:#4b5563}
.chart .tx{font-size:9px;text-anchor:middle;fill:#6b7280}.chart .ty{font-size:9px;text-anchor:end;fill:#6b7280}
.chart .gl{stroke:#eef0f3;stroke-width:1}.chart .pf{fill:none;stroke:#d1d5db}.chart .lv{font-size:9px;text-anchor:end;fill:#2563eb}
.chart .bl{font-size:9px;text-anchor:start;fill:#4b5563}.chart .mk{stroke:#dc2626;stroke-dasharray:3 3}.chart .ml{font-size:9px;text-anchor:end;fill:#dc2626}
.density{max-width:420px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:12px;align-items:start}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:8px 10px;min-width:0}
.card h3{font-size:14px;margin:0 0 6px}.card h3 small{font-weight:400;color:#6b7280;margin-left:8px}
.ex{font:12px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;
border-top:1px solid #f1f5f9;padding:2px 0}
.ex .v{display:inline-block;min-width:4.5em;color:#6b7280;font-family:system-ui,sans-serif;font-size:11px}
.t{border-radius:2px}.t.pk{outline:1.5px solid #c2410c;font-weight:700}
pre{background:#fff;border:1px solid #e5e7eb;padding:10px;overflow:auto;font-size:12px}
summary{cursor:pointer;color:#2563eb}
"""


def write_report(run_dir: str | Path) -> Path:
    """Render ``run_dir/report.html`` from the run's files (see the module docstring); return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FeaturekitError(f"run directory {run_dir} does not exist; pass the folder a training run wrote")
    config, config_note = _read_json(run_dir / "config.json")
    name = run_dir.resolve().name  # the folder's own name: a run folder may be moved or renamed
    sections = [
        ("eval", "Evaluation", _eval_section(run_dir / "eval.json")),
        ("training", "Training curves", _curves_section(run_dir / "metrics.jsonl")),
        ("density", "Feature density", _density_section(run_dir / "features" / "density.json")),
        ("features", "Features", _features_section(run_dir / "features" / "top_examples.json")),
        ("config", "Config", _config_section(config, config_note)),
    ]
    if (run_dir / "features" / "top_patches.json").exists():  # a vision run: image tokens instead of text examples
        sections[3] = ("features", "Image features", _image_features_section(run_dir / "features"))
    if (run_dir / "features" / "heads.json").exists():
        sections.insert(4, ("heads", "Attention heads", _heads_section(run_dir / "features" / "heads.json")))
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{html}</section>' for key, title, html in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(name)} · featurekit report</title><style>{CSS}</style></head>"
            f"<body><main><h1>{_e(name)}</h1><div class=\"note\">featurekit run report</div>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")
    return atomic_write_text(run_dir / "report.html", page)


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None) or (None, a note saying why it is missing or unreadable)."""
    if not path.exists():
        return None, f"No {path.name} in this run."
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as err:
        return None, f"Could not read {path.name}: {err}"


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _value(v: Any) -> str:
    if isinstance(v, (int, float)):
        return fmt(v)
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 200 else text[:200] + "…"


def _eval_section(path: Path) -> str:
    data, note = _read_json(path)
    if note or not isinstance(data, dict):
        return _note(note or f"{path.name} is not a JSON object.")
    flat = _flatten(data)
    keys = [k for k in EVAL_LABELS if k in flat] + [k for k in flat if k not in EVAL_LABELS]
    rows = []
    for key in keys:
        label, desc = EVAL_LABELS.get(key, (key, ""))
        rows.append(f'<tr><th>{_e(label)}</th><td class="num">{_e(_value(flat[key]))}</td>'
                    f'<td class="desc">{_e(desc)}</td></tr>')
    return f"<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>{''.join(rows)}</table>"


def _curves_section(path: Path) -> str:
    if not path.exists():
        return _note(f"No {path.name} in this run.")
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1  # e.g. a line cut short while training was still writing
                continue
            if isinstance(row, dict):
                rows.append(row)
    xkey = "tokens" if any(_finite(r.get("tokens")) for r in rows) else "step"
    charts = []
    for key, label in CURVES:
        pts = [(r[xkey], r[key]) for r in rows if _finite(r.get(xkey)) and _finite(r.get(key))]
        if not pts:
            continue
        ys = [y for _, y in pts]
        log_y = key in LOG_CURVES and min(ys) > 0 and max(ys) / min(ys) > 10
        charts.append(line_chart([x for x, _ in pts], ys, title=label + (" (log scale)" if log_y else ""),
                                 xlabel=xkey, ylabel=label, log_y=log_y))
    notes = _note(f"Skipped {bad} unreadable line(s) of {path.name}.") if bad else ""
    if not charts:
        return _note(f"{path.name} has no plottable metrics.") + notes
    return f'<div class="grid">{"".join(charts)}</div>{notes}'


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _density_section(path: Path) -> str:
    data, note = _read_json(path)
    dens = data.get("density") if isinstance(data, dict) else None
    if note or not isinstance(dens, list):
        return _note(note or f"{path.name} has no \"density\" list.")
    dens = [float(d) for d in dens if _finite(d)]
    n_dead, n_dense = sum(d <= 0 for d in dens), sum(d > 0.1 for d in dens)
    svg = density_histogram(dens)
    pct = lambda n: f"{100 * n / max(len(dens), 1):.1f}%"  # noqa: E731
    caption = (f"{len(dens):,} latents · {n_dead:,} dead ({pct(n_dead)}) · "
               f"{n_dense:,} dense &gt;10% ({pct(n_dense)})")
    return f'<div class="density">{svg}</div><p>{caption}</p>'


def _visible(token: str) -> str:
    """Show whitespace and control characters: newline → ⏎, tab → ⇥, others as \\xNN."""
    token = token.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "␍").replace("\t", "⇥")
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in token)


def _num(v: Any, default: float = 0.0) -> float:
    return float(v) if _finite(v) else default


def _example_html(ex: dict, scale: float) -> str:
    tokens, acts = ex.get("tokens") or [], ex.get("acts") or []
    peak = ex.get("max_pos", -1)
    spans = []
    for i, tok in enumerate(tokens):
        act = _num(acts[i]) if i < len(acts) else 0.0
        alpha = min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0
        text = _visible(str(tok))
        style = f' style="background:rgba(249,115,22,{alpha:.2f})"' if alpha > 0.005 else ""
        cls = "t pk" if i == peak else "t"
        spans.append(f'<span class="{cls}"{style} title="{_e(f"{text} · act {act:.4g}")}">{_e(text)}</span>')
    value = ex.get("value", acts[peak] if isinstance(peak, int) and 0 <= peak < len(acts) else None)
    label = fmt(_num(value)) if _finite(value) else ""
    return f'<div class="ex"><span class="v">{_e(label)}</span>{"".join(spans)}</div>'


def _features_section(path: Path) -> str:
    data, note = _read_json(path)
    if note or not isinstance(data, list):
        return _note(note or f"{path.name} is not a list of features.")
    cards = []
    for feat in data[:MAX_CARDS]:
        if not isinstance(feat, dict):
            continue
        examples = [ex for ex in feat.get("examples") or [] if isinstance(ex, dict)]
        scale = _num(feat.get("max_act"))
        if scale <= 0:  # fall back to the largest shown activation
            scale = max((_num(a) for ex in examples for a in ex.get("acts") or []), default=0.0)
        body = "".join(_example_html(ex, scale) for ex in examples) or _note("no positive activations")
        cards.append(f'<div class="card"><h3>Feature {_e(feat.get("index", "?"))}'
                     f'<small>density {_e(fmt(_num(feat.get("density"))))} · '
                     f'max act {_e(fmt(_num(feat.get("max_act"))))}</small></h3>{body}</div>')
    more = _note(f"Showing {MAX_CARDS} of {len(data)} features.") if len(data) > MAX_CARDS else ""
    intro = _note("Top-activating examples; shading is proportional to act / max act, the peak token is outlined. "
                  "Hover a token for its activation.")
    return f'{intro}<div class="cards">{"".join(cards)}</div>{more}' if cards else _note("No features listed.")


def _image_features_section(folder: Path, shown: int = 8) -> str:
    """A vision run's features: how many fire on CLS or patch tokens only, and each listed latent's top tokens."""
    data, note = _read_json(folder / "top_patches.json")
    if note or not isinstance(data, list):
        return _note(note or "top_patches.json is not a list of features.")
    kinds, _ = _read_json(folder / "token_kinds.json")
    intro = ""
    if isinstance(kinds, dict) and isinstance(kinds.get("cls_fires"), list) and isinstance(kinds.get("patch_fires"), list):
        pairs = list(zip(kinds["cls_fires"], kinds["patch_fires"]))
        live = [(c, p) for c, p in pairs if _num(c) + _num(p) > 0]
        intro = _note(f"{len(live)} live features on {kinds.get('n_cls_tokens')} CLS and {kinds.get('n_patch_tokens')} patch tokens: "
                      f"{sum(1 for c, p in live if not _num(p))} fire on CLS tokens only, "
                      f"{sum(1 for c, p in live if not _num(c))} on patches only.")
    rows = []
    for feat in data[:MAX_CARDS]:
        if not isinstance(feat, dict):
            continue
        tops = [t for t in feat.get("top") or [] if isinstance(t, dict)][:shown]
        cells = ", ".join(f"{_e(t.get('image'))} {_e('CLS' if t.get('kind') == 'cls' else (t.get('row'), t.get('col')))} "
                          f"{_e(fmt(_num(t.get('value'))))}" for t in tops)
        rows.append(f'<tr><td>{_e(feat.get("latent"))}</td><td class="num">{_e(fmt(_num(feat.get("density"))))}</td><td>{cells}</td></tr>')
    return (f'{intro}{_figures_html(folder)}<h3>Top tokens</h3><table><tr><th>latent</th><th>density</th>'
            f'<th>top tokens: view, CLS or patch (row, col), code</th></tr>{"".join(rows)}</table>')


def _figures_html(folder: Path) -> str:
    """figures.json's PNGs inline, CLS-token features and patch features under separate headings."""
    listing, note = _read_json(folder / "figures.json")
    if note or not isinstance(listing, dict):
        return ""
    parts = []
    for kind, title in (("cls", "CLS-token features"), ("patch", "Patch features")):
        imgs = []
        for item in listing.get(kind) or []:
            path = folder / str(item.get("file", "")) if isinstance(item, dict) else None
            if path is None or path.parent != folder / "figures" or path.suffix != ".png" or not path.is_file():
                continue  # only the run's own figures folder
            data = base64.b64encode(path.read_bytes()).decode()
            imgs.append(f'<div><img alt="latent {_e(item.get("latent"))}" style="max-width:100%" src="data:image/png;base64,{data}"></div>')
        parts.append(f"<h3>{title}</h3>" + ("".join(imgs) or _note("none fired on the held-out views")))
    return "".join(parts)


def _heads_section(path: Path, shown: int = 5) -> str:
    data, note = _read_json(path)
    if note or not isinstance(data, dict) or not isinstance(data.get("heads"), list):
        return _note(note or f"{path.name} has no per-head list.")
    rows = []
    for head in data["heads"]:
        if not isinstance(head, dict):
            continue
        tops = ", ".join(f'{_e(t.get("feature"))} ({_e(fmt(_num(t.get("share"))))})'
                         for t in (head.get("top_features") or [])[:shown] if isinstance(t, dict))
        rows.append(f'<tr><td>{_e(head.get("head"))}</td><td>{_e(head.get("features_mostly_here"))}</td><td>{tops}</td></tr>')
    intro = _note(f"Share of each feature's decoder norm per head (n_heads = {data.get('n_heads')}, head_dim = {data.get('head_dim')}); "
                  f"{fmt(100 * _num(data.get('single_head_fraction')))}% of the {data.get('n_live')} live features put ≥ 50% "
                  f"of their norm on one head.")
    return (f'{intro}<table><tr><th>head</th><th>features mostly here</th><th>top features (share)</th></tr>'
            f'{"".join(rows)}</table>')


def _config_section(config: Any, note: str | None) -> str:
    if note:
        return _note(note)
    text = json.dumps(config, indent=2, ensure_ascii=False)
    return f"<details><summary>config.json</summary><pre>{_e(text)}</pre></details>"
