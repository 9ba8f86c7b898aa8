"""Int8 weights (Q8_0 blocks of 32, float16 scales): the block layout, the kernels, the logit error against fp32,
the files in the model directory and in the user cache, and `m3lite quantize` / `generate --weights`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("sentencepiece")

import m3lite  # noqa: E402
from clitools import one_line_error, run  # noqa: E402
from converters.init import random_weights  # noqa: E402
from m3lite import int8_weights as q8files  # noqa: E402
from m3lite.config import ModelConfig  # noqa: E402
from m3lite.engine import Engine  # noqa: E402
from m3lite.errors import BadArgument, ModelFileError  # noqa: E402
from m3lite.kernels import q8  # noqa: E402
from m3lite.modelfile import ModelFiles  # noqa: E402

# The bound of the int8 logits against the fp32 logits of the same weights: max |int8 - fp32| over every
# position and vocabulary entry, as a fraction of max |fp32 logit|. Measured (48-64 random or text tokens):
# random `tiny` models 0.45-1.3%, `tiny` with matrices x5 (sharper logits) 2.2-3.1%, random `default` models
# (8.4M parameters, tied and untied, 3 seeds each) 2.1-2.4%, the `default` shape trained briefly (runs/quick)
# 1.1-1.2%. Each projection adds the rounding of its weights and of its input (about 0.6% rms each for
# Gaussian values); the residual stream carries them through the layers.
INT8_REL_BOUND = 0.05


def quantized(cfg: ModelConfig, w: dict[str, np.ndarray]) -> dict:
    """The int8 tensors of `w` as the engine takes them (what m3lite.int8_weights stores, in memory)."""
    out = {}
    for name in q8files.MATMULS:
        src = w["tok_embeddings" if name == "output" and cfg.tie_embeddings else name]
        values, scales = q8.quantize_blocks(src)
        out[name] = (values, scales.astype(np.float32))
    return out


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Int8 weights quantized at load go to a cache private to each test."""
    monkeypatch.setenv("M3LITE_CACHE", str(tmp_path / "cache"))


# ---- the block layout ------------------------------------------------------------------------------------------

def test_blocks_follow_llama_cpp_q8_0():
    x = np.zeros((2, 70), np.float32)  # 70 inputs: 3 blocks, the last one padded with zeros
    x[0, :32] = np.arange(32) - 16.0  # max |x| 16 -> d = 16/127
    x[0, 32:64] = 2.5 * np.array([1, -1] * 16)  # ties of x/d land on .5 only through d = 2.5/127
    x[0, 64:] = 0.1
    x[1, 5] = -3.0
    values, scales = q8.quantize_blocks(x)
    assert values.dtype == np.int8 and values.shape == (2, 96)
    assert scales.dtype == np.float16 and scales.shape == (2, 3)
    assert (values[:, 70:] == 0).all()  # padding
    d = np.float32(16) / np.float32(127)
    assert scales[0, 0] == np.float16(d)
    want = np.trunc(x[0, :32] * (np.float32(1) / d) + np.copysign(0.5, x[0, :32]))  # roundf, as llama.cpp
    assert (values[0, :32] == want).all()
    assert abs(values[0, :32]).max() == 127 and (abs(values[0, 32:64]) == 127).all()
    assert scales[1, 1] == 0 and (values[1, 32:] == 0).all()  # a block of zeros: scale 0, values 0
    assert values[1, 5] == -127 and values[1, :32].sum() == -127
    # halves round away from zero (C's roundf), not to even
    h = np.zeros((1, 32), np.float32)
    h[0, :3] = [127.0, 2.5, -0.5]  # d = 1 exactly
    assert list(q8.quantize_blocks(h)[0][0, :3]) == [127, 3, -1]


def test_round_trip_error_bound():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 100)) * rng.uniform(0.001, 10, (64, 1))).astype(np.float32)
    values, scales = q8.quantize_blocks(x)
    back = q8.dequantize_blocks(values, scales, 100)
    assert back.shape == x.shape and back.dtype == np.float32
    xp = np.zeros((64, 128), np.float32)
    xp[:, :100] = x
    amax = np.abs(xp.reshape(64, 4, 32)).max(-1)  # per block
    err = np.abs(np.pad(back - x, ((0, 0), (0, 28)))).reshape(64, 4, 32).max(-1)
    assert (err <= amax * (1 / 254 + 2.0 ** -11) * (1 + 1e-6)).all()
    # values that are multiples of an exact float16 scale come back exactly
    ints = rng.integers(-127, 128, (8, 32))
    ints[:, 0] = 127  # every block: max |x| = 127 * 0.25, so d = 0.25 (exact in float16) and x / d = ints
    exact = ints.astype(np.float32) * np.float32(0.25)
    v, s = q8.quantize_blocks(exact)
    assert (q8.dequantize_blocks(v, s) == exact).all()


