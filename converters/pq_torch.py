"""m3lite.pq's product quantization in torch, for quantization-aware distillation (`--memory-quant pq`).

The layout is m3lite.pq's: a key or value vector of head_dim values is head_dim / SUB_DIM sub-vectors of SUB_DIM
consecutive values; codebooks [n_memory_layers, n_kv_heads, 2 (0 keys, 1 values), head_dim / SUB_DIM, CENTROIDS,
SUB_DIM] float32. `quantize` is `m3lite.pq.decode(m3lite.pq.encode(x, cb, kv), cb, kv)` on any device (up to
float rounding in near ties); `fake_quant` puts it in the forward pass with a straight-through gradient (the
identity), so the adapter learns to write and read memories that survive quantization. `kmeans` follows
m3lite.pq.kmeans's rules with every codebook at once, in blocks of at most BUDGET distances.
"""
from __future__ import annotations

import contextlib

import torch

from m3lite.pq import CENTROIDS, ITERATIONS, SUB_DIM, n_codes

from .model import Memory

BUDGET = 1 << 25  # elements of one [codebooks, vectors, centroids] block of distances (128 MiB in float32)


@contextlib.contextmanager
def _float32(device: torch.device):
    """Distances in full float32 whatever the caller runs under: no autocast (bf16 would pick the wrong
    centroids), no TF32 matmuls on CUDA."""
    try:
        autocast = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        autocast = contextlib.nullcontext()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with autocast:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _block(n: int, k: int) -> int:
    """Codebooks per block for n vectors and k centroids each."""
    return max(1, BUDGET // max(1, n * k))


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [M, N, d], c [M, K, d] float32 -> index [M, N] of each sub-vector's nearest centroid (ties: the lowest),
    computed as m3lite.pq._nearest does (|x|^2 is the same for all centroids), in one fused pass."""
    return torch.baddbmm((c * c).sum(-1)[:, None, :], x, c.transpose(1, 2), alpha=-2.0).argmin(-1)


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`_nearest` in blocks of codebooks (memory-bounded)."""
    M, N, _ = x.shape
    if M == 0 or N == 0:
        return torch.zeros(M, N, dtype=torch.long, device=x.device)
    rows = _block(N, c.shape[1])
    return torch.cat([_nearest(x[i:i + rows], c[i:i + rows]) for i in range(0, M, rows)])


def quantize(x: torch.Tensor, codebooks: torch.Tensor, kv: int) -> torch.Tensor:
    """The nearest-centroid reconstruction of keys (kv 0) or values (kv 1) x [B, Lm, H, T, hd], in x's dtype and
    without gradient: m3lite.pq.decode(m3lite.pq.encode(x, codebooks, kv), codebooks, kv)."""
    B, Lm, H, T, hd = x.shape
    M = n_codes(hd)
    with torch.no_grad(), _float32(x.device):
        sub = x.detach().float().reshape(B, Lm, H, T, M, SUB_DIM).permute(1, 2, 4, 0, 3, 5)
        sub = sub.reshape(Lm * H * M, B * T, SUB_DIM)
        cb = codebooks[:, :, kv].to(device=x.device, dtype=torch.float32).reshape(Lm * H * M, -1, SUB_DIM)
        idx = nearest(sub, cb)  # [Lm*H*M, B*T]
        q = torch.gather(cb, 1, idx[..., None].expand(-1, -1, SUB_DIM))
        q = q.reshape(Lm, H, M, B, T, SUB_DIM).permute(3, 0, 1, 4, 2, 5).reshape(B, Lm, H, T, hd)
    return q.to(x.dtype)


def fake_quant(x: torch.Tensor, codebooks: torch.Tensor, kv: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through quantization: forward `quantize(x)` (exactly), backward the identity. valid [B, Lm, H, T]
    bool: only those slots are quantized, the others pass unchanged (a Memory's unused slots stay zero)."""
    xd = x.detach()
    q = quantize(x, codebooks, kv)
    if valid is not None:
        q = torch.where(valid[..., None], q, xd)
    return q + (x - xd)  # x - xd is exactly zero: the forward value is q, the gradient reaches x unchanged


def fake_quant_memory(mem: Memory, codebooks: torch.Tensor) -> Memory:
    """`encode_memory`'s memories with their valid keys and values replaced by their pq reconstruction
    (straight-through)."""
    valid = mem.slot_mask()
    return Memory(fake_quant(mem.keys, codebooks, 0, valid), fake_quant(mem.values, codebooks, 1, valid),
                  mem.positions, mem.counts)


def kmeans(x: torch.Tensor, k: int = CENTROIDS, iterations: int = ITERATIONS,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Centroids [M, k, d] float32 of the sub-vectors x [M, N, d], one k-means per row, all rows at once on x's
    device: Lloyd's from k distinct points per row drawn with `generator` (a CPU generator, so that CPU and CUDA
    start alike); a centroid left without points keeps its place; fewer than k points: every point is a centroid
    (the rest repeat them); stops early when no centroid moves. Cluster sums: scatter_add on the CPU, one-hot
    matmuls on other devices (CUDA's scatter_add adds in any order: not reproducible). Memory: two [rows, N, k]
    float32 blocks of at most BUDGET elements."""
    M, N, d = x.shape
    if N == 0:
        return torch.zeros(M, k, d, device=x.device)
    with torch.no_grad(), _float32(x.device):
        x = x.detach().float().contiguous()
        order = torch.rand(M, N, generator=generator).argsort(-1)  # a random permutation per row
        pick = order[:, :k] if N >= k else order[:, torch.arange(k) % N]
        c = torch.gather(x, 1, pick.to(x.device)[..., None].expand(-1, -1, d))
        rows = _block(N, k)
        for _ in range(iterations):
            new = torch.empty_like(c)
            for i in range(0, M, rows):
                xs, cs = x[i:i + rows], c[i:i + rows]
                a = _nearest(xs, cs)
                if x.device.type == "cpu":
                    sums = torch.zeros_like(cs).scatter_add_(1, a[..., None].expand(-1, -1, d), xs)
                    counts = torch.zeros(cs.shape[:2]).scatter_add_(1, a, torch.ones(a.shape))
                else:
                    onehot = torch.zeros(xs.shape[0], N, k, device=x.device).scatter_(2, a[..., None], 1.0)
                    counts = onehot.sum(1)  # [rows, k], exact
                    sums = torch.bmm(onehot.transpose(1, 2), xs)  # [rows, k, d]
                    del onehot
                new[i:i + rows] = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], cs)
            if torch.equal(new, c):
                break
            c = new
    return c


def train_codebooks(keys: torch.Tensor, values: torch.Tensor, generator: torch.Generator | None = None,
                    k: int = CENTROIDS, iterations: int = ITERATIONS) -> torch.Tensor:
    """Codebooks [Lm, H, 2, hd / SUB_DIM, k, SUB_DIM] float32 (on the vectors' device) from N sample vectors
    keys, values [N, Lm, H, hd] (valid slots only), one k-means per (layer, head, key/value, sub-space)."""
    N, Lm, H, hd = keys.shape
    M = n_codes(hd)
    x = torch.stack((keys, values), 3).float().reshape(N, Lm, H, 2, M, SUB_DIM)
    x = x.permute(1, 2, 3, 4, 0, 5).reshape(Lm * H * 2 * M, N, SUB_DIM)
    return kmeans(x, k, iterations, generator).reshape(Lm, H, 2, M, k, SUB_DIM)


def relative_error(x: torch.Tensor, codebooks: torch.Tensor, kv: int) -> float:
    """|x - quantize(x)| / |x| (Frobenius, the measure of tests/test_pq.py and the README) of vectors
    x [N, Lm, H, hd]."""
    x = x.float()
    q = quantize(x[:, :, :, None], codebooks, kv)[:, :, :, 0]
    return float(torch.linalg.vector_norm(x - q) / torch.linalg.vector_norm(x).clamp(min=1e-30))
