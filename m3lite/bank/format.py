"""The bank's file format: file names, record dtypes, the manifest (read, checked, written), the writer lock and
file helpers. See m3lite.bank for the layout."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import memory_quant as Q
from ..errors import BadArgument, M3Error, another_model
from ..modelfile import atomic_write_bytes as _atomic_write, json_checksum, signed_json


FORMAT = "m3lite-bank"
VERSION = 5  # 5: sentence vectors may be computed lazily; 4: memories may be encoded lazily (m3lite.bank.lazy);
READS = (3, 4, 5)  # 3: word index, per-record checks, sentence embeddings (read as they are); older: "rebuild"
MANIFEST = "manifest.json"
LOCK = "lock"
MEM, CHECKS, REFS, TEXTS, DOCS, VECS, DELETED, TOKENS, TERMS = (
    "memories.bin", "checks.bin", "refs.bin", "texts.bin", "docs.jsonl", "vectors.f32", "deleted.u32", "tokens.u32",
    "terms.u64")
DATA_FILES = (MEM, CHECKS, REFS, TEXTS, DOCS, VECS, DELETED, TOKENS, TERMS)
HASHED = (CHECKS, REFS, DOCS, DELETED)  # sha256, checked on every open; the others record by record (checks.bin)
_INDEX_NAME = re.compile(r"index\.(\d{1,12})\.hnsw")
_LEXICAL_NAME = re.compile(r"lexical\.(\d{1,12})\.bin")
_ARRAY_NAME = re.compile(r"array\.([a-z0-9_]{1,32})\.([0-9a-f]{16})\.npy")
_TMP_NAME = re.compile(r"(manifest\.json|index\.\d{1,12}\.hnsw|lexical\.\d{1,12}\.bin|array\.[a-z0-9_.]+\.npy)"
                       r"\..*\.tmp")

REF_DTYPE = np.dtype([("doc", "<u4"), ("char_start", "<u4"), ("char_end", "<u4"), ("text_offset", "<u8"),
                      ("text_length", "<u4"), ("n_tokens", "<u2"), ("flags", "<u2"), ("terms_offset", "<u8"),
                      ("n_terms", "<u2")])
CHECK_DTYPE = np.dtype([("memory", "<u4"), ("text", "<u4"), ("tokens", "<u4"), ("terms", "<u4"), ("vector", "<u4")])

EXACT_BELOW = 5000  # live references under which search is brute force
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
INDEX_SAVE_MIN_TAIL = 5000  # an unsaved index tail longer than this (or 1/8 of the index) is saved at commit


class BankError(M3Error):
    """A bank is missing, foreign, corrupt, busy, or was built for another model."""


class BankBusyError(BankError):
    """Another process is writing the bank."""


class FingerprintError(BankError):
    """The bank was built with another model."""


def foreign_bank(path, built_for: str, model: str) -> FingerprintError:
    """The one-line refusal of a bank built by another model."""
    return FingerprintError(another_model(f"bank {path}", built_for, model, "rebuild the bank with this model"))


@dataclass(frozen=True)
class MemShape:
    n_memory_layers: int
    n_kv_heads: int
    tokens_per_head: int
    head_dim: int

    @classmethod
    def of(cls, x: Any) -> "MemShape":
        if isinstance(x, MemShape):
            return x
        try:
            s = cls(**x) if isinstance(x, dict) else cls(*x)
        except TypeError:
            raise BadArgument(f"memory shape {x!r}: give (n_memory_layers, n_kv_heads, tokens_per_head, "
                              f"head_dim)") from None
        for name in ("n_memory_layers", "n_kv_heads", "tokens_per_head", "head_dim"):
            v = getattr(s, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise BadArgument(f"memory shape: {name} must be a positive integer, got {v!r}")
        if s.tokens_per_head > 32767:
            raise BadArgument("memory shape: tokens_per_head must be below 32768")
        return cls(*(int(getattr(s, n)) for n in ("n_memory_layers", "n_kv_heads", "tokens_per_head",
                                                    "head_dim")))

    def as_dict(self) -> dict[str, int]:
        return {"n_memory_layers": self.n_memory_layers, "n_kv_heads": self.n_kv_heads,
                "tokens_per_head": self.tokens_per_head, "head_dim": self.head_dim}


def record_dtype(shape: MemShape, quant: str) -> np.dtype:
    """The numpy dtype of one memory record (one reference), padded to a multiple of 8 bytes."""
    Lm, H, T, hd = shape.n_memory_layers, shape.n_kv_heads, shape.tokens_per_head, shape.head_dim
    sd, pd = Q.storage_dtype(quant), Q.packed_dim(hd, quant)
    fields: list[tuple] = [("k", sd, (Lm, H, T, pd)), ("v", sd, (Lm, H, T, pd))]
    if Q.has_scales(quant):
        fields += [("k_scale", "<f2", (Lm, H, T)), ("v_scale", "<f2", (Lm, H, T))]
    fields += [("pos", "<i2", (Lm, H, T)), ("count", "<i2", (Lm, H))]
    dt = np.dtype(fields)
    return np.dtype({"names": list(dt.names), "formats": [dt.fields[n][0] for n in dt.names],
                     "offsets": [dt.fields[n][1] for n in dt.names], "itemsize": -(-dt.itemsize // 8) * 8})


# ---------------------------------------------------------------------------------------------- files


def _hash_prefix(path: Path, length: int, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    left = length
    with open(path, "rb") as f:
        while left > 0:
            b = f.read(min(left, 1 << 22))
            if not b:
                break
            h.update(b)
            left -= len(b)
    if left:
        raise BankError(f"{path} is shorter than its committed length; the bank is damaged: rebuild it")
    return h


def _map(path: Path, dtype: Any, n: int, shape: tuple[int, ...] = ()) -> np.ndarray:
    dtype = np.dtype(dtype)
    if n == 0:
        return np.zeros((0,) + shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,) + shape)


class _Lock:
    """Exclusive flock on the bank's lock file; a second writer fails at once with BankBusyError."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                other = ""
            os.close(self.fd)
            who = f" (process {other})" if other.isdigit() else ""
            raise BankBusyError(f"bank {folder} is being written by another process{who}; wait for it to "
                                f"finish") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = -1


