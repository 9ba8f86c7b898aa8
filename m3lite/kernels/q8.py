"""Int8 matrix kernels in llama.cpp's Q8_0 layout: blocks of QK = 32 along the input dimension, one scale each.

A weight matrix W [n, k] is stored as int8 values qs [n, kp] (kp = 32 * ceil(k / 32), zero padded) and scales
ws [n, kp / 32], with W[r, j] ~ ws[r, j // 32] * qs[r, j]. The values come from llama.cpp's recipe (see
`quantize_blocks`), so a GGUF Q8_0 export holds the same numbers.

Activations stay fp32: only the weights are int8. Rounding the activations to int8 too (llama.cpp's
q8_0 x q8_0 dot, which this file did until issue 11) compounded over SmolLM2's 30 layers: its logits kept a
correlation of 0.998 with fp32 but the first greedy token changed, while int8 weights alone keep 0.9995 and the
answer. Decode is bound by the bytes of the weights, not by the arithmetic, so the fp32 products cost nothing
measurable: `_dot_q8f` (LLVM IR; numba leaves a 32-iteration loop scalar) converts a block of 32 int8 weights to
fp32 in registers, multiplies it with the activations and adds it, times the block's scale, into 16 lanes that
are summed once per row.

Prefill runs the same function as fp32 GEMMs: `matmul_q8` dequantizes the weights tile by tile into an fp32
buffer that stays in cache for a BLAS GEMM.
"""
import numpy as np
from llvmlite import ir
from numba import float32, njit, prange, types
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
def _dot_q8f(typingctx, w, ws, x):
    """sum over blocks b < ws.shape[0] of ws[b] * (w[32b:32b+32] . x[32b:32b+32]), w int8, ws and x float32, all
    1-D C-contiguous. No bounds checks: the caller passes x with at least 32 * ws.shape[0] values."""
    for a, dt in ((w, types.int8), (ws, types.float32), (x, types.float32)):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dt):
            return None

    def codegen(context, builder, sig, args):
        wa, wsa, xa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
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
        wv = builder.load(_ptr(builder, wa.data, off, _vec(ir.IntType(8), QK)), align=1)
        xv = builder.load(_ptr(builder, xa.data, off, _vec(_F32, QK)), align=4)
        p = builder.fmul(builder.sitofp(wv, _vec(_F32, QK)), xv, flags=["fast"])
        half = builder.fadd(builder.shuffle_vector(p, p, _lanes(range(16))),
                            builder.shuffle_vector(p, p, _lanes(range(16, QK))), flags=["fast"])
        d = _splat(builder, builder.load(builder.gep(wsa.data, [b])), 16)
        nxt = builder.fadd(acc, builder.fmul(half, d, flags=["fast"]), flags=["fast"])
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

    return types.float32(w, ws, x), codegen


def _ptr(builder, data, offset, t):
    """A pointer to the vector type t at element `offset` of an array's data."""
    return builder.bitcast(builder.gep(data, [offset]), t.as_pointer())


def _splat(builder, value, n):
    t = _vec(value.type, n)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(t, ir.Undefined), value, ir.Constant(_I32, 0)),
                                  ir.Constant(t, ir.Undefined), _lanes([0] * n))


def _arrays(*pairs):
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dt for a, dt in pairs)


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


# ---- matrix-vector (decode) ----------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def dot_q8f(w, ws, x):
    """W[r] . x for one int8 row (w [kp] int8, ws [kp / 32] float32 scales) and fp32 activations x [k], k <= kp
    (w is zero past k)."""
    k = x.shape[0]
    full = k // QK
    acc = _dot_q8f(w[:full * QK], ws[:full], x[:full * QK])
    if full * QK < k:
        t = float32(0.0)
        for j in range(full * QK, k):
            t += float32(w[j]) * x[j]
        acc += t * ws[full]
    return acc


@njit(parallel=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def matvec_q8(w, ws, x, out):
    """out = W @ x with W = (w [n, kp] int8, ws [n, kp / 32]) and fp32 x [k]."""
    if w.shape[1] != ws.shape[1] * QK or x.shape[0] > w.shape[1] or w.shape[0] != ws.shape[0]:
        raise ValueError("q8 matvec: shapes of weights, scales and activations do not match")
    for r in prange(w.shape[0]):
        out[r] = dot_q8f(w[r], ws[r], x)


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


def matmul_q8(x, w, ws, out, tilebuf):
    """out [m, n] = x [m, k] @ W.T (W = (w [n, kp], ws)): the function of `matvec_q8` (up to the order of the
    fp32 sums) as fp32 BLAS GEMMs over row tiles of W dequantized into the flat scratch `tilebuf` (at least 8
    rows of k floats; the tile is as many rows as it holds)."""
    k = x.shape[1]
    t = tilebuf[:(tilebuf.shape[0] // k) * k].reshape(-1, k)
    for r0 in range(0, w.shape[0], t.shape[0]):
        n = dequantize_rows(w, ws, r0, t)
        np.matmul(x, t[:n].T, out=out[:, r0:r0 + n])


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
# q8 selects the weights: fp32 w (the int8 arguments are then unused placeholders) or int8 (qw, qs). The branch
# is taken at run time, so the fp32 and int8 engines share one compiled decode step.

@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def rows(q8, acc, w, qw, qs, x, out, r0, r1):
    """out[r] = W[r] . x, or out[r] += W[r] . x with acc, for the rows r0 <= r < r1."""
    for r in range(r0, r1):
        s = dot_q8f(qw[r], qs[r], x) if q8 else dot(w[r], x)
        out[r] = out[r] + s if acc else s


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def rows_swiglu(q8, w1, w3, q1, s1, q3, s3, x, out, r0, r1):
    """out[r] = silu(W1[r] . x) * (W3[r] . x) for the rows r0 <= r < r1."""
    for r in range(r0, r1):
        if q8:
            out[r] = silu(dot_q8f(q1[r], s1[r], x)) * dot_q8f(q3[r], s3[r], x)
        else:
            out[r] = silu(dot(w1[r], x)) * dot(w3[r], x)
