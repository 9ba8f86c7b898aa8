"""The numba engine against a plain-numpy (float64) Llama forward pass written here."""
import numpy as np
import pytest

from m3lite.config import ModelConfig
from m3lite.engine import Engine
from m3lite.threads import default_threads
from m3lite.errors import BadArgument
from m3lite.modelfile import tensor_shapes

SHAPES = {
    # GQA ratio 1, tied embeddings
    "mha-tied": dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=96, max_seq_len=64),
    # GQA ratio 2, untied output
    "gqa2-untied": dict(vocab_size=101, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=160,
                        max_seq_len=64, tie_embeddings=False),
    # GQA ratio 4, head_dim 48 (q_dim 192 != dim 96)
    "gqa4-hd48": dict(vocab_size=89, dim=96, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128, head_dim=48,
                      max_seq_len=64, rope_theta=500.0),
}


def make_cfg(name: str) -> ModelConfig:
    return ModelConfig(name=name, **SHAPES[name])


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every tensor of tensor_shapes(cfg): norms near 1, matrices std 0.02..0.1."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in tensor_shapes(cfg).items():
        if "norm" in name:
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("tok_embeddings", "output"):
            a = 0.5 * rng.standard_normal(shape)
        else:
            a = rng.uniform(0.02, 0.1) * rng.standard_normal(shape)
        w[name] = a.astype(np.float32)
    return w


