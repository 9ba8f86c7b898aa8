"""Int8 matrix kernels in llama.cpp's Q8_0 layout: blocks of QK = 32 along the input dimension, one scale each.

A weight matrix W [n, k] is stored as int8 values qs [n, kp] (kp = 32 * ceil(k / 32), zero padded) and scales
ws [n, kp / 32], with W[r, j] ~ ws[r, j // 32] * qs[r, j]. The values come from llama.cpp's recipe (see
`quantize_blocks`), so a GGUF Q8_0 export holds the same numbers.

Activations are quantized the same way, once per matmul (`quantize_act`): per block of 32, scale
d = max|x| / 127 and values round(x / d) in [-127, 127], kept widened to int16 so the weight rows are the only
thing sign-extended in the inner loop. A row dot product is then, per block, an exact integer dot product of
32 int8 pairs (int32 accumulation) times the two scales: `_dot_q8`, written in LLVM IR because numba widens
every integer product to int64 and LLVM then leaves the loop scalar. On AVX2 the block is two
vpmovsxbw + two vpmaddwd (int16 pairs -> int32), two vcvtdq2ps and two vfmadd into 16 float lanes that are
summed once per row, the shape of llama.cpp's ggml_vec_dot_q8_0_q8_0.

Prefill runs the same function (int8 weights x int8 activations) as fp32 GEMMs: `fake_quantize_rows` rounds the
activations exactly as `quantize_act`, and `matmul_q8` dequantizes the weights tile by tile into an fp32 buffer
that stays in cache for a BLAS GEMM (3.7x faster here than integer dot products per output, numba over 2 cores).
"""
import numpy as np
from llvmlite import ir
from numba import float32, int16, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import BadArgument
from .matmul import FASTMATH, dot, silu

QK = 32  # values per block
QMAX = 127

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _lanes(idx):
    return ir.Constant(_vec(_I32, len(idx)), list(idx))


@intrinsic
def _dot_q8(typingctx, w, ws, xq, xs):
    """sum over blocks b < ws.shape[0] of ws[b] * xs[b] * (integer dot of w[32b:32b+32] and xq[32b:32b+32]).

    w: int8 row, ws: float32 scales, xq: int16 activation values (in [-127, 127]), xs: float32 scales, all 1-D
    C-contiguous. No bounds checks: the callers check w.shape[0] and xq.shape[0] >= 32 * ws.shape[0].
    """
    for a, dt in ((w, types.int8), (ws, types.float32), (xq, types.int16), (xs, types.float32)):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dt):
            return None

    def codegen(context, builder, sig, args):
        wa, wsa, xqa, xsa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
        nb = builder.extract_value(wsa.shape, 0)
        acc_t = _vec(_F32, 16)
        zero = ir.Constant(acc_t, [0.0] * 16)
        entry = builder.block
        loop = builder.function.append_basic_block("q8dot.loop")
        done = builder.function.append_basic_block("q8dot.done")
        builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(_I64, 0)), loop, done)

        builder.position_at_end(loop)
        b = builder.phi(_I64)
        acc = builder.phi(acc_t)
        off = builder.mul(b, ir.Constant(_I64, QK))
        wv = builder.load(builder.bitcast(builder.gep(wa.data, [off]), _vec(ir.IntType(8), QK).as_pointer()),
                          align=1)
        xv = builder.load(builder.bitcast(builder.gep(xqa.data, [off]), _vec(ir.IntType(16), QK).as_pointer()),
                          align=2)
        # |w * x| <= 127 * 127: the products and their pair sums are exact in int32 (LLVM: pmaddwd)
        p = builder.mul(builder.sext(wv, _vec(_I32, QK)), builder.sext(xv, _vec(_I32, QK)), flags=["nsw"])
        pairs = builder.add(builder.shuffle_vector(p, p, _lanes(range(0, QK, 2))),
                            builder.shuffle_vector(p, p, _lanes(range(1, QK, 2))), flags=["nsw"])
        d = builder.fmul(builder.load(builder.gep(wsa.data, [b])), builder.load(builder.gep(xsa.data, [b])))
        dv = builder.shuffle_vector(builder.insert_element(ir.Constant(acc_t, ir.Undefined), d, ir.Constant(_I32, 0)),
                                    ir.Constant(acc_t, ir.Undefined), _lanes([0] * 16))
        nxt = builder.fadd(acc, builder.fmul(builder.sitofp(pairs, acc_t), dv, flags=["contract"]),
                           flags=["contract"])
        b1 = builder.add(b, ir.Constant(_I64, 1))
        b.add_incoming(ir.Constant(_I64, 0), entry)
        b.add_incoming(b1, loop)
        acc.add_incoming(zero, entry)
        acc.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", b1, nb), loop, done)

        builder.position_at_end(done)
        v = builder.phi(acc_t)
        v.add_incoming(zero, entry)
        v.add_incoming(nxt, loop)
        n = 16
        while n > 1:  # the 16 lanes summed as a tree, once per row
            h = n // 2
            v = builder.fadd(builder.shuffle_vector(v, v, _lanes(range(h))),
                             builder.shuffle_vector(v, v, _lanes(range(h, n))))
            n = h
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(w, ws, xq, xs), codegen


