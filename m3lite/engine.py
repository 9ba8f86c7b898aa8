"""The numba inference engine: prefill and decode over a preallocated KV cache, with memory attention.

The state is spelled out like llama2.c's RunState: weights, the KV cache and every scratch buffer are set up
once in `Engine.__init__`. The math is float32. Float32 weights are read-only views of the memory-mapped model
file, never copied; float16 weights (a model exported with dtype="float16") are widened to float32 once, at
load, into a private copy: float16 files save disk, not RAM. With int8 weights (`m3lite.int8_weights`, llama.cpp's
Q8_0 blocks) every projection and the output head run the int8 kernels of `kernels.q8` instead, in decode
(integer dot products) and in prefill / reference encoding (the same int8 x int8 function as fp32 GEMMs over
dequantized tiles); embeddings and norms stay float.

KV cache layout, per layer and kv head, in slots::

    [ 0 ............ prefix_capacity ) [ prefix_capacity ........ prefix_capacity + max_ctx )
      explicit memories, right-aligned   context tokens, in order

Kv head g of layer l attends to the contiguous slot range [attn_start[l, g], current slot]. Plain layers
start at prefix_capacity; a memory layer holding m memory tokens at head g starts at prefix_capacity - m, so
its memory keys (stored already rotated, by `set_prefix`) are seen by every query with no causal mask among
them. Attention is a sum over keys, so the order of memory tokens does not matter and padded memory slots
are simply not stored (per-head counts).
With prefix_capacity=0 the engine is a plain Llama decoder.

Explicit memory (Memory3), besides `set_prefix`:
- `encode_references` turns references (<ref> + text ids) into sparse memories, exactly as
  `converters.model.encode_memory`, on its own scratch buffers (the context state is not touched);
- `ref_kv` is the <ref> token's key/value at the memory layers (cached: the weights never change);
- decode steps add the attention weight that queries of the memory layers put on each prefix slot into a
  tracker (`prefix_attention`, `prefix_attention_total`, `reset_prefix_attention`), for citations.
"""
from __future__ import annotations

import math
import mmap
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .config import ModelConfig
from .errors import BadArgument
from .kernels import (accumulate_prefix_attention, attention_group, attention_prefill, reference_attention,
                      rmsnorm, rmsnorm_rows, rope_rows,
                      rope_rows_at, rope_tables, select_tokens, selection_scores, silu_mul)
from .kernels.q8 import QK, matmul_q8, matvec_q8, padded, rows, rows_swiglu
from .kernels.sync import STATE_SIZE, barrier, part
from .modelfile import tensor_shapes
from .threads import default_threads, set_blas_threads, threads_fixed, threads_now

PREFILL_CHUNK = 128  # tokens per prefill block: enough rows for efficient GEMMs, scratch stays small
ENCODE_TOKENS = 2048  # tokens (of several references, packed) per encode block
REF_ID = 4  # the <ref> token of the tokenizers trained here (converters.tokenizer.REF); the default ref_id
Q8_TILE_BYTES = 4 << 20  # int8 prefill: weights dequantized per BLAS GEMM (4 MiB: 5% faster than 1 MiB here)
LINEAR = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")  # the per-layer projections, in the decode step's order


class DecodeWeights(NamedTuple):
    """What a decode step reads of the model: the float weights (stacked over layers) and the int8 ones; the set
    not run is a placeholder of the same type, so fp32 and int8 share one compiled decode step."""
    emb: np.ndarray  # [V, D]; empty with int8 and tied embeddings (the int8 head's rows are the embedding)
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w1: np.ndarray
    w3: np.ndarray
    w2: np.ndarray
    norm: np.ndarray
    out_w: np.ndarray  # the float head
    q8: bool  # run the int8 set: values q* and float32 block scales s* of each projection and of the head
    qwq: np.ndarray  # (flat fields: numba's parallel region takes no tuple nested in a tuple)
    swq: np.ndarray
    qwk: np.ndarray
    swk: np.ndarray
    qwv: np.ndarray
    swv: np.ndarray
    qwo: np.ndarray
    swo: np.ndarray
    qw1: np.ndarray
    sw1: np.ndarray
    qw3: np.ndarray
    sw3: np.ndarray
    qw2: np.ndarray
    sw2: np.ndarray
    q_out: np.ndarray
    s_out: np.ndarray


class DecodeCache(NamedTuple):
    """The KV cache [L, n_kv, capacity, hd], each (layer, kv head)'s first attended slot, and the RoPE tables."""
    k: np.ndarray
    v: np.ndarray
    attn_start: np.ndarray
    cos: np.ndarray
    sin: np.ndarray


