"""Pure SVG chart builders for the report: heatmaps, line charts, interval bars.

Each returns one self-contained ``<svg>`` string (no scripts, no external references) with an
accessible ``<title>``/``<desc>``. Every piece of text that comes from results is escaped here,
so the template may insert the returned markup as-is. Heatmaps draw one ``<rect>`` per cell
(with a hover tooltip) up to ``max_rect_cells`` (4096, ~0.4 MB); larger matrices (hundreds of experts x many
layers) become one embedded PNG, one pixel per cell, built with zlib, so the file stays small.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

# Diverging blue-white-red (ColorBrewer RdBu, reversed: negative blue, positive red).
DIVERGING = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"]
# Sequential (viridis anchors), light = low is harder to read on white, so dark-to-light is used.
SEQUENTIAL = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]
# Okabe-Ito, colour-blind safe, for line series.
PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442"]
MISSING = "#c8c8c8"
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"


# ---------------------------------------------------------------- helpers


class ChartDataError(ValueError):
    """The data given for a chart cannot be drawn (wrong type, empty); the report says so and goes on."""



def _esc(x: Any) -> str:
    """Escape any value for SVG text or attribute content."""
    return escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    """A finite float, or None for None/NaN/Inf/non-numbers (bools are not numbers here)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except Exception:  # noqa: BLE001 - anything that is not a number (incl. template Undefined)
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 3) -> str:
    """Short human number: 4 significant digits, scientific for very small/large values."""
    v = _num(x)
    if v is None:
        return "n/a" if x is None or isinstance(x, (int, float)) else str(x)
    if v == 0:
        return "0"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    a = abs(v)
    if a < 1e-3 or a >= 1e5:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _uid(*parts: Any) -> str:
    """Deterministic id from content: identical charts share identical (and identical-meaning) defs."""
    h = hashlib.sha1(repr(parts).encode("utf-8", "replace")).hexdigest()[:10]
    return f"c{h}"


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def _interp(stops: Sequence[str], t: float) -> tuple[int, int, int]:
    """Linear interpolation along colour stops, t in [0, 1]."""
    t = min(1.0, max(0.0, t))
    pos = t * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    f = pos - i
    a, b = _hex(stops[i]), _hex(stops[i + 1])
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


class Scale:
    """Maps values to colours: diverging (symmetric about 0) or sequential between vmin and vmax."""

    def __init__(self, values: Iterable[float | None], vmin: Any = None, vmax: Any = None, kind: str | None = None):
        finite = [v for v in values if v is not None]
        lo = _num(vmin) if _num(vmin) is not None else (min(finite) if finite else 0.0)
        hi = _num(vmax) if _num(vmax) is not None else (max(finite) if finite else 1.0)
        if lo > hi:
            lo, hi = hi, lo
        self.kind = kind if kind in ("diverging", "sequential") else ("diverging" if lo < 0 < hi else "sequential")
        if self.kind == "diverging":
            m = max(abs(lo), abs(hi)) or 1.0
            lo, hi = -m, m
        if hi == lo:
            hi = lo + 1.0
        self.lo, self.hi = lo, hi
        self.stops = DIVERGING if self.kind == "diverging" else SEQUENTIAL

    def rgb(self, v: float) -> tuple[int, int, int]:
        return _interp(self.stops, (v - self.lo) / (self.hi - self.lo))

    def color(self, v: float | None) -> str:
        if v is None:
            return MISSING
        r, g, b = self.rgb(v)
        return f"#{r:02x}{g:02x}{b:02x}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """'Nice' axis ticks covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    out, x = [], start
    while x <= hi + step * 1e-6:
        out.append(round(x, 12))
        x += step
    return out


def _label_every(n: int, room_px: float, min_px: float = 12.0) -> int:
    """Label every k-th item (k a round number: 1, 2, 5, 10, 20, 50, ...) so labels are min_px apart."""
    if n <= 0 or room_px <= 0:
        return 1
    need = min_px / (room_px / n)
    mag = 1
    while True:
        for m in (1, 2, 5):
            if m * mag >= need:
                return m * mag
        mag *= 10