# ---------------------------------------------------------------------------------------------- manifest


def _write_manifest(path: Path, m: dict) -> None:
    _atomic_write(path / MANIFEST, signed_json(m, indent=1))


def _corrupt(path: Path, why: str) -> BankError:
    return BankError(f"{path / MANIFEST} is corrupt ({why}); restore it or rebuild the bank")


def _int(d: dict, key: str, path: Path, lo: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _corrupt(path, f"field {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        raise BankError(f"bank {path} does not exist; build one first")
    if not path.is_dir():
        raise BankError(f"{path} is not an m3lite bank (not a folder)")
    mp = path / MANIFEST
    if not mp.is_file():
        raise BankError(f"{path} is not an m3lite bank ({MANIFEST} is missing)")
    try:
        m = json.loads(mp.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _corrupt(path, f"not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BankError(f"{path} is not an m3lite bank ({MANIFEST} has no format {FORMAT!r})")
    if not isinstance(m.get("version"), int) or m["version"] not in READS:
        raise BankError(f"bank {path} has format version {m.get('version')!r}; this m3lite reads version "
                        f"{VERSION}: {'upgrade m3lite' if isinstance(m.get('version'), int) and m['version'] > VERSION else 'rebuild the bank'}")
    if m.get("checksum") != json_checksum(m):
        raise _corrupt(path, "it does not match its checksum")
    if not isinstance(m.get("fingerprint"), str) or not m["fingerprint"]:
        raise _corrupt(path, "no model fingerprint")
    mem = m.get("memory")
    if not isinstance(mem, dict):
        raise _corrupt(path, "no memory section")
    try:
        shape = MemShape.of({k: mem.get(k) for k in ("n_memory_layers", "n_kv_heads", "tokens_per_head",
                                                      "head_dim")})
        rdt = record_dtype(shape, mem.get("quant"))
    except BadArgument as e:
        raise _corrupt(path, str(e)) from None
    if not isinstance(mem.get("lazy", False), bool) or (mem.get("lazy") and m["version"] < 4):
        raise _corrupt(path, "bad memory.lazy")
    lazy_vectors = m.get("vectors_lazy", False)
    if not isinstance(lazy_vectors, bool) or (lazy_vectors and m["version"] < 5):
        raise _corrupt(path, "bad vectors_lazy")
    if mem.get("record_bytes") != rdt.itemsize:
        raise _corrupt(path, f"record_bytes {mem.get('record_bytes')!r} does not match the memory shape "
                             f"({rdt.itemsize})")
    dim = _int(m, "embed_dim", path, 1)
    count = _int(m, "count", path)
    ndocs = _int(m, "documents", path)
    ndel = _int(m, "deleted_documents", path)
    _int(m, "generation", path)
    files = m.get("files")
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        raise _corrupt(path, "the files section does not list the bank files")
    want = {MEM: 0 if mem.get("lazy") else count * rdt.itemsize, CHECKS: count * CHECK_DTYPE.itemsize, REFS: count * REF_DTYPE.itemsize,
            VECS: 0 if lazy_vectors else 4 * dim * count, DELETED: 4 * ndel}
    for name in DATA_FILES:
        f = files[name]
        if not isinstance(f, dict):
            raise _corrupt(path, f"bad entry for {name}")
        n = _int(f, "length", path)
        if name in want and n != want[name]:
            raise _corrupt(path, f"{name} length {n} does not match {count} references")
        if n % {TOKENS: 4, TERMS: 8}.get(name, 1):
            raise _corrupt(path, f"{name} length {n} is not a whole number of records")
        if name in HASHED and not (isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64):
            raise _corrupt(path, f"no sha256 for {name}")
    if ndel > ndocs:
        raise _corrupt(path, "more deleted documents than documents")
    ix = m.get("index")
    if ix is not None:
        if not isinstance(ix, dict) or not isinstance(ix.get("file"), str) or not _INDEX_NAME.fullmatch(ix["file"]):
            raise _corrupt(path, "bad index entry")
        if _int(ix, "count", path) > count or _int(ix, "deleted", path) > ndel:
            raise _corrupt(path, "index entry beyond the committed references")
        _int(ix, "M", path, 2)
        _int(ix, "ef_construction", path, 1)
        _int(ix, "bytes", path, 1)
        if not (isinstance(ix.get("sha256"), str) and len(ix["sha256"]) == 64):
            raise _corrupt(path, "no sha256 for the index")
    lx = m.get("lexical")
    if lx is not None:
        if not isinstance(lx, dict) or not isinstance(lx.get("file"), str) or not _LEXICAL_NAME.fullmatch(lx["file"]):
            raise _corrupt(path, "bad lexical index entry")
        if _int(lx, "count", path) > count:
            raise _corrupt(path, "lexical index entry beyond the committed references")
        _int(lx, "bytes", path, 1)
        if not (isinstance(lx.get("sha256"), str) and len(lx["sha256"]) == 64):
            raise _corrupt(path, "no sha256 for the lexical index")
        if not isinstance(lx.get("sections"), dict):
            raise _corrupt(path, "no sections for the lexical index")
    arrays = m.get("arrays", {})
    if not isinstance(arrays, dict):
        raise _corrupt(path, "arrays must be an object")
    for name, a in arrays.items():
        if not (isinstance(a, dict) and isinstance(a.get("file"), str) and isinstance(a.get("sha256"), str)):
            raise _corrupt(path, f"bad entry for array {name!r}")
        f = _ARRAY_NAME.fullmatch(a["file"])
        if not f or f.group(1) != name or not a["sha256"].startswith(f.group(2)) or len(a["sha256"]) != 64:
            raise _corrupt(path, f"bad file name for array {name!r}")
        _int(a, "bytes", path, 1)
    if not isinstance(m.get("meta", {}), dict) or not isinstance(m.get("stats", {}), dict):
        raise _corrupt(path, "meta and stats must be objects")
    return m
