"""The GGUF export (converters/export_gguf.py): tensors and metadata read back with the gguf package, the RoPE
permutation, a numpy forward pass with llama.cpp's conventions, and llama.cpp itself when it is installed."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from converters.export_gguf import export_gguf, interleave_rope_rows  # noqa: E402
from m3lite.modelfile import ModelFiles  # noqa: E402

# tied with GQA; untied with a head_dim that is not dim / n_heads and one KV head (MQA)
VARIANTS = {"tied": {}, "untied": dict(tie_embeddings=False, head_dim=24, n_kv_heads=1)}
PROMPT = [1, 300, 301, 400, 17, 290, 42, 333, 260, 261, 500, 7]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """(variant, type) -> (model dir, gguf path), exported once per module."""
    out = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(variant: str, type: str):
        if (variant, type) not in made:
            d = tiny_model_dir(seed=5, **VARIANTS[variant])
            made[variant, type] = (d, export_gguf(d, out / f"{variant}.{type}.gguf", type=type))
        return made[variant, type]

    return get


def _field(r, key):
    return r.fields[key].contents()


def _tensor(t) -> np.ndarray:
    """A tensor of a GGUFReader as float32 [rows, cols] (or [n])."""
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        return np.array(t.data, np.float32)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensors_and_metadata(exported, variant):
    d, path = exported(variant, "f32")
    f = ModelFiles.open(d)
    c, w = f.config, f.weights
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "llama"
    expect = {
        "llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.ffn_dim, "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads, "llama.attention.key_length": c.hd,
        "llama.attention.value_length": c.hd, "llama.rope.dimension_count": c.hd, "llama.vocab_size": c.vocab_size,
        "general.file_type": 0, "tokenizer.ggml.model": "llama", "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 3,
        "m3lite.fingerprint": f.fingerprint,
    }
    for k, v in expect.items():
        assert _field(r, k) == v, k
    assert _field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)

    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = pb.ModelProto()
    sp.ParseFromString(f.tokenizer_path.read_bytes())
    assert _field(r, "tokenizer.ggml.tokens") == [p.piece for p in sp.pieces]
    assert _field(r, "tokenizer.ggml.scores") == pytest.approx([p.score for p in sp.pieces])
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:5] == [2, 3, 3, 3, 3]  # <unk>, then <s> </s> <pad> <ref> are control tokens
    assert types[5:5 + 256] == [6] * 256  # byte fallback pieces

    t = {x.name: x for x in r.tensors}
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    names |= {f"blk.{i}.{n}.weight" for i in range(c.n_layers) for n in
              ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(t) == names
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)
    np.testing.assert_array_equal(_tensor(t["token_embd.weight"]), w["tok_embeddings"])
    out = w["tok_embeddings"] if c.tie_embeddings else w["output"]
    np.testing.assert_array_equal(_tensor(t["output.weight"]), out)
    np.testing.assert_array_equal(_tensor(t["output_norm.weight"]), w["norm"])
    for i in range(c.n_layers):
        for kind, name in (("wv", "attn_v"), ("wo", "attn_output"), ("w1", "ffn_gate"), ("w3", "ffn_up"),
                           ("w2", "ffn_down"), ("attention_norm", "attn_norm"), ("ffn_norm", "ffn_norm")):
            np.testing.assert_array_equal(_tensor(t[f"blk.{i}.{name}.weight"]), w[kind][i])
        np.testing.assert_array_equal(_tensor(t[f"blk.{i}.attn_q.weight"]), interleave_rope_rows(w["wq"][i], c.n_heads))
        np.testing.assert_array_equal(_tensor(t[f"blk.{i}.attn_k.weight"]),
                                      interleave_rope_rows(w["wk"][i], c.n_kv_heads))


def test_q8_0_layout(exported):
    d, path = exported("tied", "q8_0")
    w = ModelFiles.open(d).weights
    r = gguf.GGUFReader(path)
    assert _field(r, "general.file_type") == 7
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    q = t["blk.0.ffn_down.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0
    rows, cols = w["w2"][0].shape
    assert q.data.shape == (rows, cols // 32 * 34)  # 34 bytes per block of 32
    # a block's step is max|x|/127 stored as float16 (relative rounding 2**-11): half a step of rounding, plus
    # up to 127 steps times the scale's own rounding
    err = np.abs(_tensor(q) - w["w2"][0]).reshape(rows, -1, 32)
    step = np.abs(w["w2"][0]).reshape(rows, -1, 32).max(-1, keepdims=True) / 127
    assert (err <= step * (0.5 + 127 * 2.0**-11) * 1.001).all()


def _rotate_half(x, cos, sin):
    h = x.shape[-1] // 2
    return x * np.concatenate([cos, cos], -1) + np.concatenate([-x[..., h:], x[..., :h]], -1) * \
        np.concatenate([sin, sin], -1)


def _adjacent_pairs(x, cos, sin):
    """llama.cpp's RoPE for the llama architecture (LLAMA_ROPE_TYPE_NORM): rotates (x[2i], x[2i+1])."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    rng = np.random.default_rng(0)
    n_heads, hd, dim, n = 3, 8, 12, 5
    w = rng.standard_normal((n_heads * hd, dim))
    x = rng.standard_normal((n, dim))
    ang = np.arange(n)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    ours = _rotate_half((x @ w.T).reshape(n, n_heads, hd), cos, sin)
    theirs = _adjacent_pairs((x @ interleave_rope_rows(w, n_heads).T).reshape(n, n_heads, hd), cos, sin)
    # the same rotated vectors, with the head dimension in another order: dot products (scores) are equal
    perm = interleave_rope_rows(np.arange(hd)[:, None], 1)[:, 0]
    np.testing.assert_allclose(theirs, ours[..., perm], atol=1e-12)
    np.testing.assert_allclose(np.einsum("ihd,jhd->hij", theirs, theirs), np.einsum("ihd,jhd->hij", ours, ours),
                               atol=1e-10)