def _labels(given: Any, n: int) -> list:
    """Axis labels: the given list, cut or extended with indices to n entries."""
    given = list(given) if isinstance(given, (list, tuple)) else []
    return given[:n] + list(range(len(given), n))


def _png_data_uri(pixels: list[list[tuple[int, int, int]]]) -> str:
    """A truecolour PNG (one pixel per cell) as a data URI, with only zlib and struct."""
    h, w = len(pixels), len(pixels[0]) if pixels else 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _legend(scale: Scale, x: float, y: float, width: float, gid: str, unit: str, has_missing: bool) -> str:
    """Horizontal colour bar with min/mid/max labels; a grey hatched swatch when cells are missing."""
    stops = "".join(f'<stop offset="{i / (len(scale.stops) - 1):.3f}" stop-color="{c}"/>' for i, c in enumerate(scale.stops))
    mid = (scale.lo + scale.hi) / 2
    parts = [f'<defs><linearGradient id="{gid}-grad">{stops}</linearGradient></defs>',
             f'<rect x="{x}" y="{y}" width="{width}" height="10" fill="url(#{gid}-grad)" stroke="#888" stroke-width="0.5"/>']
    for frac, v, anchor in ((0, scale.lo, "start"), (0.5, mid, "middle"), (1, scale.hi, "end")):
        parts.append(f'<text x="{x + frac * width:.1f}" y="{y + 22}" text-anchor="{anchor}" font-size="10">{_esc(fmt(v))}</text>')
    if unit:
        parts.append(f'<text x="{x + width + 8:.1f}" y="{y + 9}" font-size="10">{_esc(unit)}</text>')
    if has_missing:
        mx = x + width + 8 + (7 * len(unit) + 10 if unit else 0)
        parts.append(f'<rect x="{mx:.1f}" y="{y}" width="10" height="10" fill="url(#{gid}-na)" stroke="#888" stroke-width="0.5"/>'
                     f'<text x="{mx + 14:.1f}" y="{y + 9}" font-size="10">no data</text>')
    return "".join(parts)


# ---------------------------------------------------------------- heatmap