class DecodeScratch(NamedTuple):
    """The decode step's buffers, written every step: the residual x, each thread's normed input row xb [T, D],
    q/k/v, attention weights and totals, the attention output, the MLP's hidden row, the logits, the barrier."""
    x: np.ndarray
    xb: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    att: np.ndarray
    att_totals: np.ndarray
    ao: np.ndarray
    hb: np.ndarray
    logits: np.ndarray
    sync: np.ndarray


class Tracking(NamedTuple):
    """Where the memory layers' attention on the prefix is added up (see `_decode_step`)."""
    track: np.ndarray  # [L] bool: layers whose attention is tracked
    prefix_end: int
    mass: np.ndarray  # [prefix_end] float64
    mass_total: np.ndarray  # [1] float64


@njit(parallel=True, cache=True, error_model="numpy")
def _decode_step(token, slot, pos, eps, scale, n_rep, w, cache, s, tr):
    """The whole forward pass of one token, all layers; writes s.logits [V]. Allocates nothing.
    w: DecodeWeights, cache: DecodeCache, s: DecodeScratch, tr: Tracking.

    One parallel region: thread t of T takes its share of the rows of every projection and of the kv heads in
    attention, and `barrier(s.sync, T)` separates the phases (numba would launch a thread team per prange, ~40
    per token, each launch costing about what a layer of a small model computes). T = s.xb.shape[0] must be
    numba's thread count (the caller sets it): the barriers wait for every thread. s.xb holds per-thread scratch
    rows: each thread normalises the whole input of a projection itself, so only the outputs are shared.

    Prefix-attention tracking: at each layer l with tr.track[l], the softmax weights of every query head on the
    prefix slots [attn_start[l, g], tr.prefix_end) are added to tr.mass (float64) and n_heads (the softmax mass
    of the layer) to tr.mass_total[0].

    w.q8 runs the int8 weights (w.qwq / w.swq ..., w.q_out / w.s_out the head); else the fp32 ones."""
    T = s.xb.shape[0]
    s.sync[:] = 0
    for t in prange(T):
        _decode_thread(t, T, token, slot, pos, eps, scale, n_rep, w, cache, s, tr)


