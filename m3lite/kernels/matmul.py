"""fp32 matrix-vector kernels for the decode hot loop (weights in [out, in] layout, rows contiguous).

Decode is bandwidth-bound: each weight row is read once per token as one contiguous dot product, and
rows are split across threads with prange. Measured on a 2-core AVX2 machine, one row per iteration is as
fast as unrolling 2 or 4 rows that share x (LLVM already keeps several vector accumulators per dot).
"""
import numpy as np
from numba import float32, njit, prange

from .expf import FASTMATH, exp_softmax  # FASTMATH: vectorized reductions + FMA; NaN/inf semantics stay exact


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def dot(a, b):
    """fp32 dot product of two vectors of equal length."""
    s = float32(0.0)
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def silu(g):
    """g * sigmoid(g) in fp32 with the vectorizable exp (within ~3e-7 relative; no overflow: silu(-200) = -0)."""
    e = exp_softmax(-abs(g))  # exp(-|g|) in (0, 1]
    inv = float32(1.0) / (float32(1.0) + e)
    return g * inv if g >= float32(0.0) else g * (e * inv)


@njit(parallel=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def silu_mul(a, b, out):
    """out = silu(a) * b elementwise on [n, f] blocks (prefill, reference encoding); out may alias a or b.

    Each row goes through a private buffer: LLVM vectorizes a loop only when its runtime check finds that the
    output does not overlap the inputs, so writing in place directly would run the scalar loop (~8x slower)."""
    n, f = a.shape
    for blk in prange((n + 15) // 16):
        tmp = np.empty(f, np.float32)
        for i in range(blk * 16, min(n, blk * 16 + 16)):
            ai = a[i]
            bi = b[i]
            for j in range(f):
                tmp[j] = silu(ai[j]) * bi[j]
            oi = out[i]
            for j in range(f):
                oi[j] = tmp[j]