def heatmap_svg(m: dict, *, max_rect_cells: int = 4096, width: int = 900) -> str:
    """Heatmap of ``m = {title, rows, cols, values, vmin, vmax, unit, note, scale?, row_label?, col_label?}``.

    ``values`` is a list of rows (None/NaN = no data, drawn hatched grey). Rows are usually layers,
    columns experts. The colour scale is diverging when the range spans zero, sequential otherwise
    (``scale`` overrides). Up to ``max_rect_cells`` cells: one rect each with a tooltip; beyond: a PNG.
    """
    if not isinstance(m, dict):
        raise ChartDataError(f"a heatmap must be an object with values, got {type(m).__name__}")
    vals = m.get("values") or []
    if not isinstance(vals, list) or not vals or not all(isinstance(r, (list, tuple)) for r in vals):
        raise ChartDataError("heatmap values must be a non-empty list of rows")
    nr, nc = len(vals), max(len(r) for r in vals)
    if nc == 0:
        raise ChartDataError("heatmap rows are empty")
    grid = [[_num(r[j]) if j < len(r) else None for j in range(nc)] for r in vals]
    rows = _labels(m.get("rows"), nr)
    cols = _labels(m.get("cols"), nc)
    title = str(m.get("title") or "heatmap")
    unit = str(m.get("unit") or "")
    scale = Scale((v for row in grid for v in row), m.get("vmin"), m.get("vmax"), m.get("scale"))
    has_missing = any(v is None for row in grid for v in row)
    gid = _uid(title, nr, nc, vals[:3], m.get("vmin"), m.get("vmax"))

    left, top = 56, 34
    plot_w = max(120.0, width - left - 20)
    cw = min(28.0, max(1.0, plot_w / nc))
    ch = min(22.0, max(2.0, min(cw * 1.2, 640.0 / nr)))
    pw, ph = cw * nc, ch * nr
    legend_y = top + ph + 36
    total_w = max(left + pw + 20, 460)
    total_h = legend_y + 34
    row_name, col_name = str(m.get("row_label") or "layer"), str(m.get("col_label") or "expert")

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart heatmap" role="img" width="{total_w:.0f}" height="{total_h:.0f}" '
           f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" aria-labelledby="{gid}-t {gid}-d" style="{FONT}">'),
           f'<title id="{gid}-t">{_esc(title)}</title>',
           (f'<desc id="{gid}-d">{nr} {_esc(row_name)}s by {nc} {_esc(col_name)}s; colour from {_esc(fmt(scale.lo))} to '
           f'{_esc(fmt(scale.hi))} {_esc(unit)}; grey hatched cells have no data.</desc>'),
           (f'<defs><pattern id="{gid}-na" width="4" height="4" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
           f'<rect width="4" height="4" fill="{MISSING}"/><line x1="0" y1="0" x2="0" y2="4" stroke="#999" stroke-width="1.5"/></pattern></defs>'),
           f'<text x="{left}" y="14" font-size="13" font-weight="600">{_esc(title)}</text>']

    if nr * nc <= max_rect_cells:
        # Cells in a group scaled to the cell size: integer coordinates keep each rect short.
        rl, cl = row_name[:1].upper(), col_name[:1].upper()
        cells, missing = [], []
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is None:
                    missing.append(f'<rect x="{j * cw:.2f}" y="{i * ch:.2f}" width="{cw:.2f}" height="{ch:.2f}"/>')
                else:
                    cells.append(f'<rect x="{j}" y="{i}" width="1" height="1" fill="{scale.color(v)}">'
                                 f'<title>{_esc(f"{rl}{rows[i]} {cl}{cols[j]}: {fmt(v)}")}</title></rect>')
        out.append(f'<g transform="translate({left},{top}) scale({cw:.4f},{ch:.4f})" shape-rendering="crispEdges">{"".join(cells)}</g>')
        if missing:
            out.append(f'<g transform="translate({left},{top})" fill="url(#{gid}-na)"><title>no data</title>{"".join(missing)}</g>')
    else:
        pixels = [[scale.rgb(v) if v is not None else _hex(MISSING) for v in row] for row in grid]
        out.append(f'<image x="{left}" y="{top}" width="{pw:.2f}" height="{ph:.2f}" preserveAspectRatio="none" '
                   f'style="image-rendering:pixelated" href="{_png_data_uri(pixels)}"><title>{nr} x {nc} cells drawn as an image '
                   f'(no per-cell tooltips at this size; exact values are in results.json)</title></image>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw:.2f}" height="{ph:.2f}" fill="none" stroke="#666" stroke-width="0.5"/>')

    every_r = _label_every(nr, ph, 11)
    for i in range(0, nr, every_r):
        out.append(f'<text x="{left - 4}" y="{top + (i + 0.5) * ch + 3.5:.1f}" text-anchor="end" font-size="9">{_esc(rows[i])}</text>')
    every_c = _label_every(nc, pw, 6.0 * max(len(str(c)) for c in cols) + 6)
    for j in range(0, nc, every_c):
        out.append(f'<text x="{left + (j + 0.5) * cw:.1f}" y="{top + ph + 12:.1f}" text-anchor="middle" font-size="9">{_esc(cols[j])}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 25:.1f}" text-anchor="middle" font-size="10" fill="#444">{_esc(col_name)}</text>')
    out.append(f'<text x="12" y="{top + ph / 2:.1f}" text-anchor="middle" font-size="10" fill="#444" '
               f'transform="rotate(-90 12 {top + ph / 2:.1f})">{_esc(row_name)}</text>')
    out.append(_legend(scale, left, legend_y, min(240.0, max(120.0, pw)), gid, unit, has_missing))
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------- line chart


