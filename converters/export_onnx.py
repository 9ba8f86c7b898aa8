"""Export a model to an m3lite model directory: weights, tokenizer, a hand-built ONNX graph, manifest.

The graph is written op by op with onnx.helper from the config (not traced by torch.onnx.export), so
onnxruntime running it is a second, independent implementation of the math in `converters.model`.
Its weights are not copied: every initializer is ONNX external data pointing into the stacked blocks of
model.onnx.data that the runtime memory-maps. Weights are stored as float32 or float16 (`dtype`: half the
disk); float16 initializers are followed by Cast-to-float32 nodes, so the math, the inputs and the outputs stay
float32 whatever the storage.

Graph (batch 1; n new tokens after `past` cached ones; L layers):
    inputs   input_ids int64 [1, n], position_ids int64 [1, n],
             past_key_{i}, past_value_{i} float32 [1, n_kv, past, hd]  (past may be 0)
    outputs  logits float32 [1, n, vocab], present_key_{i}, present_value_{i} [1, n_kv, past + n, hd]
Keys in past/present are stored after RoPE.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from m3lite.config import ModelConfig
from m3lite.errors import BadArgument
from m3lite.modelfile import (CONFIG_FILE, DATA_FILE, DTYPES, FLOAT_DTYPES, ONNX_FILE, TOKENIZER_FILE,
                              atomic_write_bytes, fingerprint, sha256_file, write_manifest, write_weights)

OPSET = 17
LAYER_KINDS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def export(model: Any, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
           dtype: str = "float32") -> str:
    """Write `model` (a converters.model.Transformer) and its tokenizer as a model directory with its weights
    stored as `dtype` ("float32" or "float16"); return the fingerprint."""
    from .model import to_stacked

    return export_stacked(model.cfg, to_stacked(model), tokenizer_path, out_dir, dtype=dtype)


def export_stacked(cfg: ModelConfig, tensors: dict[str, np.ndarray], tokenizer_path: str | os.PathLike,
                   out_dir: str | os.PathLike, dtype: str = "float32") -> str:
    """Like `export`, from stacked float32 runtime tensors (see m3lite.modelfile.tensor_shapes)."""
    check_dtype(dtype)
    out = Path(out_dir)
    tok_src = Path(tokenizer_path)
    _check_tokenizer(tok_src, cfg.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    # An older model here must stop looking valid before its files are replaced; config.json comes back last.
    (out / CONFIG_FILE).unlink(missing_ok=True)

    index = write_weights(out, cfg, tensors, dtype=dtype)
    tok = out / TOKENIZER_FILE
    if not (tok.exists() and tok.resolve() == tok_src.resolve()):
        _atomic_copy(tok_src, tok)
    fp = fingerprint(cfg, index["sha256"], sha256_file(tok))

    graph = build_model(cfg, index)
    for k, v in (("m3lite.config", cfg.to_json()), ("m3lite.fingerprint", fp)):
        graph.metadata_props.add(key=k, value=v)
    # Serialised directly: onnx.save could write external tensors out again; ours must point at the data file.
    atomic_write_bytes(out / ONNX_FILE, graph.SerializeToString())
    onnx.checker.check_model(str(out / ONNX_FILE))

    written = write_manifest(out, cfg, index)
    assert written == fp, "fingerprint mismatch between graph metadata and manifest"
    return fp


def check_dtype(dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise BadArgument(f"unknown weight dtype {dtype!r}; exports write {' or '.join(FLOAT_DTYPES)}")


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    if not path.is_file():
        raise BadArgument(f"tokenizer {path} does not exist")
    try:
        n = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (RuntimeError, OSError) as e:
        raise BadArgument(f"{path} is not a sentencepiece model ({e})") from None
    if n != vocab_size:
        raise BadArgument(f"tokenizer {path} has {n} pieces but the model's vocab_size is {vocab_size}; "
                          f"train a tokenizer of that size")


def _atomic_copy(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, Path(src).read_bytes())


class _Graph:
    """A tiny builder: each call appends one node and returns its output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs: Any) -> str:
        self._n += 1
        out = name or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self._n}_{op_type}", **attrs))
        return out

    def const(self, value: Any, dtype: Any) -> str:
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.inits.append(numpy_helper.from_array(a, name))
            self._consts[key] = name
        return self._consts[key]

    def external(self, name: str, shape: tuple[int, ...], offset: int, dtype: str = "float32") -> str:
        t = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=list(shape),
                        data_location=TensorProto.EXTERNAL)
        nbytes = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
        for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(nbytes))):
            t.external_data.add(key=k, value=v)
        self.inits.append(t)
        return name


