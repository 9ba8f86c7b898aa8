"""The model directory: ONNX graph + raw external weight data (memory-mapped), tokenizer, config, fingerprint.

Layout of a model directory::

    config.json        {"format": "m3lite-model", "version": 1, "config": {...}, "weights": {...},
                        "tokenizer": {...}, "fingerprint": "..."}   -- written last: the commit point
    model.onnx         the forward graph; its initializers point into model.onnx.data (ONNX external data)
    model.onnx.data    raw little-endian tensors (float32, or float16: half the disk), each 64-byte aligned
    tokenizer.model    sentencepiece (models trained here), or
    tokenizer.json     a Hugging Face tokenizer (imported models; special ids in the manifest's "tokenizer")
    model.q8.*         optional int8 weights (m3lite.int8_weights)

Weights of the same kind are stored stacked over layers ([n_layers, out, in]) so the runtime maps each kind
as one array; the ONNX graph's per-layer initializers are offsets into those blocks. Linear weights are in
the PyTorch convention [out_features, in_features]. RoPE is the "rotate half" convention.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import BadArgument, ModelFileError

FORMAT = "m3lite-model"
VERSION = 1
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.model"
ALIGN = 64
DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}
FLOAT_DTYPES = ("float32", "float16")  # what exports write and both backends run (int8 needs its own kernels)


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the stacked weight tensors of a model (the runtime's view)."""
    L, D, F, V = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size
    shapes = {
        "tok_embeddings": (V, D),
        "attention_norm": (L, D),
        "wq": (L, cfg.q_dim, D),
        "wk": (L, cfg.kv_dim, D),
        "wv": (L, cfg.kv_dim, D),
        "wo": (L, D, cfg.q_dim),
        "ffn_norm": (L, D),
        "w1": (L, F, D),  # gate
        "w3": (L, F, D),  # up
        "w2": (L, D, F),  # down
        "norm": (D,),
    }
    if not cfg.tie_embeddings:
        shapes["output"] = (V, D)
    return shapes


def json_checksum(obj: dict) -> str:
    """sha256 of a JSON object without its "checksum" field (canonical: sorted keys): a manifest checks itself."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def signed_json(obj: dict, indent: int = 2) -> bytes:
    """`obj` as JSON text with its checksum (see json_checksum)."""
    return (json.dumps(dict(obj, checksum=json_checksum(obj)), indent=indent, ensure_ascii=False) + "\n").encode()


def checksum_ok(obj: dict) -> bool:
    """Whether a manifest matches its checksum (files written before checksums carry none: accepted)."""
    return "checksum" not in obj or obj["checksum"] == json_checksum(obj)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fingerprint(cfg: ModelConfig, weights_sha: str, tokenizer_sha: str) -> str:
    """A model's identity: config, weights and tokenizer. Banks record it and are refused by other models."""
    h = hashlib.sha256()
    h.update(cfg.to_json().encode())
    h.update(weights_sha.encode())
    h.update(tokenizer_sha.encode())
    return h.hexdigest()[:32]


def fsync_dir(path: Path) -> None:
    """Make a rename in folder `path` durable (best effort: some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path):
    """A unique temporary path beside `path` (`NAME.*.tmp`) for the block to write (by any means, e.g. a
    library that takes a file name); when the block ends the file is fsynced and renamed to `path`, and the
    folder fsynced: readers see the old or the new content, never a part. An exception leaves `path` as it
    was and removes the temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def _atomic_file(path: Path):
    """An open binary file whose content replaces `path` when the block ends (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part (tmp + fsync + rename)."""
    with _atomic_file(path) as f:
        f.write(data)


def write_aligned(path: Path, arrays) -> tuple[dict[str, int], int, str]:
    """Write the arrays of `arrays` ((key, C-contiguous little-endian array) pairs, consumed one at a time so a
    generator can make each just before it is written) to `path`, each at an ALIGN-aligned offset, atomically
    (tmp + fsync + rename). Returns ({key: offset}, size, sha256)."""
    offsets: dict[str, int] = {}
    offset = 0
    h = hashlib.sha256()
    with _atomic_file(path) as f:
        for key, a in arrays:
            pad = b"\0" * ((-offset) % ALIGN)
            for chunk in (pad, memoryview(a.reshape(-1)).cast("B")):  # no copy of large tensors
                f.write(chunk)
                h.update(chunk)
            offset += len(pad)
            offsets[key] = offset
            offset += a.nbytes
    return offsets, offset, h.hexdigest()


