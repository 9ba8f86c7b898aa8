"""Token sampling: repetition penalty, greedy, top-k (partial selection), top-p, temperature.

Order (as llama.cpp): penalty -> top-k -> top-p on the untempered softmax -> sample from the softmax of the
kept logits divided by the temperature. The uniform number u comes from the caller, so the caller's numpy
Generator owns the seed and a run is reproducible.
"""
import numpy as np
from numba import njit

from ..errors import BadArgument
from .expf import exp_softmax
from .matmul import FASTMATH


@njit(cache=True, error_model="numpy")
def _argmax(x):
    best = 0
    for i in range(1, x.shape[0]):
        if x[i] > x[best]:  # strict: ties go to the lowest index
            best = i
    return best


@njit(cache=True, error_model="numpy", inline="always")
def _heap_less(vals, idx, a, b):
    """Heap order: smaller value first; among equal values the larger index is "smaller" (evicted first)."""
    return vals[a] < vals[b] or (vals[a] == vals[b] and idx[a] > idx[b])


@njit(cache=True, error_model="numpy")
def _sift_down(vals, idx, i, n):
    while True:
        left = 2 * i + 1
        if left >= n:
            return
        c = left
        if left + 1 < n and _heap_less(vals, idx, left + 1, left):
            c = left + 1
        if _heap_less(vals, idx, c, i):
            vals[i], vals[c] = vals[c], vals[i]
            idx[i], idx[c] = idx[c], idx[i]
            i = c
        else:
            return


@njit(cache=True, error_model="numpy")
def _top_k(x, k):
    """Indices of the k largest entries of x (ties: lowest index), sorted by value descending then index.

    A size-k min-heap over one pass: O(V log k) instead of sorting the whole vocabulary.
    """
    vals = np.empty(k, np.float32)
    idx = np.empty(k, np.int64)
    for i in range(k):
        vals[i] = x[i]
        idx[i] = i
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(vals, idx, i, k)
    for i in range(k, x.shape[0]):
        if x[i] > vals[0]:
            vals[0] = x[i]
            idx[0] = i
            _sift_down(vals, idx, 0, k)
    # heap sort: repeatedly move the smallest to the end -> descending order
    for end in range(k - 1, 0, -1):
        vals[0], vals[end] = vals[end], vals[0]
        idx[0], idx[end] = idx[end], idx[0]
        _sift_down(vals, idx, 0, end)
    return idx


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def _exp_shifted(x, cand, n, mx, inv_t, out):
    """out[i] = exp((x[cand[i]] - mx) * inv_t) for i < n, in fp32 (vectorized); returns their sum in fp64."""
    for i in range(n):
        out[i] = exp_softmax((x[cand[i]] - mx) * inv_t)
    total = 0.0
    for i in range(n):
        total += out[i]
    return total


@njit(cache=True, error_model="numpy")
def sample_kernel(logits, temperature, top_k, top_p, repetition_penalty, recent_tokens, n_recent, u):
    """Compiled sampler; see `sample` for the meaning of the arguments (they are not checked here)."""
    V = logits.shape[0]
    work = logits
    if repetition_penalty != 1.0 and n_recent > 0:
        work = logits.copy()
        pen = np.float32(repetition_penalty)
        for j in range(n_recent):
            t = recent_tokens[j]
            if t < 0 or t >= V:
                continue
            seen = False
            for i in range(j):
                if recent_tokens[i] == t:
                    seen = True
                    break
            if seen:
                continue  # penalize each distinct token once
            if work[t] > 0:
                work[t] = work[t] / pen
            else:
                work[t] = work[t] * pen
    if temperature <= 0.0 or top_k == 1 or np.isinf(np.float32(1.0 / temperature)):
        return _argmax(work)
    buf = np.empty(V, np.float32)
    if 0 < top_k < V:
        cand = _top_k(work, top_k)
    elif top_p < 1.0:
        # nucleus over the whole vocabulary without sorting it: grow a partial top-k until it holds top_p of
        # the probability mass (for peaked distributions a few hundred tokens; flat ones end in a full sort)
        mx = work[_argmax(work)]
        z = _exp_shifted(work, np.arange(V), V, mx, np.float32(1.0), buf)
        k = 256
        while True:
            if 4 * k >= V:
                cand = np.argsort(-work, kind="mergesort")  # stable: ties keep the lowest index first
                break
            cand = _top_k(work, k)
            if _exp_shifted(work, cand, k, mx, np.float32(1.0), buf) >= top_p * z:
                break
            k *= 8
    else:
        cand = np.arange(V)
    n = cand.shape[0]
    mx = work[cand[0]]
    for i in range(n):
        mx = max(mx, work[cand[i]])
    n_keep = n
    if top_p < 1.0:  # cand is sorted by probability here
        total = _exp_shifted(work, cand, n, mx, np.float32(1.0), buf)
        cum = 0.0
        for i in range(n):
            cum += buf[i]
            if cum >= top_p * total:
                n_keep = i + 1
                break
    total = _exp_shifted(work, cand, n_keep, mx, np.float32(1.0 / temperature), buf)  # finite: see above
    r = u * total
    cum = 0.0
    for i in range(n_keep):
        cum += buf[i]
        if r < cum:
            return cand[i]
    return cand[n_keep - 1]


_EMPTY = np.zeros(0, np.int64)


def sample(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, recent_tokens=None, n_recent: int | None = None,
           u: float = 0.0) -> int:
    """Pick the next token from logits [V].

    temperature 0 means greedy argmax (ties to the lowest index). repetition_penalty > 1 divides positive and
    multiplies negative logits of the distinct tokens in recent_tokens[:n_recent] (as llama.cpp / CTRL).
    top_k 0 keeps all tokens; top_p 1.0 disables nucleus filtering. u is a uniform number in [0, 1).
    """
    x = np.asarray(logits)
    if x.ndim != 1 or x.shape[0] == 0:
        raise BadArgument(f"logits must be a non-empty vector, got shape {x.shape}")
    if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
        x = np.array(x, dtype=np.float32)  # one compiled signature
    if not temperature >= 0.0:
        raise BadArgument(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if int(top_k) < 0:
        raise BadArgument(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise BadArgument(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0.0:
        raise BadArgument(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if not 0.0 <= u < 1.0:
        raise BadArgument(f"u must be a uniform random number in [0, 1), got {u}")
    if recent_tokens is None:
        rec = _EMPTY
    else:
        rec = np.asarray(recent_tokens)
        if rec.dtype != np.int64 or not rec.flags.c_contiguous or not rec.flags.writeable or rec.ndim != 1:
            rec = np.array(rec, dtype=np.int64).reshape(-1)
    n = rec.shape[0] if n_recent is None else int(n_recent)
    if not 0 <= n <= rec.shape[0]:
        raise BadArgument(f"n_recent must be in [0, {rec.shape[0]}], got {n_recent}")
    return int(sample_kernel(x, float(temperature), int(top_k), float(top_p), float(repetition_penalty),
                             rec, n, float(u)))
