"""Causal multi-head attention over the KV cache, with grouped-query heads.

The cache of one layer is k_cache/v_cache [n_kv, capacity, hd]. Keys of a query are one contiguous slot range
[start, end): the engine keeps explicit-memory keys right-aligned in a prefix region just before the context,
so a memory layer simply starts earlier (start < prefix_capacity) and every memory key is visible to every
query, while causality only concerns context slots. Query head h reads kv head h // n_rep.
"""
import numpy as np
from numba import float32, njit, prange

from .matmul import FASTMATH, dot


@njit(fastmath=FASTMATH, cache=True)
def _attend(q, kc, vc, start, end, scale, att, out):
    """One query vector q [hd] against keys/values kc/vc [capacity, hd] in slots [start, end); writes out [hd]."""
    sc = float32(scale)
    mx = float32(-np.inf)
    for t in range(start, end):
        s = dot(q, kc[t]) * sc
        att[t] = s
        if s > mx:
            mx = s
    total = float32(0.0)
    for t in range(start, end):
        e = np.exp(att[t] - mx)
        att[t] = e
        total += e
    inv = float32(1.0) / total
    hd = out.shape[0]
    for i in range(hd):
        out[i] = float32(0.0)
    for t in range(start, end):
        p = att[t] * inv
        vt = vc[t]
        for i in range(hd):
            out[i] += p * vt[i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def attention_decode(q, k_cache, v_cache, start, end, n_rep, scale, att, out):
    """One token: q [n_heads*hd] attends to slots [start, end) of k_cache/v_cache [n_kv, capacity, hd].

    att [n_heads, capacity] is scratch; out [n_heads*hd] receives the concatenated heads.
    """
    hd = k_cache.shape[2]
    n_heads = q.shape[0] // hd
    for h in prange(n_heads):
        kv = h // n_rep
        _attend(q[h * hd:(h + 1) * hd], k_cache[kv], v_cache[kv], start, end, scale, att[h],
                out[h * hd:(h + 1) * hd])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def attention_prefill(q, k_cache, v_cache, start, slot0, n_rep, scale, att, out):
    """A block of n tokens: row i of q [n, n_heads*hd] sits in cache slot slot0 + i and attends to slots
    [start, slot0 + i] (memory prefix plus causal context). Writes out [n, n_heads*hd]; att [n_heads, capacity]."""
    hd = k_cache.shape[2]
    n = q.shape[0]
    n_heads = q.shape[1] // hd
    for h in prange(n_heads):
        kv = h // n_rep
        for i in range(n):
            _attend(q[i, h * hd:(h + 1) * hd], k_cache[kv], v_cache[kv], start, slot0 + i + 1, scale, att[h],
                    out[i, h * hd:(h + 1) * hd])
