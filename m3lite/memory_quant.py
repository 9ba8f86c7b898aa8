"""Quantization of memory vectors (keys and values of explicit memories), one scale per vector.

A "vector" is the last axis of the array (the head dimension); leading axes are free. Modes:

- ``f32``  stored as little-endian float32, exact.
- ``f16``  stored as float16: relative error <= 2**-11 in the normal range, absolute <= 2**-25 below it.
- ``int8`` symmetric, one float16 scale per vector, values in [-127, 127].
- ``int4`` symmetric, one float16 scale per vector, values in [-7, 7], two per byte (head dim must be even):
  element 2i in the low nibble, 2i+1 in the high nibble, each stored as value + 8.

Error bound of int8/int4 (``qmax`` = 127 or 7)::

    |x - dequantize(quantize(x))| <= scale / 2 + 2**-23 * |x|      elementwise
    max|x| / qmax <= scale <= max|x| / qmax * (1 + 2**-10)         (scale as stored, float16)

The scale is max|x| / qmax rounded *up* to the next float16 (never down), so x / scale never leaves
[-qmax, qmax] and no value is clipped; the 2**-23 term covers float32 arithmetic. A vector of zeros has
scale 0 and comes back as zeros. Inputs must be finite and small enough for float16 (max|x| <= 65504 for
f16, <= 65504 * qmax for int8/int4), else `BadArgument`.
"""
from __future__ import annotations

import numpy as np

from .errors import BadArgument

MODES = ("f32", "f16", "int8", "int4", "pq")  # pq: product quantization with the bank's codebooks (m3lite.pq)
QMAX = {"int8": 127, "int4": 7}
_F16_MAX = float(np.finfo(np.float16).max)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise BadArgument(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")


def storage_dtype(mode: str) -> np.dtype:
    """dtype of the stored values of one mode."""
    _check_mode(mode)
    return np.dtype({"f32": "<f4", "f16": "<f2", "int8": "i1", "int4": "u1", "pq": "u1"}[mode])


def packed_dim(head_dim: int, mode: str) -> int:
    """Number of stored elements per vector of `head_dim` values."""
    _check_mode(mode)
    if mode == "pq":
        from .pq import n_codes

        return n_codes(head_dim)
    if mode == "int4":
        if head_dim % 2:
            raise BadArgument(f"int4 quantization needs an even head dimension, got {head_dim}")
        return head_dim // 2
    return head_dim


def has_scales(mode: str) -> bool:
    _check_mode(mode)
    return mode in QMAX


def bytes_per_vector(head_dim: int, mode: str) -> int:
    """Bytes one vector takes, its scale included."""
    return packed_dim(head_dim, mode) * storage_dtype(mode).itemsize + (2 if has_scales(mode) else 0)


def _scales(x: np.ndarray, qmax: int) -> np.ndarray:
    amax = np.max(np.abs(x), axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    want = amax.astype(np.float64) / qmax
    if np.any(want > _F16_MAX):
        raise BadArgument(f"values up to {float(np.max(amax)):.3g} are too large for a float16 scale")
    s = want.astype(np.float16)
    # round up, never down: keeps |x / s| <= qmax so nothing is clipped
    low = s.astype(np.float64) < want
    if np.any(low):
        s[low] = np.nextafter(s[low], np.float16(np.inf))
    return s


def quantize(x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantize `x` along its last axis; returns (stored values, float16 scales or None). Not pq: that needs a
    bank's codebooks (m3lite.pq.encode)."""
    _check_mode(mode)
    if mode == "pq":
        raise BadArgument("pq codes are made with a bank's codebooks: m3lite.pq.encode")
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise BadArgument("cannot quantize non-finite values (NaN or infinity)")
    if mode == "f32":
        return x.astype("<f4", copy=True), None
    if mode == "f16":
        if x.size and float(np.max(np.abs(x))) > _F16_MAX:
            raise BadArgument(f"values beyond {_F16_MAX} do not fit float16; use f32, int8 or int4")
        return x.astype("<f2"), None
    qmax = QMAX[mode]
    hd = x.shape[-1]
    packed_dim(hd, mode)  # validates the head dimension
    s = _scales(x, qmax)
    s32 = s.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(s32 > 0, x / np.where(s32 > 0, s32, 1), 0)
    q = np.clip(np.rint(r), -qmax, qmax).astype(np.int8)
    if mode == "int8":
        return q, s
    u = (q + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8), s


def dequantize(q: tuple[np.ndarray, np.ndarray | None], mode: str) -> np.ndarray:
    """Inverse of `quantize`: `q` is its (values, scales) pair; returns float32 of the original shape."""
    _check_mode(mode)
    if mode == "pq":
        raise BadArgument("pq codes are decoded with a bank's codebooks: m3lite.pq.decode")
    data, scales = q
    data = np.asarray(data)
    if mode in ("f32", "f16"):
        return data.astype(np.float32)
    if scales is None:
        raise BadArgument(f"{mode} data needs its scales")
    s = np.asarray(scales).astype(np.float32)[..., None]
    if mode == "int8":
        return data.astype(np.float32) * s
    u = data.astype(np.uint8)
    out = np.empty(u.shape[:-1] + (u.shape[-1] * 2,), np.float32)
    out[..., 0::2] = (u & 0x0F).astype(np.float32) - 8
    out[..., 1::2] = (u >> 4).astype(np.float32) - 8
    return out * s
