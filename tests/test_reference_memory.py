"""converters/model.py explicit memory: encoding (selection, keys, padding, gradients) and memory attention."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.model import (  # noqa: E402
    Memory,
    Transformer,
    encode_memory,
    forward_with_memory,
    forward_with_memory_parallel,
    memory_scores,
    ref_kv,
)
from converters.tokenizer import PAD, REF  # noqa: E402
from m3lite.config import ModelConfig  # noqa: E402

TOL = 1e-4

SHAPES = {
    # GQA ratio 1, memory layers [0, 1] (the first half), tied
    "mha": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=128, memory_tokens_per_head=4),
    # GQA ratio 2, head dim 48, untied, memory layers not contiguous and not from 0 to the middle
    "gqa2-hd48": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=48,
                      tie_embeddings=False, memory_layers=[0, 2], memory_tokens_per_head=5),
}
REF_MAX = 24
LENGTHS = [24, 13, 3, 9]  # a full reference, shorter ones, one with fewer text tokens (2) than K


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", reference_max_tokens=REF_MAX, **SHAPES[request.param])
    m = Transformer(cfg, seed=3).eval()
    # At init scale attention is almost uniform and the selection scores nearly tie; larger weights give the
    # scores clear gaps, so comparing the chosen positions across implementations means something.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and not name.startswith("tok_embeddings"):
                p.mul_(4.0)
    return m


def make_refs(cfg, lengths, seed=0, pad=PAD, T=None):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) if T is None else T
    toks = torch.full((len(lengths), T), pad, dtype=torch.long)
    for b, n in enumerate(lengths):
        toks[b, 0] = REF
        toks[b, 1:n] = torch.randint(5, cfg.vocab_size, (n - 1,), generator=g)
    return toks, torch.tensor(lengths)


def capture_qk(model, tokens):
    """Pre-RoPE q, k [T, heads, hd] of every layer, captured with hooks on wq/wk during a plain forward."""
    cfg, got = model.cfg, {}
    hooks = []
    for i, layer in enumerate(model.layers):
        for name in ("wq", "wk"):
            def hook(mod, inp, out, i=i, name=name):
                got[i, name] = out[0].detach().double().numpy().reshape(out.shape[1], -1, cfg.hd)
            hooks.append(getattr(layer.attention, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return got


def brute_force_scores(q, k, n, n_heads, n_kv):
    """score[g][j] for j in 1..n-1, by the definition, one token at a time in float64."""
    hd = q.shape[-1]
    r = n_heads // n_kv
    out = np.zeros((n_kv, n))
    for g in range(n_kv):
        for h in range(n_heads):
            if h // r != g:
                continue
            for i in range(1, n):
                logits = np.array([q[i, h] @ k[j, g] / math.sqrt(hd) for j in range(1, n)])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[g, 1:] += p
    return out


def test_selection_matches_brute_force(model):
    cfg = model.cfg
    K = cfg.memory_tokens_per_head
    toks, lengths = make_refs(cfg, LENGTHS)
    with torch.no_grad():
        mem = encode_memory(model, toks, lengths)
    Lm = len(cfg.memory_layer_ids)
    assert mem.keys.shape == (len(LENGTHS), Lm, cfg.n_kv_heads, K, cfg.hd)
    assert mem.positions.shape == mem.keys.shape[:4] and mem.positions.dtype == torch.long
    assert mem.counts.shape == (len(LENGTHS), Lm, cfg.n_kv_heads)
    for b, n in enumerate(LENGTHS):
        qk = capture_qk(model, toks[b:b + 1, :n])
        for li, layer in enumerate(cfg.memory_layer_ids):
            want = brute_force_scores(qk[layer, "wq"], qk[layer, "wk"], n, cfg.n_heads, cfg.n_kv_heads)
            got = memory_scores(torch.from_numpy(qk[layer, "wq"]).float().permute(1, 0, 2)[None],
                                torch.from_numpy(qk[layer, "wk"]).float().permute(1, 0, 2)[None],
                                (torch.arange(n) >= 1)[None])[0].numpy()
            assert np.all(np.isneginf(got[:, 0]))
            np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-5, atol=1e-5)
            for g in range(cfg.n_kv_heads):
                order = sorted(range(1, n), key=lambda j: (-want[g, j], j))
                keep = sorted(order[:K])
                if len(order) > K:  # the test only means something if the cut is not a near-tie
                    assert want[g, order[K - 1]] - want[g, order[K]] > 1e-4
                c = int(mem.counts[b, li, g])
                assert c == min(K, n - 1)
                assert mem.positions[b, li, g, :c].tolist() == keep
                assert mem.positions[b, li, g, c:].tolist() == [0] * (K - c)


def test_keys_and_values_are_the_models_own(model):
    cfg = model.cfg
    K = cfg.memory_tokens_per_head
    toks, lengths = make_refs(cfg, LENGTHS, seed=1)
    with torch.no_grad():
        mem = encode_memory(model, toks, lengths)
    for b, n in enumerate(LENGTHS):
        with torch.no_grad():
            _, kv = model(toks[b:b + 1, :n], return_kv=True)
        for li, layer in enumerate(cfg.memory_layer_ids):
            for g in range(cfg.n_kv_heads):
                c = int(mem.counts[b, li, g])
                pos = mem.positions[b, li, g, :c]
                torch.testing.assert_close(mem.keys[b, li, g, :c], kv[layer][0][0, g, pos], atol=1e-6, rtol=0)
                torch.testing.assert_close(mem.values[b, li, g, :c], kv[layer][1][0, g, pos], atol=1e-6, rtol=0)
                assert not mem.keys[b, li, g, c:].any() and not mem.values[b, li, g, c:].any()
    assert int(mem.counts[2].unique()) == 2 < K  # LENGTHS[2] = 3: <ref> and 2 text tokens


def test_padding_and_batch_do_not_change_a_memory(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, LENGTHS, seed=2, pad=PAD, T=REF_MAX)
    garbage, _ = make_refs(cfg, LENGTHS, seed=2, pad=7, T=REF_MAX)
    with torch.no_grad():
        batch = encode_memory(model, toks, lengths)
        other_pad = encode_memory(model, garbage, lengths)
        for b, n in enumerate(LENGTHS):
            alone = encode_memory(model, toks[b:b + 1, :n], lengths[b:b + 1])
            for m in (batch[b], other_pad[b]):
                assert torch.equal(m.positions, alone.positions) and torch.equal(m.counts, alone.counts)
                torch.testing.assert_close(m.keys, alone.keys, atol=1e-5, rtol=0)
                torch.testing.assert_close(m.values, alone.values, atol=1e-5, rtol=0)


def test_reference_without_text_is_an_empty_memory(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, [1, 4], seed=15)
    mem = encode_memory(model, toks, lengths)
    assert not mem.counts[0].any() and not mem.positions[0].any() and not mem.keys[0].any()
    mem.values.sum().backward()  # no NaN from the all-masked softmax reaches the weights
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    tokens = torch.randint(5, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        torch.testing.assert_close(forward_with_memory(model, tokens, mem[0]),
                                   forward_with_memory(model, tokens, None), atol=TOL, rtol=0)


def test_ref_kv_is_every_references_first_token(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, [11], seed=3)
    with torch.no_grad():
        rk, rv = ref_kv(model)
        _, kv = model(toks, return_kv=True)
    Lm = len(cfg.memory_layer_ids)
    assert rk.shape == rv.shape == (Lm, cfg.n_kv_heads, 1, cfg.hd)
    for li, layer in enumerate(cfg.memory_layer_ids):
        torch.testing.assert_close(rk[li], kv[layer][0][0, :, :1], atol=1e-6, rtol=0)
        torch.testing.assert_close(rv[li], kv[layer][1][0, :, :1], atol=1e-6, rtol=0)


def test_no_memories_equals_ref_prefix_only(model):
    cfg = model.cfg
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(5, cfg.vocab_size, (2, 40), generator=g)
    empty = Memory(*(torch.zeros((0, len(cfg.memory_layer_ids), cfg.n_kv_heads, cfg.memory_tokens_per_head)
                                 + extra, dtype=dt) for extra, dt in
                     (((cfg.hd,), torch.float32), ((cfg.hd,), torch.float32), ((), torch.long))),
                   torch.zeros((0, len(cfg.memory_layer_ids), cfg.n_kv_heads), dtype=torch.long))
    with torch.no_grad():
        rk, rv = ref_kv(model)
        want = model(tokens, positions=torch.arange(REF_MAX, REF_MAX + 40),
                     prefix_kv={layer: (rk[li][None].expand(2, -1, -1, -1), rv[li][None].expand(2, -1, -1, -1))
                                for li, layer in enumerate(cfg.memory_layer_ids)})
        plain = model(tokens, positions=torch.arange(REF_MAX, REF_MAX + 40))
        for memories in (None, [None, None, None], [[None, None], None, empty], empty):
            for fwd in (forward_with_memory, forward_with_memory_parallel):
                got = fwd(model, tokens, memories, chunk=16)
                torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (plain - want).abs().max() > 1e-3  # <ref> is really attended


def by_hand(model, tokens, per_chunk, chunk, pos_offset):
    """One sequence [1, T], chunk by chunk with past_kv and prefix_kv; the memory slots gathered explicitly
    (valid slots only, no mask) in front of <ref>. per_chunk: list of lists of Memory (one reference each)."""
    cfg = model.cfg
    rk, rv = ref_kv(model)
    kv, outs = None, []
    for c, refs in enumerate(per_chunk):
        prefix = {}
        for li, layer in enumerate(cfg.memory_layer_ids):
            ks, vs = [rk[li]], [rv[li]]
            for m in refs:
                n = int(m.counts[0, li, 0])
                assert (m.counts[0, li] == n).all()
                ks.append(m.keys[0, li, :, :n])
                vs.append(m.values[0, li, :, :n])
            prefix[layer] = (torch.cat(ks, 1)[None], torch.cat(vs, 1)[None])
        a, b = c * chunk, min(tokens.shape[1], (c + 1) * chunk)
        logits, kv = model(tokens[:, a:b], positions=torch.arange(pos_offset + a, pos_offset + b), past_kv=kv,
                           prefix_kv=prefix, return_kv=True)
        outs.append(logits)
    return torch.cat(outs, 1), kv


def test_chunks_equal_processing_by_hand(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, [24, 3, 17, 9, 24, 2], seed=5, T=REF_MAX)
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(5, cfg.vocab_size, (2, 150), generator=g)
    with torch.no_grad():
        mem = encode_memory(model, toks, lengths)
        # sequence 0: refs [0, 1] | [2] | [3, 4, 5]; sequence 1: [5] | nothing | [1, 0]
        chunks = [mem[[0, 1]], [mem[2], None], [mem[[3, 4, 5]], mem[[1, 0]]]]
        seq = [[[mem[0], mem[1]], [mem[2]], [mem[3], mem[4], mem[5]]],
               [[mem[0], mem[1]], [], [mem[1], mem[0]]]]
        loop, loop_kv = forward_with_memory(model, tokens, chunks, chunk=64, return_kv=True)
        fused, fused_kv = forward_with_memory_parallel(model, tokens, chunks, chunk=64, return_kv=True)
        assert loop.shape == (2, 150, cfg.vocab_size)
        for b in range(2):
            want, want_kv = by_hand(model, tokens[b:b + 1], seq[b], 64, REF_MAX)
            torch.testing.assert_close(loop[b:b + 1], want, atol=TOL, rtol=0)
            for (k, v), (wk, wv) in zip(loop_kv, want_kv):
                assert k.shape == (2, cfg.n_kv_heads, 150, cfg.hd)
                torch.testing.assert_close(k[b:b + 1], wk, atol=TOL, rtol=0)
                torch.testing.assert_close(v[b:b + 1], wv, atol=TOL, rtol=0)
        torch.testing.assert_close(fused, loop, atol=TOL, rtol=0)
        for (k, v), (fk, fv) in zip(loop_kv, fused_kv):
            torch.testing.assert_close(fk, k, atol=TOL, rtol=0)
            torch.testing.assert_close(fv, v, atol=TOL, rtol=0)
        # the memories matter, and so do the chunk boundaries
        none = forward_with_memory(model, tokens, None, chunk=64)
        assert (none - loop).abs().max() > 1e-3
        # continuing from past_kv: the first 64 tokens, then the rest as its own call
        head, kv = forward_with_memory(model, tokens[:, :64], chunks[:1], chunk=64, return_kv=True)
        tail = forward_with_memory(model, tokens[:, 64:], chunks[1:], chunk=64, past_kv=kv)
        tail_fused = forward_with_memory_parallel(model, tokens[:, 64:], chunks[1:], chunk=64, past_kv=kv)
        torch.testing.assert_close(torch.cat((head, tail), 1), loop, atol=TOL, rtol=0)
        torch.testing.assert_close(tail_fused, tail, atol=TOL, rtol=0)


def test_numpy_memories_are_accepted(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, [24, 5], seed=7)
    tokens = torch.randint(5, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(8))

    class NumpyMemory:  # what the runtime holds: arrays, no positions needed
        def __init__(self, m):
            self.keys, self.values, self.counts = m.keys.numpy(), m.values.numpy(), m.counts.numpy()

    with torch.no_grad():
        mem = encode_memory(model, toks, lengths)
        want = forward_with_memory(model, tokens, mem)
        got = forward_with_memory(model, tokens, NumpyMemory(mem))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_prefix_mask_hides_slots(model):
    cfg = model.cfg
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(5, cfg.vocab_size, (1, 6), generator=g)
    layer = cfg.memory_layer_ids[-1]
    k = torch.randn(1, cfg.n_kv_heads, 5, cfg.hd, generator=g)
    v = torch.randn(1, cfg.n_kv_heads, 5, cfg.hd, generator=g)
    keep = torch.tensor([True, False, True, True, False])
    with torch.no_grad():
        want = model(tokens, prefix_kv={layer: (k[:, :, keep], v[:, :, keep])})
        got = model(tokens, prefix_kv={layer: (k, v, keep[None])})
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # per KV head: head 0 sees slots 0..1, the others slot 0 only
        per_head = torch.zeros(1, cfg.n_kv_heads, 1, 5, dtype=torch.bool)
        per_head[0, :, 0, 0] = True
        per_head[0, 0, 0, 1] = True
        got = model(tokens, prefix_kv={layer: (k, v, per_head)})
        alone = model(tokens, prefix_kv={layer: (k[:, :, :1], v[:, :, :1])})
        assert (got - alone).abs().max() > 1e-4
        if cfg.n_kv_heads > 1:
            assert (got - want).abs().max() > 1e-4
        with pytest.raises(ValueError, match="prefix mask"):
            model(tokens, prefix_kv={layer: (k, v, keep[None, :4])})


def test_gradients_flow_through_encode_memory(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, [24, 3], seed=10)
    model.zero_grad(set_to_none=True)
    mem = encode_memory(model, toks, lengths)
    assert mem.keys.requires_grad and mem.values.requires_grad
    (mem.keys.square().sum() + mem.values.square().sum()).backward()
    last = max(cfg.memory_layer_ids)
    for i in range(cfg.n_layers):
        a = model.layers[i].attention
        if i > last:  # never run
            assert a.wq.weight.grad is None and a.wk.weight.grad is None
            continue
        for w in (a.wk, a.wv):
            assert (w.weight.grad is not None and w.weight.grad.abs().max() > 0) == (i in cfg.memory_layer_ids
                                                                                    or i < last)
        # a layer's q only shapes what later layers store (the selection is not differentiable)
        assert (a.wq.weight.grad is not None and a.wq.weight.grad.abs().max() > 0) == (i < last)
    # end to end: the context loss reaches the memories and the last memory layer's wq
    model.zero_grad(set_to_none=True)
    mem = encode_memory(model, toks, lengths)
    mem.keys.retain_grad()
    tokens = torch.randint(5, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(11))
    loss = sum(torch.nn.functional.cross_entropy(fwd(model, tokens, mem, chunk=16)[0, :-1], tokens[0, 1:])
               for fwd in (forward_with_memory, forward_with_memory_parallel))
    loss.backward()
    assert mem.keys.grad[mem.slot_mask()].abs().max() > 0
    assert not mem.keys.grad[~mem.slot_mask()].any()  # padded slots are hidden, not merely zero
    assert model.layers[last].attention.wq.weight.grad.abs().max() > 0
    model.zero_grad(set_to_none=True)


def test_bad_input(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, [5, 3], seed=12)
    with pytest.raises(ValueError, match="<ref>"):
        encode_memory(model, toks.clone().fill_(9), lengths)
    with pytest.raises(ValueError, match="lengths"):
        encode_memory(model, toks, torch.tensor([6, 3]))
    with pytest.raises(ValueError, match="lengths"):
        encode_memory(model, toks, torch.tensor([0, 3]))
    long, long_len = make_refs(cfg, [REF_MAX + 1], seed=12)
    with pytest.raises(ValueError, match="reference_max_tokens"):
        encode_memory(model, long, long_len)
    mem = encode_memory(model, toks, lengths)
    tokens = torch.randint(5, cfg.vocab_size, (1, 30))
    with pytest.raises(ValueError, match="chunks"):
        forward_with_memory(model, tokens, [mem, mem], chunk=10)
    with pytest.raises(ValueError, match="one entry per sequence"):
        forward_with_memory(model, tokens, [[mem, mem]], chunk=30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(model):
    cfg = model.cfg
    toks, lengths = make_refs(cfg, LENGTHS, seed=13, T=REF_MAX)
    tokens = torch.randint(5, cfg.vocab_size, (1, 100), generator=torch.Generator().manual_seed(14))
    gpu = Transformer(cfg, seed=None).cuda()
    gpu.load_state_dict(model.state_dict())
    with torch.no_grad():
        mem = encode_memory(model, toks, lengths)
        mem_gpu = encode_memory(gpu, toks.cuda(), lengths.cuda())
        assert torch.equal(mem_gpu.positions.cpu(), mem.positions)
        torch.testing.assert_close(mem_gpu.keys.cpu(), mem.keys, atol=1e-3, rtol=0)
        want = forward_with_memory(model, tokens, mem[[0, 1]])
        got = forward_with_memory(gpu, tokens.cuda(), mem_gpu[[0, 1]])
        torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=0)
