"""Model directories whose weights are stored as float16: half the disk, float32 math in both backends.

Built without torch (numpy weights, cached tokenizer); the torch export path has its own test at the end."""
from __future__ import annotations

import json
import mmap
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sentencepiece")

import m3lite  # noqa: E402
from converters.export_onnx import export_stacked  # noqa: E402
from converters.init import main as init_main  # noqa: E402
from converters.init import random_weights  # noqa: E402
from converters.tokenizer import cached_tokenizer  # noqa: E402
from m3lite.config import ModelConfig  # noqa: E402
from m3lite.engine import Engine  # noqa: E402
from m3lite.errors import BadArgument, ModelFileError  # noqa: E402
from m3lite.modelfile import ALIGN, CONFIG_FILE, DATA_FILE, ModelFiles, signed_json, tensor_shapes, write_weights  # noqa: E402

TOL = 1e-4  # numba vs onnxruntime, as for float32 models
# float16 vs float32 storage of the same weights (the weights' float16 rounding, relative 2^-11 at most), as a
# fraction of the largest logit. Measured on the models below: 1.1e-3 (tied, max |logit| 7.6) and 1.5e-3
# (untied, 3.1); on the default preset trained for 100 steps, 1.8e-4 (max diff 1.5e-3 of 8.0).
FP16_REL_BOUND = 4e-3
IDS = (np.arange(37) * 37 + 11) % 512


