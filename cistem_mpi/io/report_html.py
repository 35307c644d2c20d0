"""Static HTML for ``cistem-mpi report``: pages, tables and small inline SVG charts.

Plain HTML + CSS, no scripts and no network fetches, so a report opens from
any copy of the project.  Links to the project's files are relative to the
page (see :func:`rel_link`).  Every page is written to a temporary name and
renamed, so a browser refreshing during ``--watch`` never sees half a page.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa;font-size:14px}
header{background:#234;color:#fff;padding:8px 16px}
header a{color:#cde;margin-right:14px;text-decoration:none}
header h1{font-size:18px;margin:4px 0 6px 0}
main{padding:8px 16px}
h2{font-size:16px;border-bottom:1px solid #ccc;padding-bottom:2px;margin-top:22px}
table{border-collapse:collapse;margin:6px 0;background:#fff}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.st-finished{color:#161}.st-running{color:#14a;font-weight:bold}.st-failed,.st-died{color:#b11;font-weight:bold}
.st-cancelled,.st-queued,.st-stalled{color:#a60}
details summary{cursor:pointer;color:#246}
pre{white-space:pre-wrap;margin:2px 0;font-size:12px}
img.thumb{max-width:220px;max-height:220px;border:1px solid #ccc;background:#fff}
img.big{max-width:100%;border:1px solid #ccc;background:#fff}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.card{background:#fff;border:1px solid #ddd;padding:6px;display:inline-block}
.pager a,.pager b{margin-right:8px}
.muted{color:#777}
"""


def esc(value: object) -> str:
    """HTML-escape ``str(value)``.

    >>> esc("<a & b>")
    '&lt;a &amp; b&gt;'
    """
    return html.escape("" if value is None else str(value), quote=True)


def rel_link(target: Path, page_dir: Path) -> str | None:
    """The URL of ``target`` relative to ``page_dir`` (None when it is not a file below their common project).

    Parameters
    ----------
    target : Path
        An absolute file path.
    page_dir : Path
        The folder of the page that links to it.

    Returns
    -------
    str or None
        A relative, percent-quoted POSIX path, or None when the file is missing.

    >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "A").mkdir(); (d / "A" / "x y.png").write_bytes(b"")
    0
    >>> (d / "Report").mkdir(); rel_link(d / "A" / "x y.png", d / "Report")
    '../A/x%20y.png'
    """
    from urllib.parse import quote

    if not target.is_file():
        return None
    return quote(Path(os.path.relpath(target, page_dir)).as_posix())


def fmt(value: object, digits: int = 2) -> str:
    """A number for a table cell (``-`` for None or non-finite).

    >>> fmt(3.14159), fmt(None), fmt(12)
    ('3.14', '-', '12')
    """
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return esc(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else "-"


def duration(seconds: float | None) -> str:
    """``1h 02m 03s`` style wall time.

    >>> duration(3723.4), duration(5.2), duration(None)
    ('1h 02m 03s', '5.2 s', '-')
    """
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    h, m, s = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = (), cls: str = "") -> str:
    """An HTML table; cells are already HTML (escape them with :func:`esc`).

    >>> table(["a"], [["1"]])
    '<table><tr><th>a</th></tr>\\n<tr><td>1</td></tr></table>'
    """
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>{head}\n" + "\n".join(body) + "</table>"


def page(title: str, body: str, nav: Sequence[tuple[str, str]], generated: str) -> str:
    """A whole HTML document with the report's header and navigation."""
    links = "".join(f'<a href="{esc(href)}">{esc(text)}</a>' for text, href in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><header><h1>{esc(title)}</h1>"
            f"<nav>{links}</nav></header>\n<main>\n{body}\n"
            f'<p class="muted">Generated {esc(generated)} by cistem-mpi report.</p></main></body></html>\n')