def _ptr(builder, data, offset, t):
    """A pointer to the vector type t at element `offset` of an array's data."""
    return builder.bitcast(builder.gep(data, [offset]), t.as_pointer())


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _splat(builder, value, n):
    t = _vec(value.type, n)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(t, ir.Undefined), value, ir.Constant(_I32, 0)),
                                  ir.Constant(t, ir.Undefined), _lanes([0] * n))


def _rounded_block(context, builder, xty, x, o):
    """IR for one block of 32 floats x[o:o + 32]: (d, round(x / d)) as `_block_scale` and np.rint compute them."""
    t = _vec(_F32, QK)
    v = builder.load(_ptr(builder, context.make_array(xty)(context, builder, x).data, o, t), align=4)
    amax = _call(builder, "llvm.vector.reduce.fmax.v32f32", _F32, [_call(builder, "llvm.fabs.v32f32", t, [v])])
    zero = builder.fcmp_ordered("==", amax, ir.Constant(_F32, 0.0))
    d = builder.select(zero, ir.Constant(_F32, 0.0), builder.fdiv(amax, ir.Constant(_F32, float(QMAX))))
    inv = builder.select(zero, ir.Constant(_F32, 0.0), builder.fdiv(ir.Constant(_F32, float(QMAX)), amax))
    return d, _call(builder, "llvm.rint.v32f32", t, [builder.fmul(v, _splat(builder, inv, QK))])


def _arrays(*pairs):
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dt for a, dt in pairs)


@intrinsic
def _quantize32(typingctx, x, o, xq, xs, b):
    """One full block, vectorized: xq[o:o + 32] = round(x[o:o + 32] / d) (int16), xs[b] = d."""
    if not _arrays((x, types.float32), (xq, types.int16), (xs, types.float32)):
        return None

    def codegen(context, builder, sig, args):
        x, o, xq, xs, b = args
        o = context.cast(builder, o, sig.args[1], types.int64)
        d, r = _rounded_block(context, builder, sig.args[0], x, o)
        xqd = context.make_array(sig.args[2])(context, builder, xq).data
        builder.store(builder.fptosi(r, _vec(ir.IntType(16), QK)), _ptr(builder, xqd, o, _vec(ir.IntType(16), QK)),
                      align=2)
        b = context.cast(builder, b, sig.args[4], types.int64)
        builder.store(d, builder.gep(context.make_array(sig.args[3])(context, builder, xs).data, [b]))
        return context.get_dummy_value()

    return types.none(x, o, xq, xs, b), codegen


@intrinsic
def _fake_quantize32(typingctx, x, o, out):
    """One full block, vectorized: out[o:o + 32] = d * round(x[o:o + 32] / d)."""
    if not _arrays((x, types.float32), (out, types.float32)):
        return None

    def codegen(context, builder, sig, args):
        x, o, out = args
        o = context.cast(builder, o, sig.args[1], types.int64)
        d, r = _rounded_block(context, builder, sig.args[0], x, o)
        outd = context.make_array(sig.args[2])(context, builder, out).data
        builder.store(builder.fmul(r, _splat(builder, d, QK)), _ptr(builder, outd, o, _vec(_F32, QK)), align=4)
        return context.get_dummy_value()

    return types.none(x, o, out), codegen


