"""Int8 weights: every matmul weight of a model in llama.cpp's Q8_0 layout (`kernels.q8`), stored in two files.

    model.q8.json   {"format": "m3lite-q8", "version": 1, "block": 32, "scale_dtype": "float16",
                     "model_fingerprint": ..., "data": {"file", "size", "sha256"},
                     "tensors": {name: {"shape": [..., n, k], "values": offset, "scales": offset}}}
                    -- written last: the commit point
    model.q8.data   per tensor, 64-byte aligned: int8 values [..., n, kp] (kp = k rounded up to 32, zero padded),
                    then float16 scales [..., n, kp / 32]

The quantized tensors are the attention and FFN weights (wq wk wv wo w1 w3 w2, stacked over layers as in
model.onnx.data) and the output head `output` (the embedding matrix when embeddings are tied); embeddings and
norms stay float. The files live in the model directory (`m3lite quantize`: such a model then runs int8 by
default) or in the user cache, `cache_dir()/int8/<fingerprint>/`, where loading with weights="int8" puts them
the first time. The fingerprint in the header ties them to one model: files of another model, truncated or
altered (size, sha256 of the data) are refused; a refused cache entry is quantized again.

Int8 is a way to run a model, not another model: the fingerprint (and so the banks a model may use) stays the
fp32 model's. Values are int8-mapped from the data file (zero copy); scales are widened to float32 at load.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import BadArgument, ModelFileError, another_model
from .kernels.q8 import QK, padded, quantize_blocks
from .modelfile import (ALIGN, CONFIG_FILE, checksum_ok, signed_json, ModelFiles, _verified_sha, atomic_write_bytes, cache_dir, tensor_shapes,
                        write_aligned)

FORMAT = "m3lite-q8"
VERSION = 1
JSON_FILE = "model.q8.json"
DATA_FILE = "model.q8.data"
WEIGHTS = ("fp32", "int8")
MATMULS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2", "output")
CHUNK = 1 << 22  # weights quantized per numpy pass (bounds the temporaries to ~50 MB)


def matmul_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The float shapes [..., n, k] of the quantized tensors."""
    shapes = tensor_shapes(cfg)
    return {name: shapes["tok_embeddings" if name == "output" and cfg.tie_embeddings else name] for name in MATMULS}


