"""An adapter's merge gives the same bits on every CPU (no BLAS product, whose summation order is the CPU's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from m3lite.adapter import Adapter


def _adapter(a: np.ndarray, b: np.ndarray, alpha: float) -> Adapter:
    return Adapter(Path("x.safetensors"), {"alpha": alpha, "rank": a.shape[0]}, {("wq", 0): (a, b)})


def test_delta_is_exact_and_independent_of_the_order_of_its_terms():
    """Float16 values in [0.5, 1) make each rank-1 term exact with 22 bits and their sum exact in float64 but not
    in float32: the merged update must be the exact sum rounded once (a float32 BLAS product is not, in most
    elements) and must not change when the rank components are listed in another order."""
    rng = np.random.default_rng(0)
    rank, n_out, n_in = 16, 48, 40

    def halves(shape):
        return (rng.uniform(0.5, 1.0, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float16).astype(np.float32)

    a, b = halves((rank, n_in)), halves((n_out, rank))
    exact = (b.astype(np.float64) @ a.astype(np.float64)) * 2.0  # exact here: 16 terms of 22 bits, close exponents
    d = _adapter(a, b, alpha=2.0 * rank).delta("wq", 0)
    assert d.dtype == np.float32
    assert np.array_equal(d, exact.astype(np.float32))
    assert not np.array_equal(d, (b @ a) * np.float32(2.0))  # what float32 BLAS gives: last bits differ
    perm = rng.permutation(rank)
    assert np.array_equal(_adapter(a[perm], b[:, perm], alpha=2.0 * rank).delta("wq", 0), d)
    assert _adapter(a, b, alpha=1.0).delta("wk", 0) is None