def line_chart_svg(c: dict, *, width: int = 720, height: int = 300) -> str:
    """Line chart of ``c = {title, x, xlabel, ylabel?, series: {label: [y...]}, hlines?: {label: y}}``.

    None/NaN points break a line. Used for per-layer curves (residual projection before vs after,
    signal quality, KL). Series are coloured with a colour-blind safe palette and labelled in a legend.
    """
    if not isinstance(c, dict):
        raise ChartDataError(f"a curve must be an object with series, got {type(c).__name__}")
    series = c.get("series") or {}
    if not isinstance(series, dict) or not series:
        raise ChartDataError("curve has no series")
    n = max(len(v) for v in series.values() if isinstance(v, (list, tuple))) if any(isinstance(v, (list, tuple)) for v in series.values()) else 0
    if n == 0:
        raise ChartDataError("curve series are empty")
    xs_raw = _labels(c.get("x"), n)
    xs = [_num(x) for x in xs_raw[:n]] + [float(i) for i in range(len(xs_raw), n)]
    if any(x is None for x in xs):  # categorical x: plot by position
        xs = [float(i) for i in range(n)]
    ys = [_num(v) for s in series.values() if isinstance(s, (list, tuple)) for v in s]
    hl = c.get("hlines") if isinstance(c.get("hlines"), dict) else {}
    hlines = {str(k): _num(v) for k, v in hl.items() if _num(v) is not None}
    finite = [v for v in ys if v is not None] + list(hlines.values())
    ylo, yhi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if ylo > 0 and ylo < 0.5 * yhi:
        ylo = 0.0
    if yhi == ylo:
        yhi, ylo = yhi + 1, ylo - (1 if ylo != 0 else 0)
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - (pad if ylo != 0 else 0), yhi + pad
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xhi = xlo + 1
    title = str(c.get("title") or "curve")
    gid = _uid(title, n, list(series)[:5])
    legend_rows = math.ceil(len(series) / 3)
    left, right, top, bottom = 60, 16, 30, 44 + 16 * legend_rows
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * pw

    def sy(y: float) -> float:
        return top + ph - (y - ylo) / (yhi - ylo) * ph

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart line" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" aria-labelledby="{gid}-t {gid}-d" style="{FONT}">'),
           f'<title id="{gid}-t">{_esc(title)}</title>',
           f'<desc id="{gid}-d">{len(series)} series over {n} points: {_esc(", ".join(map(str, series)))}.</desc>',
           f'<text x="{left}" y="16" font-size="13" font-weight="600">{_esc(title)}</text>']
    for t in _ticks(ylo, yhi):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 5}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{_esc(fmt(t))}</text>')
    if ylo < 0 < yhi:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#888"/>')
    xt = _ticks(xlo, xhi, min(10, n))
    for t in xt:
        x = sx(t)
        lab = xs_raw[int(t)] if xs == [float(i) for i in range(n)] and 0 <= int(t) < len(xs_raw) and t == int(t) else fmt(t)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{_esc(lab)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999" stroke-width="0.6"/>')
    if c.get("xlabel"):
        out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 28}" text-anchor="middle" font-size="10" fill="#444">{_esc(c["xlabel"])}</text>')
    if c.get("ylabel"):
        out.append(f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" font-size="10" fill="#444" '
                   f'transform="rotate(-90 14 {top + ph / 2:.1f})">{_esc(c["ylabel"])}</text>')
    for k, (lab, y) in enumerate(hlines.items()):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#b2182b" stroke-dasharray="5 3">'
                   f'<title>{_esc(lab)}: {_esc(fmt(y))}</title></line>'
                   f'<text x="{left + pw - 4}" y="{sy(y) - 3:.1f}" text-anchor="end" font-size="9" fill="#b2182b">{_esc(lab)}</text>')
    for k, (lab, vals) in enumerate(series.items()):
        if not isinstance(vals, (list, tuple)):
            continue
        col = PALETTE[k % len(PALETTE)]
        dash = "" if k < len(PALETTE) else ' stroke-dasharray="4 2"'
        seg: list[str] = []
        segs: list[list[str]] = []
        for x, v in zip(xs, vals):
            v = _num(v)
            if v is None:
                if seg:
                    segs.append(seg)
                seg = []
            else:
                seg.append(f"{sx(x):.1f},{sy(v):.1f}")
        if seg:
            segs.append(seg)
        out.append(f'<g><title>{_esc(lab)}</title>')
        for s in segs:
            out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.8"{dash} points="{" ".join(s)}"/>')
        if n <= 60:
            for x, v in zip(xs, vals):
                v = _num(v)
                if v is not None:
                    out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(v):.1f}" r="2.4" fill="{col}"><title>{_esc(lab)} @ {_esc(fmt(x))}: {_esc(fmt(v))}</title></circle>')
        out.append("</g>")
        lx = left + (k % 3) * (pw / 3)
        ly = top + ph + 42 + 16 * (k // 3)
        out.append(f'<line x1="{lx:.1f}" x2="{lx + 18:.1f}" y1="{ly - 4}" y2="{ly - 4}" stroke="{col}" stroke-width="2.5"{dash}/>'
                   f'<text x="{lx + 23:.1f}" y="{ly}" font-size="10">{_esc(lab)}</text>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------- interval bars


def interval_bars_svg(items: Sequence[dict], *, title: str = "rates", xmax: float = 1.0, percent: bool = True,
                      width: int = 640, limit: float | None = None) -> str:
    """Horizontal bars with confidence-interval whiskers: ``items = [{label, rate, lo, hi, k?, n?}]``.

    For refusal rates before/after (and over-refusal, per-cause simulated rates). ``limit`` draws a
    dashed line, e.g. the gate's maximum refusal rate.
    """
    items = [it for it in items if isinstance(it, dict)]
    if not items:
        raise ChartDataError("no rates to draw")
    gid = _uid(title, [(it.get("label"), it.get("rate")) for it in items])
    left, right, top, bar_h, gap = 170, 185, 30, 18, 10
    pw = width - left - right
    height = top + len(items) * (bar_h + gap) + 26

    def sx(v: float) -> float:
        return left + max(0.0, min(1.0, v / xmax)) * pw

    def pct(v: Any) -> str:
        x = _num(v)
        return "n/a" if x is None else (f"{100 * x:.1f}%" if percent else fmt(x))

    desc = "; ".join(f"{it.get('label')}: {pct(it.get('rate'))} [{pct(it.get('lo'))}, {pct(it.get('hi'))}]" for it in items)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart bars" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" aria-labelledby="{gid}-t {gid}-d" style="{FONT}">'),
           f'<title id="{gid}-t">{_esc(title)}</title>',
           f'<desc id="{gid}-d">{_esc(desc)}</desc>',
           f'<text x="8" y="16" font-size="13" font-weight="600">{_esc(title)}</text>']
    for t in _ticks(0, xmax, 5):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{height - 22}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle" font-size="10">{_esc(pct(t))}</text>')
    for i, it in enumerate(items):
        y = top + i * (bar_h + gap)
        rate, lo, hi = _num(it.get("rate")), _num(it.get("lo")), _num(it.get("hi"))
        col = PALETTE[i % len(PALETTE)]
        out.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="end" font-size="11">{_esc(it.get("label", ""))}</text>')
        if rate is not None:
            out.append(f'<rect x="{left}" y="{y}" width="{sx(rate) - left:.1f}" height="{bar_h}" fill="{col}" fill-opacity="0.75">'
                       f'<title>{_esc(it.get("label", ""))}: {_esc(pct(rate))}</title></rect>')
        if lo is not None and hi is not None:
            ym = y + bar_h / 2
            out.append(f'<g stroke="#222" stroke-width="1.4"><line x1="{sx(lo):.1f}" x2="{sx(hi):.1f}" y1="{ym}" y2="{ym}"/>'
                       f'<line x1="{sx(lo):.1f}" x2="{sx(lo):.1f}" y1="{ym - 5}" y2="{ym + 5}"/>'
                       f'<line x1="{sx(hi):.1f}" x2="{sx(hi):.1f}" y1="{ym - 5}" y2="{ym + 5}"/></g>')
        kn = f" ({it['k']}/{it['n']})" if it.get("k") is not None and it.get("n") is not None else ""
        ci = f" [{pct(lo)}, {pct(hi)}]" if lo is not None and hi is not None else ""
        out.append(f'<text x="{left + pw + 6}" y="{y + bar_h / 2 + 4:.1f}" font-size="10">{_esc(pct(rate) + ci + kn)}</text>')
    if _num(limit) is not None:
        x = sx(float(limit))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{height - 22}" stroke="#b2182b" stroke-dasharray="5 3">'
                   f'<title>limit {_esc(pct(limit))}</title></line>')
    out.append("</svg>")
    return "".join(out)