def check_weights(weights: str | None) -> None:
    if weights is not None and weights not in WEIGHTS:
        raise BadArgument(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")


def resolve_weights(weights: str | None, files: ModelFiles) -> str:
    """The weights a model runs: `weights` if given, else int8 when its directory holds int8 weights, else fp32."""
    check_weights(weights)
    if weights is None:
        return "int8" if (files.path / JSON_FILE).is_file() else "fp32"
    return weights


@dataclass
class Q8Weights:
    """A model's int8 weights: name -> (values int8 [..., n, kp], scales float32 [..., n, kp / 32])."""

    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    path: Path | None  # the model.q8.json they were read from; None when quantized in memory only

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes + s.nbytes // 2 for q, s in self.tensors.values())  # scales as stored (float16)


def _quantized(files: ModelFiles):
    """(name, values, float16 scales) of each matmul weight, quantized in row chunks."""
    cfg = files.config
    for name, shape in matmul_shapes(cfg).items():
        src = files.weights["tok_embeddings" if name == "output" and cfg.tie_embeddings else name]
        k = shape[-1]
        rows = src.reshape(-1, k)
        values = np.empty((rows.shape[0], padded(k)), np.int8)
        scales = np.empty((rows.shape[0], padded(k) // QK), np.float16)
        step = max(1, CHUNK // k)
        for r0 in range(0, rows.shape[0], step):
            values[r0:r0 + step], scales[r0:r0 + step] = quantize_blocks(rows[r0:r0 + step])
        yield name, values.reshape(shape[:-1] + values.shape[-1:]), scales.reshape(shape[:-1] + scales.shape[-1:])


def write(folder: Path, files: ModelFiles, quantized=None) -> Path:
    """Quantize `files` (or take `quantized`, from `_quantized`) and write model.q8.data then model.q8.json into
    `folder`; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict] = {}
    shapes = matmul_shapes(files.config)

    def arrays():
        for name, values, scales in quantized if quantized is not None else _quantized(files):
            index[name] = {"shape": list(shapes[name])}
            yield (name, "values"), values.astype("<i1", copy=False)
            yield (name, "scales"), scales.astype("<f2", copy=False)

    offsets, size, sha = write_aligned(folder / DATA_FILE, arrays())
    for (name, part), off in offsets.items():
        index[name][part] = off
    header = {"format": FORMAT, "version": VERSION, "block": QK, "scale_dtype": "float16",
              "model_fingerprint": files.fingerprint, "data": {"file": DATA_FILE, "size": size, "sha256": sha},
              "tensors": index}
    atomic_write_bytes(folder / JSON_FILE, signed_json(header))
    return folder / JSON_FILE


def read(folder: Path, files: ModelFiles, verify: bool = True) -> Q8Weights:
    """The int8 weights stored in `folder` for the model `files`; ModelFileError (one line) if they are missing,
    made for another model, truncated, altered or malformed."""
    jpath = folder / JSON_FILE
    redo = f"run `m3lite quantize --model {files.path}` again" if folder == files.path else "they will be remade"
    try:
        header = json.loads(jpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{jpath} is missing: there are no int8 weights in {folder}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{jpath} is unreadable ({e}); {redo}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{jpath} is not an m3lite int8 weights file; {redo}")
    if not checksum_ok(header):
        raise ModelFileError(f"{jpath} does not match its checksum; {redo}")
    if header.get("version") != VERSION or header.get("block") != QK or header.get("scale_dtype") != "float16":
        raise ModelFileError(f"{jpath} has an int8 format this m3lite does not read (version "
                             f"{header.get('version')!r}, block {header.get('block')!r}); {redo}")
    if header.get("model_fingerprint") != files.fingerprint:
        raise ModelFileError(another_model(f"the int8 weights {jpath}", header.get("model_fingerprint"),
                                           files.fingerprint, redo))
    try:
        data = folder / header["data"]["file"]
        size = int(header["data"]["size"])
        want_sha = header["data"]["sha256"]
        tensors = header["tensors"]
        shapes = matmul_shapes(files.config)
        if data.name != DATA_FILE or set(tensors) != set(shapes):
            raise ValueError("tensors")
        if not data.is_file() or data.stat().st_size != size:
            raise ModelFileError(f"{data} is missing or has the wrong size: it is truncated or altered; {redo}")
        if verify and _verified_sha(data) != want_sha:
            raise ModelFileError(f"{data} does not match its checksum: it was altered or corrupted; {redo}")
        mm = np.memmap(data, dtype=np.uint8, mode="r")
        out = {}
        for name, shape in shapes.items():
            t = tensors[name]
            if list(t["shape"]) != list(shape):
                raise ValueError(name)
            kp = padded(shape[-1])
            parts = []
            for part, dt, cols in (("values", np.dtype("<i1"), kp), ("scales", np.dtype("<f2"), kp // QK)):
                off = int(t[part])
                n = int(np.prod(shape[:-1])) * cols * dt.itemsize
                if off < 0 or off % ALIGN or off + n > size:
                    raise ValueError(f"{name} {part}")
                parts.append(mm[off:off + n].view(dt).reshape(shape[:-1] + (cols,)))
            values, scales = parts
            values.flags.writeable = False
            out[name] = (values, scales.astype(np.float32))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{jpath} is malformed (bad field {e}); {redo}") from None
    return Q8Weights(out, jpath)


def cache_folder(files: ModelFiles) -> Path:
    """Where int8 weights quantized at load are kept: the user cache, one folder per model fingerprint."""
    return cache_dir() / "int8" / files.fingerprint


def load(files: ModelFiles, verify: bool = True) -> Q8Weights:
    """The int8 weights of a model: those in its directory (refused with ModelFileError if they do not fit it),
    else those in the user cache (remade if damaged), else quantized now and saved to the cache (kept in memory
    only if the cache cannot be written)."""
    if (files.path / JSON_FILE).is_file():
        return read(files.path, files, verify)
    folder = cache_folder(files)
    if (folder / JSON_FILE).is_file():
        try:
            return read(folder, files, verify)
        except ModelFileError:
            pass  # a damaged or foreign cache entry is simply made again
    quantized = list(_quantized(files))
    try:
        write(folder, files, quantized)
        return read(folder, files, verify=False)  # just written; mapping it shares the page cache
    except (OSError, ModelFileError):  # read-only or full cache: run from memory
        return Q8Weights({n: (v, s.astype(np.float32)) for n, v, s in quantized}, None)


def quantize_model(model_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """`m3lite quantize`: write int8 weights into the model directory, or into `out`, a copy of the model
    (files hard-linked where possible) that then runs int8 by default. Returns what was written."""
    t0 = time.perf_counter()
    files = ModelFiles.open(model_dir)
    dest = files.path if out is None else Path(out)
    if out is not None and dest.resolve() != files.path.resolve():
        _copy_model(files, dest)
    try:
        jpath = write(dest, files)
    except OSError as e:
        raise ModelFileError(f"cannot write int8 weights into {dest}: {e.strerror or e}") from None
    q = read(dest, files)
    floats = sum(int(np.prod(s)) * 4 for s in matmul_shapes(files.config).values())
    return {"model": str(dest), "file": str(jpath), "fingerprint": files.fingerprint, "tensors": len(q.tensors),
            "int8_bytes": (jpath.parent / DATA_FILE).stat().st_size, "fp32_bytes": floats,
            "seconds": round(time.perf_counter() - t0, 3)}


def _copy_model(files: ModelFiles, dest: Path) -> None:
    """Copy a model directory's files to dest (hard links where the file system allows), config.json last."""
    if dest.exists() and not dest.is_dir():
        raise BadArgument(f"--out {dest} is a file; give a new or empty folder")
    if dest.is_dir() and any(dest.iterdir()):
        try:
            same = ModelFiles.open(dest, verify=False).fingerprint == files.fingerprint
        except ModelFileError:
            same = False
        if not same:
            raise BadArgument(f"--out {dest} is not empty; give a new or empty folder")
        return
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for src in (files.onnx_path, files.data_path, files.tokenizer_path, files.path / CONFIG_FILE):
            target = dest / src.name
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
    except OSError as e:
        raise ModelFileError(f"cannot copy the model into {dest}: {e.strerror or e}") from None