def write_weights(out_dir: str | os.PathLike, cfg: ModelConfig, tensors: dict[str, np.ndarray],
                  dtype: str = "float32") -> dict[str, Any]:
    """Write the stacked tensors to model.onnx.data; return the weights index for config.json.

    `tensors` must hold exactly the names and shapes of `tensor_shapes(cfg)`. They are stored as `dtype`
    (every tensor the same); float16 refuses a tensor with values it cannot hold (|x| > 65504, or not finite).
    """
    if dtype not in DTYPES:
        raise BadArgument(f"unknown weight dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    want = tensor_shapes(cfg)
    if set(tensors) != set(want):
        raise BadArgument(f"weights do not match the config: missing {sorted(set(want) - set(tensors))}, "
                          f"extra {sorted(set(tensors) - set(want))}")
    le = np.dtype(DTYPES[dtype]).newbyteorder("<")

    def stored():
        for name, shape in want.items():
            with np.errstate(over="ignore"):  # float16 overflow is refused just below
                a = np.ascontiguousarray(tensors[name], dtype=le)
            if tuple(a.shape) != shape:
                raise BadArgument(f"tensor {name} has shape {a.shape}, expected {shape}")
            if dtype == "float16" and not np.isfinite(a).all():
                raise BadArgument(f"tensor {name} has values that float16 cannot hold (beyond +-65504, or not "
                                  f"finite); export it as float32")
            yield name, a

    offsets, size, sha = write_aligned(out / DATA_FILE, stored())
    index = {name: {"offset": offsets[name], "shape": list(shape), "dtype": dtype} for name, shape in want.items()}
    return {"file": DATA_FILE, "size": size, "sha256": sha, "tensors": index}


def write_manifest(out_dir: str | os.PathLike, cfg: ModelConfig, weights_index: dict[str, Any],
                   extra: dict[str, Any] | None = None, tokenizer_file: str = TOKENIZER_FILE,
                   tokenizer_meta: dict[str, Any] | None = None) -> str:
    """Write config.json (the commit point of a model directory); return the fingerprint. `tokenizer_meta`
    (special ids, see m3lite.tokenizer.load_tokenizer) goes into the manifest's tokenizer entry."""
    out = Path(out_dir)
    tok = out / tokenizer_file
    if not tok.is_file():
        raise ModelFileError(f"{tok} is missing: write the tokenizer before the manifest")
    tok_sha = sha256_file(tok)
    fp = fingerprint(cfg, weights_index["sha256"], tok_sha)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_dict(),
        "weights": weights_index,
        "onnx": ONNX_FILE,
        "tokenizer": {**(tokenizer_meta or {}), "file": tokenizer_file, "sha256": tok_sha},
        "fingerprint": fp,
    }
    if extra:
        manifest.update(extra)
    atomic_write_bytes(out / CONFIG_FILE, signed_json(manifest))
    return fp