def llama_cpp_reference(path, ids) -> np.ndarray:
    """Logits [n, vocab] of a GGUF llama model, computed with numpy the way llama.cpp defines the llama
    architecture (adjacent-pairs RoPE, GQA, RMSNorm, SwiGLU), from the file's tensors and metadata only."""
    r = gguf.GGUFReader(path)
    f = lambda k: _field(r, k)  # noqa: E731
    t = {x.name: _tensor(x).astype(np.float64) for x in r.tensors}
    H, G, hd = f("llama.attention.head_count"), f("llama.attention.head_count_kv"), f("llama.attention.key_length")
    eps, theta, L = f("llama.attention.layer_norm_rms_epsilon"), f("llama.rope.freq_base"), f("llama.block_count")
    n = len(ids)
    ang = np.arange(n)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = t["token_embd.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(L):
        p = f"blk.{i}."
        h = norm(x, t[p + "attn_norm.weight"])
        q = _adjacent_pairs((h @ t[p + "attn_q.weight"].T).reshape(n, H, hd), cos, sin)
        k = _adjacent_pairs((h @ t[p + "attn_k.weight"].T).reshape(n, G, hd), cos, sin)
        v = (h @ t[p + "attn_v.weight"].T).reshape(n, G, hd)
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
        s = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hij,jhd->ihd", a, v).reshape(n, H * hd)
        x = x + o @ t[p + "attn_output.weight"].T
        h = norm(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    return norm(x, t["output_norm.weight"]) @ t["output.weight"].T


# float32 weights: rounding only; q8_0 moves weights by up to half a step of max|block|/127
TOLERANCE = {"f32": 1e-4, "f16": 2e-3, "q8_0": 2e-2}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("type", list(TOLERANCE))
def test_llama_cpp_math_on_the_file_matches_m3lite(exported, variant, type):
    import m3lite

    d, path = exported(variant, type)
    ours = m3lite.load(d).logits(PROMPT)
    theirs = llama_cpp_reference(path, PROMPT)
    assert np.abs(theirs - ours).max() <= TOLERANCE[type] * max(1.0, np.abs(ours).max())


def _llama(path, n_ctx=256):
    llama_cpp = pytest.importorskip("llama_cpp")
    from m3lite.threads import physical_cores

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=physical_cores(),
                           n_threads_batch=physical_cores(), logits_all=True, verbose=False, seed=0)


def _llama_greedy(llm, ids, n) -> tuple[np.ndarray, list[int]]:
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[:len(ids)], np.float32)
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok == 2:
            break
        out.append(tok)
        llm.eval([tok])
    return first, out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_f32_same_greedy_tokens(exported, variant):
    import m3lite

    d, path = exported(variant, "f32")
    llm = _llama(path)
    assert llm.n_vocab() == 512
    logits, tokens = _llama_greedy(llm, PROMPT, 24)
    m = m3lite.load(d)
    ours = m.logits(PROMPT)
    assert np.abs(logits - ours).max() <= 1e-3 * max(1.0, np.abs(ours).max())
    m.generate(PROMPT, max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    assert tokens == m.last_result.tokens


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_q8_0_close_to_fp32(exported, variant):
    import m3lite

    d, path = exported(variant, "q8_0")
    logits, _ = _llama_greedy(_llama(path), PROMPT, 0)
    ours = m3lite.load(d).logits(PROMPT)
    # llama.cpp also quantizes the activations to 8 bits: a looser bound than the weights-only reference above
    assert np.abs(logits - ours).max() <= 5e-2 * max(1.0, np.abs(ours).max())


def test_llama_cpp_tokenizer_matches_sentencepiece(exported):
    import m3lite

    d, path = exported("tied", "f32")
    llm = _llama(path)
    tok = m3lite.load(d).tokenizer
    for text in ("The history of the world is long.", "Paris is the capital of France, 1889."):
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text, bos=True)


def test_cli_and_errors(exported, tmp_path):
    d, _ = exported("tied", "f32")
    out = tmp_path / "m.gguf"
    p = subprocess.run([sys.executable, "-m", "converters.export_gguf", str(d), "--out", str(out), "--type", "q8_0"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert out.is_file() and "Q8_0" in p.stdout
    assert not list(tmp_path.glob(".*.tmp"))
    p = subprocess.run([sys.executable, "-m", "converters.export_gguf", str(tmp_path / "missing"), "--out",
                        str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: ")
