import numpy as np
import pytest

from m3lite import memory_quant as Q
from m3lite.errors import BadArgument, M3Error


def _data(seed=0, shape=(3, 4, 5, 32)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(1e-3, 50, shape[:-1] + (1,)).astype(np.float32)
    x[0, 0, 0] = 0.0  # an all-zero vector
    x[0, 0, 1, 3] = 1e5  # an outlier: the whole vector shares its scale
    return x


@pytest.mark.parametrize("mode,qmax", [("int8", 127), ("int4", 7)])
def test_integer_modes_error_bound(mode, qmax):
    x = _data()
    q, s = Q.quantize(x, mode)
    assert q.dtype == (np.int8 if mode == "int8" else np.uint8)
    assert q.shape == x.shape[:-1] + (x.shape[-1] if mode == "int8" else x.shape[-1] // 2,)
    assert s.dtype == np.float16 and s.shape == x.shape[:-1]
    amax = np.abs(x).max(-1)
    s32 = s.astype(np.float32)
    # the scale is max|x| / qmax rounded up to float16, never down
    assert np.all(s32 >= amax / qmax)
    assert np.all(s32 <= amax / qmax * (1 + 2 ** -10) + 1e-30)
    y = Q.dequantize((q, s), mode)
    assert y.dtype == np.float32 and y.shape == x.shape
    bound = s32[..., None] / 2 + 2 ** -23 * np.abs(x)
    assert np.all(np.abs(x - y) <= bound)
    assert np.all(y[0, 0, 0] == 0)
    if mode == "int8":
        assert np.abs(q.astype(int)).max() <= 127
    else:
        lo, hi = q & 15, q >> 4
        assert lo.min() >= 1 and hi.min() >= 1  # values -7..7 stored as 1..15


def test_int4_packing_order():
    x = np.array([[7.0, -7.0, 1.0, 0.0]], np.float32)
    q, s = Q.quantize(x, "int4")
    assert float(s[0]) == 1.0
    assert q.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]]
    assert Q.dequantize((q, s), "int4").tolist() == x.tolist()


def test_int4_needs_even_head_dim():
    with pytest.raises(BadArgument):
        Q.quantize(np.ones((2, 5), np.float32), "int4")


def test_float_modes():
    x = _data(1)
    q, s = Q.quantize(x, "f32")
    assert s is None and q.dtype == np.float32 and np.array_equal(Q.dequantize((q, s), "f32"), x)
    x[0, 0, 1, 3] = 100.0
    q, s = Q.quantize(x, "f16")
    assert s is None and q.dtype == np.float16
    y = Q.dequantize((q, s), "f16")
    assert np.all(np.abs(x - y) <= np.maximum(np.abs(x) * 2 ** -11, 2 ** -25))


def test_small_and_tiny_values():
    x = np.array([[1e-9, -3e-10, 0, 2e-9], [1e-30, 0, 0, 0]], np.float32)
    for mode in ("int8", "int4"):
        q, s = Q.quantize(x, mode)
        y = Q.dequantize((q, s), mode)
        assert np.all(np.abs(x - y) <= s.astype(np.float32)[:, None] / 2 + 1e-38)


def test_bad_input():
    for bad in (np.array([[np.nan, 1.0]]), np.array([[np.inf, 1.0]])):
        with pytest.raises(M3Error):
            Q.quantize(bad, "int8")
    with pytest.raises(M3Error):
        Q.quantize(np.array([[1e5, 1.0]]), "f16")
    with pytest.raises(M3Error):
        Q.quantize(np.ones((1, 4)), "int3")


def test_sizes():
    assert Q.bytes_per_vector(64, "f32") == 256
    assert Q.bytes_per_vector(64, "f16") == 128
    assert Q.bytes_per_vector(64, "int8") == 66
    assert Q.bytes_per_vector(64, "int4") == 34
