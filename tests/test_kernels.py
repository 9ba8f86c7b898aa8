"""Each numba kernel against plain numpy (float64)."""
import numpy as np
import pytest

from m3lite.errors import BadArgument
from m3lite.kernels import (accumulate_prefix_attention, attention_group, first_copies, attention_prefill, dot,
                            reference_attention, rmsnorm, rmsnorm_rows,
                            rope, rope_rows, rope_rows_at, rope_tables, sample, select_tokens,
                            selection_scores, silu_mul)

RNG = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def silu64(g):
    g = np.asarray(g, np.float64)
    return g / (1 + np.exp(-g))


def softmax64(s):
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_dot():
    a, b = randn(77), randn(77)
    assert abs(dot(a, b) - a.astype(np.float64) @ b) < 1e-5


def test_rmsnorm():
    x, w = randn(83), randn(83)
    out = np.empty_like(x)
    rmsnorm(x, readonly(w), 1e-5, out)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64 ** 2) + 1e-5) * w
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    X = randn(5, 83)
    out2 = np.empty_like(X)
    rmsnorm_rows(X, readonly(w), 1e-5, out2)
    X64 = X.astype(np.float64)
    ref2 = X64 / np.sqrt(np.mean(X64 ** 2, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out2, ref2, rtol=1e-5, atol=1e-6)
    rmsnorm(x, readonly(w), 1e-5, x)  # in place
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-6)


def rope64(x, hd, positions, theta):
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = positions[:, None] * inv
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x = x.reshape(len(positions), -1, hd).astype(np.float64)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(len(positions), -1)


@pytest.mark.parametrize("hd", [8, 48])
def test_rope(hd):
    cos, sin = rope_tables(hd, 10000.0, 300)
    assert cos.shape == (300, hd // 2) and cos.dtype == np.float32
    inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    np.testing.assert_allclose(cos, np.cos(np.arange(300)[:, None] * inv), atol=1e-4)
    x = randn(3 * hd)
    ref = rope64(x[None], hd, np.array([257.0]), 10000.0)[0]
    rope(x, hd, cos[257], sin[257])
    np.testing.assert_allclose(x, ref, atol=1e-4)
    X = randn(6, 2 * hd)
    ref = rope64(X, hd, np.arange(10, 16, dtype=np.float64), 10000.0)
    rope_rows(X, hd, cos, sin, 10)
    np.testing.assert_allclose(X, ref, atol=1e-5)


def test_silu_mul():
    a, b = randn(4, 19, scale=5), randn(4, 19)
    ref = silu64(a) * b
    silu_mul(a, b, a)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    big = np.array([[-200.0, 200.0, 0.0, -88.0, 88.0]], np.float32)  # no overflow to nan
    out = np.empty_like(big)
    silu_mul(big, np.ones_like(big), out)
    np.testing.assert_allclose(out, [[0.0, 200.0, 0.0, 0.0, 88.0]], atol=1e-6)
    # more rows than one parallel block (16), written over either input
    a, b = randn(37, 70, scale=6), randn(37, 70)
    ref = silu64(a) * b
    for out_is in ("a", "b", "new"):
        a2, b2 = a.copy(), b.copy()
        out = {"a": a2, "b": b2, "new": np.empty_like(a)}[out_is]
        silu_mul(a2, b2, out)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def attention64(q, k, v, visible, n_rep):
    """q [H, hd], k/v [KV, T, hd], visible [KV, T] bool -> [H*hd]."""
    H, hd = q.shape
    out = []
    for h in range(H):
        g = h // n_rep
        kk, vv = k[g][visible[g]].astype(np.float64), v[g][visible[g]].astype(np.float64)
        p = softmax64(kk @ q[h] / np.sqrt(hd))
        out.append(p @ vv)
    return np.concatenate(out)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (8, 2)])
