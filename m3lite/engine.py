"""The numba inference engine: prefill and decode over a preallocated KV cache, with memory attention.

The state is spelled out like llama2.c's RunState: weights (read-only views of the memory-mapped model
file, never copied), the KV cache and every scratch buffer are allocated once in `Engine.__init__`.

KV cache layout, per layer and kv head, in slots::

    [ 0 ............ prefix_capacity ) [ prefix_capacity ........ prefix_capacity + max_ctx )
      explicit memories, right-aligned   context tokens, in order

Kv head g of layer l attends to the contiguous slot range [attn_start[l, g], current slot]. Plain layers
start at prefix_capacity; a memory layer holding m memory tokens at head g starts at prefix_capacity - m, so
its memory keys (stored already rotated, by `set_prefix`) are seen by every query with no causal mask among
them. Attention is a sum over keys, so the order of memory tokens does not matter and padded memory slots
are simply not stored (per-head counts).
With prefix_capacity=0 the engine is a plain Llama decoder.
"""
from __future__ import annotations

import math
import os

import numba
import numpy as np
from numba import njit

from .config import ModelConfig
from .errors import BadArgument
from .kernels import (attention_decode, attention_prefill, matvec, matvec_acc, matvec_qkv, matvec_swiglu,
                      rmsnorm, rmsnorm_rows, rope, rope_rows, rope_tables, silu_mul)
from .modelfile import tensor_shapes