def _inside(folder: Path, name: Any, what: str) -> Path:
    """Resolve a file name read from a model file; refuse anything that would leave the folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or Path(name).name != name:
        raise ModelFileError(f"{folder}: {what} file name {name!r} is not a plain file name in the model folder")
    return folder / name


@dataclass
class ModelFiles:
    """A validated model directory with its weights memory-mapped (zero copy, read-only)."""

    path: Path
    config: ModelConfig
    weights: dict[str, np.ndarray]
    fingerprint: str
    manifest: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return _inside(self.path, self.manifest.get("onnx", ONNX_FILE), "onnx")

    @property
    def tokenizer_path(self) -> Path:
        return _inside(self.path, self.manifest["tokenizer"]["file"], "tokenizer")

    @property
    def data_path(self) -> Path:
        return _inside(self.path, self.manifest["weights"]["file"], "weights")

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "ModelFiles":
        p = Path(path)
        if not p.exists():
            raise ModelFileError(f"model directory {p} does not exist (create one with `python -m converters.init "
                                 f"--out {p}`)")
        if not p.is_dir():
            raise ModelFileError(f"{p} is not a model directory (expected a folder with {CONFIG_FILE})")
        cpath = p / CONFIG_FILE
        if not cpath.is_file():
            raise ModelFileError(f"{p} is not an m3lite model directory: {CONFIG_FILE} is missing")
        try:
            manifest = json.loads(cpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{cpath} is not valid JSON ({e}); the model directory is corrupt") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ModelFileError(f"{cpath} is not an m3lite model manifest")
        if not checksum_ok(manifest):
            raise ModelFileError(f"{cpath} does not match its checksum: it was altered or corrupted; re-export or "
                                 f"re-download the model")
        if manifest.get("version") != VERSION:
            raise ModelFileError(f"{cpath} has format version {manifest.get('version')!r}; this m3lite reads "
                                 f"version {VERSION}: upgrade m3lite or re-export the model")
        try:
            cfg = ModelConfig.from_dict(manifest["config"])
            windex = manifest["weights"]
            tensors = windex["tensors"]
            size = int(windex["size"])
            tok = manifest["tokenizer"]
            fp = manifest["fingerprint"]
        except BadArgument as e:
            raise ModelFileError(f"{cpath}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{cpath} is malformed (missing or bad field {e}); re-export the model") from None
        data = _inside(p, windex.get("file"), "weights")
        tokp = _inside(p, tok.get("file"), "tokenizer")
        for f, what in ((data, "weight"), (tokp, "tokenizer")):
            if not f.is_file():
                raise ModelFileError(f"{what} file {f} is missing; the model directory is incomplete")
        actual = data.stat().st_size
        if actual != size:
            raise ModelFileError(f"weight file {data} has {actual} bytes, expected {size}: it is truncated or "
                                 f"altered; re-export or re-download the model")
        if verify:
            if _verified_sha(data) != windex.get("sha256"):
                raise ModelFileError(f"weight file {data} does not match its checksum: it was altered or "
                                     f"corrupted; re-export or re-download the model")
            if _verified_sha(tokp) != tok.get("sha256"):
                raise ModelFileError(f"tokenizer {tokp} does not match its checksum; re-export the model")
        want = tensor_shapes(cfg)
        if set(tensors) != set(want):
            raise ModelFileError(f"{cpath}: weight tensors do not match the config; re-export the model")
        mm = np.memmap(data, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        weights: dict[str, np.ndarray] = {}
        for name, shape in want.items():
            t = tensors[name]
            if t.get("dtype", "float32") not in DTYPES:
                raise ModelFileError(f"{cpath}: tensor {name} has dtype {t.get('dtype')!r}, which this m3lite "
                                     f"cannot read; upgrade m3lite or re-export the model")
            dt = np.dtype(DTYPES[t.get("dtype", "float32")]).newbyteorder("<")
            off = int(t["offset"])
            n = int(np.prod(shape)) * dt.itemsize
            if list(t["shape"]) != list(shape) or off < 0 or off + n > size or off % dt.itemsize:
                raise ModelFileError(f"{cpath}: tensor {name} lies outside the weight file; re-export the model")
            weights[name] = mm[off:off + n].view(dt).reshape(shape)
        return cls(path=p, config=cfg, weights=weights, fingerprint=fp, manifest=manifest)


def _verified_sha(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime, inode) so large models verify once, not per load."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()[:24]
    cache = cache_dir() / "verified"
    entry = cache / key
    try:
        v = entry.read_text().strip()
        if len(v) == 64:
            return v
    except OSError:
        pass
    v = sha256_file(path)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(entry, v.encode())
    except OSError:
        pass  # a read-only cache only costs time
    return v


def cache_dir() -> Path:
    """The user's m3lite cache (XDG_CACHE_HOME/m3lite, or M3LITE_CACHE)."""
    env = os.environ.get("M3LITE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "m3lite"