def test_attention_group(n_heads, n_kv):
    """The decode step's attention, one kv head at a time (as the engine's threads run it): the new token's
    key/value go to slot `end - 1`, its query heads attend to [starts[g], end). cos 1 / sin 0: no rotation."""
    hd, cap = 16, 20
    kc, vc = randn(n_kv, cap, hd), randn(n_kv, cap, hd)
    q, k, v = randn(n_heads * hd), randn(n_kv * hd), randn(n_kv * hd)
    att = np.zeros((n_heads, cap), np.float32)
    out = np.empty(n_heads * hd, np.float32)
    totals = np.empty(n_heads, np.float32)
    starts, end = np.arange(n_kv, dtype=np.int64) + 3, 15  # each kv head has its own first slot
    cos, sin = np.ones(hd // 2, np.float32), np.zeros(hd // 2, np.float32)
    qa = q.copy()
    for g in range(n_kv):
        attention_group(qa, k, v, kc, vc, g, starts[g], end - 1, n_heads // n_kv, 1 / np.sqrt(hd), cos, sin, att,
                        out, totals)
    np.testing.assert_array_equal(kc[:, end - 1], k.reshape(n_kv, hd))
    np.testing.assert_array_equal(vc[:, end - 1], v.reshape(n_kv, hd))
    vis = np.zeros((n_kv, cap), bool)
    for g in range(n_kv):
        vis[g, starts[g]:end] = True
    np.testing.assert_allclose(out, attention64(q.reshape(n_heads, hd), kc, vc, vis, n_heads // n_kv),
                               atol=1e-5)
    # att / totals are the softmax weights the heads used
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        p = softmax64(kc[g, starts[g]:end].astype(np.float64) @ q[h * hd:(h + 1) * hd] / np.sqrt(hd))
        np.testing.assert_allclose(att[h, starts[g]:end] / totals[h], p, rtol=1e-5, atol=1e-7)
    # accumulate_prefix_attention adds those weights on the prefix slots [starts[g], prefix_end)
    mass = np.full(cap, 0.5)
    accumulate_prefix_attention(att, totals, starts, 9, n_heads // n_kv, mass)
    want = np.full(cap, 0.5)
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        want[starts[g]:9] += att[h, starts[g]:9] / totals[h]
    np.testing.assert_allclose(mass, want, rtol=1e-6)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 1), (6, 2)])
