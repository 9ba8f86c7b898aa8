"""Memory adapters: low-rank (LoRA) updates of a base model's linear weights, trained to read explicit memory.

An adapter is one `.safetensors` file (readable by any safetensors tool):
- tensors `layers.{i}.{kind}.lora_a` [rank, in] and `layers.{i}.{kind}.lora_b` [out, rank] (float16 or float32)
  for the kinds wq, wk, wv, wo, w1, w3, w2 of the layers it adapts; the update of W [out, in] is
  (alpha / rank) * lora_b @ lora_a;
- its header's `__metadata__["m3lite"]`: JSON with format, version, rank, alpha, the base model's shape
  (`base`: n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size and a free-text name), the explicit-memory
  settings it was trained for (memory_layers, memory_tokens_per_head; optionally retrieval_top_k, the
  references retrieved per question or chunk the adapted model reads best), how it was trained (`training`,
  free form) and the sha256 of the data section, so a damaged file is refused before any weight is touched.

The adapter is merged into the float32 weights when a model is imported (`m3lite import SRC --adapter FILE`,
and `m3lite pull` for the default model), before the weights are stored as float16 and quantised to int8: the
runtime then runs an ordinary model at full speed. The model's memory settings become the adapter's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import M3Error
from .modelfile import atomic_write_bytes, tensor_shapes

FORMAT, VERSION = "m3lite-adapter", 1
KINDS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
SHAPE_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_CODES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}


class AdapterError(M3Error):
    """An adapter file is damaged, foreign, or does not fit the model."""


def tensor_name(layer: int, kind: str, part: str) -> str:
    return f"layers.{layer}.{kind}.lora_{part}"


@dataclass
class Adapter:
    path: Path
    meta: dict[str, Any]
    pairs: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]  # (kind, layer) -> (a [r, in], b [out, r]), fp32

    @property
    def scale(self) -> float:
        return float(self.meta["alpha"]) / int(self.meta["rank"])

    def delta(self, kind: str, layer: int) -> np.ndarray | None:
        """The float32 update of layer `layer`'s `kind` weight, or None when the adapter leaves it alone.

        The same bits on every CPU: a BLAS product sums in an order of its own (AVX-512 and AVX2 kernels differ),
        and a last-bit change here can flip a float16 rounding of the merged weight, so the same adapter pulled
        on two machines got two fingerprints and each refused the other's banks. The rank-1 terms are added
        one after another instead, elementwise in float64 (a product of two float32 values is exact there)."""
        pair = self.pairs.get((kind, layer))
        if pair is None:
            return None
        a, b = (np.asarray(x, np.float64) for x in pair)
        acc = np.zeros((b.shape[0], a.shape[1]), np.float64)
        for r in range(a.shape[0]):
            acc += b[:, r, None] * a[None, r, :]
        return (acc * self.scale).astype(np.float32)

    def check(self, cfg: ModelConfig) -> None:
        """Refuse a model whose shape is not the adapter's base."""
        base = self.meta["base"]
        for f in SHAPE_FIELDS:
            if int(base[f]) != int(getattr(cfg, f)):
                raise AdapterError(f"{self.path}: adapter was trained for a model with {f} {base[f]}, this model "
                                   f"has {getattr(cfg, f)} (base: {base.get('name', '?')})")
        shapes = tensor_shapes(cfg)
        for (kind, layer), (a, b) in self.pairs.items():
            out, inp = shapes[kind][1:]
            if a.shape != (a.shape[0], inp) or b.shape != (out, a.shape[0]):
                raise AdapterError(f"{self.path}: layer {layer} {kind} has shapes {a.shape}, {b.shape}; the model "
                                   f"needs [rank, {inp}] and [{out}, rank]")

    def settings(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with the adapter's explicit-memory settings (and its references per retrieval, when given)."""
        cfg = dataclasses.replace(cfg, memory_layers=list(self.meta["memory_layers"]),
                                  memory_tokens_per_head=int(self.meta["memory_tokens_per_head"]))
        if self.meta.get("retrieval_top_k"):
            cfg = dataclasses.replace(cfg, retrieval_top_k=int(self.meta["retrieval_top_k"]))
        return cfg

    def merged(self, weights: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The stacked weights with the adapter added (each tensor read and merged when asked for)."""
        return _Merged(self, weights)

    def info(self) -> dict[str, Any]:
        """What a model manifest records about the adapter merged into it."""
        return {"file": self.path.name, "sha256": self.meta["sha256"], "rank": self.meta["rank"],
                "alpha": self.meta["alpha"], "memory_layers": self.meta["memory_layers"],
                "memory_tokens_per_head": self.meta["memory_tokens_per_head"],
                "retrieval_top_k": self.meta.get("retrieval_top_k"), "base": self.meta["base"].get("name", ""),
                "training": self.meta.get("training", {})}


class _Merged(Mapping):
    def __init__(self, adapter: Adapter, weights: Mapping[str, np.ndarray]):
        self.adapter, self.weights = adapter, weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, name: str) -> np.ndarray:
        w = self.weights[name]
        if name not in KINDS:
            return w
        w = np.array(w, dtype=np.float32, copy=True)
        for layer in range(w.shape[0]):
            d = self.adapter.delta(name, layer)
            if d is not None:
                w[layer] += d
        return w


def write_adapter(path: str | os.PathLike, pairs: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]],
                  meta: dict[str, Any], dtype: str = "float16") -> str:
    """Write an adapter file atomically; returns the sha256 of its data. `meta` needs rank, alpha, base,
    memory_layers and memory_tokens_per_head (format, version and sha256 are added here)."""
    dt = np.dtype("<f2" if dtype == "float16" else "<f4")
    header: dict[str, Any] = {}
    blobs, off = [], 0
    for (kind, layer) in sorted(pairs, key=lambda k: (k[1], KINDS.index(k[0]))):
        for part, arr in zip("ab", pairs[(kind, layer)]):
            a = np.ascontiguousarray(arr, dtype=dt)
            if not np.isfinite(a).all():
                raise AdapterError(f"layer {layer} {kind} lora_{part} has values {dtype} cannot hold")
            raw = a.tobytes()
            header[tensor_name(layer, kind, part)] = {"dtype": _CODES[dt], "shape": list(a.shape),
                                                      "data_offsets": [off, off + len(raw)]}
            blobs.append(raw)
            off += len(raw)
    data = b"".join(blobs)
    digest = hashlib.sha256(data).hexdigest()
    m = dict(meta, format=FORMAT, version=VERSION, sha256=digest)
    header["__metadata__"] = {"m3lite": json.dumps(m, sort_keys=True)}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    atomic_write_bytes(Path(path), struct.pack("<Q", len(head)) + head + data)
    return digest


def _header(path: Path) -> tuple[dict, dict, int, int]:
    from .importers.checkpoint import CheckpointError
    from .importers.hf_folder import safetensors_header

    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
    try:
        header, base, size = safetensors_header(path)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    try:
        meta = json.loads(header.get("__metadata__", {}).get("m3lite", "null"))
    except (AttributeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not an m3lite adapter (no m3lite metadata)")
    if meta.get("version") != VERSION:
        raise AdapterError(f"{path} has adapter version {meta.get('version')}; this m3lite reads {VERSION}")
    try:
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        layers = [int(i) for i in meta["memory_layers"]]
        int(meta["memory_tokens_per_head"])
        top = int(meta.get("retrieval_top_k") or 1)
        {f: int(meta["base"][f]) for f in SHAPE_FIELDS}
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{path}: adapter metadata is incomplete") from None
    if rank <= 0 or not np.isfinite(alpha) or not layers or top < 1:
        raise AdapterError(f"{path}: adapter metadata is invalid (rank {rank}, alpha {alpha})")
    return header, meta, base, size


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """An adapter's metadata from its header (its data not read nor checked: `read_adapter` does that)."""
    return _header(Path(path))[1]


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and check an adapter file: one line naming the file and what is wrong otherwise."""
    path = Path(path)
    header, meta, base, size = _header(path)
    rank = int(meta["rank"])
    with open(path, "rb") as f:
        f.seek(base)
        data = f.read()
    if len(data) != size - base or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise AdapterError(f"{path} is damaged: its data does not match the checksum in its header")
    pairs: dict[tuple[str, int], list] = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        parts = name.split(".")
        try:
            ok = len(parts) == 4 and parts[0] == "layers" and parts[2] in KINDS and parts[3] in ("lora_a", "lora_b")
            layer = int(parts[1]) if ok else -1
            dt, shape, (a, b) = _DTYPES[t["dtype"]], tuple(int(x) for x in t["shape"]), t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{path}: tensor {name} has a malformed header entry") from None
        if not ok or layer < 0 or len(shape) != 2 or not (0 <= a <= b <= len(data)) or \
                b - a != shape[0] * shape[1] * dt.itemsize:
            raise AdapterError(f"{path}: tensor {name} is not an adapter tensor or its size is wrong")
        arr = np.frombuffer(data, dtype=dt, count=shape[0] * shape[1], offset=a).reshape(shape).astype(np.float32)
        pairs.setdefault((parts[2], layer), [None, None])["ab".index(parts[3][-1])] = arr
    out = {}
    for key, (a, b) in pairs.items():
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: layer {key[1]} {key[0]} lacks a tensor or has a rank other than {rank}")
        out[key] = (a, b)
    if not out:
        raise AdapterError(f"{path}: the adapter holds no tensors")
    return Adapter(path, meta, out)
