"""Causal multi-head attention over the KV cache, with grouped-query heads.

The cache of one layer is k_cache/v_cache [n_kv, capacity, hd]. The keys of a query at kv head g are one
contiguous slot range [starts[g], end): the engine keeps explicit-memory keys right-aligned in a prefix region
just before the context, so a memory layer simply starts earlier (starts[g] < prefix_capacity, per kv head)
and every memory key is visible to every query, while causality only concerns context slots.
Query head h reads kv head h // n_rep.
"""
import numpy as np
from numba import float32, njit

from .expf import exp_softmax
from .matmul import FASTMATH, dot
from .rope import rope


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def _attend(q, kc, vc, start, end, scale, att, out):
    """One query vector q [hd] against keys/values kc/vc [capacity, hd] in slots [start, end); writes out [hd].

    Leaves the unnormalised softmax terms exp(s_t - max) in att[start:end] and returns their sum, so the
    attention weights are att[t] / total."""
    hd = q.shape[0]
    sc = float32(scale)
    # scores, 4 keys per pass over q
    t = start
    while t + 4 <= end:
        k0 = kc[t]
        k1 = kc[t + 1]
        k2 = kc[t + 2]
        k3 = kc[t + 3]
        s0 = float32(0.0)
        s1 = float32(0.0)
        s2 = float32(0.0)
        s3 = float32(0.0)
        for i in range(hd):
            qi = q[i]
            s0 += qi * k0[i]
            s1 += qi * k1[i]
            s2 += qi * k2[i]
            s3 += qi * k3[i]
        att[t] = s0 * sc
        att[t + 1] = s1 * sc
        att[t + 2] = s2 * sc
        att[t + 3] = s3 * sc
        t += 4
    while t < end:
        att[t] = dot(q, kc[t]) * sc
        t += 1
    # softmax in fp32
    mx = float32(-np.inf)
    for t in range(start, end):
        mx = max(mx, att[t])
    for t in range(start, end):
        att[t] = exp_softmax(att[t] - mx)
    total = float32(0.0)
    for t in range(start, end):
        total += att[t]
    # weighted sum of values, 4 keys per pass over out
    for i in range(hd):
        out[i] = float32(0.0)
    t = start
    while t + 4 <= end:
        p0 = att[t]
        p1 = att[t + 1]
        p2 = att[t + 2]
        p3 = att[t + 3]
        v0 = vc[t]
        v1 = vc[t + 1]
        v2 = vc[t + 2]
        v3 = vc[t + 3]
        for i in range(hd):
            out[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i]
        t += 4
    while t < end:
        p = att[t]
        vt = vc[t]
        for i in range(hd):
            out[i] += p * vt[i]
        t += 1
    inv = float32(1.0) / total
    for i in range(hd):
        out[i] *= inv
    return total


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def attention_group(q, k, v, k_cache, v_cache, g, start, slot, n_rep, scale, cos, sin, att, out, totals):
    """One token at kv head g, a thread's share of the decode step's attention: rotate k's head g (cos/sin: the rows of
    the token's position) and store it with v's head g in cache slot `slot`, then rotate the query heads
    h = g * n_rep .. of q and attend to slots [start, slot] (writes their rows of att, out and totals)."""
    hd = k_cache.shape[2]
    kg = k[g * hd:(g + 1) * hd]
    rope(kg, hd, cos, sin)
    kc = k_cache[g, slot]
    vc = v_cache[g, slot]
    for i in range(hd):
        kc[i] = kg[i]
        vc[i] = v[g * hd + i]
    for h in range(g * n_rep, (g + 1) * n_rep):
        qh = q[h * hd:(h + 1) * hd]
        rope(qh, hd, cos, sin)
        totals[h] = _attend(qh, k_cache[g], v_cache[g], start, slot + 1, scale, att[h], out[h * hd:(h + 1) * hd])


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def softmax_causal(scores, m, n_cols, n_before, scale):
    """In place on scores[:m, :n_cols]: row i becomes softmax(scale * row[:n_before + i + 1]), zeros after."""
    sc = float32(scale)
    for i in range(m):
        row = scores[i, :n_cols]
        n = n_before + i + 1
        mx = float32(-np.inf)
        for t in range(n):
            mx = max(mx, row[t])
        for t in range(n):
            row[t] = exp_softmax((row[t] - mx) * sc)
        total = float32(0.0)
        for t in range(n):
            total += row[t]
        inv = float32(1.0) / total
        for t in range(n):
            row[t] *= inv
        for t in range(n, n_cols):
            row[t] = float32(0.0)


def attention_prefill(q, k_cache, v_cache, starts, slot0, n_rep, scale, scores, out):
    """A block of m tokens: row i of q [m, n_heads*hd] sits in cache slot slot0 + i and attends to slots
    [starts[g], slot0 + i] at kv head g (memory prefix and past context, then the causal block).
    Writes out [m, n_heads*hd].

    Prefill is compute-bound, so per head the scores and the weighted values are two BLAS GEMMs
    (Q K^T into scores [>= m, >= slot0 + m - start], scratch) around a compiled causal softmax.
    """
    hd = k_cache.shape[2]
    m = q.shape[0]
    end = slot0 + m
    for h in range(q.shape[1] // hd):
        kv = h // n_rep
        start = int(starts[kv])
        n_cols = end - start
        s = scores[:m, :n_cols]
        np.matmul(q[:, h * hd:(h + 1) * hd], k_cache[kv, start:end].T, out=s)
        softmax_causal(scores, m, n_cols, slot0 - start, scale)
        np.matmul(s, v_cache[kv, start:end], out=out[:, h * hd:(h + 1) * hd])