def build_model(cfg: ModelConfig, index: dict[str, Any]) -> onnx.ModelProto:
    """The forward graph of `cfg` whose weights are the external tensors described by `index` (the weights
    index returned by m3lite.modelfile.write_weights). Float16 weights are cast to float32 as they are read."""
    tensors = index["tensors"]
    for name, t in tensors.items():
        if t["dtype"] not in FLOAT_DTYPES:
            raise BadArgument(f"the ONNX export reads {' or '.join(FLOAT_DTYPES)} weights; tensor {name} is "
                              f"{t['dtype']}")
    g = _Graph()
    L, D, H, KV, hd = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd
    G = H // KV
    i64, f32 = np.int64, np.float32

    def stored(kind: str, layer: int | None = None) -> str:
        """The initializer as stored (float32 or float16)."""
        t = tensors[kind]
        shape, dt = tuple(t["shape"]), t["dtype"]
        if layer is None:
            return g.external(kind, shape, t["offset"], dt)
        per_layer = int(np.prod(shape[1:])) * np.dtype(DTYPES[dt]).itemsize
        return g.external(f"layers.{layer}.{kind}", shape[1:], t["offset"] + layer * per_layer, dt)

    def to_f32(x: str, kind: str, name: str) -> str:
        return x if tensors[kind]["dtype"] == "float32" else g.op("Cast", x, to=TensorProto.FLOAT, name=name)

    cast: dict[tuple[str, int | None], str] = {}

    def weight(kind: str, layer: int | None = None) -> str:
        """The initializer as float32 (one Cast node per float16 initializer, shared by its uses)."""
        if (kind, layer) not in cast:
            w = stored(kind, layer)
            cast[kind, layer] = to_f32(w, kind, f"{w}.f32")
        return cast[kind, layer]

    def rmsnorm(x: str, w: str) -> str:
        ms = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(cfg.norm_eps, f32))))
        return g.op("Mul", g.op("Mul", x, inv), w)

    def linear(x: str, w: str) -> str:  # x [n, in], w [out, in]
        return g.op("Gemm", x, w, transB=1)

    def rope(x: str) -> str:  # x [heads, n, hd]; cos, sin [n, hd]
        x1 = g.op("Slice", x, g.const([0], i64), g.const([hd // 2], i64), g.const([2], i64))
        x2 = g.op("Slice", x, g.const([hd // 2], i64), g.const([hd], i64), g.const([2], i64))
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=2)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))

    def heads(x: str, n_heads: int) -> str:  # [n, n_heads*hd] -> [n_heads, n, hd]
        return g.op("Transpose", g.op("Reshape", x, g.const([-1, n_heads, hd], i64)), perm=[1, 0, 2])

    # token embedding, [n, D] from here on (batch is 1)
    # (float16 storage: gather the rows, then cast only them)
    tok_rows = g.op("Gather", stored("tok_embeddings"), "input_ids", axis=0)
    x = g.op("Reshape", to_f32(tok_rows, "tok_embeddings", "tok_embeddings.rows.f32"), g.const([-1, D], i64))

    # RoPE tables for the given positions
    pos = g.op("Cast", g.op("Reshape", "position_ids", g.const([-1, 1], i64)), to=TensorProto.FLOAT)
    angles = g.op("Mul", pos, g.const(_inv_freq(hd, cfg.rope_theta), f32))  # [n, hd/2]
    emb = g.op("Concat", angles, angles, axis=1)
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)

    # causal mask [G*n, past+n]: row (g, j) sees columns 0..past+j; tiled once per query head of a group
    n = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0], i64))
    past = g.op("Squeeze", g.op("Shape", "past_key_0", start=2, end=3), g.const([0], i64))
    total = g.op("Add", past, n)
    one, zero = g.const(1, i64), g.const(0, i64)
    cols = g.op("Range", zero, total, one)
    rows = g.op("Unsqueeze", g.op("Add", g.op("Range", zero, n, one), past), g.const([1], i64))
    mask = g.op("Where", g.op("LessOrEqual", cols, rows), g.const(0.0, f32), g.const(-np.inf, f32))
    mask = g.op("Tile", mask, g.const([G, 1], i64))
    scale = g.const(1.0 / np.sqrt(hd), f32)

    for i in range(L):
        h = rmsnorm(x, weight("attention_norm", i))
        q = rope(heads(linear(h, weight("wq", i)), H))  # [H, n, hd]
        k = g.op("Unsqueeze", rope(heads(linear(h, weight("wk", i)), KV)), g.const([0], i64))  # [1, KV, n, hd]
        v = g.op("Unsqueeze", heads(linear(h, weight("wv", i)), KV), g.const([0], i64))
        k = g.op("Concat", f"past_key_{i}", k, axis=2, name=f"present_key_{i}")
        v = g.op("Concat", f"past_value_{i}", v, axis=2, name=f"present_value_{i}")
        # GQA without repeating K/V: the G query heads of a KV head become G*n rows of one matrix
        qg = g.op("Reshape", q, g.const([1, KV, -1, hd], i64))  # [1, KV, G*n, hd]
        scores = g.op("Mul", g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
        o = g.op("Reshape", g.op("MatMul", probs, v), g.const([H, -1, hd], i64))  # [H, n, hd]
        o = g.op("Reshape", g.op("Transpose", o, perm=[1, 0, 2]), g.const([-1, H * hd], i64))
        x = g.op("Add", x, linear(o, weight("wo", i)))

        h = rmsnorm(x, weight("ffn_norm", i))
        gate = linear(h, weight("w1", i))
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), linear(h, weight("w3", i)))
        x = g.op("Add", x, linear(act, weight("w2", i)))

    h = rmsnorm(x, weight("norm"))
    w_out = weight("tok_embeddings") if cfg.tie_embeddings else weight("output")
    g.op("Unsqueeze", linear(h, w_out), g.const([0], i64), name="logits")

    # tok_embeddings is referenced twice when tied: keep one initializer
    seen: set[str] = set()
    inits = [t for t in g.inits if not (t.name in seen or seen.add(t.name))]

    kv_in = [1, KV, "past", hd]
    kv_out = [1, KV, "total", hd]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "n"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "n", cfg.vocab_size])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, kv_in))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, kv_out))
    graph = helper.make_graph(g.nodes, "m3lite", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="m3lite",
                              producer_version="1")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    return model


def _inv_freq(hd: int, theta: float) -> np.ndarray:
    # the same float64 -> float32 rounding as converters.model.rope_inv_freq (kept torch-free here)
    return (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)
