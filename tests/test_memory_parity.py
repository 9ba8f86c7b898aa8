"""The numba engine's explicit memory against the PyTorch reference (converters/model.py): encoding
(`encode_memory`, `ref_kv`), memory attention (`forward_with_memory`), and int8 memories."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.model import Memory, Transformer, encode_memory, forward_with_memory, ref_kv, to_stacked  # noqa: E402
from converters.tokenizer import PAD, REF  # noqa: E402
from m3lite import memory_quant as quant  # noqa: E402
from m3lite.config import ModelConfig  # noqa: E402
from m3lite.engine import Engine  # noqa: E402

TOL = 1e-4
REF_MAX = 24
SHAPES = {
    # GQA ratio 1, memory layers [0, 1] (the first half), tied embeddings
    "mha-hd48": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=128, head_dim=48, memory_layers=[0, 1],
                     memory_tokens_per_head=4),
    # GQA ratio 2, memory layers not contiguous, untied
    "gqa2-hd48": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=48, memory_layers=[0, 2],
                      memory_tokens_per_head=5, tie_embeddings=False),
}
LENGTHS = [24, 13, 3, 9, 1, 2, 17, 24]  # full, shorter, fewer text tokens than K, <ref> alone, one text token
# int8 memories (m3lite.memory_quant: one float16 scale per vector, error <= max|x|/254 per element): measured over
# 3 memory sets x 4 prompts of 128 tokens, the largest logit change was 6.8e-3 on mha-hd48 (|logits| <= 0.71)
# and 2.2e-2 on gqa2-hd48 (|logits| <= 2.75), i.e. at most 0.94% of the largest logit magnitude (median 0.6%).
# The test allows 1.5% of it.
INT8_REL_BOUND = 0.015


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    cfg = ModelConfig.preset("tiny", reference_max_tokens=REF_MAX, max_seq_len=256, **SHAPES[request.param])
    cfg.name = request.param
    m = Transformer(cfg, seed=3).eval()
    # at init scale attention is almost uniform and selection scores nearly tie; larger weights give them gaps
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and not name.startswith("tok_embeddings"):
                p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def engine(model):
    cfg = model.cfg
    return Engine(cfg, to_stacked(model), max_ctx=256, prefix_capacity=1 + 3 * cfg.memory_tokens_per_head)


def make_refs(cfg, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [[REF] + torch.randint(5, cfg.vocab_size, (n - 1,), generator=g).tolist() for n in lengths]


def torch_encode(model, refs) -> Memory:
    T = max(len(r) for r in refs)
    toks = torch.full((len(refs), T), PAD, dtype=torch.long)
    for b, r in enumerate(refs):
        toks[b, :len(r)] = torch.tensor(r)
    with torch.no_grad():
        return encode_memory(model, toks, torch.tensor([len(r) for r in refs]))


def as_memory(keys, values, positions, counts) -> Memory:
    return Memory(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (keys, values)),
                  torch.from_numpy(positions.astype(np.int64)), torch.from_numpy(counts.astype(np.int64)))


def close(a, b, tol=TOL):
    err = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert err < tol, f"max abs error {err:.3g} >= {tol}"
    return err


# ---- encoding ---------------------------------------------------------------------------------------------

def test_encode_references_matches_encode_memory(model, engine):
    cfg = model.cfg
    refs = make_refs(cfg, LENGTHS, seed=0)
    want = torch_encode(model, refs)
    keys, values, positions, counts = engine.encode_references(refs)
    np.testing.assert_array_equal(positions, want.positions.numpy())
    np.testing.assert_array_equal(counts, want.counts.numpy())
    close(keys, want.keys.numpy())
    close(values, want.values.numpy())
    K = cfg.memory_tokens_per_head
    unused = np.arange(K) >= counts[..., None]
    assert not keys[unused].any() and not values[unused].any() and not positions[unused].any()


def test_encode_references_repeated_tokens(model, engine):
    """Repeated tokens have equal layer-0 keys: exact ties, resolved to the lower position by both."""
    refs = [[REF] + [7, 9, 7, 9, 7, 11, 9, 7, 13, 7, 9, 11], [REF] + [20] * 10]
    want = torch_encode(model, refs)
    keys, values, positions, counts = engine.encode_references(refs)
    np.testing.assert_array_equal(positions, want.positions.numpy())
    np.testing.assert_array_equal(counts, want.counts.numpy())
    close(keys, want.keys.numpy())
    close(values, want.values.numpy())


def test_ref_kv_matches_reference(model, engine):
    with torch.no_grad():
        rk, rv = ref_kv(model)
    k, v = engine.ref_kv()
    assert k.shape == tuple(rk.shape) and v.shape == tuple(rv.shape)
    close(k, rk.numpy())
    close(v, rv.numpy())


# ---- memory attention -------------------------------------------------------------------------------------

def install(engine, mem: Memory | None) -> None:
    """Put <ref> and the valid slots of each of mem's references in front of the context at every memory
    layer, in the order of converters.model.memory_prefix."""
    rk, rv = engine.ref_kv()
    for li, layer in enumerate(engine.cfg.memory_layer_ids):
        ks, vs = [rk[li]], [rv[li]]
        for r in range(0 if mem is None else len(mem)):
            c = int(mem.counts[r, li].min())
            assert (mem.counts[r, li] == c).all()
            ks.append(mem.keys[r, li, :, :c].numpy())
            vs.append(mem.values[r, li, :, :c].numpy())
        engine.set_prefix(layer, np.concatenate(ks, axis=1), np.concatenate(vs, axis=1))


@pytest.fixture(scope="module")
def memories(model, engine):
    """Five memories encoded by the engine (the same ones go to both sides)."""
    return as_memory(*engine.encode_references(make_refs(model.cfg, [24, 20, 4, 16, 2], seed=1)))


def reference_logits(model, tokens, per_chunk, chunk):
    with torch.no_grad():
        return forward_with_memory(model, torch.tensor(tokens)[None], per_chunk, chunk=chunk)[0].numpy()


@pytest.mark.parametrize("storage", ["f32", "int8"])
def test_prefill_chunks_with_memories(model, engine, memories, storage):
    """A 150-token prompt in 64-token chunks, each chunk with its own memories (the last with none); the
    memories as encoded (fp32) and as a bank returns them (dequantized int8), the same ones on both sides."""
    if storage == "int8":
        memories = quantized(memories)
    cfg = model.cfg
    chunk = cfg.retrieval_interval
    assert chunk == 64
    tokens = torch.randint(5, cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    per_chunk = [memories[[0, 1]], memories[[2, 3, 4]], None]
    want = reference_logits(model, tokens, per_chunk, chunk)
    engine.reset()
    engine.pos_offset = cfg.reference_max_tokens
    got = []
    for c, mem in enumerate(per_chunk):
        install(engine, mem)
        got.append(engine.prefill(np.array(tokens[c * chunk:(c + 1) * chunk]), all_logits=True))
    close(np.concatenate(got), want)
    # the memories matter: the same prompt with no memories differs
    assert np.abs(want - reference_logits(model, tokens, None, chunk)).max() > 1e-2


def test_decode_switches_memories(model, engine, memories):
    """Prefill one chunk, then decode token by token, switching memories at each chunk boundary."""
    cfg = model.cfg
    chunk = 16
    tokens = torch.randint(5, cfg.vocab_size, (44,), generator=torch.Generator().manual_seed(3)).tolist()
    per_chunk = [memories[[4]], memories[[0, 2]], None]
    want = reference_logits(model, tokens, per_chunk, chunk)
    engine.reset()
    engine.pos_offset = cfg.reference_max_tokens
    install(engine, per_chunk[0])
    got = list(engine.prefill(np.array(tokens[:chunk]), all_logits=True))
    for i in range(chunk, len(tokens)):
        if i % chunk == 0:
            install(engine, per_chunk[i // chunk])
        got.append(engine.decode(tokens[i]))
    close(np.array(got), want)


def quantized(mem: Memory) -> Memory:
    """mem with keys and values through int8 storage and back (padded slots zeroed, as a bank stores them)."""
    valid = (np.arange(mem.keys.shape[3]) < mem.counts.numpy()[..., None])[..., None]
    k8, v8 = (quant.dequantize(quant.quantize(a.numpy() * valid, "int8"), "int8") for a in (mem.keys, mem.values))
    return as_memory(k8, v8, mem.positions.numpy(), mem.counts.numpy())


def test_int8_memories(model, engine):
    """Memories stored as int8 change the logits by less than INT8_REL_BOUND of their largest magnitude."""
    cfg = model.cfg
    chunk = cfg.retrieval_interval
    worst = 0.0
    for seed in (1, 11):
        mem = as_memory(*engine.encode_references(make_refs(cfg, [24, 20, 4, 16, 2], seed=seed)))
        q8 = quantized(mem)
        assert np.abs(q8.keys.numpy() - mem.keys.numpy()).max() > 0  # quantization did change them
        tokens = torch.randint(5, cfg.vocab_size, (128,), generator=torch.Generator().manual_seed(seed)).tolist()
        runs = []
        for m in (mem, q8):
            engine.reset()
            engine.pos_offset = cfg.reference_max_tokens
            out = []
            for c, sel in enumerate(([0, 1, 2], [3, 4])):
                install(engine, m[sel])
                out.append(engine.prefill(np.array(tokens[c * chunk:(c + 1) * chunk]), all_logits=True))
            runs.append(np.concatenate(out))
        err = float(np.abs(runs[0] - runs[1]).max())
        scale = float(np.abs(runs[0]).max())
        print(f"{cfg.name}: int8 memories change the logits by at most {err:.3g} (|logits| <= {scale:.3g})")
        worst = max(worst, err / scale)
    assert 0 < worst < INT8_REL_BOUND
