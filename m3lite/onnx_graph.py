"""The forward graph of a model directory as ONNX, built op by op from the config (onnx.helper, no torch).

onnxruntime running it is a second, independent implementation of the math in `converters.model`. Its weights
are not copied: every initializer is ONNX external data pointing into the stacked blocks of model.onnx.data that
the runtime memory-maps. Float16 initializers are followed by Cast-to-float32 nodes, so the math, the inputs and
the outputs stay float32 whatever the storage.

Graph (batch 1; n new tokens after `past` cached ones; L layers):
    inputs   input_ids int64 [1, n], position_ids int64 [1, n],
             past_key_{i}, past_value_{i} float32 [1, n_kv, past, hd]  (past may be 0)
    outputs  logits float32 [1, n, vocab], present_key_{i}, present_value_{i} [1, n_kv, past + n, hd]
Keys in past/present are stored after RoPE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import ModelConfig
from .errors import BadArgument
from .kernels.rope import rope_inv_freq
from .modelfile import DATA_FILE, DTYPES, FLOAT_DTYPES, ONNX_FILE, atomic_write_bytes

OPSET = 17
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def write_graph(out_dir: str | Path, cfg: ModelConfig, index: dict[str, Any], fingerprint: str) -> Path:
    """Write model.onnx for `cfg` over the weights `index` (m3lite.modelfile.write_weights) and check it."""
    graph = build_model(cfg, index)
    for k, v in (("m3lite.config", cfg.to_json()), ("m3lite.fingerprint", fingerprint)):
        graph.metadata_props.add(key=k, value=v)
    path = Path(out_dir) / ONNX_FILE
    # Serialised directly: onnx.save could write external tensors out again; ours must point at the data file.
    atomic_write_bytes(path, graph.SerializeToString())
    onnx.checker.check_model(str(path))
    return path


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
    angles = g.op("Mul", pos, g.const(rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling), f32))  # [n, hd/2]
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