def test_attention_prefill(n_heads, n_kv):
    hd, cap, n = 8, 24, 5
    kc, vc = randn(n_kv, cap, hd), randn(n_kv, cap, hd)
    q = randn(n, n_heads * hd)
    scores = np.full((n + 1, cap + 3), np.nan, np.float32)  # scratch may be larger than needed
    out = np.empty_like(q)
    # slots starts[g]..9: memories/past, visible to all; 10..14: the block, causal
    starts, slot0 = 2 + 2 * np.arange(n_kv, dtype=np.int64), 10
    attention_prefill(q, kc, vc, starts, slot0, n_heads // n_kv, 1 / np.sqrt(hd), scores, out)
    for i in range(n):
        vis = np.zeros((n_kv, cap), bool)
        for g in range(n_kv):
            vis[g, starts[g]:slot0 + i + 1] = True
        np.testing.assert_allclose(out[i], attention64(q[i].reshape(n_heads, hd), kc, vc, vis, n_heads // n_kv),
                                   atol=1e-5)


# ---- explicit memory: reference encoding ---------------------------------------------------------------

def pack(lengths, width, scale=1.0):
    return randn(int(sum(lengths)), width, scale=scale)


def test_rope_rows_at():
    hd, n = 8, 6
    cos, sin = rope_tables(hd, 100.0, 20)
    x = randn(n, 3 * hd)
    pos = np.array([5, 0, 19, 3, 3, 7])
    want = x.copy()
    for i in range(n):
        rope(want[i], hd, cos[pos[i]], sin[pos[i]])
    rope_rows_at(x, hd, cos, sin, pos)
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("n_heads,n_kv,lengths", [(4, 4, [5, 1, 7]), (4, 2, [7, 7]), (6, 2, [2, 9, 4, 9])])
def test_reference_attention(n_heads, n_kv, lengths):
    hd, n_rep = 8, n_heads // n_kv
    q, k, v = pack(lengths, n_heads * hd), pack(lengths, n_kv * hd), pack(lengths, n_kv * hd)
    out = np.full_like(q, np.nan)
    reference_attention(q, k, v, np.array(lengths), hd, 1 / np.sqrt(hd), out)
    r0 = 0
    for n in lengths:  # each reference alone, causal
        for i in range(n):
            vis = np.zeros((n_kv, n), bool)
            vis[:, :i + 1] = True
            kk = k[r0:r0 + n].reshape(n, n_kv, hd).transpose(1, 0, 2)
            vv = v[r0:r0 + n].reshape(n, n_kv, hd).transpose(1, 0, 2)
            np.testing.assert_allclose(out[r0 + i], attention64(q[r0 + i].reshape(n_heads, hd), kk, vv, vis, n_rep),
                                       atol=1e-5)
        r0 += n


@pytest.mark.parametrize("n_heads,n_kv,lengths", [(4, 4, [5, 1, 7]), (4, 2, [7, 7]), (6, 2, [2, 9, 4, 9])])
def test_selection_scores(n_heads, n_kv, lengths):
    hd, n_rep = 8, n_heads // n_kv
    q, k = pack(lengths, n_heads * hd, 2.0), pack(lengths, n_kv * hd, 2.0)
    got = selection_scores(q, k, np.array(lengths), hd, 1 / np.sqrt(hd))
    T = max(lengths)
    assert got.shape == (len(lengths), n_kv, T) and got.dtype == np.float64
    r0 = 0
    for b, n in enumerate(lengths):
        want = np.full((n_kv, T), -np.inf)
        want[:, 1:n] = 0.0
        for h in range(n_heads):
            g = h // n_rep
            for i in range(1, n):  # text queries, text keys, no causal mask
                s = k[r0 + 1:r0 + n, g * hd:(g + 1) * hd].astype(np.float64) @ q[r0 + i, h * hd:(h + 1) * hd]
                want[g, 1:n] += softmax64(s / np.sqrt(hd))
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)
        r0 += n


def test_first_copies_make_exact_ties():
    lengths = np.array([6, 4])
    x = randn(10, 5)
    x[2] = x[4] = x[1]  # reference 0: rows 1, 2, 4 equal
    x[9] = x[7]  # reference 1: rows 1 and 3
    x[6] = x[0]  # equal rows in different references are not copies
    rep = np.full((2, 6), -1, np.int64)
    first_copies(x, lengths, rep)
    assert rep[0].tolist() == [0, 1, 1, 3, 1, 5] and rep[1, :4].tolist() == [0, 1, 2, 1]
    # keys that differ by rounding only: with x, the copies' scores are bitwise those of the first copy
    hd = 4
    q, k = randn(10, 2 * hd), randn(10, hd)
    for i, j in ((2, 1), (4, 1), (9, 7)):
        k[i] = k[j] * np.float32(1 + 2 ** -20)
    s = selection_scores(q, k, lengths, hd, 0.5, x)
    assert s[0, 0, 2] == s[0, 0, 4] == s[0, 0, 1] and s[1, 0, 3] == s[1, 0, 1]
    s0 = selection_scores(q, k, lengths, hd, 0.5)
    assert s0[0, 0, 2] != s0[0, 0, 1]
    np.testing.assert_allclose(s, s0, rtol=1e-5)


def test_select_tokens():
    K = 3
    s = np.full((3, 2, 6), -np.inf)
    s[0, 0, 1:6] = [0.5, 2.0, 0.5, 3.0, 0.5]  # ties at 0.5: the lower positions win
    s[0, 1, 1:6] = [1.0, 1.0, 1.0, 1.0, 1.0]
    s[1, :, 1:3] = [[1.0, 2.0], [2.0, 1.0]]  # 2 text tokens < K
    lengths = np.array([6, 3, 1])  # the last reference is <ref> alone
    pos, cnt = select_tokens(s, lengths, K)
    assert pos.dtype == np.int32 and pos.shape == (3, 2, K)
    assert cnt.tolist() == [3, 2, 0]
    assert pos[0, 0].tolist() == [1, 2, 4] and pos[0, 1].tolist() == [1, 2, 3]
    assert pos[1].tolist() == [[1, 2, 0], [1, 2, 0]]
    assert pos[2].tolist() == [[0, 0, 0], [0, 0, 0]]


# ---- sampling --------------------------------------------------------------------------------------------

def test_greedy_is_argmax_lowest_tie():
    x = randn(1000)
    assert sample(x, temperature=0.0) == int(np.argmax(x))
    x[[10, 500]] = x.max() + 1
    assert sample(x, temperature=0.0) == 10
    assert sample(x, temperature=0.7, top_k=1, u=0.99) == 10
    assert sample(x, temperature=0.7, top_p=1e-9, u=0.99) == 10
    assert sample(x, temperature=0.7, top_k=50, top_p=1e-9, u=0.99) == 10
    assert sample(x, temperature=1e-300, u=0.99) == 10  # 1/T overflows float32: greedy, not NaN


def test_top_k_one_and_top_p_tiny_equal_greedy():
    for seed in range(5):
        x = np.random.default_rng(seed).standard_normal(32000).astype(np.float32)
        g = sample(x, temperature=0.0)
        assert g == int(np.argmax(x))
        assert sample(x, temperature=1.0, top_k=1, u=0.5) == g
        assert sample(x, temperature=1.0, top_p=1e-6, u=0.999) == g


def test_seeded_sampling_is_reproducible():
    x = randn(512, scale=2)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [sample(x, temperature=0.8, top_k=40, top_p=0.9, u=rng.random()) for _ in range(50)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sampling_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    counts = np.bincount([sample(logits, 1.0, u=rng.random()) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_k=2 renormalizes over the two best: 0.5/0.8, 0.3/0.8
    counts = np.bincount([sample(logits, 1.0, top_k=2, u=rng.random()) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)
    # top_p=0.7 keeps the smallest prefix reaching 0.7: {0, 1}
    counts = np.bincount([sample(logits, 1.0, top_p=0.7, u=rng.random()) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)
    # low temperature sharpens
    counts = np.bincount([sample(logits, 0.25, u=rng.random()) for _ in range(2000)], minlength=4) / 2000
    assert counts[0] > 0.85
    # u -> 0 picks the most likely token of the sorted candidates; u -> 1 the least likely kept one
    assert sample(logits, 1.0, top_k=3, u=0.0) == 0
    assert sample(logits, 1.0, top_k=3, u=0.9999) == 2


def test_top_k_partial_selection_matches_sort():
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    best = np.argsort(-x, kind="stable")[:7]
    # with u sweeping [0, 1) only the 7 best tokens can come out, each of them at some u
    seen = {sample(x, 1.0, top_k=7, u=u) for u in np.linspace(0, 0.9999, 400)}
    assert seen == set(best.tolist())


def test_repetition_penalty():
    x = np.array([2.0, 1.9, -1.0, -1.1], np.float32)
    assert sample(x, 0.0) == 0
    assert sample(x, 0.0, repetition_penalty=1.2, recent_tokens=np.array([0]), n_recent=1) == 1
    # negative logits get multiplied: token 2 (-1.0 -> -1.5) falls below token 3 (-1.1)
    y = np.array([-1.0, -1.1], np.float32)
    assert sample(y, 0.0, repetition_penalty=1.5, recent_tokens=[0, 0, 0]) == 1
    # only the first n_recent entries of the window count
    assert sample(x, 0.0, repetition_penalty=1.2, recent_tokens=np.array([1, 0]), n_recent=1) == 0
    # a repeated token is penalized once, not once per occurrence: 2.0/1.04 > 1.9 still wins
    assert sample(x, 0.0, repetition_penalty=1.04, recent_tokens=np.array([0, 0, 0, 0])) == 0
    # the penalty lowers the repeated token's probability when sampling
    rng = np.random.default_rng(0)
    n0 = sum(sample(x, 1.0, u=rng.random()) == 0 for _ in range(2000))
    n1 = sum(sample(x, 1.0, repetition_penalty=1.5, recent_tokens=[0], u=rng.random()) == 0 for _ in range(2000))
    assert n1 < n0 - 200
    assert x[0] == 2.0  # the caller's logits are not modified


def test_sampling_bad_arguments():
    x = randn(10)
    for kw in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
               dict(repetition_penalty=0.0), dict(u=1.0), dict(recent_tokens=[1], n_recent=2)):
        with pytest.raises(BadArgument):
            sample(x, **kw)


def test_exp_softmax_accuracy():
    from m3lite.kernels.expf import exp_softmax
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_softmax(x[i])

    x = -np.random.default_rng(0).uniform(0, 80, 100_000).astype(np.float32)
    x[:4] = [0.0, -1e-9, -0.5, -79.9]
    out = np.empty_like(x)
    apply(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) < 2e-7
    apply(np.array([-np.inf, -200.0], np.float32), out[:2])
    assert out[0] < 1e-37 and out[1] < 1e-37


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: partial selection suffices; flat: falls back to a sort
def test_top_p_nucleus_matches_sort(scale):
    x = (scale * np.random.default_rng(4).standard_normal(3000)).astype(np.float32)
    p = np.exp(x.astype(np.float64) - x.max())
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    n_keep = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)
    nucleus = order[:n_keep]
    # u in [0, 1) maps monotonically onto the kept tokens in descending order of probability
    q = p[nucleus] ** (1 / 0.7)
    edges = np.cumsum(q) / q.sum()
    for u in np.linspace(0, 0.999, 97):
        if np.min(np.abs(edges - u)) < 1e-5:
            continue  # fp32 vs fp64 rounding may fall either side of a boundary
        want = nucleus[min(int(np.searchsorted(edges, u, side="right")), n_keep - 1)]
        assert sample(x, 0.7, top_p=0.6, u=float(u)) == want
