"""Kernels of explicit-memory encoding (Memory3 references) and of memory-attention bookkeeping.

References are processed *packed*: the tokens of B references are the rows of one matrix (no padding),
reference b owning rows sum(lengths[:b]) .. sum(lengths[:b+1]) - 1, so the projections and the MLP are single
GEMMs over every token of the batch while attention stays within each reference. Row vectors hold the heads
side by side (q [N, n_heads*hd], k/v [N, n_kv*hd]); query head h reads kv head h // n_rep.
Attention inside the references pads them to [B, T] (T = the longest) and runs Q K^T and P V as BLAS GEMMs
per reference and head, around compiled fp32 softmaxes: compute-bound work that BLAS does ~5x faster than
compiled loops. These kernels run outside the decode loop and allocate their own (per-call) scratch.

The math is the one of `converters.model.encode_memory`, `memory_scores` and `select_tokens`.
"""
import numpy as np
from numba import float32, njit, prange

from .expf import exp_softmax
from .matmul import FASTMATH
from .rope import rope


@njit(parallel=True, cache=True, error_model="numpy")
def rope_rows_at(x, hd, cos, sin, positions):
    """Rotate row i of x [n, n_heads*hd] in place for position positions[i] (an integer array [n])."""
    for i in prange(x.shape[0]):
        p = positions[i]
        rope(x[i], hd, cos[p], sin[p])