def sharpened(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Random weights with the matrices scaled up (x5 as tests/test_converters.py does, the embedding x10):
    logits far from uniform, so an fp16-vs-fp32 difference is measured on numbers that matter."""
    w = random_weights(cfg, seed)
    for name, a in w.items():
        if not name.endswith("norm"):
            a *= np.float32(10.0 if name == "tok_embeddings" else 5.0)
    # norms away from 1 so their float16 rounding shows too
    rng = np.random.default_rng(seed)
    for name in ("attention_norm", "ffn_norm", "norm"):
        w[name] = (1 + 0.1 * rng.standard_normal(w[name].shape)).astype(np.float32)
    return w


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tmp_path_factory):
    """(cfg, fp32 weights, fp32 model dir, fp16 model dir) of the same weights."""
    cfg = ModelConfig.preset("tiny", tie_embeddings=request.param == "tied")
    w = sharpened(cfg, seed=3)
    tok = cached_tokenizer(cfg.vocab_size)
    root = tmp_path_factory.mktemp(f"fp16-{request.param}")
    export_stacked(cfg, w, tok, root / "f32")
    export_stacked(cfg, w, tok, root / "f16", dtype="float16")
    return cfg, w, root / "f32", root / "f16"


def test_files_are_half_the_size(pair):
    cfg, _, d32, d16 = pair
    a, b = ModelFiles.open(d32), ModelFiles.open(d16)
    s32, s16 = (d32 / DATA_FILE).stat().st_size, (d16 / DATA_FILE).stat().st_size
    n = len(tensor_shapes(cfg))
    assert 4 * cfg.n_params() <= s32 <= 4 * cfg.n_params() + ALIGN * n
    assert 2 * cfg.n_params() <= s16 <= 2 * cfg.n_params() + ALIGN * n  # only alignment padding on top
    assert abs(s16 - s32 / 2) <= ALIGN * n
    assert b.disk_bytes() < 0.55 * a.disk_bytes()  # config, graph and tokenizer barely change
    assert b.fingerprint != a.fingerprint  # other weights: banks of one are refused by the other


def test_open_verifies_and_maps_float16(pair):
    cfg, w, _, d16 = pair
    mf = ModelFiles.open(d16)
    tensors = mf.manifest["weights"]["tensors"]
    assert {t["dtype"] for t in tensors.values()} == {"float16"}
    for name, a in mf.weights.items():
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        assert isinstance(base, mmap.mmap) and not a.flags.writeable  # a view of the mapped file, no copy
        assert a.dtype == np.float16 and tensors[name]["offset"] % ALIGN == 0
        assert np.array_equal(a, w[name].astype(np.float16)), name


def test_open_refuses_altered_float16_files(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("M3LITE_CACHE", str(tmp_path / "cache"))
    _, _, _, d16 = pair
    d = tmp_path / "m"
    shutil.copytree(d16, d)
    data = d / DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="checksum"):
        ModelFiles.open(d)
    data.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ModelFileError, match="truncated"):
        ModelFiles.open(d)
    shutil.copy(d16 / DATA_FILE, data)
    assert ModelFiles.open(d).fingerprint == ModelFiles.open(d16).fingerprint
    # a manifest claiming float32 for float16 data: the tensors no longer fit the file
    m = json.loads((d / CONFIG_FILE).read_text())
    for t in m["weights"]["tensors"].values():
        t["dtype"] = "float32"
    (d / CONFIG_FILE).write_text(json.dumps(m))  # the manifest checks itself
    with pytest.raises(ModelFileError, match="checksum"):
        ModelFiles.open(d)
    (d / CONFIG_FILE).write_bytes(signed_json(m))  # signed again, to reach the checks behind
    with pytest.raises(ModelFileError, match="outside the weight file"):
        ModelFiles.open(d)
    for t in m["weights"]["tensors"].values():
        t["dtype"] = "bfloat16"
    (d / CONFIG_FILE).write_bytes(signed_json(m))
    with pytest.raises(ModelFileError, match="bfloat16"):
        ModelFiles.open(d)


def test_engine_widens_float16_once(pair):
    cfg, w, d32, d16 = pair
    mf16, mf32 = ModelFiles.open(d16), ModelFiles.open(d32)
    e16, e32 = Engine(cfg, mf16.weights, n_threads=1), Engine(cfg, mf32.weights, n_threads=1)
    for name in tensor_shapes(cfg):
        a = e16.weights[name]
        assert a.dtype == np.float32 and a.flags.c_contiguous and not a.flags.writeable
        assert not np.shares_memory(a, mf16.weights[name])  # a copy, made once at load
        assert np.array_equal(a, w[name].astype(np.float16).astype(np.float32))
        assert np.shares_memory(e32.weights[name], mf32.weights[name])  # float32: zero copy
    if cfg.tie_embeddings:
        assert e16.output is e16.tok_embeddings  # one widened copy serves both
    # float16 storage is the float32 model with its weights rounded to float16: bit for bit
    rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
    er = Engine(cfg, rounded, n_threads=1)
    assert np.array_equal(e16.prefill(IDS, all_logits=True), er.prefill(IDS, all_logits=True))
    with pytest.raises(BadArgument, match="int8"):
        Engine(cfg, {k: v.astype(np.int8) for k, v in w.items()})


def test_backends_agree_on_float16(pair):
    cfg, _, _, d16 = pair
    m = m3lite.load(d16, n_threads=1)
    a, b = m.logits(IDS, backend="numba"), m.logits(IDS, backend="onnxruntime")
    assert a.shape == b.shape == (len(IDS), cfg.vocab_size) and b.dtype == np.float32
    assert np.abs(a).max() > 2  # logits far from zero: the comparison means something
    assert np.abs(a - b).max() < TOL
    # incremental decoding too
    en, eo = m.engine("numba"), m.engine("onnxruntime")
    en.reset()
    eo.reset()
    x, y = en.prefill(IDS[:20]), eo.prefill(IDS[:20])
    for t in IDS[20:28]:
        assert np.abs(x - y).max() < TOL
        x, y = en.decode(int(t)), eo.decode(int(t))
    assert np.abs(x - y).max() < TOL


def test_float16_vs_float32_logits(pair):
    _, _, d32, d16 = pair
    m32, m16 = m3lite.load(d32, n_threads=1), m3lite.load(d16, n_threads=1)
    for backend in ("numba", "onnxruntime"):
        a, b = m32.logits(IDS, backend=backend), m16.logits(IDS, backend=backend)
        diff = np.abs(a - b).max()
        assert 0 < diff < FP16_REL_BOUND * np.abs(a).max(), (backend, diff, np.abs(a).max())
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_onnx_graph_casts_float16_initializers(pair):
    import onnx
    from onnx import TensorProto

    cfg, _, _, d16 = pair
    g = onnx.load(str(d16 / "model.onnx"), load_external_data=False).graph
    ext = [t for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
    assert ext and all(t.data_type == TensorProto.FLOAT16 for t in ext)
    assert all({e.key: e.value for e in t.external_data}["location"] == DATA_FILE for t in ext)
    # every float16 initializer is read through a Cast to float32 (the embedding: its gathered rows)
    users = {t.name: [n for n in g.node if t.name in n.input] for t in ext}
    for name, nodes in users.items():
        for n in nodes:
            if n.op_type == "Gather":
                n = next(m for m in g.node if n.output[0] in m.input)
            assert n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT, name
    # one Cast per initializer (shared by its uses; tied: the embedding is cast once more, for the output)
    casts = [n for n in g.node if n.op_type == "Cast" and n.input[0] in users]
    assert len(casts) == len(ext) - (0 if cfg.tie_embeddings else 1)
    io = list(g.input[2:]) + list(g.output)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)
    sess = ort.InferenceSession(str(d16 / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].type == "tensor(float)"
    assert (d16 / "model.onnx").stat().st_size < 100_000  # the weights stay in the data file


def test_write_weights_refuses_what_float16_cannot_hold(tmp_path):
    cfg = ModelConfig.preset("tiny", n_layers=1)
    w = random_weights(cfg, 0)
    w["wq"][0, 0, 0] = 1e5
    with pytest.raises(BadArgument, match="float16 cannot hold"):
        write_weights(tmp_path, cfg, w, dtype="float16")
    write_weights(tmp_path, cfg, w, dtype="float32")
    with pytest.raises(BadArgument, match="float32 or float16"):
        export_stacked(cfg, w, cached_tokenizer(cfg.vocab_size), tmp_path / "m", dtype="int8")


def test_init_cli_float16_and_info(tmp_path, capsys):
    out = tmp_path / "m"
    assert init_main(["--out", str(out), "--preset", "tiny", "--n-layers", "1", "--seed", "4",
                      "--dtype", "float16"]) == 0
    assert "float16" in capsys.readouterr().out
    mf = ModelFiles.open(out)
    ref = random_weights(mf.config, seed=4)
    assert all(np.array_equal(mf.weights[k], ref[k].astype(np.float16)) for k in ref)
    p = subprocess.run([sys.executable, "-m", "m3lite", "info", "--model", str(out), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dtype"] == ["float16"]
    p = subprocess.run([sys.executable, "-m", "m3lite", "info", "--model", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "float16" in p.stdout


def test_init_cli_refuses_other_dtypes(tmp_path):
    with pytest.raises(SystemExit):
        init_main(["--out", str(tmp_path / "x"), "--dtype", "int8"])


def test_tiny_model_dir_fixture_float16(tiny_model_dir):
    mf = ModelFiles.open(tiny_model_dir(dtype="float16"))
    assert all(a.dtype == np.float16 for a in mf.weights.values())


def test_torch_export_float16(tmp_path):
    torch = pytest.importorskip("torch")
    from converters.export_onnx import export
    from converters.model import Transformer, from_stacked, to_stacked

    cfg = ModelConfig.preset("tiny", n_layers=2)
    model = Transformer(cfg, seed=7).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("tok_embeddings"):
                p.mul_(5.0)
    tok = cached_tokenizer(cfg.vocab_size)
    export(model, tok, tmp_path / "f32")
    export(model, tok, tmp_path / "f16", dtype="float16")
    s32, s16 = ((tmp_path / d / DATA_FILE).stat().st_size for d in ("f32", "f16"))
    assert abs(s16 - s32 / 2) <= ALIGN * len(tensor_shapes(cfg))
    mf = ModelFiles.open(tmp_path / "f16")
    st = to_stacked(model)
    assert all(np.array_equal(mf.weights[k], st[k].astype(np.float16)) for k in st)
    # a float16 model directory loads back into torch (e.g. to train on): weights widened
    back = from_stacked(cfg, mf.weights)
    with torch.no_grad():
        want = model(torch.tensor(IDS)[None])[0].numpy()
        again = back(torch.tensor(IDS)[None])[0].numpy()
    got = m3lite.load(tmp_path / "f16", n_threads=1).logits(IDS, backend="onnxruntime")
    assert np.abs(got - again).max() < TOL  # the same (rounded) weights: backends agree with torch
    assert 0 < np.abs(got - want).max() < FP16_REL_BOUND * np.abs(want).max()
