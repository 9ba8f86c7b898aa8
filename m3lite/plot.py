"""Charts as PNG without a plotting library: an RGB canvas, straight lines and filled boxes, a 3x5 bitmap font
(digits, capitals, a few signs), and the PNG container written with zlib and struct (8-bit RGB, no filters).

Line charts (the trainer's loss curves) and grouped bar charts (`m3lite eval`'s report)."""
from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

# 3x5 bitmaps, row by row: enough for tick labels written with "%.3g"
_FONT = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
         "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
         "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
         "+": "000010111010000", "e": "000111111100111", " ": "000000000000000",
         "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
         "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
         "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
         "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
         "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
         "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
         "Y": "101101010010010", "Z": "111001010100111", "@": "010101111100011", "%": "101001010100101",
         "/": "001001010100100", "(": "010100100100010", ")": "010001001001010", ":": "000010000010000",
         "_": "000000000000111", "=": "000111000111000", ",": "000000000010100"}
WHITE, GREY, BLACK = (255, 255, 255), (220, 220, 220), (0, 0, 0)
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127))


def png_bytes(rgb: np.ndarray) -> bytes:
    """An [H, W, 3] uint8 image as PNG file bytes."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[y], np.uint8).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    ok = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[ok], xs[ok]] = color


def _text(img: np.ndarray, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> None:
    """Draw `s` with its top left corner at (x, y): 4 * scale pixels per character, 5 * scale high. Lowercase
    letters other than "e" (which exponents use) are drawn as capitals; unknown characters as spaces."""
    for ch in s:
        bits = _FONT.get(ch) or _FONT.get(ch.upper(), _FONT[" "])
        for k, bit in enumerate(bits):
            if bit == "1":
                r, c = y + (k // 3) * scale, x + (k % 3) * scale
                img[max(r, 0):r + scale, max(c, 0):c + scale] = color
        x += 4 * scale


def loss_chart(series: Sequence[tuple[Sequence[float], Sequence[float]]], width: int = 720,
               height: int = 400) -> bytes:
    """PNG bytes of line charts sharing axes: series[i] = (xs, ys), drawn in COLORS order (loss, then eval
    loss); y ticks labelled with their values, x labelled at both ends."""
    img = np.full((height, width, 3), WHITE, np.uint8)
    left, right, top, bottom = 70, 20, 20, 40
    pts = [(np.asarray(x, float), np.asarray(y, float)) for x, y in series if len(x)]
    pts = [(x[np.isfinite(y)], y[np.isfinite(y)]) for x, y in pts]
    if not any(len(x) for x, _ in pts):
        return png_bytes(img)
    xmin = min(x.min() for x, _ in pts if len(x))
    xmax = max(x.max() for x, _ in pts if len(x))
    ymin = min(y.min() for _, y in pts if len(y))
    ymax = max(y.max() for _, y in pts if len(y))
    if xmax == xmin:
        xmax = xmin + 1
    pad = (ymax - ymin) * 0.05 or 0.5
    ymin, ymax = ymin - pad, ymax + pad
    W, H = width - left - right, height - top - bottom

    def px(x, y):
        return left + (x - xmin) / (xmax - xmin) * W, top + (ymax - y) / (ymax - ymin) * H

    for k in range(6):  # horizontal grid and labels
        yv = ymin + (ymax - ymin) * k / 5
        _, yp = px(xmin, yv)
        _line(img, left, yp, left + W, yp, GREY)
        _text(img, 4, int(yp) - 5, f"{yv:.3g}")
    _line(img, left, top, left, top + H, BLACK)
    _line(img, left, top + H, left + W, top + H, BLACK)
    _text(img, left, top + H + 10, f"{xmin:.0f}")
    label = f"{xmax:.0f}"
    _text(img, left + W - 8 * len(label), top + H + 10, label)
    for (x, y), color in zip(pts, COLORS):
        p = [px(a, b) for a, b in zip(x, y)]
        for (a0, b0), (a1, b1) in zip(p, p[1:]):
            _line(img, a0, b0, a1, b1, color)
        if len(p) == 1:
            _line(img, p[0][0] - 2, p[0][1], p[0][0] + 2, p[0][1], color)
    return png_bytes(img)


def _box(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    h, w = img.shape[:2]
    a, b = sorted((int(round(y0)), int(round(y1))))
    c, d = sorted((int(round(x0)), int(round(x1))))
    img[max(a, 0):min(b, h), max(c, 0):min(d, w)] = color


def text_width(s: str, scale: int = 2) -> int:
    return 4 * scale * len(s) - scale if s else 0


def bar_chart(panels: Sequence[tuple[str, Sequence[tuple[str, float | None]]]], height: int = 300,
              panel_width: int | None = None) -> bytes:
    """PNG bytes of grouped bars: one panel per (title, [(label, value), ...]), side by side, each with its own
    scale from 0 to its largest value (so metrics of different units can share a picture). A label has the same
    colour in every panel, listed in a legend on top; each bar has its value written above it (None: no bar, a
    dash). Values are drawn with "%.3g" (whole numbers from 1000 to 1e7); negative values as 0-height bars."""
    bar_w, gap = 30, 14
    n_bars = max((len(bars) for _, bars in panels), default=1)
    titles = [t for t, _ in panels]
    pw = panel_width or max(150, n_bars * (bar_w + gap) + 40, *(text_width(t) + 20 for t in titles or [""]))
    width = max(pw * max(len(panels), 1), 200)
    labels: list[str] = []
    for _, bars in panels:
        for label, _ in bars:
            if label not in labels:
                labels.append(label)
    color = {label: COLORS[i % len(COLORS)] for i, label in enumerate(labels)}
    # the legend: colour boxes and labels, wrapped over as many rows as the width needs
    rows: list[list[str]] = [[]]
    x = 10
    for label in labels:
        w = 16 + text_width(label) + 18
        if rows[-1] and x + w > width - 10:
            rows.append([])
            x = 10
        rows[-1].append(label)
        x += w
    top = 10 + 18 * len(rows) + 10
    img = np.full((height + top - 30, width, 3), WHITE, np.uint8)
    for r, row in enumerate(rows):
        x, y = 10, 10 + 18 * r
        for label in row:
            _box(img, x, y, x + 10, y + 10, color[label])
            _text(img, x + 16, y, label.upper())
            x += 16 + text_width(label) + 18
    bottom = img.shape[0] - 30  # the axis; panel titles below it
    plot_top = top + 22  # room for the value labels of the tallest bar
    for p, (title, bars) in enumerate(panels):
        x0 = p * pw
        _line(img, x0 + 10, bottom, x0 + pw - 10, bottom, BLACK)
        _text(img, x0 + (pw - text_width(title)) // 2, bottom + 10, title.upper())
        vals = [v for _, v in bars if v is not None and np.isfinite(v)]
        vmax = max(max(vals, default=0.0), 0.0) or 1.0
        inner = len(bars) * bar_w + (len(bars) - 1) * gap
        bx = x0 + (pw - inner) // 2
        for label, v in bars:
            if v is None or not np.isfinite(v):
                _text(img, bx + (bar_w - text_width("-")) // 2, bottom - 16, "-")
            else:
                h = max(v, 0.0) / vmax * (bottom - plot_top)
                _box(img, bx, bottom - h, bx + bar_w, bottom, color[label])
                s = f"{v:.0f}" if 1e3 <= abs(v) < 1e7 else f"{v:.3g}"
                _text(img, bx + (bar_w - text_width(s)) // 2, int(bottom - h) - 14, s)
            bx += bar_w + gap
        if p:
            _line(img, x0, top, x0, bottom + 28, GREY)
    return png_bytes(img)


def scatter_chart(series: Sequence[tuple[str, Sequence[tuple[float, float, str]]]], x_title: str, y_title: str,
                  log_x: bool = True, y_max: float | None = None, join: bool = False, width: int = 760,
                  height: int = 460) -> bytes:
    """PNG bytes of labelled points: series[i] = (name, [(x, y, point label), ...]), one colour per series (in
    a legend on top), each point's label written beside it, its points joined in the order given with `join`.
    x on a log scale by default (ticks at powers of ten), y from 0 to `y_max` (default: its largest value)."""
    pts = [(name, [(float(x), float(y), lab) for x, y, lab in p if np.isfinite(x) and np.isfinite(y)
                   and (x > 0 or not log_x)]) for name, p in series]
    img = np.full((height, width, 3), WHITE, np.uint8)
    xs = [x for _, p in pts for x, _, _ in p]
    ys = [y for _, p in pts for _, y, _ in p]
    legend_h = 10 + 18 * len(pts)
    left, right, top, bottom = 60, 30, legend_h + 14, 50
    for i, (name, _) in enumerate(pts):
        _box(img, 10, 10 + 18 * i, 20, 20 + 18 * i, COLORS[i % len(COLORS)])
        _text(img, 26, 10 + 18 * i, name.upper())
    if not xs:
        return png_bytes(img)
    fx = np.log10 if log_x else (lambda v: v)
    x0, x1 = float(fx(min(xs))), float(fx(max(xs)))
    if log_x:
        x0, x1 = np.floor(x0), np.ceil(x1)
    if x1 == x0:
        x1 = x0 + 1
    y1 = y_max if y_max else max(max(ys), 1e-9) * 1.08
    W, H = width - left - right, height - top - bottom

    def px(x, y):
        return left + (fx(x) - x0) / (x1 - x0) * W, top + (y1 - y) / y1 * H

    for k in range(6):
        yv = y1 * k / 5
        _, yp = px(10 ** x0 if log_x else x0, yv)
        _line(img, left, yp, left + W, yp, GREY)
        _text(img, 4, int(yp) - 5, f"{yv:.3g}")
    ticks = [10 ** e for e in range(int(x0), int(x1) + 1)] if log_x else list(np.linspace(x0, x1, 6))
    for t in ticks:
        xp, _ = px(t, 0)
        _line(img, xp, top + H, xp, top + H + 5, BLACK)
        s = f"{t:.0e}".replace("e+0", "e") if log_x else f"{t:.3g}"
        _text(img, int(xp) - text_width(s) // 2, top + H + 10, s)
    _line(img, left, top, left, top + H, BLACK)
    _line(img, left, top + H, left + W, top + H, BLACK)
    _text(img, left + (W - text_width(x_title)) // 2, top + H + 30, x_title.upper())
    _text(img, left + 4, top - 12, y_title.upper())
    for i, (_, p) in enumerate(pts):
        color = COLORS[i % len(COLORS)]
        xy = [px(x, y) for x, y, _ in p]
        for (a0, b0), (a1, b1) in zip(xy, xy[1:]) if join else ():
            _line(img, a0, b0, a1, b1, color)
        for (a, b), (_, _, lab) in zip(xy, p):
            _box(img, a - 3, b - 3, a + 4, b + 4, color)
            if lab:
                _text(img, int(a) + 6, int(b) - 12, lab.upper(), color=color)
    return png_bytes(img)