@intrinsic
def _dequantize32(typingctx, w, o, d, out):
    """One full block, vectorized: out[o:o + 32] = d * w[o:o + 32] (w int8, out float32)."""
    if not _arrays((w, types.int8), (out, types.float32)):
        return None

    def codegen(context, builder, sig, args):
        w, o, d, out = args
        o = context.cast(builder, o, sig.args[1], types.int64)
        d = context.cast(builder, d, sig.args[2], types.float32)
        wd = context.make_array(sig.args[0])(context, builder, w).data
        f = builder.sitofp(builder.load(_ptr(builder, wd, o, _vec(ir.IntType(8), QK)), align=1), _vec(_F32, QK))
        outd = context.make_array(sig.args[3])(context, builder, out).data
        builder.store(builder.fmul(f, _splat(builder, d, QK)), _ptr(builder, outd, o, _vec(_F32, QK)), align=4)
        return context.get_dummy_value()

    return types.none(w, o, d, out), codegen


# ---- activations ---------------------------------------------------------------------------------------------

# Full blocks go through the vectorized intrinsics above (LLVM unrolls a 32-iteration loop into scalar code);
# the block functions below handle the last block of a row whose length is not a multiple of QK, with the same
# arithmetic.

@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def _block_scale(x, o, n):
    """(d, 1/d) of the n <= 32 values x[o:o + n]: d = max|x| / 127; (0, 0) for a block of zeros."""
    amax = float32(0.0)
    for j in range(n):
        amax = max(amax, abs(x[o + j]))
    if amax == float32(0.0):
        return float32(0.0), float32(0.0)
    return amax / float32(QMAX), float32(QMAX) / amax


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def _quantize_block(x, o, n, xq, xs, b):
    d, inv = _block_scale(x, o, n)
    xs[b] = d
    for j in range(n):
        xq[o + j] = int16(np.rint(x[o + j] * inv))
    for j in range(n, QK):
        xq[o + j] = int16(0)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def quantize_act(x, xq, xs):
    """Quantize x [k] into int8 values (stored as int16) xq [>= kp] and scales xs [>= kp / 32], block by block;
    values of the last block beyond k are zero."""
    k = x.shape[0]
    full = k // QK
    for b in range(full):
        _quantize32(x, b * QK, xq, xs, b)
    if full * QK < k:
        _quantize_block(x, full * QK, k - full * QK, xq, xs, full)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def _fake_quantize_block(x, o, n, out):
    d, inv = _block_scale(x, o, n)
    for j in range(n):
        out[o + j] = np.rint(x[o + j] * inv) * d