PREFILL_CHUNK = 128  # tokens per prefill block: enough rows for efficient GEMMs, scratch stays small


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core and slow decode down)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "core_id") as f1, open(base + "physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def default_threads(n_threads: int | None = None) -> int:
    """n_threads, else $M3LITE_THREADS, else the number of physical cores; capped by numba's pool size."""
    if n_threads is None:
        env = os.environ.get("M3LITE_THREADS", "").strip()
        if env:
            try:
                n_threads = int(env)
            except ValueError:
                raise BadArgument(f"M3LITE_THREADS must be a positive integer, got {env!r}") from None
        else:
            n_threads = physical_cores()
    if int(n_threads) < 1:
        raise BadArgument(f"the number of threads must be >= 1, got {n_threads}")
    return min(int(n_threads), numba.config.NUMBA_NUM_THREADS)


@njit(cache=True, error_model="numpy")
def _decode_step(token, slot, pos, attn_start, eps, scale, n_rep,
                 emb, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2, norm, out_w,
                 cos, sin, k_cache, v_cache,
                 x, xb, q, k, v, att, ao, hb, logits):
    """The whole forward pass of one token, all layers; writes logits [V]. Parallelism lives in the kernels
    (prange over matrix rows and attention heads); this function itself allocates nothing."""
    dim = x.shape[0]
    n_kv = k_cache.shape[1]
    hd = k_cache.shape[3]
    for i in range(dim):
        x[i] = emb[token, i]
    for l in range(attn_norm.shape[0]):
        rmsnorm(x, attn_norm[l], eps, xb)
        matvec_qkv(wq[l], wk[l], wv[l], xb, q, k, v)
        rope(q, hd, cos[pos], sin[pos])
        rope(k, hd, cos[pos], sin[pos])
        for h in range(n_kv):
            kc = k_cache[l, h, slot]
            vc = v_cache[l, h, slot]
            for i in range(hd):
                kc[i] = k[h * hd + i]
                vc[i] = v[h * hd + i]
        attention_decode(q, k_cache[l], v_cache[l], attn_start[l], slot + 1, n_rep, scale, att, ao)
        matvec_acc(wo[l], ao, x)
        rmsnorm(x, ffn_norm[l], eps, xb)
        matvec_swiglu(w1[l], w3[l], xb, hb)
        matvec_acc(w2[l], hb, x)
    rmsnorm(x, norm, eps, xb)
    matvec(out_w, xb, logits)


@njit(cache=True, error_model="numpy")
def _store_kv(k, v, k_cache, v_cache, slot0, hd, cos, sin, pos0):
    """Rotate the keys k [n, kv_dim] for positions pos0.. and write k, v into cache slots slot0.. of one layer
    (k_cache/v_cache [n_kv, capacity, hd])."""
    rope_rows(k, hd, cos, sin, pos0)
    for h in range(k_cache.shape[0]):
        for i in range(k.shape[0]):
            for j in range(hd):
                k_cache[h, slot0 + i, j] = k[i, h * hd + j]
                v_cache[h, slot0 + i, j] = v[i, h * hd + j]


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only plain-ndarray view (no copy): one numba signature for memmaps and in-memory arrays alike."""
    a = np.asarray(a).view(np.ndarray)
    a.flags.writeable = False
    return a


class Engine:
    """Prefill/decode state for one sequence.

    Engine(cfg, weights, max_ctx=None, prefix_capacity=0, n_threads=None): `weights` is the dict of
    `ModelFiles.weights` (float32, names and shapes of `tensor_shapes(cfg)`); max_ctx defaults to
    cfg.max_seq_len context tokens; prefix_capacity reserves cache slots for explicit memories.
    Context token i sits at RoPE position `pos_offset + i` (`pos_offset` is a plain attribute, default 0).
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], max_ctx: int | None = None,
                 prefix_capacity: int = 0, n_threads: int | None = None):
        self.cfg = cfg
        self.max_ctx = int(cfg.max_seq_len if max_ctx is None else max_ctx)
        self.prefix_capacity = int(prefix_capacity)
        if self.max_ctx < 1:
            raise BadArgument(f"max_ctx must be >= 1, got {max_ctx}")
        if self.prefix_capacity < 0:
            raise BadArgument(f"prefix_capacity must be >= 0, got {prefix_capacity}")
        self.n_threads = default_threads(n_threads)
        numba.set_num_threads(self.n_threads)

        # weights: read-only views, never copies
        want = tensor_shapes(cfg)
        missing = sorted(set(want) - set(weights))
        if missing:
            raise BadArgument(f"weights do not match the config: missing {', '.join(missing)}")
        w = {}
        for name, shape in want.items():
            a = np.asarray(weights[name])
            if tuple(a.shape) != shape:
                raise BadArgument(f"weight {name} has shape {tuple(a.shape)}, the config needs {shape}")
            if a.dtype != np.float32:
                raise BadArgument(f"weight {name} is {a.dtype}; this engine runs float32 weights")
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)  # only for hand-made weights; model files are contiguous
            w[name] = _readonly(a)
        self.weights = w
        self.tok_embeddings = w["tok_embeddings"]
        self.attention_norm = w["attention_norm"]
        self.wq, self.wk, self.wv, self.wo = w["wq"], w["wk"], w["wv"], w["wo"]
        self.ffn_norm = w["ffn_norm"]
        self.w1, self.w3, self.w2 = w["w1"], w["w3"], w["w2"]
        self.norm = w["norm"]
        self.output = w["tok_embeddings"] if cfg.tie_embeddings else w["output"]

        L, D, hd = cfg.n_layers, cfg.dim, cfg.hd
        n_kv, F, V = cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.scale = 1.0 / math.sqrt(hd)
        self.eps = float(cfg.norm_eps)
        self.capacity = self.prefix_capacity + self.max_ctx

        # KV cache and memory-attention bookkeeping
        self.k_cache = np.zeros((L, n_kv, self.capacity, hd), np.float32)
        self.v_cache = np.zeros((L, n_kv, self.capacity, hd), np.float32)
        self.attn_start = np.full((L, n_kv), self.prefix_capacity, np.int64)
        self.pos_offset = 0
        self._n_past = 0
        self.cos = self.sin = np.zeros((0, hd // 2), np.float32)
        self._ensure_positions(self.max_ctx)

        # decode scratch (one token)
        self.x = np.zeros(D, np.float32)
        self.xb = np.zeros(D, np.float32)
        self.q = np.zeros(cfg.q_dim, np.float32)
        self.k = np.zeros(cfg.kv_dim, np.float32)
        self.v = np.zeros(cfg.kv_dim, np.float32)
        self.ao = np.zeros(cfg.q_dim, np.float32)
        self.hb = np.zeros(F, np.float32)
        self.att = np.zeros((cfg.n_heads, self.capacity), np.float32)
        self.logits = np.zeros(V, np.float32)

        # prefill scratch (one block of up to PREFILL_CHUNK tokens)
        C = min(PREFILL_CHUNK, self.max_ctx)
        self.chunk = C
        self.px = np.zeros((C, D), np.float32)
        self.pxb = np.zeros((C, D), np.float32)
        self.pq = np.zeros((C, cfg.q_dim), np.float32)
        self.pk = np.zeros((C, cfg.kv_dim), np.float32)
        self.pv = np.zeros((C, cfg.kv_dim), np.float32)
        self.pao = np.zeros((C, cfg.q_dim), np.float32)
        self.ph1 = np.zeros((C, F), np.float32)
        self.ph3 = np.zeros((C, F), np.float32)
        self.pscores = np.zeros((C, self.capacity), np.float32)

    # ---- state -------------------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Context tokens in the cache."""
        return self._n_past

    def reset(self) -> None:
        """Forget the context and the explicit memories (pos_offset is left as it is)."""
        self._n_past = 0
        self.clear_prefix()

    def set_prefix(self, layer: int, k: np.ndarray, v: np.ndarray, counts=None) -> None:
        """Put explicit-memory keys/values [n_kv, m, hd] (keys already rotated) in front of layer `layer`'s context.

        They replace the layer's previous memories and are seen by every query, without causal mask.
        counts [n_kv] (optional): kv head g keeps only its first counts[g] tokens (padded memory slots dropped);
        default m for every head. m = 0 removes the layer's memories.
        """
        cfg = self.cfg
        if not 0 <= int(layer) < cfg.n_layers:
            raise BadArgument(f"layer {layer} is out of range: the model has {cfg.n_layers} layers")
        k = np.asarray(k)
        v = np.asarray(v)
        if k.ndim != 3 or k.shape != v.shape or k.shape[0] != cfg.n_kv_heads or k.shape[2] != cfg.hd:
            raise BadArgument(f"memory keys/values must both be [n_kv_heads={cfg.n_kv_heads}, m, "
                              f"head_dim={cfg.hd}], got {k.shape} and {v.shape}")
        m = k.shape[1]
        if counts is None:
            counts = np.full(cfg.n_kv_heads, m, np.int64)
        else:
            counts = np.asarray(counts).astype(np.int64).reshape(-1)
            if counts.shape != (cfg.n_kv_heads,) or counts.min() < 0 or counts.max() > m:
                raise BadArgument(f"memory counts must be {cfg.n_kv_heads} integers in [0, {m}], got {counts}")
        P = self.prefix_capacity
        if counts.max(initial=0) > P:
            raise BadArgument(f"{counts.max()} memory tokens do not fit the engine's prefix capacity of {P}; "
                              f"create the engine with a larger prefix_capacity")
        for g, c in enumerate(counts):
            self.k_cache[layer, g, P - c:P] = k[g, :c]
            self.v_cache[layer, g, P - c:P] = v[g, :c]
            self.attn_start[layer, g] = P - c

    def clear_prefix(self) -> None:
        """Remove all explicit memories: every layer attends to the context only."""
        self.attn_start[...] = self.prefix_capacity

    def _ensure_positions(self, n_pos: int) -> None:
        if n_pos > self.cos.shape[0]:
            self.cos, self.sin = rope_tables(self.cfg.hd, self.cfg.rope_theta, max(n_pos, self.max_ctx))

    def _check_room(self, n: int) -> int:
        if self._n_past + n > self.max_ctx:
            raise BadArgument(f"context is full: {self._n_past} + {n} tokens exceed the engine's limit of "
                              f"{self.max_ctx}; reset() or create the engine with a larger max_ctx")
        off = int(self.pos_offset)
        if off < 0:
            raise BadArgument(f"pos_offset must be >= 0, got {self.pos_offset}")
        self._ensure_positions(off + self._n_past + n)
        return off + self._n_past

    # ---- forward -----------------------------------------------------------------------------------------

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the context; return its next-token logits [V] (a new array)."""
        t = int(token)
        if not 0 <= t < self.cfg.vocab_size:
            raise BadArgument(f"token id {token} is out of range [0, {self.cfg.vocab_size})")
        pos = self._check_room(1)
        numba.set_num_threads(self.n_threads)  # per calling thread in numba
        _decode_step(t, self.prefix_capacity + self._n_past, pos, self.attn_start, self.eps, self.scale,
                     self.n_rep, self.tok_embeddings, self.attention_norm, self.wq, self.wk, self.wv, self.wo,
                     self.ffn_norm, self.w1, self.w3, self.w2, self.norm, self.output, self.cos, self.sin,
                     self.k_cache, self.v_cache, self.x, self.xb, self.q, self.k, self.v, self.att, self.ao,
                     self.hb, self.logits)
        self._n_past += 1
        return self.logits.copy()

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append the tokens `ids` to the context with matrix-matrix work (blocks of PREFILL_CHUNK tokens).

        Returns the logits of the last token [V], or of every token [n, V] with all_logits.
        Can be called repeatedly to extend the context.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise BadArgument(f"prefill needs a non-empty 1-D array of token ids, got shape {ids.shape} "
                              f"of {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        V = self.cfg.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise BadArgument(f"token ids must be in [0, {V}), got values from {ids.min()} to {ids.max()}")
        n = ids.shape[0]
        self._check_room(n)
        # BLAS (numpy's GEMMs) owns the cores during prefill: its worker threads spin between calls, and
        # numba's workers fighting them for the same cores made prefill ~7x slower on 2 cores.
        numba.set_num_threads(1)
        out = np.empty((n, V), np.float32) if all_logits else None
        for c0 in range(0, n, self.chunk):
            c1 = min(n, c0 + self.chunk)
            xn = self._prefill_block(ids[c0:c1])
            if out is not None:
                np.matmul(xn, self.output.T, out=out[c0:c1])
        if out is not None:
            return out
        return np.matmul(self.output, xn[-1])

    def _prefill_block(self, ids: np.ndarray) -> np.ndarray:
        """Run up to `chunk` tokens through all layers, append their keys/values; return the final-normed
        hidden states [m, dim] (a view of scratch)."""
        m = ids.shape[0]
        pos0 = self.pos_offset + self._n_past
        slot0 = self.prefix_capacity + self._n_past
        hd = self.cfg.hd
        x, xb = self.px[:m], self.pxb[:m]
        q, k, v, ao = self.pq[:m], self.pk[:m], self.pv[:m], self.pao[:m]
        h1, h3 = self.ph1[:m], self.ph3[:m]
        np.take(self.tok_embeddings, ids, axis=0, out=x)
        for l in range(self.cfg.n_layers):
            rmsnorm_rows(x, self.attention_norm[l], self.eps, xb)
            np.matmul(xb, self.wq[l].T, out=q)
            np.matmul(xb, self.wk[l].T, out=k)
            np.matmul(xb, self.wv[l].T, out=v)
            rope_rows(q, hd, self.cos, self.sin, pos0)
            _store_kv(k, v, self.k_cache[l], self.v_cache[l], slot0, hd, self.cos, self.sin, pos0)
            attention_prefill(q, self.k_cache[l], self.v_cache[l], self.attn_start[l], slot0, self.n_rep,
                              self.scale, self.pscores, ao)
            np.matmul(ao, self.wo[l].T, out=xb)
            x += xb
            rmsnorm_rows(x, self.ffn_norm[l], self.eps, xb)
            np.matmul(xb, self.w1[l].T, out=h1)
            np.matmul(xb, self.w3[l].T, out=h3)
            silu_mul(h1, h3, h1)
            np.matmul(h1, self.w2[l].T, out=xb)
            x += xb
        rmsnorm_rows(x, self.norm, self.eps, xb)
        self._n_past += m
        return xb