def test_quantize_refuses_values_it_cannot_hold():
    with pytest.raises(BadArgument, match="not finite"):
        q8.quantize_blocks(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(BadArgument, match="too large"):
        q8.quantize_blocks(np.full((1, 32), 1e7, np.float32))


# ---- kernels ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [64, 96, 100])
def test_matvec_is_the_dot_of_the_dequantized_weights(k):
    rng = np.random.default_rng(k)
    w = rng.standard_normal((37, k)).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    values, s16 = q8.quantize_blocks(w)
    ws = s16.astype(np.float32)
    # the exact value: int8 weights times their scales, fp32 activations, in float64
    want = q8.dequantize_blocks(values, ws, k).astype(np.float64) @ x.astype(np.float64)
    out = np.zeros(37, np.float32)
    q8.matvec_q8(values, ws, x, out)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
    # the decode step's per-thread kernels: a share of the rows, with the residual add, and the gated MLP
    nowt = np.zeros((0, 0), np.float32)  # the fp32 weights, unused by the int8 branch
    acc = np.ones(37, np.float32)
    q8.rows(True, True, nowt, values, ws, x, acc, 5, 30)
    assert (acc[:5] == 1).all() and (acc[30:] == 1).all() and np.allclose(acc[5:30], out[5:30] + 1, rtol=1e-6)
    sw = np.zeros(37, np.float32)
    q8.rows_swiglu(True, nowt, nowt, values, ws, values[::-1].copy(), ws[::-1].copy(), x, sw, 0, 37)
    assert np.allclose(sw, out / (1 + np.exp(-out.astype(np.float64))) * out[::-1], rtol=1e-5, atol=1e-6)
    # prefill: the same function as fp32 GEMMs over dequantized tiles
    X = np.stack([x, -2 * x, rng.standard_normal(k).astype(np.float32)])
    g = np.zeros((3, 37), np.float32)
    q8.matmul_q8(X, values, ws, g, np.zeros(8 * k, np.float32))  # 8-row tiles
    assert np.abs(g[0] - out).max() <= 1e-5 * np.abs(out).max()
    assert np.abs(g[1] + 2 * out).max() <= 1e-5 * np.abs(out).max()


def test_matvec_checks_shapes():
    values, s = q8.quantize_blocks(np.ones((4, 64), np.float32))
    with pytest.raises(ValueError):
        q8.matvec_q8(values, np.ascontiguousarray(s[:, :1], np.float32), np.zeros(64, np.float32), np.zeros(4, np.float32))


# ---- the engine: int8 against fp32 -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset,tied", [("tiny", True), ("tiny", False), ("default", True)])
def test_logit_error_within_bound(preset, tied):
    cfg = ModelConfig.preset(preset, tie_embeddings=tied)
    w = random_weights(cfg, seed=1)
    a = Engine(cfg, w, max_ctx=64)
    b = Engine(cfg, w, max_ctx=64, q8=quantized(cfg, w))
    ids = np.random.default_rng(2).integers(5, cfg.vocab_size, 48)
    fa, fb = a.prefill(ids, all_logits=True), b.prefill(ids, all_logits=True)
    assert rel_error(fa, fb) < INT8_REL_BOUND
    assert 0 < rel_error(fa, fb)  # the int8 path did run


def test_int8_decode_equals_int8_prefill_with_memories():
    """Decode (integer dots) and prefill (fp32 GEMMs over the same quantized values) compute one function,
    memory attention included."""
    cfg = ModelConfig.preset("tiny", n_kv_heads=1, tie_embeddings=False)
    w = random_weights(cfg, seed=4)
    for a in w.values():
        a *= 5
    e = Engine(cfg, w, max_ctx=64, prefix_capacity=16, q8=quantized(cfg, w))
    rng = np.random.default_rng(0)
    mem = rng.standard_normal((2, 1, 12, cfg.hd)).astype(np.float32)
    ids = rng.integers(5, cfg.vocab_size, 20)
    e.set_prefix(0, mem[0], mem[1])
    full = e.prefill(ids, all_logits=True)
    e.reset()
    e.set_prefix(0, mem[0], mem[1])
    e.prefill(ids[:5])
    steps = np.array([e.decode(t) for t in ids[5:]])
    assert rel_error(full[5:], steps) < 1e-5


def test_mismatched_int8_weights_are_refused():
    cfg = ModelConfig.preset("tiny")
    w = random_weights(cfg)
    bad = quantized(cfg, w)
    bad["w2"] = (bad["w2"][0][:, :, :32], bad["w2"][1])
    with pytest.raises(BadArgument, match="int8 weight w2"):
        Engine(cfg, w, q8=bad)
    del bad["w2"]
    with pytest.raises(BadArgument, match="lack w2"):
        Engine(cfg, w, q8=bad)


def test_tiny_model_greedy_tokens_equal(tiny_model_dir):
    d = tiny_model_dir()
    a, b = m3lite.load(d, weights="fp32"), m3lite.load(d, weights="int8")
    assert (a.weights, b.weights) == ("fp32", "int8")
    prompt = "The history of Rome"
    ids = a.encode_prompt(prompt)
    assert rel_error(a.logits(ids), b.logits(ids)) < INT8_REL_BOUND
    want = a.generate(prompt, max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    got = b.generate(prompt, max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    assert got == want and a.last_result.tokens == b.last_result.tokens
    # the onnxruntime backend runs the float graph whatever the weights
    assert np.abs(b.logits(ids, backend="onnxruntime") - a.logits(ids)).max() < 1e-4


def test_greedy_departs_only_at_near_ties():
    """Random weights made sharper (x5) give varied greedy text, but their top logits can lie closer than the
    int8 error: int8 greedy then follows fp32 greedy until a step where fp32's chosen logit beats int8's choice
    by no more than twice the bound (both see the same context there)."""
    cfg = ModelConfig.preset("tiny")
    for seed in range(3):
        w = random_weights(cfg, seed)
        for name, a in w.items():
            if not name.endswith("norm"):
                a *= 10.0 if name == "tok_embeddings" else 5.0
        fp, i8 = Engine(cfg, w, max_ctx=64), Engine(cfg, w, max_ctx=64, q8=quantized(cfg, w))
        prompt = [1] + list(np.random.default_rng(seed).integers(5, cfg.vocab_size, 8))
        la, lb = fp.prefill(prompt), i8.prefill(prompt)
        for _ in range(32):
            ta, tb = int(np.argmax(la)), int(np.argmax(lb))
            if ta != tb:
                assert la[ta] - la[tb] <= 2 * INT8_REL_BOUND * np.abs(la).max()
                break
            la, lb = fp.decode(ta), i8.decode(tb)


# ---- files: the model directory and the user cache ----------------------------------------------------------

def test_load_quantizes_once_into_the_cache(tiny_model_dir, tmp_path):
    d = tiny_model_dir()
    m = m3lite.load(d, weights="int8")
    files = ModelFiles.open(d)
    folder = q8files.cache_folder(files)
    assert m._q8.path == folder / q8files.JSON_FILE
    assert folder.is_relative_to(tmp_path / "cache")
    header = json.loads((folder / q8files.JSON_FILE).read_text())
    assert header["model_fingerprint"] == files.fingerprint and header["block"] == 32
    values, scales = m._q8.tensors["wq"]
    assert isinstance(values, np.memmap) and not values.flags.writeable  # mapped from the file, not copied
    want_v, want_s = q8.quantize_blocks(files.weights["wq"])
    assert (values == want_v).all() and (scales == want_s.astype(np.float32)).all()
    assert (m._q8.tensors["output"][0] == q8.quantize_blocks(files.weights["tok_embeddings"])[0]).all()
    mtime = (folder / q8files.DATA_FILE).stat().st_mtime_ns
    assert m3lite.load(d).weights == "fp32"  # int8 only when asked: nothing is stored in the model directory
    assert m3lite.load(d, weights="int8")._q8.path == folder / q8files.JSON_FILE
    assert (folder / q8files.DATA_FILE).stat().st_mtime_ns == mtime  # reused, not remade


def _other_model_cache(tiny_model_dir, folder):
    other = ModelFiles.open(tiny_model_dir(seed=5))
    q8files.write(folder, other)


@pytest.mark.parametrize("damage", ["foreign", "truncated", "altered", "not json", "wrong format", "bad offset"])
def test_damaged_or_foreign_files_are_refused(tiny_model_dir, tmp_path, damage):
    d = tiny_model_dir()
    files = ModelFiles.open(d)
    folder = tmp_path / "q8"
    if damage == "foreign":
        _other_model_cache(tiny_model_dir, folder)
    else:
        q8files.write(folder, files)
    jpath, data = folder / q8files.JSON_FILE, folder / q8files.DATA_FILE
    header = json.loads(jpath.read_text())
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[:-64])
    elif damage == "altered":
        b = bytearray(data.read_bytes())
        b[100] ^= 1
        data.write_bytes(bytes(b))
    elif damage == "not json":
        jpath.write_text("{oops")
    elif damage == "wrong format":
        jpath.write_text(json.dumps(dict(header, version=99)))
    elif damage == "bad offset":
        header["tensors"]["w1"]["values"] = header["data"]["size"]
        jpath.write_text(json.dumps(header))
    with pytest.raises(ModelFileError) as e:
        q8files.read(folder, files)
    assert "\n" not in str(e.value)
    # in the user cache the same damage is repaired: the weights are quantized again
    cache = q8files.cache_folder(files)
    shutil.copytree(folder, cache)
    got = q8files.load(files)
    assert got.path == cache / q8files.JSON_FILE
    assert (got.tensors["w2"][0] == q8.quantize_blocks(files.weights["w2"])[0]).all()
    q8files.read(cache, files)  # sound again


def test_unwritable_cache_runs_from_memory(tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("M3LITE_CACHE", str(blocker / "cache"))  # a path under a file: cannot be created
    m = m3lite.load(tiny_model_dir(), weights="int8")
    assert m._q8.path is None
    assert len(m.logits([1, 2, 3])) == 3


# ---- the command line ------------------------------------------------------------------------------------------

def test_quantize_command_and_default_weights(tiny_model_dir, tmp_path):
    d = tiny_model_dir()
    out = tmp_path / "m8"
    r = json.loads(run("quantize", "--model", d, "--out", out, "--json").stdout)
    assert r["model"] == str(out) and r["tensors"] == 8
    assert r["int8_bytes"] < 0.3 * r["fp32_bytes"]  # 34 bytes per 32 weights, and alignment
    assert m3lite.load(out).weights == "int8"  # stored int8 weights are the default
    assert m3lite.load(out, weights="fp32").weights == "fp32"
    assert m3lite.load(out).fingerprint == m3lite.load(d).fingerprint  # the same model: its banks stay valid
    a = json.loads(run("generate", "hello", "--model", out, "-n", "8", "--temperature", "0", "--json").stdout)
    b = json.loads(run("generate", "hello", "--model", d, "-n", "8", "--temperature", "0", "--weights", "int8",
                       "--json").stdout)
    assert a["tokens"] == b["tokens"]
    # quantizing again into the same folder, or into the model's own, is allowed
    run("quantize", "--model", d, "--out", out)
    run("quantize", "--model", out)


def test_quantize_and_weights_errors_are_one_line(tiny_model_dir, tmp_path):
    d = tiny_model_dir()
    assert "does not exist" in one_line_error(run("quantize", "--model", tmp_path / "nope", check=False))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "not empty" in one_line_error(run("quantize", "--model", d, "--out", busy, check=False))
    assert "is a file" in one_line_error(run("quantize", "--model", d, "--out", busy / "notes.txt", check=False))
    assert "unknown weights" in one_line_error(run("generate", "hi", "--model", d, "--weights", "int4",
                                                   check=False))
    # int8 weights stored in a model directory but made for another model
    m = tmp_path / "m"
    run("quantize", "--model", d, "--out", m)
    _other_model_cache(tiny_model_dir, tmp_path / "other")
    for name in (q8files.JSON_FILE, q8files.DATA_FILE):
        shutil.copy(tmp_path / "other" / name, m / name)
    msg = one_line_error(run("generate", "hi", "--model", m, "-n", "2", check=False))
    assert "another model" in msg and "m3lite quantize" in msg
    (m / q8files.DATA_FILE).write_bytes(b"")
    (m / q8files.JSON_FILE).write_text("[]")
    assert "not an m3lite int8" in one_line_error(run("generate", "hi", "--model", m, "-n", "2", check=False))


def test_second_engine_of_an_int8_model_runs_int8(tiny_model_dir):
    """A Chat's engine (Model.new_engine) shares the int8 weights and runs them too."""
    m = m3lite.load(tiny_model_dir(), weights="int8")
    a, b = m.engine(), m.new_engine()
    assert b.q8 and np.shares_memory(b.q8_weights["w1"][0], a.q8_weights["w1"][0])  # shared, not copied
    ids = np.arange(5, 30)
    assert (a.prefill(ids, all_logits=True) == b.prefill(ids, all_logits=True)).all()
    chat = m.chat()
    assert chat.engine.q8
