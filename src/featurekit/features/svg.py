"""Tiny inline-SVG charts for the HTML report: a line chart and a histogram, no dependencies.

Every function returns an ``<svg>`` string whose text (titles, labels) is HTML-escaped. Charts
use a fixed ``viewBox`` and scale with their container (``width: 100%``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

W, H = 360, 220                     # viewBox size
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 26, 40  # plot margins
LINE = "#2563eb"
BAR = "#60a5fa"
DEAD = "#9ca3af"


def fmt(v: float) -> str:
    """Short number for ticks and tables: integers with separators, else 4 significant digits."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    if v == int(v) and abs(v) < 1e5:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _tick_label(v: float) -> str:
    """Compact tick text: 1.5M, 20k, 0.25, 1e-04."""
    a = abs(v)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{v / scale:.3g}{suffix}"
    if a == 0 or a >= 1e-3:
        return f"{v:.3g}"
    return f"{v:.0e}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2 or 5 × 10^k) covering [lo, hi]."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _frame(title: str, xlabel: str, ylabel: str, body: list[str], title_x: float | None = None) -> str:
    """The <svg> element: title (centred, or left-aligned at ``title_x``), axis labels, plot frame."""
    px, py = LEFT + (W - LEFT - RIGHT) / 2, TOP + (H - TOP - BOTTOM) / 2
    anchor = " ctl" if title_x is not None else ""  # a class (.chart .ctl{text-anchor:start}), not a style attribute: CSP-safe
    head = (f'<svg class="chart" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="{escape(title, quote=True)}">'
            f'<text x="{W / 2 if title_x is None else title_x}" y="16" class="ct{anchor}">{escape(title)}</text>'
            f'<text x="{px}" y="{H - 6}" class="al">{escape(xlabel)}</text>'
            f'<text x="12" y="{py}" class="al" transform="rotate(-90 12 {py})">{escape(ylabel)}</text>'
            f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" class="pf"/>')
    return head + "".join(body) + "</svg>"


def _axes(xt: list[tuple[float, str]], yt: list[tuple[float, str]]) -> list[str]:
    """Grid lines and tick labels; ticks are given as (pixel, label)."""
    out = []
    for x, label in xt:
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" class="gl"/>'
                   f'<text x="{x:.1f}" y="{H - BOTTOM + 13}" class="tx">{escape(label)}</text>')
    for y, label in yt:
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" class="gl"/>'
                   f'<text x="{LEFT - 4}" y="{y + 3:.1f}" class="ty">{escape(label)}</text>')
    return out