def rotate(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE of x [..., n, hd] for positions [n], in float64."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def reference_forward(cfg, weights, ids, pos_offset=0, prefix=None, probs=None):
    """Full-sequence forward in float64; returns logits [n, V].

    prefix: {layer: (k, v)} or {layer: (k, v, counts)} memory keys/values [n_kv, m, hd] (keys rotated), put in
    front of that layer's context keys and visible to every query; with counts, kv head g sees only its first
    counts[g] memory tokens.
    probs: a dict that receives the attention weights, probs[layer, head] = [n, c + n] (c: the memory tokens
    that head sees, first)."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    n = len(ids)
    hd, H, KV = cfg.hd, cfg.n_heads, cfg.n_kv_heads
    eps = cfg.norm_eps

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    pos = pos_offset + np.arange(n)
    causal = np.tril(np.ones((n, n), bool))
    x = w["tok_embeddings"][np.asarray(ids)]
    for l in range(cfg.n_layers):
        h = rms(x, w["attention_norm"][l])
        q = (h @ w["wq"][l].T).reshape(n, H, hd).transpose(1, 0, 2)
        k = (h @ w["wk"][l].T).reshape(n, KV, hd).transpose(1, 0, 2)
        v = (h @ w["wv"][l].T).reshape(n, KV, hd).transpose(1, 0, 2)
        q, k = rotate(q, pos, cfg.rope_theta), rotate(k, pos, cfg.rope_theta)
        heads = []
        for hh in range(H):
            g = hh // (H // KV)
            kk, vv, mask = k[g], v[g], causal
            if prefix and l in prefix:
                pk, pv = (np.asarray(a, np.float64) for a in prefix[l][:2])
                c = prefix[l][2][g] if len(prefix[l]) > 2 else pk.shape[1]
                kk = np.concatenate([pk[g, :c], kk])
                vv = np.concatenate([pv[g, :c], vv])
                mask = np.concatenate([np.ones((n, c), bool), causal], axis=1)
            s = np.where(mask, q[hh] @ kk.T / np.sqrt(hd), -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            if probs is not None:
                probs[l, hh] = p
            heads.append(p @ vv)
        x = x + np.concatenate(heads, axis=1) @ w["wo"][l].T
        h2 = rms(x, w["ffn_norm"][l])
        g = h2 @ w["w1"][l].T
        x = x + ((g / (1 + np.exp(-g))) * (h2 @ w["w3"][l].T)) @ w["w2"][l].T
    x = rms(x, w["norm"])
    out = w["tok_embeddings"] if cfg.tie_embeddings else w["output"]
    return x @ out.T


def close(a, b, tol=1e-4):
    err = np.abs(np.asarray(a, np.float64) - b).max()
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    cfg = make_cfg(request.param)
    return cfg, random_weights(cfg, seed=len(request.param))


def test_prefill_all_logits_matches_reference(model):
    cfg, w = model
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 23)
    e = Engine(cfg, w)
    got = e.prefill(ids, all_logits=True)
    assert got.shape == (23, cfg.vocab_size) and got.dtype == np.float32
    close(got, reference_forward(cfg, w, ids))
    assert e.n_past == 23


def test_prefill_last_logits(model):
    cfg, w = model
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 9)
    got = Engine(cfg, w).prefill(ids)
    assert got.shape == (cfg.vocab_size,)
    close(got, reference_forward(cfg, w, ids)[-1])


def test_decode_matches_full_recompute(model):
    cfg, w = model
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 12)
    ref = reference_forward(cfg, w, ids)
    e = Engine(cfg, w)
    for i, t in enumerate(ids):
        close(e.decode(int(t)), ref[i])
    assert e.n_past == len(ids)


def test_prefill_then_decode_equals_token_by_token(model):
    cfg, w = model
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, 15)
    a = Engine(cfg, w)
    la = [a.prefill(ids[:7])] + [a.decode(int(t)) for t in ids[7:]]
    b = Engine(cfg, w)
    lb = [b.decode(int(t)) for t in ids][6:]
    close(np.array(la), np.array(lb, np.float64), tol=2e-5)


def test_prefill_extends_context_in_blocks(model):
    cfg, w = model
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, 30)
    ref = reference_forward(cfg, w, ids)
    e = Engine(cfg, w)
    e.chunk = 4  # force several internal blocks per call
    got = np.concatenate([e.prefill(ids[:11], all_logits=True), e.prefill(ids[11:], all_logits=True)])
    close(got, ref)


def test_pos_offset_shifts_positions(model):
    cfg, w = model
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, 8)
    e = Engine(cfg, w)
    e.pos_offset = 40  # beyond max_ctx: the rope tables grow on demand
    got = np.concatenate([e.prefill(ids[:5], all_logits=True), [e.decode(int(t)) for t in ids[5:]]])
    close(got, reference_forward(cfg, w, ids, pos_offset=40))


def random_prefix(cfg, layers, m, seed):
    rng = np.random.default_rng(seed)
    return {l: (rng.standard_normal((cfg.n_kv_heads, m, cfg.hd)).astype(np.float32),
                rng.standard_normal((cfg.n_kv_heads, m, cfg.hd)).astype(np.float32)) for l in layers}


def test_memory_prefix_attention(model):
    cfg, w = model
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, 14)
    prefix = random_prefix(cfg, [0], 5, seed=8)
    if cfg.n_layers > 2:
        prefix.update(random_prefix(cfg, [2], 3, seed=9))  # layers may hold different numbers of memories
    e = Engine(cfg, w, prefix_capacity=6)
    for l, (k, v) in prefix.items():
        e.set_prefix(l, k, v)
    e.pos_offset = 6
    got = np.concatenate([e.prefill(ids[:9], all_logits=True), [e.decode(int(t)) for t in ids[9:]]])
    ref = reference_forward(cfg, w, ids, pos_offset=6, prefix=prefix)
    close(got, ref)
    assert np.abs(ref - reference_forward(cfg, w, ids, pos_offset=6)).max() > 1e-3  # memories matter


def test_memory_prefix_replaced_midway():
    cfg = make_cfg("gqa2-untied")
    w = random_weights(cfg, seed=3)
    ids = np.random.default_rng(10).integers(0, cfg.vocab_size, 6)
    last = cfg.n_layers - 1  # memories in the last layer do not change the cached context keys/values
    p1, p2 = random_prefix(cfg, [last], 8, seed=1)[last], random_prefix(cfg, [last], 2, seed=2)[last]
    e = Engine(cfg, w, prefix_capacity=8)
    e.set_prefix(last, *p1)
    e.prefill(ids[:4])
    e.set_prefix(last, *p2)  # a shorter set replaces the longer one entirely
    close(e.decode(int(ids[4])), reference_forward(cfg, w, ids[:5], prefix={last: p2})[-1])
    e.clear_prefix()
    assert (e.attn_start == e.prefix_capacity).all()
    close(e.decode(int(ids[5])), reference_forward(cfg, w, ids)[-1])


def test_memory_counts_per_kv_head(model):
    cfg, w = model
    ids = np.random.default_rng(11).integers(0, cfg.vocab_size, 10)
    k, v = random_prefix(cfg, [0], 6, seed=12)[0]
    counts = np.arange(cfg.n_kv_heads) % 4 + 2  # padded memory slots: head g keeps its first counts[g] tokens
    e = Engine(cfg, w, prefix_capacity=8)
    e.set_prefix(0, k, v, counts=counts)
    assert list(e.attn_start[0]) == list(8 - counts)
    got = np.concatenate([e.prefill(ids[:6], all_logits=True), [e.decode(int(t)) for t in ids[6:]]])
    close(got, reference_forward(cfg, w, ids, prefix={0: (k, v, counts)}))
    with pytest.raises(BadArgument):
        e.set_prefix(0, k, v, counts=np.full(cfg.n_kv_heads, 7))


def test_plain_layers_ignore_prefix_region():
    cfg = make_cfg("mha-tied")
    w = random_weights(cfg)
    ids = np.arange(10) % cfg.vocab_size
    e = Engine(cfg, w, prefix_capacity=4)
    e.k_cache[:, :, :4] = 1e3  # garbage in unused prefix slots must not leak
    close(e.prefill(ids, all_logits=True), reference_forward(cfg, w, ids))
    e.reset()
    e.set_prefix(0, *random_prefix(cfg, [0], 4, 3)[0])
    e.reset()  # reset also forgets memories
    close(e.prefill(ids, all_logits=True), reference_forward(cfg, w, ids))


def test_context_full_raises():
    cfg = make_cfg("mha-tied")
    e = Engine(cfg, random_weights(cfg), max_ctx=8)
    e.prefill(np.arange(6))
    with pytest.raises(BadArgument, match="8"):
        e.prefill(np.arange(3))
    e.decode(1)
    e.decode(2)
    with pytest.raises(BadArgument, match="context is full.*8"):
        e.decode(3)
    assert e.n_past == 8
    e.reset()
    assert e.n_past == 0
    e.decode(3)


def test_bad_arguments():
    cfg = make_cfg("gqa2-untied")
    w = random_weights(cfg)
    e = Engine(cfg, w, prefix_capacity=2)
    with pytest.raises(BadArgument):
        e.decode(cfg.vocab_size)
    with pytest.raises(BadArgument):
        e.decode(-1)
    with pytest.raises(BadArgument):
        e.prefill(np.array([0, cfg.vocab_size]))
    with pytest.raises(BadArgument):
        e.prefill(np.array([], np.int64))
    with pytest.raises(BadArgument, match="prefix capacity"):
        e.set_prefix(0, *random_prefix(cfg, [0], 3, 0)[0])
    with pytest.raises(BadArgument):
        e.set_prefix(cfg.n_layers, *random_prefix(cfg, [0], 1, 0)[0])
    bad = dict(w)
    bad["wq"] = bad["wq"][:, :-1]
    with pytest.raises(BadArgument, match="wq"):
        Engine(cfg, bad)
    bad = dict(w)
    del bad["output"]
    with pytest.raises(BadArgument, match="output"):
        Engine(cfg, bad)
    assert e.n_past == 0


def test_weights_are_not_copied(tmp_path):
    cfg = make_cfg("gqa4-hd48")
    w = random_weights(cfg)
    mapped = {}
    for name, a in w.items():
        p = tmp_path / name
        a.tofile(p)
        mapped[name] = np.memmap(p, dtype="<f4", mode="r", shape=a.shape)
    e = Engine(cfg, mapped)
    for name in mapped:
        assert np.shares_memory(e.weights[name], mapped[name])
    ids = np.arange(5)
    close(e.prefill(ids, all_logits=True), reference_forward(cfg, w, ids))


def test_threads(monkeypatch):
    monkeypatch.setenv("M3LITE_THREADS", "1")
    assert default_threads() == 1
    assert default_threads(1) == 1
    monkeypatch.setenv("M3LITE_THREADS", "two")
    with pytest.raises(BadArgument):
        default_threads()
    with pytest.raises(BadArgument):
        default_threads(0)
    monkeypatch.delenv("M3LITE_THREADS")
    assert default_threads() >= 1


# ---- explicit memory: prefix-attention tracking -----------------------------------------------------------

def memory_cfg(name="gqa2-untied", **kw):
    """A SHAPES model with two memory layers (0 and 2: not contiguous)."""
    return ModelConfig(name=name, **dict(SHAPES[name], memory_layers=[0, 2], **kw))


def test_prefix_attention_matches_softmax_weights():
    cfg = memory_cfg()
    w = random_weights(cfg, seed=5)
    ids = np.random.default_rng(20).integers(0, cfg.vocab_size, 8)
    m = 5
    prefix = random_prefix(cfg, [0, 1, 2], m, seed=21)  # layer 1 is not a memory layer: not counted
    e = Engine(cfg, w, prefix_capacity=7)
    for l, (k, v) in prefix.items():
        e.set_prefix(l, k, v)
    e.pos_offset = 7
    assert e.prefix_attention().tolist() == [0.0] * m and e.prefix_attention_total() == 0.0
    e.prefill(ids[:5])  # prefill is not counted
    assert e.prefix_attention().tolist() == [0.0] * m and e.prefix_attention_total() == 0.0
    for t in ids[5:]:
        e.decode(int(t))
    probs = {}
    reference_forward(cfg, w, ids, pos_offset=7, prefix=prefix, probs=probs)
    want = sum(probs[l, h][5:, :m].sum(0) for l in (0, 2) for h in range(cfg.n_heads))
    got = e.prefix_attention()
    assert got.shape == (m,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert e.prefix_attention_total() == 3 * 2 * cfg.n_heads  # 3 steps, 2 memory layers, every head sums to 1
    assert 0 < got.sum() < e.prefix_attention_total()
    # resets: explicit, by set_prefix (the slots now hold other memories), by clear_prefix and reset
    e.reset_prefix_attention()
    assert not e.prefix_attention().any() and e.prefix_attention_total() == 0.0
    e.decode(1)
    assert e.prefix_attention().any()
    e.set_prefix(2, *prefix[2])
    assert not e.prefix_attention().any() and e.prefix_attention_total() == 0.0
    e.decode(2)
    e.clear_prefix()
    assert e.prefix_attention().shape == (0,) and e.prefix_attention_total() == 0.0
    e.set_prefix(0, *prefix[0])
    e.decode(3)
    e.reset()
    assert e.prefix_attention_total() == 0.0 and e.prefix_attention().shape == (0,)


def test_prefix_attention_without_prefix_is_empty():
    cfg = memory_cfg()
    w = random_weights(cfg, seed=5)
    for cap in (0, 4):
        e = Engine(cfg, w, prefix_capacity=cap)
        e.set_prefix(1, *random_prefix(cfg, [1], cap, seed=1)[1])  # not a memory layer
        for t in (3, 4, 5):
            e.decode(t)
        assert e.prefix_attention().shape == (0,)
        assert e.prefix_attention_total() == 3 * 2 * cfg.n_heads


def test_prefix_attention_per_head_counts():
    """A kv head holding c < m tokens: its token i is slot P - c + i, index m - c + i of the result."""
    cfg = memory_cfg()
    w = random_weights(cfg, seed=6)
    ids = np.random.default_rng(22).integers(0, cfg.vocab_size, 4)
    k, v = random_prefix(cfg, [0], 6, seed=23)[0]
    counts = np.array([6, 3])
    e = Engine(cfg, w, prefix_capacity=8)
    e.set_prefix(0, k, v, counts=counts)
    e.prefill(ids[:2])
    for t in ids[2:]:
        e.decode(int(t))
    probs = {}
    reference_forward(cfg, w, ids, prefix={0: (k, v, counts)}, probs=probs)
    want = np.zeros(6)
    for h in range(cfg.n_heads):
        c = counts[h // 2]
        want[6 - c:] += probs[0, h][2:, :c].sum(0)
    np.testing.assert_allclose(e.prefix_attention(), want, rtol=1e-5)


# ---- explicit memory: encoding references (a float64 numpy reference; the PyTorch one is in
# test_memory_parity.py) -------------------------------------------------------------------------------------

def sharpen(cfg, w, factor=4.0):
    """Larger weights: attention far from uniform, so selection scores have clear gaps (no near-ties)."""
    return {n: (a * factor if a.ndim == 3 and "norm" not in n else a) for n, a in w.items()}


def reference_encode(cfg, weights, ids):
    """One reference in float64 by the definition: (keys, values [Lm, n_kv, K, hd], positions [Lm, n_kv, K],
    count, scores [Lm, n_kv, n])."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    n, hd, H, KV, K = len(ids), cfg.hd, cfg.n_heads, cfg.n_kv_heads, cfg.memory_tokens_per_head
    r = H // KV
    pos = np.arange(n)
    causal = np.tril(np.ones((n, n), bool))
    layers = cfg.memory_layer_ids
    keys, values = np.zeros((len(layers), KV, K, hd)), np.zeros((len(layers), KV, K, hd))
    positions = np.zeros((len(layers), KV, K), np.int64)
    scores = np.full((len(layers), KV, n), -np.inf)
    count = min(K, n - 1)
    x = w["tok_embeddings"][np.asarray(ids)]
    for l in range(max(layers) + 1):
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w["attention_norm"][l]
        q = (h @ w["wq"][l].T).reshape(n, H, hd).transpose(1, 0, 2)
        k = (h @ w["wk"][l].T).reshape(n, KV, hd).transpose(1, 0, 2)
        v = (h @ w["wv"][l].T).reshape(n, KV, hd).transpose(1, 0, 2)
        qr, kr = rotate(q, pos, cfg.rope_theta), rotate(k, pos, cfg.rope_theta)
        if l in layers:
            li = layers.index(l)
            for g in range(KV):
                scores[li, g, 1:] = 0.0
                for hh in range(g * r, (g + 1) * r) if n > 1 else ():
                    s = q[hh, 1:] @ k[g, 1:].T / np.sqrt(hd)  # text x text, no mask, no RoPE
                    p = np.exp(s - s.max(-1, keepdims=True))
                    scores[li, g, 1:] += (p / p.sum(-1, keepdims=True)).sum(0)
                keep = sorted(sorted(range(1, n), key=lambda j: (-scores[li, g, j], j))[:count])
                positions[li, g, :count] = keep
                keys[li, g, :count] = kr[g, keep]
                values[li, g, :count] = v[g, keep]
        heads = []
        for hh in range(H):
            s = np.where(causal, qr[hh] @ kr[hh // r].T / np.sqrt(hd), -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[hh // r])
        x = x + np.concatenate(heads, axis=1) @ w["wo"][l].T
        h2 = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w["ffn_norm"][l]
        g1 = h2 @ w["w1"][l].T
        x = x + ((g1 / (1 + np.exp(-g1))) * (h2 @ w["w3"][l].T)) @ w["w2"][l].T
    return keys, values, positions, count, scores


def make_refs(cfg, lengths, seed):
    """References of distinct text tokens (a repeated token has the same layer-0 key: an exact score tie)."""
    rng = np.random.default_rng(seed)
    return [[4] + rng.choice(np.arange(5, cfg.vocab_size), n - 1, replace=False).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["gqa2-untied", "gqa4-hd48"])
def enc_model(request):
    cfg = memory_cfg(request.param, memory_tokens_per_head=4, reference_max_tokens=20) \
        if request.param == "gqa2-untied" else \
        ModelConfig(name=request.param, **dict(SHAPES[request.param], memory_layers=[0, 1],
                                               memory_tokens_per_head=3, reference_max_tokens=20))
    return cfg, sharpen(cfg, random_weights(cfg, seed=7))


def test_encode_references_matches_numpy(enc_model):
    cfg, w = enc_model
    lengths = [20, 11, 4, 2, 1, 3]  # full, shorter, fewer text tokens than K, <ref> alone
    refs = make_refs(cfg, lengths, seed=30)
    e = Engine(cfg, w)
    keys, values, positions, counts = e.encode_references(refs)
    Lm, G, K, hd = len(cfg.memory_layer_ids), cfg.n_kv_heads, cfg.memory_tokens_per_head, cfg.hd
    assert keys.shape == values.shape == (len(refs), Lm, G, K, hd) and keys.dtype == np.float32
    assert positions.shape == (len(refs), Lm, G, K) and positions.dtype == np.int32
    assert counts.shape == (len(refs), Lm, G) and counts.dtype == np.int32
    for b, ids in enumerate(refs):
        wk, wv, wp, wc, sc = reference_encode(cfg, w, ids)
        assert (counts[b] == wc).all()
        for li in range(Lm):
            for g in range(G):
                srt = np.sort(sc[li, g, 1:])[::-1]
                if len(srt) > K:  # the check is only meaningful without a near-tie at the cut
                    assert srt[K - 1] - srt[K] > 1e-4
        np.testing.assert_array_equal(positions[b], wp)
        close(keys[b], wk)
        close(values[b], wv)
        assert not keys[b][:, :, wc:].any() and not values[b][:, :, wc:].any()


def test_encode_references_repeated_token_ties_go_to_lower_positions(enc_model):
    """At layer 0 a key depends on its token alone: repeated tokens tie exactly, the lower positions win."""
    cfg, w = enc_model
    K = cfg.memory_tokens_per_head
    e = Engine(cfg, w)
    for _ in range(2):  # also with the copies in several GEMM tiles
        _, _, positions, counts = e.encode_references([[4] + [20] * 15, [4] + [9, 20] * 9 + [20]])
        assert (positions[0, 0] == np.arange(1, K + 1)).all()
        # reference 1 alternates two tokens: each kept token of a kind is its lowest-position copy(ies)
        for g in range(cfg.n_kv_heads):
            kept = positions[1, 0, g].tolist()
            odd = [p for p in kept if p % 2 == 1]
            even = [p for p in kept if p % 2 == 0]
            assert odd == list(range(1, 2 * len(odd), 2)) and even == list(range(2, 2 * len(even) + 1, 2))


def test_encode_references_blocks_and_batches(enc_model, monkeypatch):
    """Packing several references per block, or one block per reference, or one call per reference: same."""
    import m3lite.engine as engine_mod

    cfg, w = enc_model
    refs = make_refs(cfg, [20, 5, 17, 9, 20, 1, 12], seed=31)
    e = Engine(cfg, w)
    whole = e.encode_references(refs)
    alone = [e.encode_references([r]) for r in refs]
    monkeypatch.setattr(engine_mod, "ENCODE_TOKENS", 24)  # blocks of 1-2 references
    blocks = e.encode_references(refs)
    for i in range(4):  # GEMMs of other sizes round differently: keys/values agree to fp32 noise
        for got in (blocks[i], np.concatenate([a[i] for a in alone])):
            if i < 2:
                close(got, whole[i])
            else:
                np.testing.assert_array_equal(got, whole[i])
    empty = e.encode_references([])
    assert [a.shape[0] for a in empty] == [0, 0, 0, 0]


def test_ref_kv_matches_numpy_and_is_cached(enc_model):
    cfg, w = enc_model
    e = Engine(cfg, w)
    k, v = e.ref_kv()
    assert k.shape == v.shape == (len(cfg.memory_layer_ids), cfg.n_kv_heads, 1, cfg.hd)
    assert e.ref_kv()[0] is k and not k.flags.writeable
    # <ref> alone in float64: at position 0 RoPE is the identity and the token attends only to itself
    w64 = {n: np.asarray(a, np.float64) for n, a in w.items()}
    hd, r = cfg.hd, cfg.n_heads // cfg.n_kv_heads
    x = w64["tok_embeddings"][[4]]
    for l in range(max(cfg.memory_layer_ids) + 1):
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w64["attention_norm"][l]
        kk = (h @ w64["wk"][l].T).reshape(cfg.n_kv_heads, hd)
        vv = (h @ w64["wv"][l].T).reshape(cfg.n_kv_heads, hd)
        if l in cfg.memory_layer_ids:
            li = cfg.memory_layer_ids.index(l)
            close(k[li, :, 0], kk)
            close(v[li, :, 0], vv)
        x = x + np.repeat(vv, r, axis=0).reshape(1, -1) @ w64["wo"][l].T
        h2 = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w64["ffn_norm"][l]
        g1 = h2 @ w64["w1"][l].T
        x = x + ((g1 / (1 + np.exp(-g1))) * (h2 @ w64["w3"][l].T)) @ w64["w2"][l].T


def test_encode_references_leaves_the_context_alone():
    cfg = memory_cfg()
    w = random_weights(cfg, seed=8)
    ids = np.random.default_rng(32).integers(0, cfg.vocab_size, 9)
    pk, pv = random_prefix(cfg, [0], 3, seed=33)[0]
    runs = []
    for encode in (False, True):
        e = Engine(cfg, w, prefix_capacity=4)
        e.set_prefix(0, pk, pv)
        e.pos_offset = 5
        out = [e.prefill(ids[:6])]
        out.append(e.decode(int(ids[6])))
        if encode:
            e.encode_references(make_refs(cfg, [30, 7], seed=34))
            e.ref_kv()
        out += [e.decode(int(t)) for t in ids[7:]]
        runs.append((np.array(out), e.n_past, e.prefix_attention(), e.prefix_attention_total()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] == len(ids)
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    assert runs[0][3] == runs[1][3]


def test_encode_references_bad_arguments():
    cfg = memory_cfg(reference_max_tokens=8)
    e = Engine(cfg, random_weights(cfg))
    ok = [4, 5, 6]
    for bad, match in (([ok, []], "reference 1 is empty"),
                       ([[5, 6, 7]], "<ref>"),
                       ([[4] + [5] * 8], "at most"),
                       ([[4, cfg.vocab_size]], "outside"),
                       ([[4, -1]], "outside"),
                       ([[4.0, 5.0]], "integer"),
                       ([[[4, 5]]], "1-D"),
                       ("abc", "list")):
        with pytest.raises(BadArgument, match=match):
            e.encode_references(bad)
    keys, _, positions, counts = e.encode_references([[4] + [5] * 7, np.array([4, 9])])
    assert counts[:, 0, 0].tolist() == [min(7, cfg.memory_tokens_per_head), 1]
