"""Rotary position embedding, "rotate half" convention.

For each head of size hd, with x1 = x[:hd/2], x2 = x[hd/2:] and angle = pos * theta^(-2i/hd):
out = [x1*cos - x2*sin, x2*cos + x1*sin].
"""
import numpy as np
from numba import njit, prange


def rope_inv_freq(hd: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """RoPE inverse frequencies [hd/2], float32: theta^(-(0, 2, .., hd-2)/hd) in float64, then `scaling` applied,
    then rounded to float32, so every backend (numba, ONNX, PyTorch) rounds alike.

    scaling (ModelConfig.rope_scaling) is None, {"type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1's long-context rule: long wavelengths are
    slowed by `factor`, short ones kept, the band between blended), or {"type": "freq_factors", "factors": [hd/2]}
    (llama.cpp's rope_freqs tensor: each frequency divided by its factor).
    """
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    kind = (scaling or {}).get("type")
    if kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    elif kind == "freq_factors":
        inv = inv / np.asarray(scaling["factors"], dtype=np.float64)
    elif kind is not None:
        raise ValueError(f"unknown RoPE scaling {kind!r}")
    return inv.astype(np.float32)


def rope_tables(hd: int, theta: float, n_pos: int, scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [n_pos, hd/2] (float32) for positions 0..n_pos-1.

    Rounded exactly as the reference (converters/model.py): inv_freq from `rope_inv_freq`; angle =
    float32(position) * inv_freq in float32; cos/sin in float32.
    """
    inv_freq = rope_inv_freq(hd, theta, scaling)
    ang = np.arange(n_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.ascontiguousarray(np.cos(ang)), np.ascontiguousarray(np.sin(ang))


@njit(cache=True, error_model="numpy")
def rope(x, hd, cos, sin):
    """Rotate every head of the vector x [n_heads*hd] in place; cos/sin are one row [hd/2] of the tables."""
    half = hd // 2
    for h in range(x.shape[0] // hd):
        b = h * hd
        for i in range(half):
            x1 = x[b + i]
            x2 = x[b + half + i]
            c = cos[i]
            s = sin[i]
            x[b + i] = x1 * c - x2 * s
            x[b + half + i] = x2 * c + x1 * s


@njit(parallel=True, cache=True, error_model="numpy")
def rope_rows(x, hd, cos, sin, pos0):
    """Rotate row i of x [n, n_heads*hd] in place for position pos0 + i."""
    for i in prange(x.shape[0]):
        rope(x[i], hd, cos[pos0 + i], sin[pos0 + i])