def line_chart(xs: Sequence[float], ys: Sequence[float], *, title: str, xlabel: str, ylabel: str = "",
               log_y: bool = False) -> str:
    """A line chart of (x, y); non-finite points (and y <= 0 on a log axis) are dropped."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys)
           if x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        return _frame(title, xlabel, ylabel, [f'<text x="{W / 2}" y="{H / 2}" class="ct">no data</text>'])
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(tf(p[1]) for p in pts), max(tf(p[1]) for p in pts)
    if log_y:
        yticks = [float(e) for e in range(math.floor(y0), math.ceil(y1) + 1)]
        if len(yticks) < 2:
            yticks = [yticks[0], yticks[0] + 1]
        ylab = [_tick_label(10 ** e) if -2 <= e <= 3 else f"1e{int(e)}" for e in yticks]
    else:
        yticks = nice_ticks(0.0 if 0 <= y0 < 0.25 * y1 else y0, y1)  # start at 0 when data is near it
        ylab = [_tick_label(t) for t in yticks]
    if x1 > x0:  # the x axis spans the data exactly; ticks inside it
        xa, xb = x0, x1
        xticks = [t for t in nice_ticks(x0, x1, 6) if x0 - 1e-9 * (x1 - x0) <= t <= x1 + 1e-9 * (x1 - x0)]
    else:
        xa, xb, xticks = x0 - 1, x0 + 1, [x0]
    ya, yb = yticks[0], yticks[-1]
    sx = lambda v: LEFT + (v - xa) / ((xb - xa) or 1) * (W - LEFT - RIGHT)  # noqa: E731
    sy = lambda v: H - BOTTOM - (v - ya) / ((yb - ya) or 1) * (H - TOP - BOTTOM)  # noqa: E731
    body = _axes([(sx(t), _tick_label(t)) for t in xticks], [(sy(t), s) for t, s in zip(yticks, ylab)])
    path = " ".join(f"{sx(x):.1f},{sy(tf(y)):.1f}" for x, y in pts)
    body.append(f'<polyline points="{path}" fill="none" stroke="{LINE}" stroke-width="1.6"/>')
    if len(pts) == 1:
        body.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(tf(pts[0][1])):.1f}" r="3" fill="{LINE}"/>')
    last = pts[-1][1]
    body.append(f'<text x="{W - RIGHT}" y="{TOP - 4}" class="lv">last: {escape(fmt(last))}</text>')
    return _frame(title, xlabel, ylabel, body, title_x=LEFT)


def histogram(counts: Sequence[int], edges: Sequence[float], *, title: str, xlabel: str,
              ylabel: str = "latents", extra: tuple[str, int] | None = None,
              marker: tuple[float, str] | None = None) -> str:
    """Bars for ``counts`` over bins ``edges`` (len(counts) + 1), plus an optional separate bar
    ``extra = (label, count)`` drawn left of the axis gap (e.g. dead latents), and an optional
    dashed vertical ``marker = (x, label)``."""
    n_extra = 1 if extra else 0
    slots = len(counts) + 2 * n_extra          # extra bar + one empty slot as a gap
    peak = max(list(counts) + ([extra[1]] if extra else []) + [1])
    yticks = nice_ticks(0, peak, 4)
    ya, yb = yticks[0], yticks[-1]
    pw = (W - LEFT - RIGHT) / max(slots, 1)
    sy = lambda v: H - BOTTOM - (v - ya) / ((yb - ya) or 1) * (H - TOP - BOTTOM)  # noqa: E731
    x_of = lambda edge_i: LEFT + (2 * n_extra + edge_i) * pw  # noqa: E731
    step = max(1, round(len(counts) / 6))
    xt = [(x_of(i), _tick_label(edges[i])) for i in range(0, len(edges), step)]
    body = _axes(xt, [(sy(t), _tick_label(t)) for t in yticks])

    def bar(x: float, count: int, colour: str, label: str) -> str:
        y = sy(count)
        return (f'<rect x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(pw - 1, 0.5):.1f}" '
                f'height="{H - BOTTOM - y:.1f}" fill="{colour}"><title>{escape(label)}</title></rect>')

    for i, c in enumerate(counts):
        body.append(bar(x_of(i), c, BAR, f"[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}"))
    if extra:
        label, c = extra
        body.append(bar(LEFT, c, DEAD, f"{label}: {c}"))
        body.append(f'<text x="{LEFT + pw / 2:.1f}" y="{sy(c) - 3:.1f}" class="bl">{escape(label)} {c}</text>')
    if marker and edges and edges[0] <= marker[0] <= edges[-1]:
        frac = (marker[0] - edges[0]) / ((edges[-1] - edges[0]) or 1)
        mx = x_of(0) + frac * len(counts) * pw
        body.append(f'<line x1="{mx:.1f}" y1="{TOP}" x2="{mx:.1f}" y2="{H - BOTTOM}" class="mk"/>'
                    f'<text x="{mx - 3:.1f}" y="{TOP + 10}" class="ml">{escape(marker[1])}</text>')
    return _frame(title, xlabel, ylabel, body)


def density_histogram(densities: Sequence[float]) -> str:
    """Latents by log10 firing rate (bins of 0.25, or 0.5 below 10⁻⁴), dead ones as a separate bar, the 10 % line marked."""
    logs = [math.log10(d) for d in densities if d > 0]
    n_dead = len(densities) - len(logs)
    lo = math.floor(min(logs)) if logs else -6
    width = 0.25 if -lo <= 4 else 0.5
    n_bins = max(1, math.ceil(-lo / width))
    edges = [lo + i * width for i in range(n_bins + 1)]
    counts = [0] * n_bins
    for v in logs:
        counts[min(int((v - lo) / width), n_bins - 1)] += 1
    return histogram(counts, edges, title="Firing rate per latent", xlabel="log10(firing rate)",
                     extra=("dead", n_dead), marker=(-1.0, "dense (10%)"))
