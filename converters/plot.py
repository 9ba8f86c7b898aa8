"""Loss curves as PNG without a plotting library: an RGB canvas, straight lines, a 3x5 digit font, and the
PNG container written with zlib and struct (8-bit RGB, no filters)."""
from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

# 3x5 bitmaps, row by row: enough for tick labels written with "%.3g"
_FONT = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
         "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
         "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
         "+": "000010111010000", "e": "000111111100111", " ": "000000000000000"}
WHITE, GREY, BLACK = (255, 255, 255), (220, 220, 220), (0, 0, 0)
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44))


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
    for ch in s:
        bits = _FONT.get(ch, _FONT[" "])
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