def write_page(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def img(src: str | None, alt: str, cls: str = "thumb") -> str:
    """An ``<img>`` (lazy) or a muted note when there is no file."""
    if src is None:
        return f'<span class="muted">no {esc(alt)}</span>'
    return f'<a href="{esc(src)}"><img class="{cls}" src="{esc(src)}" alt="{esc(alt)}" loading="lazy"></a>'


# ----------------------------------------------------------------------------- SVG charts
_W, _H, _ML, _MR, _MT, _MB = 360, 220, 48, 12, 22, 36
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _frame(title: str, xlabel: str, ylabel: str, x0: float, x1: float, y0: float, y1: float,
           xticks: Sequence[tuple[float, str]] | None = None) -> tuple[list[str], object]:
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (_ML + (x - x0) / (x1 - x0) * pw, _MT + ph - (y - y0) / (y1 - y0) * ph)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}"'
             f' role="img" aria-label="{esc(title)}" font-family="DejaVu Sans,sans-serif" font-size="10">',
             f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="#fff"/>',
             f'<text x="{_W / 2}" y="14" text-anchor="middle" font-size="12">{esc(title)}</text>',
             f'<rect x="{_ML}" y="{_MT}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    if xticks is None:
        xticks = [(t, _tick_label(t)) for t in _ticks(min(x0, x1), max(x0, x1))]
    for t, label in xticks:
        px, _ = to_px(t, y0)
        parts.append(f'<line x1="{px:.1f}" y1="{_MT + ph}" x2="{px:.1f}" y2="{_MT + ph + 4}" stroke="#888"/>'
                     f'<text x="{px:.1f}" y="{_MT + ph + 14}" text-anchor="middle">{esc(label)}</text>')
    for t in _ticks(min(y0, y1), max(y0, y1)):
        _, py = to_px(x0, t)
        parts.append(f'<line x1="{_ML - 4}" y1="{py:.1f}" x2="{_ML}" y2="{py:.1f}" stroke="#888"/>'
                     f'<text x="{_ML - 6}" y="{py + 3:.1f}" text-anchor="end">{_tick_label(t)}</text>')
    parts.append(f'<text x="{_ML + pw / 2}" y="{_H - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(f'<text x="12" y="{_MT + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {_MT + ph / 2})">'
                 f"{esc(ylabel)}</text>")
    return parts, to_px