@njit(parallel=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def softmax_causal_refs(s, lengths, scale):
    """In place on s [B, n_kv, n_rep, T, T] (the q.k of every query head and token against the keys of its
    reference): row i of reference b becomes softmax(scale * row[:i + 1]) followed by zeros; rows at or
    beyond lengths[b] (padding) become zeros. fp32."""
    B, G, R, T = s.shape[0], s.shape[1], s.shape[2], s.shape[3]
    sc = float32(scale)
    for it in prange(B * G):
        b = it // G
        g = it - b * G
        n = lengths[b]
        for r in range(R):
            for i in range(T):
                row = s[b, g, r, i]
                m = i + 1 if i < n else 0
                mx = float32(-np.inf)
                for j in range(m):
                    x = row[j] * sc
                    row[j] = x
                    mx = max(mx, x)
                total = float32(0.0)
                for j in range(m):
                    e = exp_softmax(row[j] - mx)
                    row[j] = e
                    total += e
                inv = float32(1.0) / total if m > 0 else float32(0.0)
                for j in range(m):
                    row[j] *= inv
                for j in range(m, T):
                    row[j] = float32(0.0)


@njit(parallel=True, cache=True, error_model="numpy")
def first_copies(x, lengths, rep):
    """rep [B, >= T] (int64): rep[b, j] is the first position j' <= j of reference b whose row of the packed
    x [N, w] equals row j bit for bit (reference b: rows sum(lengths[:b]) ..)."""
    B = lengths.shape[0]
    starts = np.zeros(B, np.int64)
    for b in range(1, B):
        starts[b] = starts[b - 1] + lengths[b - 1]
    w = x.shape[1]
    for b in prange(B):
        s0 = starts[b]
        for j in range(lengths[b]):
            rep[b, j] = j
            for j2 in range(j):
                d = 0
                while d < w and x[s0 + j, d] == x[s0 + j2, d]:
                    d += 1
                if d == w:
                    rep[b, j] = j2
                    break


@njit(parallel=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def selection_softmax(s, rep, lengths, scale, scores):
    """Memory3 selection scores from raw scores s [B, n_kv, n_rep, T, T] (the pre-RoPE q.k of each query
    head of group g and token i against key j of the same reference; overwritten).

    scores [B, n_kv, T] (float64): for text tokens j (1 <= j < n = lengths[b]) the sum over r and text
    queries i (1 <= i < n) of softmax over j' in 1..n-1 of scale * s[b, g, r, i, j'], taken at j; -inf at j = 0
    and j >= n. Softmax in fp32, sums in float64.

    rep [B, T] (from `first_copies` of the layer input): token j whose input equals that of an earlier token
    rep[b, j] has the same key, hence mathematically the same score; it gets that score bit for bit, so the
    exact tie goes to the lower position as the definition says, not to whichever copy GEMM rounding favoured
    (repeated tokens at layer 0, where the input is the token's embedding alone)."""
    B, G, R, T = s.shape[0], s.shape[1], s.shape[2], s.shape[3]
    sc = float32(scale)
    for it in prange(B * G):
        b = it // G
        g = it - b * G
        n = lengths[b]
        acc = scores[b, g]
        for j in range(T):
            acc[j] = -np.inf if (j == 0 or j >= n) else 0.0
        for r in range(R):
            for i in range(1, n):
                row = s[b, g, r, i]
                mx = float32(-np.inf)
                for j in range(1, n):
                    x = row[j] * sc
                    row[j] = x
                    mx = max(mx, x)
                total = float32(0.0)
                for j in range(1, n):
                    e = exp_softmax(row[j] - mx)
                    row[j] = e
                    total += e
                inv = 1.0 / np.float64(total)
                for j in range(1, n):
                    acc[j] += row[j] * inv
        for j in range(2, n):
            if rep[b, j] >= 1:
                acc[j] = acc[rep[b, j]]


def _padded(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Packed rows x [N, w] as [B, T, w] with zero rows where valid [B, T] is False."""
    B, T = valid.shape
    if x.shape[0] == B * T:  # every reference has the longest length: nothing to pad
        return x.reshape((B, T) + x.shape[1:])
    out = np.zeros(valid.shape + x.shape[1:], x.dtype)
    r0 = 0
    for b in range(B):
        n = int(valid[b].sum())
        out[b, :n] = x[r0:r0 + n]
        r0 += n
    return out


def _valid(lengths: np.ndarray) -> np.ndarray:
    return np.arange(int(lengths.max()))[None, :] < lengths[:, None]


def _raw_scores(q: np.ndarray, k: np.ndarray, valid: np.ndarray, hd: int) -> np.ndarray:
    """q.k of every reference's query heads against its keys: s [B, n_kv, n_rep, T, T] (BLAS, one GEMM per
    reference and query head; padding rows are zeros)."""
    B, T = valid.shape
    G = k.shape[1] // hd
    R = q.shape[1] // k.shape[1]
    qp = _padded(q, valid).reshape(B, T, G, R, hd).transpose(0, 2, 3, 1, 4)  # [B, G, R, T, hd], a view
    kt = _padded(k, valid).reshape(B, T, G, hd).transpose(0, 2, 3, 1)[:, :, None]  # [B, G, 1, hd, T]
    return np.matmul(qp, kt)


def selection_scores(q, k, lengths, hd, scale, x=None) -> np.ndarray:
    """Memory3 token-selection scores [B, n_kv, T] (float64, T = max(lengths)) of packed references from one
    layer's q [N, n_heads*hd] and k [N, n_kv*hd] taken BEFORE RoPE. For kv head g and text token j (1 <= j < n):

        sum over the query heads h of group g (h // n_rep == g) and text tokens i (1 <= i < n) of
        softmax over text tokens j' of (q[i, h] . k[j', g] * scale), taken at j' = j

    (no causal mask, no positional encoding; <ref> at row 0 is neither query nor key), -inf at j = 0 and
    j >= n: `converters.model.memory_scores`. Dot products by BLAS GEMMs, softmax compiled (fp32).
    x [N, w] (optional): the rows q and k were projected from; tokens with equal rows get bitwise equal
    scores (exact ties, see `selection_softmax`).
    """
    lengths = np.asarray(lengths, np.int64)
    valid = _valid(lengths)
    B, T = valid.shape
    rep = np.empty((B, T), np.int64)
    if x is None:
        rep[:] = np.arange(T)
    else:
        first_copies(x, lengths, rep)
    scores = np.empty((B, k.shape[1] // hd, T), np.float64)
    selection_softmax(_raw_scores(q, k, valid, hd), rep, lengths, scale, scores)
    return scores


def reference_attention(q, k, v, lengths, hd, scale, out) -> None:
    """Causal self-attention inside each packed reference (no past, no prefix): query i of reference b sees
    keys 0..i of the same reference. q [N, n_heads*hd] and k [N, n_kv*hd] rotated, v [N, n_kv*hd];
    writes out [N, n_heads*hd]. Q K^T and P V are BLAS GEMMs per reference and head, the softmax compiled."""
    lengths = np.asarray(lengths, np.int64)
    valid = _valid(lengths)
    B, T = valid.shape
    G = k.shape[1] // hd
    s = _raw_scores(q, k, valid, hd)
    softmax_causal_refs(s, lengths, scale)
    vp = _padded(v, valid).reshape(B, T, G, hd).transpose(0, 2, 1, 3)[:, :, None]  # [B, G, 1, T, hd]
    o = np.matmul(s, vp)  # [B, G, R, T, hd]
    o = o.transpose(0, 3, 1, 2, 4)  # [B, T, G, R, hd]: token-major, heads side by side
    if out.shape[0] == B * T and out.flags.c_contiguous:  # no padding: one copy, through a view of out
        out.reshape(o.shape)[...] = o
    else:
        out[...] = o.reshape(B, T, q.shape[1])[valid]


def select_tokens(scores: np.ndarray, lengths: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept tokens for scores [B, n_kv, T] (from `selection_scores`): positions [B, n_kv, K] int32 and
    counts [B] int32, as `converters.model.select_tokens`.

    Reference b keeps its count = min(K, lengths[b] - 1) best-scored text tokens per kv head; equal scores
    prefer the lower position; kept positions are sorted ascending in the first slots, the rest are 0.
    """
    B, G, T = scores.shape
    counts = np.minimum(K, np.asarray(lengths) - 1).astype(np.int32)
    kk = min(K, T)
    # a stable sort of the negated scores: descending, equal scores in position order; -inf (not text) last
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :kk]
    valid = np.arange(kk)[None, None, :] < counts[:, None, None]
    order = np.sort(np.where(valid, order, T), axis=-1)
    pos = np.zeros((B, G, K), np.int32)
    pos[..., :kk] = np.where(valid, order, 0)
    return pos, counts


@njit(cache=True, error_model="numpy")
def accumulate_prefix_attention(att, totals, starts, end, n_rep, mass):
    """Add one layer's softmax weights on the prefix slots to mass [>= end]: for every query head h (kv head
    g = h // n_rep) mass[t] += att[h, t] / totals[h] for t in [starts[g], end).

    att [n_heads, capacity] holds the unnormalised exp-scores left by `attention_group` and totals [n_heads]
    their sums, so att / totals are exactly the weights the attention used. Costs n_heads * (prefix size)."""
    for h in range(att.shape[0]):
        s = starts[h // n_rep]
        if s < end:
            inv = 1.0 / np.float64(totals[h])
            for t in range(s, end):
                mass[t] += np.float64(att[h, t]) * inv
