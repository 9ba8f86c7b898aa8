"""RMSNorm: x / sqrt(mean(x^2) + eps) * w, in fp32."""
import numpy as np
from numba import float32, njit, prange


@njit(cache=True, error_model="numpy")
def rmsnorm(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w for a vector x (writes into out, which may be x)."""
    n = x.shape[0]
    ss = 0.0  # fp64 accumulator: exact enough that summation order does not matter
    for i in range(n):
        xi = np.float64(x[i])
        ss += xi * xi
    r = float32(1.0 / np.sqrt(np.float32(ss / n) + np.float32(eps)))
    for i in range(n):
        out[i] = (x[i] * r) * w[i]


@njit(parallel=True, cache=True, error_model="numpy")
def rmsnorm_rows(x, w, eps, out):
    """rmsnorm applied to each row of x [n, dim] (writes into out [n, dim])."""
    for i in prange(x.shape[0]):
        rmsnorm(x[i], w, eps, out[i])