def svg_histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 20) -> str:
    """A histogram as inline SVG (non-finite values are left out).

    >>> svg_histogram([1.0, 2.0, 2.5], "t", "x").startswith("<svg")
    True
    """
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return f'<p class="muted">{esc(title)}: no values</p>'
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5 * max(abs(lo), 1) * 0.1, hi + 0.5 * max(abs(hi), 1) * 0.1
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    parts, to_px = _frame(title, xlabel, "count", lo, hi, 0, max(1, int(counts.max())) * 1.05)
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c == 0:
            continue
        x_a, y_top = to_px(a, c)
        x_b, y_bot = to_px(b, 0)
        parts.append(f'<rect x="{x_a:.1f}" y="{y_top:.1f}" width="{max(0.5, x_b - x_a - 0.5):.1f}"'
                     f' height="{y_bot - y_top:.1f}" fill="#4a7ab0"><title>{a:.3g}–{b:.3g}: {int(c)}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def svg_lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str,
              hlines: Sequence[float] = (), y_range: tuple[float, float] | None = None, markers: bool = False,
              xticks: Sequence[tuple[float, str]] | None = None) -> str:
    """Line chart of named ``(x, y)`` series as inline SVG (FSC curves, resolution per round).

    >>> svg_lines({"a": ([0, 1], [1, 0])}, "t", "x", "y").count("<polyline")
    1
    """
    xs = [float(x) for s in series.values() for x, y in zip(*s) if x is not None and y is not None
          and math.isfinite(float(x)) and math.isfinite(float(y))]
    ys = [float(y) for s in series.values() for x, y in zip(*s) if x is not None and y is not None
          and math.isfinite(float(x)) and math.isfinite(float(y))]
    if not xs:
        return f'<p class="muted">{esc(title)}: no values</p>'
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    elif xticks is not None:  # categorical steps: half a step of room at either end
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y_range is None:
        y0, y1 = min(ys), max(ys)
        pad = 0.08 * (y1 - y0) if y1 > y0 else max(abs(y1), 1) * 0.1
        y0, y1 = y0 - pad, y1 + pad
    else:
        y0, y1 = y_range
    parts, to_px = _frame(title, xlabel, ylabel, x0, x1, y0, y1, xticks=xticks)
    for h in hlines:
        if y0 <= h <= y1:
            a, py = to_px(x0, h)
            b, _ = to_px(x1, h)
            parts.append(f'<line x1="{a:.1f}" y1="{py:.1f}" x2="{b:.1f}" y2="{py:.1f}" stroke="#999"'
                         f' stroke-dasharray="4 3"/><text x="{b - 2:.1f}" y="{py - 3:.1f}" text-anchor="end"'
                         f' fill="#777">{h:g}</text>')
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = [to_px(float(x), min(max(float(y), y0), y1)) for x, y in zip(sx, sy)
               if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
        if not pts:
            continue
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="'
                     + " ".join(f"{px:.1f},{py:.1f}" for px, py in pts) + f'"><title>{esc(name)}</title></polyline>')
        if markers:
            parts.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}"/>' for px, py in pts)
        parts.append(f'<text x="{_W - _MR - 4}" y="{_MT + 12 + 12 * i}" text-anchor="end" fill="{colour}">'
                     f"{esc(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> str:
    """A bar chart (class populations) as inline SVG.

    >>> svg_bars(["1", "2"], [3, 4], "t", "n").count("<rect") >= 2
    True
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0 or not np.isfinite(v).any():
        return f'<p class="muted">{esc(title)}: no values</p>'
    top = float(np.nanmax(v)) * 1.08 or 1.0
    every = max(1, -(-len(v) // 20))  # at most ~20 labels
    ticks = [(i + 0.5, str(lab)) for i, lab in enumerate(labels) if i % every == 0]
    parts, to_px = _frame(title, "class", ylabel, 0, len(v), 0, top, xticks=ticks)
    for i, (lab, val) in enumerate(zip(labels, v)):
        if not math.isfinite(val):
            continue
        xa, yt = to_px(i + 0.1, val)
        xb, yb = to_px(i + 0.9, 0)
        parts.append(f'<rect x="{xa:.1f}" y="{yt:.1f}" width="{xb - xa:.1f}" height="{yb - yt:.1f}"'
                     f' fill="#4a7ab0"><title>class {esc(lab)}: {val:g}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def svg_angular(theta: np.ndarray, phi: np.ndarray, title: str, bins_phi: int = 36, bins_theta: int = 18) -> str:
    """The angular distribution (Euler θ, φ in degrees) as a binned heat map in inline SVG.

    Each cell's colour is its particle count relative to the fullest cell;
    the size of the SVG does not grow with the number of particles.

    >>> svg_angular(np.array([10.0, 90.0]), np.array([0.0, 180.0]), "t").count("<rect") > 2
    True
    """
    theta = np.asarray(theta, dtype=float)
    phi = np.mod(np.asarray(phi, dtype=float), 360.0)
    ok = np.isfinite(theta) & np.isfinite(phi)
    theta, phi = np.clip(theta[ok], 0, 180), phi[ok]
    if theta.size == 0:
        return f'<p class="muted">{esc(title)}: no particles</p>'
    h, _, _ = np.histogram2d(phi, theta, bins=(bins_phi, bins_theta), range=((0, 360), (0, 180)))
    parts, to_px = _frame(f"{title} ({theta.size} particles)", "φ (°)", "θ (°)", 0, 360, 180, 0)
    peak = float(h.max()) or 1.0
    dphi, dtheta = 360 / bins_phi, 180 / bins_theta
    for i in range(bins_phi):
        for j in range(bins_theta):
            c = h[i, j]
            if c == 0:
                continue
            f = c / peak
            # white -> dark blue
            r, g, b = int(255 - 225 * f), int(255 - 190 * f), int(255 - 95 * f)
            xa, ya = to_px(i * dphi, j * dtheta)
            xb, yb = to_px((i + 1) * dphi, (j + 1) * dtheta)
            parts.append(f'<rect x="{xa:.1f}" y="{min(ya, yb):.1f}" width="{xb - xa:.1f}" height="{abs(yb - ya):.1f}"'
                         f' fill="rgb({r},{g},{b})"><title>φ {i * dphi:g}–{(i + 1) * dphi:g}°, θ {j * dtheta:g}–'
                         f"{(j + 1) * dtheta:g}°: {int(c)}</title></rect>")
    parts.append("</svg>")
    return "".join(parts)


def pager(n_pages: int, current: int, name: str) -> str:
    """Links to pages ``name_1.html`` … of a paged list (``current`` counts from 1).

    >>> pager(2, 1, "images")
    '<p class="pager">Page: <b>1</b><a href="images_2.html">2</a></p>'
    """
    if n_pages <= 1:
        return ""
    links = [f"<b>{k}</b>" if k == current else f'<a href="{esc(name)}_{k}.html">{k}</a>'
             for k in range(1, n_pages + 1)]
    return '<p class="pager">Page: ' + "".join(links) + "</p>"