@njit(cache=True, error_model="numpy")
def _decode_thread(t, T, token, slot, pos, eps, scale, n_rep, w, cache, s, tr):
    """Thread t's part of `_decode_step` (its scratch row: s.xb[t])."""
    x, xb, q, k, v, sync = s.x, s.xb[t], s.q, s.k, s.v, s.sync
    n_kv = cache.k.shape[1]
    nq, nk = q.shape[0], k.shape[0]
    D, F = x.shape[0], s.hb.shape[0]
    q8 = w.q8
    if t == 0:
        if w.emb.shape[0] == 0:  # int8 with tied embeddings: the row of the int8 head is the embedding
            for i in range(D):
                x[i] = numba.float32(w.q_out[token, i]) * w.s_out[token, i // QK]
        else:
            for i in range(D):
                x[i] = w.emb[token, i]
    barrier(sync, T)
    for l in range(w.attn_norm.shape[0]):
        rmsnorm(x, w.attn_norm[l], eps, xb)
        r0, r1 = part(nq + 2 * nk, t, T)  # q, k and v rows as one range
        rows(q8, False, w.wq[l], w.qwq[l], w.swq[l], xb, q, min(r0, nq), min(r1, nq))
        rows(q8, False, w.wk[l], w.qwk[l], w.swk[l], xb, k, min(max(r0 - nq, 0), nk),
             min(max(r1 - nq, 0), nk))
        rows(q8, False, w.wv[l], w.qwv[l], w.swv[l], xb, v, max(r0 - nq - nk, 0), max(r1 - nq - nk, 0))
        barrier(sync, T)
        for g in range(t, n_kv, T):
            attention_group(q, k, v, cache.k[l], cache.v[l], g, cache.attn_start[l, g], slot, n_rep, scale,
                            cache.cos[pos], cache.sin[pos], s.att, s.ao, s.att_totals)
        barrier(sync, T)
        if tr.track[l] and t == 0:  # att is next written after two more barriers
            accumulate_prefix_attention(s.att, s.att_totals, cache.attn_start[l], tr.prefix_end, n_rep, tr.mass)
            tr.mass_total[0] += s.att.shape[0]
        r0, r1 = part(D, t, T)
        rows(q8, True, w.wo[l], w.qwo[l], w.swo[l], s.ao, x, r0, r1)
        barrier(sync, T)
        rmsnorm(x, w.ffn_norm[l], eps, xb)
        r0, r1 = part(F, t, T)
        rows_swiglu(q8, w.w1[l], w.w3[l], w.qw1[l], w.sw1[l], w.qw3[l], w.sw3[l], xb, s.hb, r0, r1)
        barrier(sync, T)
        r0, r1 = part(D, t, T)
        rows(q8, True, w.w2[l], w.qw2[l], w.sw2[l], s.hb, x, r0, r1)
        barrier(sync, T)
    rmsnorm(x, w.norm, eps, xb)
    r0, r1 = part(s.logits.shape[0], t, T)
    rows(q8, False, w.out_w, w.q_out, w.s_out, xb, s.logits, r0, r1)


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


def _lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of zeros whose memory is taken only where it is written: anonymous mmap pages. numpy
    asks for transparent huge pages on large arrays, so writing the first positions of each (layer, head) slab of
    a KV cache made resident all of it (180 MB for SmolLM2's 8,192-token context, whatever the context used)."""
    n = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.float32, count=n // 4).reshape(shape)


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only plain-ndarray view (no copy): one numba signature for memmaps and in-memory arrays alike."""
    a = np.asarray(a).view(np.ndarray)
    a.flags.writeable = False
    return a


class Engine:
    """Prefill/decode state for one sequence.

    Engine(cfg, weights, max_ctx=None, prefix_capacity=0, n_threads=None): `weights` is the dict of
    `ModelFiles.weights` (names and shapes of `tensor_shapes(cfg)`): float32 arrays are used in place (zero
    copy), float16 ones are widened to a float32 copy here (exact; it costs the float32 size in RAM);
    max_ctx defaults to cfg.max_seq_len context tokens; prefix_capacity reserves cache slots for explicit
    memories. q8 (optional, `m3lite.int8_weights.Q8Weights.tensors`): int8 weights {name: (values int8 [..., n, kp],
    scales [..., n, kp / 32])} for the projections and "output" (the head), run instead of the float ones,
    which are then neither read nor copied.
    Context token i sits at RoPE position `pos_offset + i` (`pos_offset` is a plain attribute, default 0).
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], max_ctx: int | None = None,
                 prefix_capacity: int = 0, n_threads: int | None = None, q8: dict | None = None,
                 ref_id: int = REF_ID):
        self.cfg = cfg
        self.ref_id = int(ref_id)  # the token that starts every reference (the tokenizer's ref_id)
        self.max_ctx = int(cfg.max_seq_len if max_ctx is None else max_ctx)
        self.prefix_capacity = int(prefix_capacity)
        if self.max_ctx < 1:
            raise BadArgument(f"max_ctx must be >= 1, got {max_ctx}")
        if self.prefix_capacity < 0:
            raise BadArgument(f"prefix_capacity must be >= 0, got {prefix_capacity}")
        self.n_threads = default_threads(n_threads)
        self.adaptive = not threads_fixed(n_threads)  # fit_threads() may run fewer on a busy machine
        self.active_threads = self.n_threads
        numba.set_num_threads(self.n_threads)

        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.scale = 1.0 / math.sqrt(cfg.hd)
        self.eps = float(cfg.norm_eps)
        self.capacity = self.prefix_capacity + self.max_ctx
        self._take_weights(weights, q8)
        self._make_cache()
        self._make_scratch()

    def _take_weights(self, weights: dict[str, np.ndarray], q8: dict | None) -> None:
        """The weights as the kernels read them: read-only views of float32 arrays (never copies), float16
        widened once to a float32 copy, and the int8 set when given (the float projections are then not kept)."""
        cfg = self.cfg
        want = tensor_shapes(cfg)
        self.q8 = q8 is not None
        if self.q8:  # int8 runs the projections and the head: their float weights are not needed
            want = {name: shape for name, shape in want.items() if name not in LINEAR and name != "output"}
            if cfg.tie_embeddings:  # nor the embedding: it is the int8 head's rows (no float32 copy of it)
                del want["tok_embeddings"]
        missing = sorted(set(want) - set(weights))
        if missing:
            raise BadArgument(f"weights do not match the config: missing {', '.join(missing)}")
        w = {}
        for name, shape in want.items():
            a = np.asarray(weights[name])
            if tuple(a.shape) != shape:
                raise BadArgument(f"weight {name} has shape {tuple(a.shape)}, the config needs {shape}")
            if a.dtype == np.float16:
                a = a.astype(np.float32)  # exact; C-contiguous
            elif a.dtype != np.float32:
                raise BadArgument(f"weight {name} is {a.dtype}; this engine runs float32 weights (float16 ones "
                                  f"are widened at load)")
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)  # only for hand-made weights; model files are contiguous
            w[name] = _readonly(a)
        self.weights = w
        self.attention_norm = w["attention_norm"]
        self.ffn_norm = w["ffn_norm"]
        self.norm = w["norm"]
        L = cfg.n_layers
        # the weight set not run is a placeholder of the same type: fp32 and int8 share one compiled decode step
        f3, f2 = _readonly(np.zeros((L, 0, 0), np.float32)), _readonly(np.zeros((0, 0), np.float32))
        self.wq, self.wk, self.wv, self.wo, self.w1, self.w3, self.w2 = (w.get(n, f3) for n in LINEAR)
        self.tok_embeddings = w.get("tok_embeddings", f2)  # empty: rows of the int8 head (`embed`)
        self.output = f2 if self.q8 else w["tok_embeddings"] if cfg.tie_embeddings else w["output"]
        self.q8_weights = self._check_q8(q8, tensor_shapes(cfg)) if self.q8 else {
            n: (_readonly(np.zeros((L, 0, 0), np.int8)), f3) for n in LINEAR} | {
            "output": (_readonly(np.zeros((0, 0), np.int8)), f2)}
        kmax = padded(max(cfg.dim, cfg.q_dim, cfg.ffn_dim))
        self._q8_tile = np.zeros(max(Q8_TILE_BYTES // 4, 8 * kmax) if self.q8 else 0, np.float32)
        self._decode_weights = DecodeWeights(
            self.tok_embeddings, self.attention_norm, self.wq, self.wk, self.wv, self.wo, self.ffn_norm, self.w1,
            self.w3, self.w2, self.norm, self.output, self.q8,
            *(a for n in LINEAR + ("output",) for a in self.q8_weights[n]))

    def _make_cache(self) -> None:
        """The KV cache (memories, then context; pages taken as written), the attention starts, the RoPE tables,
        and the explicit-memory bookkeeping: memory layers, the prefix-attention tracker, the <ref> K/V."""
        cfg = self.cfg
        L, n_kv, hd = cfg.n_layers, cfg.n_kv_heads, cfg.hd
        self.k_cache = _lazy_zeros((L, n_kv, self.capacity, hd))
        self.v_cache = _lazy_zeros((L, n_kv, self.capacity, hd))
        self.attn_start = np.full((L, n_kv), self.prefix_capacity, np.int64)
        self.pos_offset = 0
        self._n_past = 0
        self.cos = self.sin = np.zeros((0, hd // 2), np.float32)
        self._ensure_positions(self.max_ctx)
        self.memory_layers = list(cfg.memory_layer_ids)
        self.track = np.zeros(L, np.bool_)
        self.track[self.memory_layers] = True
        self.prefix_mass = np.zeros(self.prefix_capacity, np.float64)
        self.prefix_mass_total = np.zeros(1, np.float64)
        self._tracking = Tracking(self.track, self.prefix_capacity, self.prefix_mass, self.prefix_mass_total)
        self._ref_kv: tuple[np.ndarray, np.ndarray] | None = None
        self._enc: dict[str, np.ndarray] = {}  # encode scratch, allocated on first use

    def _make_scratch(self) -> None:
        """The decode step's buffers (one token; a normed-input row per thread) and the prefill's (one block of
        up to PREFILL_CHUNK tokens)."""
        cfg = self.cfg
        D, F = cfg.dim, cfg.ffn_dim
        self._scratch = DecodeScratch(
            x=np.zeros(D, np.float32), xb=np.zeros((self.n_threads, D), np.float32),
            q=np.zeros(cfg.q_dim, np.float32), k=np.zeros(cfg.kv_dim, np.float32),
            v=np.zeros(cfg.kv_dim, np.float32), att=np.zeros((cfg.n_heads, self.capacity), np.float32),
            att_totals=np.zeros(cfg.n_heads, np.float32), ao=np.zeros(cfg.q_dim, np.float32),
            hb=np.zeros(F, np.float32), logits=np.zeros(cfg.vocab_size, np.float32),
            sync=np.zeros(STATE_SIZE, np.int64))
        self._active_scratch = self._scratch  # its first active_threads rows of xb (see fit_threads)
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

    @staticmethod
    def _check_q8(q8: dict, want: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for name in LINEAR + ("output",):
            shape = want["tok_embeddings" if name == "output" and "output" not in want else name]
            if name not in q8:
                raise BadArgument(f"int8 weights lack {name}")
            values, scales = (np.asarray(a) for a in q8[name])
            kp = padded(shape[-1])
            if values.shape != shape[:-1] + (kp,) or scales.shape != shape[:-1] + (kp // QK,) \
                    or values.dtype != np.int8 or scales.dtype not in (np.float16, np.float32):
                raise BadArgument(f"int8 weight {name} is {values.dtype} {values.shape} with {scales.dtype} scales "
                                  f"{scales.shape}; the config needs int8 {shape[:-1] + (kp,)} with float scales "
                                  f"{shape[:-1] + (kp // QK,)}")
            out[name] = (_readonly(np.ascontiguousarray(values)),
                         _readonly(np.ascontiguousarray(scales, dtype=np.float32)))
        return out

    # ---- state -------------------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Context tokens in the cache."""
        return self._n_past

    def reset(self) -> None:
        """Forget the context and the explicit memories, and zero the prefix-attention tracker (pos_offset is
        left as it is)."""
        self._n_past = 0
        self.clear_prefix()

    def fit_threads(self) -> int:
        """Choose the thread count of the next generation's decode steps and prefill matrix products (BLAS): all
        of the engine's threads on a quiet machine, one fewer for each core another program keeps busy (see
        `threads.threads_now`); the count the caller or $M3LITE_THREADS fixed is kept. Returns it."""
        if not self.adaptive:  # the fixed count holds for the BLAS too (else it would run on every core)
            set_blas_threads(self.active_threads)
        else:
            n = threads_now(self.n_threads)
            set_blas_threads(n)  # the prefill's matrix products: the same cores (a no-op when unchanged)
            if n != self.active_threads:
                self.active_threads = n
                s = self._scratch
                self._active_scratch = s if n == self.n_threads else s._replace(xb=s.xb[:n])
        return self.active_threads

    def truncate(self, n_past: int) -> None:
        """Keep the first `n_past` context tokens. Attention is causal, so their keys/values do not depend on the
        dropped ones: the next prefill/decode continues as if those had never been added."""
        if not 0 <= n_past <= self._n_past:
            raise BadArgument(f"cannot keep {n_past} context tokens: the cache holds {self._n_past}")
        self._n_past = int(n_past)

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of what resuming needs: the cache slots in use (memories, then context), each layer's
        attention start, pos_offset and n_past (arrays, so a conversation file can hold them)."""
        end = self.prefix_capacity + self._n_past
        return {"k": self.k_cache[:, :, :end].copy(), "v": self.v_cache[:, :, :end].copy(),
                "attn_start": self.attn_start.copy(), "pos_offset": np.array(self.pos_offset, np.int64),
                "n_past": np.array(self._n_past, np.int64),
                "prefix_capacity": np.array(self.prefix_capacity, np.int64)}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Put a `snapshot` back (taken from an engine of the same shape); BadArgument when it does not fit."""
        k, v = np.asarray(state["k"], np.float32), np.asarray(state["v"], np.float32)
        start = np.asarray(state["attn_start"], np.int64)
        n_past, off, prefix = int(state["n_past"]), int(state["pos_offset"]), int(state["prefix_capacity"])
        L, G, _, hd = self.k_cache.shape
        end = prefix + n_past
        if (prefix != self.prefix_capacity or k.shape != (L, G, end, hd) or v.shape != k.shape
                or start.shape != self.attn_start.shape or not 0 <= n_past <= self.max_ctx or off < 0
                or start.min(initial=prefix) < 0 or start.max(initial=prefix) > prefix):
            raise BadArgument(f"its KV state has another shape than this model's ({L} layers, {G} KV heads, "
                              f"{self.prefix_capacity} memory slots, {self.max_ctx} context tokens)")
        self.reset()
        self.k_cache[:, :, :end] = k
        self.v_cache[:, :, :end] = v
        self.attn_start[...] = start
        self.pos_offset = off
        self._n_past = n_past

    def set_prefix(self, layer: int, k: np.ndarray, v: np.ndarray, counts=None) -> None:
        """Put explicit-memory keys/values [n_kv, m, hd] (keys already rotated) in front of layer `layer`'s context.

        They replace the layer's previous memories and are seen by every query, without causal mask.
        counts [n_kv] (optional): kv head g keeps only its first counts[g] tokens (padded memory slots dropped);
        default m for every head. m = 0 removes the layer's memories.
        The slots now hold other memories, so the prefix-attention tracker is zeroed (read it first).
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
        self.reset_prefix_attention()

    def clear_prefix(self) -> None:
        """Remove all explicit memories: every layer attends to the context only. Zeroes the prefix-attention
        tracker."""
        self.attn_start[...] = self.prefix_capacity
        self.reset_prefix_attention()

    # ---- prefix-attention tracking (citations) -------------------------------------------------------------

    def reset_prefix_attention(self) -> None:
        """Zero the attention mass accumulated on the prefix slots and its total."""
        self.prefix_mass[:] = 0.0
        self.prefix_mass_total[0] = 0.0

    def prefix_attention(self) -> np.ndarray:
        """Attention mass per installed prefix slot [m] (float64, a copy), accumulated by `decode` since the
        last reset: the softmax weight that each query head of each memory layer (cfg.memory_layer_ids) put on
        the slot, summed over those layers, heads and decode steps (prefill is not counted).

        Index i is cache slot prefix_capacity - m + i, with m the largest number of memory tokens installed at
        any memory layer and kv head. Memories are right-aligned per (layer, kv head), so when every memory
        layer and head holds the same m tokens (as `set_prefix` without counts, installing the same memories
        at each memory layer), index i is memory token i of every layer/head. With per-head counts
        (`set_prefix(..., counts)`) a kv head holding c < m tokens keeps its first c tokens in slots
        m - c .. m - 1 of this array: the mass of its token i lands at index m - c + i. Empty when no memory
        is installed at any memory layer.
        """
        P = self.prefix_capacity
        starts = self.attn_start[self.track]
        m = P - int(starts.min()) if starts.size else 0
        return self.prefix_mass[P - m:P].copy()

    def prefix_attention_total(self) -> float:
        """All the attention mass of the memory layers over the same decode steps: steps * n_memory_layers *
        n_heads (each softmax sums to 1), so prefix_attention() / prefix_attention_total() is the share of
        attention each prefix slot received."""
        return float(self.prefix_mass_total[0])

    def _ensure_positions(self, n_pos: int) -> None:
        if n_pos > self.cos.shape[0]:
            self.cos, self.sin = rope_tables(self.cfg.hd, self.cfg.rope_theta, max(n_pos, self.max_ctx),
                                             self.cfg.rope_scaling)
            self._decode_cache = DecodeCache(self.k_cache, self.v_cache, self.attn_start, self.cos, self.sin)

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
        numba.set_num_threads(self.active_threads)  # per calling thread in numba
        _decode_step(t, self.prefix_capacity + self._n_past, pos, self.eps, self.scale, self.n_rep,
                     self._decode_weights, self._decode_cache, self._active_scratch, self._tracking)
        self._n_past += 1
        return self._scratch.logits.copy()

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
                self._mm(xn, "output", 0, out[c0:c1])
        if out is not None:
            return out
        if not self.q8:
            return np.matmul(self.output, xn[-1])
        last = np.empty((1, V), np.float32)
        self._mm(xn[-1:], "output", 0, last)
        return last[0]

    def embed(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out [n, dim] = the embeddings of the token ids."""
        if self.tok_embeddings.shape[0]:
            np.take(self.tok_embeddings, ids, axis=0, out=out)
            return
        values, scales = self.q8_weights["output"]
        D = out.shape[1]
        np.multiply(values[ids, :D], np.repeat(scales[ids], QK, axis=1)[:, :D], out=out)

    def _mm(self, x: np.ndarray, kind: str, l: int, out: np.ndarray) -> None:
        """out = x @ W.T on rows of tokens, for the projection `kind` of layer l or the head ("output")."""
        if not self.q8:
            np.matmul(x, (self.output if kind == "output" else getattr(self, kind)[l]).T, out=out)
            return
        values, scales = self.q8_weights[kind]
        if kind != "output":
            values, scales = values[l], scales[l]
        m, k = x.shape
        if m == 1:  # one token (a prompt's last, for its logits): row dots beat dequantizing the matrix
            matvec_q8(values, scales, x[0], out[0])
            return
        matmul_q8(x, values, scales, out, self._q8_tile)

    def _out_and_mlp_rows(self, l: int, ao, x, xb, h1, h3) -> None:
        """Rows of tokens: x += wo @ attention output, then x += the SwiGLU MLP of rmsnorm(x) (in place)."""
        self._mm(ao, "wo", l, xb)
        x += xb
        rmsnorm_rows(x, self.ffn_norm[l], self.eps, xb)
        self._mm(xb, "w1", l, h1)
        self._mm(xb, "w3", l, h3)
        silu_mul(h1, h3, h1)
        self._mm(h1, "w2", l, xb)
        x += xb

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
        self.embed(ids, x)
        for l in range(self.cfg.n_layers):
            rmsnorm_rows(x, self.attention_norm[l], self.eps, xb)
            self._mm(xb, "wq", l, q)
            self._mm(xb, "wk", l, k)
            self._mm(xb, "wv", l, v)
            rope_rows(q, hd, self.cos, self.sin, pos0)
            _store_kv(k, v, self.k_cache[l], self.v_cache[l], slot0, hd, self.cos, self.sin, pos0)
            attention_prefill(q, self.k_cache[l], self.v_cache[l], self.attn_start[l], slot0, self.n_rep,
                              self.scale, self.pscores, ao)
            self._out_and_mlp_rows(l, ao, x, xb, h1, h3)
        rmsnorm_rows(x, self.norm, self.eps, xb)
        self._n_past += m
        return xb

    # ---- explicit memory: encoding references ---------------------------------------------------------------

    def _check_references(self, refs) -> list[np.ndarray]:
        cfg = self.cfg
        V, T = cfg.vocab_size, cfg.reference_max_tokens
        if isinstance(refs, (str, bytes)) or not hasattr(refs, "__len__"):
            raise BadArgument("references must be a list of token-id lists")
        rows = []
        for i, r in enumerate(refs):
            a = np.asarray(r)
            if a.ndim != 1:
                raise BadArgument(f"reference {i} must be a 1-D list of token ids, got shape {a.shape}")
            if a.size == 0:
                raise BadArgument(f"reference {i} is empty: a reference is <ref> (id {self.ref_id}) followed by text "
                                  f"token ids")
            if not np.issubdtype(a.dtype, np.integer):
                raise BadArgument(f"reference {i} must hold integer token ids, got {a.dtype}")
            if a.size > T:
                raise BadArgument(f"reference {i} has {a.size} tokens; the model's references hold at most "
                                  f"reference_max_tokens={T} (<ref> included)")
            if a.min() < 0 or a.max() >= V:
                raise BadArgument(f"reference {i} has token ids from {a.min()} to {a.max()}, outside [0, {V})")
            if a[0] != self.ref_id:
                raise BadArgument(f"reference {i} starts with token {a[0]}; every reference must start with the "
                                  f"<ref> token (id {self.ref_id})")
            rows.append(a.astype(np.int64))
        return rows

    def encode_references(self, refs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Encode references into explicit memories, exactly as `converters.model.encode_memory`.

        refs: B lists of token ids, each <ref> (id 4) followed by up to reference_max_tokens - 1 text ids.
        Returns, with Lm = len(cfg.memory_layer_ids) (in that order), K = cfg.memory_tokens_per_head:

            keys, values  [B, Lm, n_kv, K, hd] float32  kept tokens' keys (rotated at their position in the
                                                        reference, as the layer used them) and values
            positions     [B, Lm, n_kv, K] int32        each kept token's position (1..len-1), ascending
            counts        [B, Lm, n_kv] int32           valid slots: min(K, len - 1); later slots are zero,
                                                        position 0

        Each reference runs alone (causal attention, RoPE positions 0..len-1) through layers 0..max memory
        layer; at a memory layer, kv head g keeps the K text tokens with the highest selection score
        (`kernels.selection_scores`: attention received from the text tokens of g's query heads, no causal
        mask, no RoPE; ties to the lower position). References are packed into blocks of up to ENCODE_TOKENS
        tokens so the projections are large GEMMs. Uses its own scratch: the context, the memories and the
        tracker of the engine are untouched.
        """
        cfg = self.cfg
        rows = self._check_references(refs)
        B, Lm, G, K, hd = len(rows), len(self.memory_layers), cfg.n_kv_heads, cfg.memory_tokens_per_head, cfg.hd
        keys = np.zeros((B, Lm, G, K, hd), np.float32)
        values = np.zeros((B, Lm, G, K, hd), np.float32)
        positions = np.zeros((B, Lm, G, K), np.int32)
        counts = np.zeros((B, Lm, G), np.int32)
        if B:
            self.fit_threads()  # a bank build on a busy machine: its matrix products on the free cores
            self._encode(rows, keys, values, positions, counts, select=True)
        return keys, values, positions, counts

    def ref_kv(self) -> tuple[np.ndarray, np.ndarray]:
        """The <ref> token alone at position 0 through the memory layers: k (rotated), v [Lm, n_kv, 1, hd]
        float32, as `converters.model.ref_kv`. Computed once and cached (read-only arrays)."""
        if self._ref_kv is None:
            cfg = self.cfg
            shape = (1, len(self.memory_layers), cfg.n_kv_heads, 1, cfg.hd)
            k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            pos = np.zeros(shape[:4], np.int32)
            cnt = np.zeros(shape[:3], np.int32)
            self._encode([np.array([self.ref_id], np.int64)], k, v, pos, cnt, select=False)
            k, v = k[0], v[0]
            k.flags.writeable = False
            v.flags.writeable = False
            self._ref_kv = (k, v)
        return self._ref_kv

    def _encode_block_tokens(self) -> int:
        """Tokens per encode block: ENCODE_TOKENS, fewer for wide models (scratch stays under ~64 MiB)."""
        cfg = self.cfg
        row_bytes = 4 * (2 * cfg.dim + 2 * cfg.q_dim + 2 * cfg.kv_dim + 2 * cfg.ffn_dim)
        return max(cfg.reference_max_tokens, min(ENCODE_TOKENS, (64 << 20) // row_bytes))

    def _encode(self, rows, keys, values, positions, counts, select: bool) -> None:
        """Run `rows` in blocks and fill the outputs (see encode_references). select=False keeps position 0
        (the <ref> token) in slot 0 of every layer/head instead of the selected tokens (for ref_kv)."""
        cfg = self.cfg
        cap = self._encode_block_tokens()
        n_all = sum(len(r) for r in rows)
        N = min(n_all, cap) if len(rows) > 1 else n_all
        N = max(N, max(len(r) for r in rows))
        D, qd, kvd, F = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.ffn_dim
        scratch = {"x": (N, D), "xb": (N, D), "q": (N, qd), "k": (N, kvd), "v": (N, kvd), "ao": (N, qd),
                   "h1": (N, F), "h3": (N, F)}
        sc = {name: np.empty(shape, np.float32) for name, shape in scratch.items()}
        self._ensure_positions(cfg.reference_max_tokens)
        numba.set_num_threads(1)  # BLAS owns the cores during the GEMMs (see prefill)
        b0 = 0
        while b0 < len(rows):
            b1, n = b0, 0
            while b1 < len(rows) and (b1 == b0 or n + len(rows[b1]) <= N):
                n += len(rows[b1])
                b1 += 1
            self._encode_block(rows[b0:b1], sc, keys[b0:b1], values[b0:b1], positions[b0:b1], counts[b0:b1],
                               select)
            b0 = b1

    def _encode_block(self, rows, sc, keys, values, positions, counts, select: bool) -> None:
        cfg = self.cfg
        hd, G, K = cfg.hd, cfg.n_kv_heads, keys.shape[3]
        B = len(rows)
        lengths = np.array([len(r) for r in rows], np.int64)
        starts = np.zeros(B, np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        N = int(lengths.sum())
        pos = np.arange(N, dtype=np.int64) - np.repeat(starts, lengths)
        x, xb, q, k, v, ao = (sc[name][:N] for name in ("x", "xb", "q", "k", "v", "ao"))
        h1, h3 = sc["h1"][:N], sc["h3"][:N]
        self.embed(np.concatenate(rows), x)
        last = max(self.memory_layers)
        slot_of = {layer: i for i, layer in enumerate(self.memory_layers)}
        g_idx = np.arange(G)[None, :, None]
        for l in range(last + 1):
            rmsnorm_rows(x, self.attention_norm[l], self.eps, xb)
            self._mm(xb, "wk", l, k)
            self._mm(xb, "wv", l, v)
            if l < last or select:
                self._mm(xb, "wq", l, q)
            li = slot_of.get(l)
            if li is not None:
                if select:
                    chosen, cnt = select_tokens(selection_scores(q, k, lengths, hd, self.scale, xb), lengths, K)
                else:
                    chosen, cnt = np.zeros((B, G, K), np.int32), np.ones(B, np.int32)
            rope_rows_at(k, hd, self.cos, self.sin, pos)
            if li is not None:
                valid = (np.arange(K) < cnt[:, None, None])[..., None]
                idx = starts[:, None, None] + chosen  # [B, G, K] rows of the packed block
                keys[:, li] = np.where(valid, k.reshape(N, G, hd)[idx, g_idx], 0.0)
                values[:, li] = np.where(valid, v.reshape(N, G, hd)[idx, g_idx], 0.0)
                positions[:, li] = chosen
                counts[:, li] = cnt[:, None]
            if l == last:
                break  # later layers, and this layer's attention output, never reach a memory
            rope_rows_at(q, hd, self.cos, self.sin, pos)
            reference_attention(q, k, v, lengths, hd, self.scale, ao)
            self._out_and_mlp_rows(l, ao, x, xb, h1, h3)