@njit(parallel=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def fake_quantize_rows(x, out):
    """out = the activations x [m, k] as `quantize_act` rounds them (d * round(x / d)), in fp32."""
    k = x.shape[1]
    full = k // QK
    for i in prange(x.shape[0]):
        for b in range(full):
            _fake_quantize32(x[i], b * QK, out[i])
        if full * QK < k:
            _fake_quantize_block(x[i], full * QK, k - full * QK, out[i])


# ---- matrix-vector (decode) ----------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def _check(w, ws, xq, xs):
    nb = ws.shape[ws.ndim - 1]
    if w.shape[w.ndim - 1] != nb * QK or xq.shape[0] < nb * QK or xs.shape[0] < nb or w.shape[0] != ws.shape[0]:
        raise ValueError("q8 matvec: shapes of weights, scales and activations do not match")


@njit(parallel=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def matvec_q8(w, ws, xq, xs, out):
    """out = W @ x with W = (w [n, kp] int8, ws [n, kp / 32]) and x quantized by `quantize_act`."""
    _check(w, ws, xq, xs)
    for r in prange(w.shape[0]):
        out[r] = _dot_q8(w[r], ws[r], xq, xs)


# ---- matrix-matrix (prefill, reference encoding) -------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def _dequantize_block(w, d, o, n, out):
    for j in range(n):
        out[o + j] = d * float32(w[o + j])


@njit(parallel=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def dequantize_rows(w, ws, r0, out):
    """out[i, :k] = rows r0 + i of W in fp32 (k = out.shape[1] <= kp; as many rows as out has, or fewer at the
    end of W). Returns the number of rows written."""
    n = min(out.shape[0], w.shape[0] - r0)
    k = out.shape[1]
    full = k // QK
    for i in prange(n):
        for b in range(full):
            _dequantize32(w[r0 + i], b * QK, ws[r0 + i, b], out[i])
        if full * QK < k:
            _dequantize_block(w[r0 + i], ws[r0 + i, full], full * QK, k - full * QK, out[i])
    return n


def matmul_q8(x, w, ws, out, xbuf, tilebuf):
    """out [m, n] = x [m, k] @ W.T (W = (w [n, kp], ws)) with x rounded as `quantize_act` does: the function of
    `matvec_q8` (up to the order of the fp32 sums) as fp32 BLAS GEMMs over row tiles of W dequantized into the
    flat scratch `tilebuf` (at least 8 rows of k floats; the tile is as many rows as it holds). xbuf [m, k] is
    scratch for the rounded activations."""
    k = x.shape[1]
    fake_quantize_rows(x, xbuf)
    t = tilebuf[:(tilebuf.shape[0] // k) * k].reshape(-1, k)
    for r0 in range(0, w.shape[0], t.shape[0]):
        n = dequantize_rows(w, ws, r0, t)
        np.matmul(xbuf, t[:n].T, out=out[:, r0:r0 + n])


# ---- weights (numpy; run at quantization time) ---------------------------------------------------------------

def padded(k: int) -> int:
    """The stored row length of an input dimension k: the next multiple of 32."""
    return -(-int(k) // QK) * QK


def quantize_blocks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a [..., k] along its last axis into Q8_0 blocks: values int8 [..., kp] (zero padded) and scales
    float16 [..., kp / 32], exactly as llama.cpp's quantize_row_q8_0: d = max|x| / 127 in fp32, values
    round-half-away(x * (1 / d)), stored scale float16(d).

    Error per value: |x - float16(d) * q| <= d / 2 + 127 * |float16(d) - d| <= max|x| * (1/254 + 2**-11)
    (blocks whose d is below float16's normal range, max|x| < 127 * 2**-14, lose relative precision)."""
    a = np.asarray(a, np.float32)
    if not np.isfinite(a).all():
        raise BadArgument("cannot quantize weights that are not finite (NaN or infinity)")
    k = a.shape[-1]
    kp = padded(k)
    blocks = np.zeros(a.shape[:-1] + (kp,), np.float32)
    blocks[..., :k] = a
    blocks = blocks.reshape(a.shape[:-1] + (kp // QK, QK))
    d = np.max(np.abs(blocks), axis=-1) / np.float32(QMAX)
    if d.size and float(d.max()) > float(np.finfo(np.float16).max):
        raise BadArgument(f"weights up to {float(d.max()) * QMAX:.3g} are too large for Q8_0's float16 scales")
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    v = blocks * inv[..., None]
    q = np.trunc(v + np.copysign(np.float32(0.5), v))  # C's roundf: halves away from zero
    return q.astype(np.int8).reshape(a.shape[:-1] + (kp,)), d.astype(np.float16)


def dequantize_blocks(qs: np.ndarray, scales: np.ndarray, k: int | None = None) -> np.ndarray:
    """float32 [..., k] from Q8_0 values [..., kp] and scales [..., kp / 32] (k defaults to kp)."""
    qs = np.asarray(qs)
    nb = qs.shape[-1] // QK
    w = qs.astype(np.float32).reshape(qs.shape[:-1] + (nb, QK)) * np.asarray(scales, np.float32)[..., None]
    return w.reshape(qs.shape)[..., :qs.shape[-1] if k is None else k]


# ---- the decode step's projections, fp32 or int8, on one thread's share of the rows ------------------------------
# q8 selects the weights: fp32 w (the int8 arguments are then unused placeholders) or int8 (qw, qs) with the input
# quantized beforehand (`quantize_act` into xq, xs). The branch is taken at run time, so the fp32 and int8 engines
# share one compiled decode step.

@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def rows(q8, acc, w, qw, qs, x, xq, xs, out, r0, r1):
    """out[r] = W[r] . x, or out[r] += W[r] . x with acc, for the rows r0 <= r < r1."""
    for r in range(r0, r1):
        s = _dot_q8(qw[r], qs[r], xq, xs) if q8 else dot(w[r], x)
        out[r] = out[r] + s if acc else s


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def rows_swiglu(q8, w1, w3, q1, s1, q3, s3, x, xq, xs, out, r0, r1):
    """out[r] = silu(W1[r] . x) * (W3[r] . x) for the rows r0 <= r < r1."""
    for r in range(r0, r1):
        if q8:
            out[r] = silu(_dot_q8(q1[r], s1[r], xq, xs)) * _dot_q8(q3[r], s3[r], xq, xs)
        else:
            out[r] = silu(dot(w1[r], x)) * dot(w3[r], x)
