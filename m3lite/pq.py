"""Product-quantized memory vectors (`--quant pq`): each key or value vector of head_dim values is cut into
head_dim / SUB_DIM sub-vectors of SUB_DIM values, and each sub-vector is stored as the one-byte index of its
nearest centroid in a codebook of CENTROIDS entries (as the Memory3 paper does with OPQ/PQ: 14 bytes per 80-dim
vector there, head_dim / 4 bytes per vector here: 16 for SmolLM2's 64, against int8's 66).

A bank has its own codebooks, one per (memory layer, kv head, key or value) and sub-space, trained by k-means on
the vectors of the first references it encodes (at most SAMPLE vectors per codebook, drawn with a fixed seed, so
the same references give the same codebooks); they are stored with the bank (`Bank.put_array` format, name
CODEBOOKS) and decode every record. Codebooks: [n_memory_layers, n_kv_heads, 2, head_dim / SUB_DIM, CENTROIDS,
SUB_DIM] float32.
"""
from __future__ import annotations

import numpy as np

from .errors import BadArgument

SUB_DIM = 4  # values per sub-vector
CENTROIDS = 256  # one byte per sub-vector
SAMPLE = 4096  # training vectors per codebook, at most
ITERATIONS = 16
SEED = 0
TRAIN_REFS = 256  # a pq bank's first batch of references, whose vectors train its codebooks
CODEBOOKS = "pq_codebooks"  # the bank array holding them


def n_codes(head_dim: int) -> int:
    """Bytes (codes) per vector of `head_dim` values."""
    if head_dim % SUB_DIM:
        raise BadArgument(f"pq quantization needs a head dimension divisible by {SUB_DIM}, got {head_dim}")
    return head_dim // SUB_DIM


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """x [M, N, d], c [M, K, d] -> index of the nearest centroid of each sub-vector, [M, N] (ties: lowest)."""
    d2 = (c * c).sum(-1)[:, None, :] - 2.0 * np.matmul(x, c.transpose(0, 2, 1))  # |x|^2 is the same for all
    return d2.argmin(-1)


def kmeans(x: np.ndarray, k: int = CENTROIDS, iterations: int = ITERATIONS, seed: int = SEED) -> np.ndarray:
    """Centroids [M, k, d] of the sub-vectors x [M, N, d], one k-means per sub-space (Lloyd's, from k distinct
    points drawn with `seed`; a centroid left without points keeps its place). Fewer than k points: every point
    is a centroid (the rest repeat them)."""
    x = np.ascontiguousarray(x, np.float32)
    M, N, d = x.shape
    if N == 0:
        return np.zeros((M, k, d), np.float32)
    rng = np.random.default_rng(seed)
    pick = rng.permutation(N)[:k] if N >= k else np.resize(rng.permutation(N), k)
    c = x[:, pick].copy()
    flat_base = (np.arange(M) * k)[:, None]
    for _ in range(iterations):
        a = _nearest(x, c)
        idx = (a + flat_base).ravel()
        counts = np.bincount(idx, minlength=M * k).reshape(M, k)
        sums = np.stack([np.bincount(idx, weights=x[..., j].ravel(), minlength=M * k) for j in range(d)], -1)
        sums = sums.reshape(M, k, d)
        filled = counts > 0
        new = np.where(filled[..., None], sums / np.maximum(counts, 1)[..., None], c).astype(np.float32)
        if np.array_equal(new, c):
            break
        c = new
    return c


def train(keys: np.ndarray, values: np.ndarray, counts: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Codebooks [Lm, H, 2, M, CENTROIDS, SUB_DIM] from memories: keys/values [B, Lm, H, T, hd], valid counts
    [B, Lm, H] (the slots past a head's count are not vectors)."""
    B, Lm, H, T, hd = keys.shape
    M = n_codes(hd)
    out = np.zeros((Lm, H, 2, M, CENTROIDS, SUB_DIM), np.float32)
    valid = np.arange(T)[None, :] < counts.reshape(B, Lm, H)[..., None]  # [B, Lm, H, T]
    for layer in range(Lm):
        for h in range(H):
            mask = valid[:, layer, h]  # [B, T]
            for kv, a in enumerate((keys, values)):
                vecs = np.asarray(a[:, layer, h], np.float32)[mask]  # [N, hd]
                g = (layer * H + h) * 2 + kv
                rng = np.random.default_rng([seed, g])
                if len(vecs) > SAMPLE:
                    vecs = vecs[np.sort(rng.choice(len(vecs), SAMPLE, replace=False))]
                sub = vecs.reshape(len(vecs), M, SUB_DIM).transpose(1, 0, 2)
                out[layer, h, kv] = kmeans(sub, seed=int(rng.integers(1 << 31)))
    return out


def encode(x: np.ndarray, codebooks: np.ndarray, kv: int) -> np.ndarray:
    """Codes uint8 [B, Lm, H, T, M] of keys (kv 0) or values (kv 1) x [B, Lm, H, T, hd]."""
    B, Lm, H, T, hd = x.shape
    M = n_codes(hd)
    out = np.empty((B, Lm, H, T, M), np.uint8)
    for layer in range(Lm):
        for h in range(H):
            sub = np.asarray(x[:, layer, h], np.float32).reshape(B * T, M, SUB_DIM).transpose(1, 0, 2)
            out[:, layer, h] = _nearest(np.ascontiguousarray(sub), codebooks[layer, h, kv]).T.reshape(B, T, M)
    return out


def decode(codes: np.ndarray, codebooks: np.ndarray, kv: int) -> np.ndarray:
    """Vectors float32 [B, Lm, H, T, M * SUB_DIM] of codes uint8 [B, Lm, H, T, M] (inverse of `encode`, up to
    the quantization error)."""
    B, Lm, H, T, M = codes.shape
    cb = codebooks[:, :, kv]  # [Lm, H, M, K, d]
    li = np.arange(Lm)[None, :, None, None, None]
    hi = np.arange(H)[None, None, :, None, None]
    mi = np.arange(M)[None, None, None, None, :]
    return cb[li, hi, mi, codes.astype(np.intp)].reshape(B, Lm, H, T, M * SUB_DIM)


def check_codebooks(cb: np.ndarray, n_memory_layers: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """`cb` if it has the shape and type a bank of that memory shape needs, else BadArgument."""
    want = (n_memory_layers, n_kv_heads, 2, n_codes(head_dim), CENTROIDS, SUB_DIM)
    if cb.shape != want or cb.dtype != np.float32 or not np.all(np.isfinite(cb)):
        raise BadArgument(f"pq codebooks of shape {cb.shape} {cb.dtype}; this bank needs float32 {want}")
    return cb
