"""HTML for the explorer: Jinja2 templates (package data, autoescaped: every string from a run, the corpus
or the user is escaped) and the helpers that build the repetitive parts in Python (token rows, charts).

Token shading uses classes (`p1`…`p16` for positive codes, `n1`…`n16` for negative), never inline styles,
so the Content-Security-Policy can forbid them; each token carries its value in `data-v` for the hover tip
(static/app.js).
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from markupsafe import Markup, escape

from ..features.svg import density_histogram as svg_density_histogram
from ..features.svg import fmt, histogram, line_chart

LEVELS = 16
WINDOW_LEFT, WINDOW_RIGHT = 24, 8  # tokens shown around an example's peak before it is expanded
CURVES = [("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction")]
LOG_CURVES = {"loss", "fvu"}

_env = jinja2.Environment(loader=jinja2.PackageLoader("featurekit.app", "templates"), autoescape=True, auto_reload=False,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)


@functools.lru_cache(maxsize=65536)
def visible(token: str) -> str:
    """A token's text with whitespace and control characters shown: newline ⏎, tab ⇥, others as \\xNN."""
    token = token.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "␍").replace("\t", "⇥")
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in token)


def chip(token: str) -> str:
    """A token for a chip (a boxed token out of context): `visible`, and a token of spaces only as ␣."""
    return "␣" * len(token) if token and not token.strip(" ") else visible(token)


def number(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return fmt(v) if isinstance(v, (int, float)) else str(v)


def percent(v: float | None) -> str:
    if v is None:
        return "–"
    if v == 0:
        return "0%"
    return f"{100 * v:.3g}%" if v >= 1e-4 else f"{v:.2e}"


def level(value: float, scale: float) -> str:
    """The shading class of a code: p1..p16 (positive) or n1..n16 (negative), '' for zero."""
    if value == 0 or scale <= 0 or not math.isfinite(value):
        return ""
    step = max(1, min(LEVELS, math.ceil(LEVELS * abs(value) / scale)))
    return f"{'p' if value > 0 else 'n'}{step}"


def tokens_html(tokens: Sequence[str], acts: Sequence[float], scale: float, peak: int | None = None,
                window: bool = True) -> Markup:
    """One context as token spans, shaded by activation; with `window`, tokens far from `peak` get the class
    `far` (hidden until the row is expanded)."""
    parts = []
    lo, hi = (peak - WINDOW_LEFT, peak + WINDOW_RIGHT) if window and peak is not None else (-1, len(tokens))
    if lo > 0:
        parts.append('<span class="more">…</span>')
    for i, tok in enumerate(tokens):
        v = acts[i] if i < len(acts) else 0.0
        far = "" if lo <= i <= hi else " far"
        text = _escaped(tok)
        if v == 0 and i != peak:  # most tokens: no shade
            parts.append(f'<span class="t{far}" data-v="0">{text}</span>')
        else:
            shade = level(v, scale)
            parts.append(f'<span class="t{" " + shade if shade else ""}{" pk" if i == peak else ""}{far}" data-v="{v:.4g}">{text}</span>')
    if hi < len(tokens) - 1:
        parts.append('<span class="more">…</span>')
    return Markup("".join(parts))


@functools.lru_cache(maxsize=65536)
def _escaped(token: str) -> str:
    return str(escape(visible(token)))


def url(*segments: Any, **params: Any) -> str:
    """A path from segments, each quoted whole (a run name can hold any character), with query parameters."""
    path = "/" + "/".join(quote(str(s), safe="") for s in segments)
    query = {k: v for k, v in params.items() if v is not None and v != ""}
    return path + ("?" + urlencode(query) if query else "")


def bar(value: float, peak: float, cls: str = "") -> Markup:
    """A small horizontal bar (SVG, no inline style) of value / peak."""
    w = 0.0 if not peak else max(0.0, min(1.0, abs(value) / abs(peak))) * 60
    return Markup(f'<svg class="bar {cls}" viewBox="0 0 60 8" width="60" height="8" aria-hidden="true">'
                  f'<rect x="0" y="0" width="{w:.1f}" height="8"/></svg>')


def act_histogram(hist: dict[str, list[int]] | None, edges: Sequence[float], density: float) -> list[Markup]:
    """The activation histogram(s) of a feature over the store's log-spaced |value| bins, trimmed to the bins
    in use: one for positive codes, one for negative codes where there are any."""
    charts = []
    for key, label in (("positive", "activation"), ("negative", "|activation| of negative codes")):
        counts = (hist or {}).get(key)
        if not counts or not any(counts):
            continue
        used = [i for i, c in enumerate(counts) if c]
        a, b = max(0, used[0] - 1), min(len(counts), used[-1] + 2)
        title = f"{'Negative codes' if key == 'negative' else 'Activations'} · density {percent(density)}"
        charts.append(Markup(histogram(counts[a:b], list(edges[a:b + 1]), title=title, xlabel=f"{label} (log bins)",
                                       ylabel="tokens")))
    return charts


def density_histogram(densities: Sequence[float]) -> Markup:
    """Latents by log10 firing rate, dead ones apart (as the static report draws it)."""
    return Markup(svg_density_histogram(densities))


def curves(rows: Sequence[dict]) -> list[Markup]:
    """Training curves from metrics.jsonl rows, against tokens (or steps)."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    xkey = "tokens" if any(finite(r.get("tokens")) for r in rows) else "step"
    charts = []
    for key, label in CURVES:
        pts = [(r[xkey], r[key]) for r in rows if finite(r.get(xkey)) and finite(r.get(key))]
        if len(pts) < 2:
            continue
        ys = [y for _, y in pts]
        log_y = key in LOG_CURVES and min(ys) > 0 and max(ys) / min(ys) > 10
        charts.append(Markup(line_chart([x for x, _ in pts], ys, title=label + (" (log)" if log_y else ""), xlabel=xkey,
                                        ylabel=label, log_y=log_y)))
    return charts


_env.filters.update(num=number, pct=percent, visible=visible, chip=chip, bar=bar)
_env.globals.update(url=url, tokens_html=tokens_html)
