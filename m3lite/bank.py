"""The memory bank on disk: explicit memories of references, their texts, and a vector index to find them.

A bank is a folder::

    manifest.json     the commit point, replaced atomically: shapes, fingerprint, committed lengths, checksums;
                      its own sha256 in "checksum"
    memories.bin      fixed-size records, one per reference (numpy structured dtype, read through memmap)
    checks.bin        one CHECK_DTYPE record per reference: crc32 of its memory, text, tokens, terms and vector
    refs.bin          one REF_DTYPE record per reference: document, char offsets, text slice, tokens, terms
    texts.bin         the reference texts, UTF-8, concatenated
    docs.jsonl        one line per document: id, title, source, sha256, first reference, reference count
    vectors.f32       the unit-normalised sentence embedding of each reference, [count, embed_dim] float32
    tokens.u32        each reference's token ids (<ref> first), n_tokens of them, one after the other
    terms.u64         each reference's word term ids (m3lite.lexical: its document's title, then its text)
    deleted.u32       tombstones: indices of removed documents (append-only, never rewritten)
    index.<gen>.hnsw  hnswlib index (cosine) of the first index.count vectors; name from the manifest
    lexical.<gen>.bin the BM25 index over the first lexical.count references' terms (flat arrays, mmap)
    array.<name>.<sha>.npy  named numeric arrays stored with the bank (e.g. the embedder's IDF weights)
    lock              held (flock) by the one writer

Every file but the manifest and the indexes is append-only. What a reader serves is checked as it is read:
checks.bin, refs.bin, docs.jsonl and deleted.u32 against their sha256 when the bank is opened; each memory,
text, token list, term list and vector against its crc32 in checks.bin when it is read; the index files against
their sha256 when they are loaded. Damage is a BankError naming the bank and the record, never used. A writer appends, fsyncs, then replaces the
manifest; readers map only the lengths their manifest committed, so a writer killed at any moment leaves
the previous commit intact and the next writer truncates the uncommitted tails. Removal appends tombstones
instead of rewriting records, so readers of an older manifest keep a consistent view and checksums of the
committed parts never change. The index is derived data: it may lag the vectors (search covers the tail
exactly), and tombstones newer than the index file are applied with mark_deleted when it is loaded.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import quant as Q
from .errors import BadArgument, M3Error
from .modelfile import json_checksum, signed_json
from .lexical import TermIndex, array_file_bytes, read_array_file, term_ids, top
from .sources import Document, chunk_document

FORMAT = "m3lite-bank"
VERSION = 3  # 3: word index, per-record checks, sentence embeddings; older banks are refused with "rebuild"
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
FLAG_HARD_SPLIT = 1  # reserved: deletion is recorded in deleted.u32, not here

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


def _fsync_dir(path: Path) -> None:
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


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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
    if not isinstance(m.get("version"), int) or m["version"] != VERSION:
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
    want = {MEM: count * rdt.itemsize, CHECKS: count * CHECK_DTYPE.itemsize, REFS: count * REF_DTYPE.itemsize,
            VECS: 4 * dim * count, DELETED: 4 * ndel}
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


# ---------------------------------------------------------------------------------------------- index


class HnswIndex:
    """A cosine hnswlib index over unit vectors labelled by reference number."""

    def __init__(self, dim: int, index: Any, M: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION):
        self.dim, self.index, self.M, self.ef_construction = dim, index, M, ef_construction

    @classmethod
    def create(cls, dim: int, capacity: int, M: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
               seed: int = 100) -> "HnswIndex":
        import hnswlib

        ix = hnswlib.Index(space="cosine", dim=dim)
        ix.init_index(max_elements=max(int(capacity), 16), M=M, ef_construction=ef_construction, random_seed=seed)
        return cls(dim, ix, M, ef_construction)

    @classmethod
    def load(cls, path: Path, dim: int, capacity: int = 0, M: int = HNSW_M,
             ef_construction: int = HNSW_EF_CONSTRUCTION) -> "HnswIndex":
        import hnswlib

        ix = hnswlib.Index(space="cosine", dim=dim)
        ix.load_index(str(path), max_elements=int(capacity))
        return cls(dim, ix, M, ef_construction)

    @property
    def count(self) -> int:
        return self.index.get_current_count()

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        if len(labels) == 0:
            return
        need = self.count + len(labels)
        if need > self.index.get_max_elements():
            self.index.resize_index(max(need, 2 * self.index.get_max_elements()))
        self.index.add_items(np.ascontiguousarray(vectors, np.float32), np.asarray(labels, np.int64))

    def mark_deleted(self, labels: Iterable[int]) -> None:
        for lab in labels:
            try:
                self.index.mark_deleted(int(lab))
            except RuntimeError:
                pass  # already deleted

    def search(self, v: np.ndarray, k: int, ef: int = HNSW_EF_SEARCH) -> tuple[np.ndarray, np.ndarray]:
        """Labels and cosine similarities of the k nearest live vectors (fewer if hnswlib finds fewer)."""
        self.index.set_ef(max(ef, k))
        try:
            labels, dist = self.index.knn_query(np.asarray(v, np.float32).reshape(1, -1), k=k, num_threads=1)
        except RuntimeError:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return labels[0].astype(np.int64), (1.0 - dist[0]).astype(np.float32)

    def save(self, path: Path) -> dict[str, Any]:
        """Write the index atomically; returns its size and sha256 for the manifest."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            self.index.save_index(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            size = os.path.getsize(tmp)
            sha = _hash_prefix(Path(tmp), size).hexdigest()
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return {"bytes": size, "sha256": sha}


def _file_ok(path: Path, info: dict) -> bool:
    """Size and sha256 of a whole file against its manifest entry. hnswlib trusts its file header (a damaged one
    can crash the process), so index files are checked before loading too."""
    try:
        if path.stat().st_size != info["bytes"]:
            return False
        return _hash_prefix(path, info["bytes"]).hexdigest() == info["sha256"]
    except (OSError, BankError):
        return False


def _build_lexical(path: Path, n: int, dead: np.ndarray, docs: list[dict]) -> TermIndex:
    """The BM25 index of the first `n` references from their stored terms, each live reference's checked against
    its crc32 (removed references, `dead`, count as empty: damage there does not matter)."""
    refs = _map(path / REFS, REF_DTYPE, n)
    checks = _map(path / CHECKS, CHECK_DTYPE, n)
    nt = refs["n_terms"].astype(np.int64) if n else np.zeros(0, np.int64)
    off = refs["terms_offset"].astype(np.int64) if n else np.zeros(0, np.int64)
    total = int(off[-1] + nt[-1]) if n else 0
    if n and (off[0] != 0 or np.any(off[1:] != off[:-1] + nt[:-1])
              or 8 * total > (path / TERMS).stat().st_size):
        raise BankError(f"bank {path}: the references' terms do not tile {TERMS}; rebuild the bank")
    terms = np.asarray(_map(path / TERMS, "<u8", total))
    live = ~np.asarray(dead[:n], bool)
    for i in np.flatnonzero(live).tolist():
        if zlib.crc32(terms[off[i]:off[i] + nt[i]].tobytes()) != int(checks["terms"][i]):
            d = int(refs["doc"][i])
            doc = f" (document {docs[d]['id']!r})" if d < len(docs) else ""
            raise BankError(f"bank {path}: the terms of reference {i}{doc} do not match their checksum; run "
                            f"`m3lite bank verify {path}`")
    return TermIndex.build(terms[np.repeat(live, nt)], np.where(live, nt, 0))


def index_text(ref: Any) -> str:
    """What a reference is found by, in both searches: its document's title, then its text (a later chunk of an
    article rarely names its subject)."""
    title = " ".join(str(ref.title).split())
    return ref.text if not title or ref.text.lstrip().startswith(title) else f"{title}\n{ref.text}"


def _normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(n, 1e-30)).astype(np.float32)


def _top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        ids, scores = ids[part], scores[part]
    order = np.lexsort((ids, -scores))
    return ids[order].astype(np.int64), scores[order].astype(np.float32)


# ---------------------------------------------------------------------------------------------- the bank


class Bank:
    """A bank opened for reading at one committed state (`refresh()` moves to the newest); `add` and `remove`
    take the writer lock, start from the newest state and leave the object at the state they committed."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self._index: HnswIndex | None = None
        self._load(manifest)

    # -------------------------------------------------------------------------------------- opening

    @classmethod
    def create(cls, path: str | os.PathLike, fingerprint: str, mem_shape: Any, quant: str = "int8",
               embed_dim: int = 0, meta: dict | None = None, exist_ok: bool = False) -> "Bank":
        """Create an empty bank folder for a model (`fingerprint`) and memory shape
        (n_memory_layers, n_kv_heads, tokens_per_head, head_dim). With `exist_ok`, an existing bank of the
        same model, shape, quantization and embedding size is opened instead."""
        p = Path(path)
        shape = MemShape.of(mem_shape)
        rdt = record_dtype(shape, quant)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise BadArgument("a bank needs the model fingerprint")
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise BadArgument(f"embed_dim must be a positive integer, got {embed_dim!r}")
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise BadArgument(f"bank meta must be JSON-serializable: {e}") from None
        if (p / MANIFEST).exists():
            if not exist_ok:
                raise BankError(f"a bank already exists at {p}; open it or choose another folder")
            b = cls.open(p, fingerprint=fingerprint)
            if b.shape != shape or b.quant != quant or b.embed_dim != embed_dim:
                raise BankError(f"the bank at {p} has memory shape {tuple(b.shape.as_dict().values())}, "
                                f"{b.quant}, embedding size {b.embed_dim}; not the requested ones: use another "
                                f"folder")
            return b
        if p.exists() and not p.is_dir():
            raise BankError(f"{p} exists and is not a folder; choose another path for the bank")
        if p.is_dir():
            ours = set(DATA_FILES) | {LOCK}
            foreign = [x.name for x in p.iterdir() if x.name not in ours and not _TMP_NAME.fullmatch(x.name)
                       and not _INDEX_NAME.fullmatch(x.name) and not _ARRAY_NAME.fullmatch(x.name)]
            if foreign:
                raise BankError(f"{p} is not empty and not a bank (it holds {foreign[0]}); choose an empty folder")
        p.mkdir(parents=True, exist_ok=True)
        lock = _Lock(p)
        try:
            if (p / MANIFEST).exists():  # another process created it while we were checking
                lock.release()
                return cls.create(p, fingerprint, shape, quant, embed_dim, meta, exist_ok)
            empty = hashlib.sha256(b"").hexdigest()
            for name in DATA_FILES:
                with open(p / name, "wb") as f:
                    os.fsync(f.fileno())
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            m = {
                "format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                "memory": dict(shape.as_dict(), quant=quant, record_bytes=rdt.itemsize, position_dtype="int16"),
                "embed_dim": embed_dim, "count": 0, "documents": 0, "deleted_documents": 0, "generation": 0,
                "files": {n: ({"length": 0, "sha256": empty} if n in HASHED else {"length": 0}) for n in DATA_FILES},
                "index": None, "lexical": None, "arrays": {}, "meta": meta, "stats": {}, "created": now, "updated": now,
            }
            _write_manifest(p, m)
        finally:
            lock.release()
        return cls(p, _read_manifest(p))

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: str | None = None) -> "Bank":
        """Open a bank at its last commit. Checks the manifest, file sizes and the cheap checksums; with a
        `fingerprint`, refuses a bank built by another model."""
        p = Path(path)
        m = _read_manifest(p)
        if fingerprint is not None and m["fingerprint"] != fingerprint:
            raise FingerprintError(f"bank {p} was built for another model (fingerprint {m['fingerprint']}, this "
                                   f"model is {fingerprint}): rebuild the bank with this model")
        return cls(p, m)

    def refresh(self) -> bool:
        """Move to the newest committed state; True if it changed."""
        m = _read_manifest(self.path)
        if m == self.manifest:
            return False
        self._load(m)
        return True

    def _load(self, m: dict, state: tuple[list[dict], list[int]] | None = None) -> None:
        """Map the committed state of manifest `m`. `state` (documents, deleted document indices) comes from
        the writer that just committed `m`: then docs.jsonl is not parsed again nor the cheap checksums redone."""
        p = self.path
        self.manifest = m
        self.fingerprint: str = m["fingerprint"]
        mem = m["memory"]
        self.shape = MemShape.of({k: mem[k] for k in ("n_memory_layers", "n_kv_heads", "tokens_per_head",
                                                       "head_dim")})
        self.quant: str = mem["quant"]
        self.rec_dtype = record_dtype(self.shape, self.quant)
        self.embed_dim: int = m["embed_dim"]
        self.count: int = m["count"]
        self.generation: int = m["generation"]
        files = m["files"]
        for name in DATA_FILES:
            fp = p / name
            if not fp.is_file():
                raise BankError(f"bank file {fp} is missing; the bank is damaged: rebuild it")
            size = fp.stat().st_size
            if size < files[name]["length"]:
                raise BankError(f"bank file {fp} is truncated ({size} bytes, {files[name]['length']} committed); "
                                f"the bank is damaged: rebuild it")
        if state is None:
            for name in HASHED:
                if _hash_prefix(p / name, files[name]["length"]).hexdigest() != files[name]["sha256"]:
                    raise BankError(f"bank file {p / name} does not match the checksum in {MANIFEST}; the bank is "
                                    f"damaged: rebuild it")
            self.docs = self._read_docs(files[DOCS]["length"], m["documents"])
            deleted = np.fromfile(p / DELETED, dtype="<u4", count=m["deleted_documents"]) \
                if m["deleted_documents"] else np.zeros(0, "<u4")
        else:
            self.docs = list(state[0])
            deleted = np.array(state[1], "<u4")
        n = self.count
        self._mem = _map(p / MEM, self.rec_dtype, n)
        self._refs = _map(p / REFS, REF_DTYPE, n)
        self._vecs = _map(p / VECS, "<f4", n, (self.embed_dim,))
        self._texts = _map(p / TEXTS, np.uint8, files[TEXTS]["length"])
        self._tokens = _map(p / TOKENS, "<u4", files[TOKENS]["length"] // 4)
        self._terms = _map(p / TERMS, "<u8", files[TERMS]["length"] // 8)
        self._checks = _map(p / CHECKS, CHECK_DTYPE, n)
        self._lexical: TermIndex | None = None  # BM25 over the references' words, loaded on the first text search
        self._vectors_checked = 0  # vectors [0, this) passed their crc32 (brute-force search reads them all)
        if len(deleted) and (int(deleted.max()) >= len(self.docs) or len(np.unique(deleted)) != len(deleted)):
            raise BankError(f"bank file {p / DELETED} names unknown documents; the bank is damaged: rebuild it")
        self._deleted_docs = deleted.astype(np.int64)
        self._dead = np.zeros(n, bool)
        for d in self._deleted_docs:
            doc = self.docs[int(d)]
            self._dead[doc["first"]:doc["first"] + doc["count"]] = True
        self._index = None
        self._index_info = m.get("index")

    def _read_docs(self, length: int, n_docs: int) -> list[dict]:
        fp = self.path / DOCS
        docs: list[dict] = []
        with open(fp, "rb") as f:
            data = f.read(length)
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        bad = BankError(f"bank file {fp} is malformed; the bank is damaged: rebuild it")
        expect = 0
        for line in lines:
            try:
                d = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise bad from None
            if not (isinstance(d, dict) and all(isinstance(d.get(k), str) for k in ("id", "title", "source", "sha256"))
                    and isinstance(d.get("first"), int) and isinstance(d.get("count"), int)
                    and d["first"] == expect and d["count"] >= 0):
                raise bad
            expect += d["count"]
            docs.append(d)
        if len(docs) != n_docs or expect != self.manifest["count"]:
            raise bad
        return docs

    def close(self) -> None:
        """Drop the maps and the index (the object is unusable afterwards)."""
        self._mem = self._refs = self._vecs = self._texts = None  # type: ignore[assignment]
        self._index = None

    def __enter__(self) -> "Bank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------- reading

    @property
    def live_count(self) -> int:
        return int(self.count - self._dead.sum())

    def live_hashes(self) -> set[str]:
        """Content hashes of the documents in the bank (removed ones excluded)."""
        dead = set(self._deleted_docs.tolist())
        return {d["sha256"] for i, d in enumerate(self.docs) if i not in dead}

    def is_deleted(self, i: int) -> bool:
        return bool(self._dead[i])

    def _check_ids(self, ids: Any) -> np.ndarray:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        if a.size and (a.min() < 0 or a.max() >= self.count):
            raise BadArgument(f"reference ids must be in [0, {self.count}), got {a.min()}..{a.max()}")
        return a

    def _damaged(self, i: int, what: str) -> BankError:
        d = int(self._refs[i]["doc"])
        doc = f" (document {self.docs[d]['id']!r})" if d < len(self.docs) else ""
        return BankError(f"bank {self.path}: the {what} of reference {i}{doc} does not match its checksum; run "
                         f"`m3lite bank verify {self.path}`")

    def _check(self, i: int, what: str, data: Any) -> None:
        """Raise BankError unless `data` (the bytes of reference i's `what`) matches its crc32 in checks.bin."""
        if zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B")) != int(self._checks[what][i]):
            raise self._damaged(i, what)

    def memories(self, ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dequantized memories of references: keys and values [k, Lm, n_kv, T, hd] float32, positions
        [k, Lm, n_kv, T] int32 and valid-token counts [k, Lm, n_kv] int32 (slots past the count are zero).
        Each record is checked against its crc32 (BankError naming it if damaged)."""
        a = self._check_ids(ids)
        rec = self._mem[a] if a.size else np.zeros(0, self.rec_dtype)
        for i in a.tolist():  # on the mapped bytes: a copy of a padded record need not copy its padding
            self._check(i, "memory", self._mem[i:i + 1])
        if Q.has_scales(self.quant):
            k = Q.dequantize((rec["k"], rec["k_scale"]), self.quant)
            v = Q.dequantize((rec["v"], rec["v_scale"]), self.quant)
        else:
            k = Q.dequantize((rec["k"], None), self.quant)
            v = Q.dequantize((rec["v"], None), self.quant)
        return (np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32),
                rec["pos"].astype(np.int32), rec["count"].astype(np.int32))

    def reference(self, i: int) -> dict[str, Any]:
        """A reference's text and provenance."""
        i = int(self._check_ids([i])[0])
        r = self._refs[i]
        off, n = int(r["text_offset"]), int(r["text_length"])
        doc = self.docs[int(r["doc"])]
        text = bytes(self._texts[off:off + n])
        self._check(i, "text", text)
        return {"id": i, "doc_id": doc["id"], "title": doc["title"], "source": doc["source"],
                "text": text.decode("utf-8", "replace"),
                "char_start": int(r["char_start"]), "char_end": int(r["char_end"]),
                "n_tokens": int(r["n_tokens"]), "deleted": bool(self._dead[i])}

    def vectors(self, ids: Any) -> np.ndarray:
        """Stored unit embedding vectors of references (each checked against its crc32)."""
        a = self._check_ids(ids)
        v = np.asarray(self._vecs[a], np.float32)
        for j, i in enumerate(a.tolist()):
            self._check(i, "vector", v[j])
        return v

    def tokens(self, i: int) -> np.ndarray:
        """A reference's token ids (<ref> first), checked against its crc32."""
        i = int(self._check_ids([i])[0])
        n = self._refs["n_tokens"].astype(np.int64)
        start = int(n[:i].sum())
        t = np.array(self._tokens[start:start + int(n[i])], np.uint32)
        self._check(i, "tokens", t)
        return t

    def _checked_vectors(self, hi: int) -> None:
        """Check the crc32 of the live vectors below `hi` not checked yet (brute-force search reads them)."""
        for s in range(self._vectors_checked, hi, 1 << 14):
            e = min(hi, s + (1 << 14))
            rows = np.asarray(self._vecs[s:e])
            for i in np.flatnonzero(~self._dead[s:e]).tolist():
                self._check(s + i, "vector", rows[i])
        self._vectors_checked = max(self._vectors_checked, hi)

    def array_names(self) -> list[str]:
        return sorted(self.manifest.get("arrays", {}))

    def get_array(self, name: str) -> np.ndarray | None:
        """A named array stored with `put_array` (e.g. the embedder's IDF weights), or None."""
        info = self.manifest.get("arrays", {}).get(name)
        if info is None:
            return None
        fp = self.path / info["file"]
        if not fp.is_file() and self.refresh():  # replaced by a writer after we read our manifest
            return self.get_array(name)
        if not _file_ok(fp, info):
            raise BankError(f"bank file {fp} is missing or does not match its checksum; the bank is damaged: "
                            f"store the array {name!r} again or rebuild the bank")
        try:
            return np.load(fp, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BankError(f"bank file {fp} is unreadable ({e}); store the array {name!r} again") from None

    def put_array(self, name: str, array: Any) -> None:
        """Store a numeric array under `name` (lowercase letters, digits, _) in one atomic commit."""
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]{1,32}", name):
            raise BadArgument(f"array name {name!r}: use 1-32 lowercase letters, digits or _")
        a = np.asarray(array)
        if a.dtype.kind not in "biuf":
            raise BadArgument(f"array {name!r} must be numeric (bool, integer or float), got {a.dtype}")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        with self._writer() as w:
            fname = f"array.{name}.{sha[:16]}.npy"
            _atomic_write(self.path / fname, data)
            w.arrays[name] = {"file": fname, "bytes": len(data), "sha256": sha}
            w.dirty = True
            w.commit(final=True, stats={}, save_index=False)

    def _exact(self, v: np.ndarray, k: int, lo: int = 0) -> tuple[np.ndarray, np.ndarray]:
        self._checked_vectors(self.count)
        ids_all: list[np.ndarray] = []
        sc_all: list[np.ndarray] = []
        step = 1 << 16
        for s in range(lo, self.count, step):
            e = min(self.count, s + step)
            sc = np.asarray(self._vecs[s:e]) @ v
            live = ~self._dead[s:e]
            ids = np.arange(s, e)[live]
            ids, sc = _top_k(ids, sc[live], k)
            ids_all.append(ids)
            sc_all.append(sc)
        if not ids_all:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return _top_k(np.concatenate(ids_all), np.concatenate(sc_all), k)

    def _reader_index(self) -> HnswIndex | None:
        if self._index is not None:
            return self._index
        info = self._index_info
        if not info:
            return None
        fp = self.path / info["file"]
        if not fp.is_file():
            # a writer replaced it after we read our manifest: move to the newest state
            if self.refresh():
                return self._reader_index()
            raise BankError(f"index file {fp} is missing; repair it with `m3lite bank verify BANK --repair`")
        if not _file_ok(fp, info):
            raise BankError(f"index file {fp} does not match its checksum; repair it with "
                            f"`m3lite bank verify BANK --repair`")
        try:
            ix = HnswIndex.load(fp, self.embed_dim, 0, info["M"], info["ef_construction"])
        except (RuntimeError, MemoryError, ValueError) as e:
            raise BankError(f"index file {fp} is unreadable ({str(e).splitlines()[0] if str(e) else e!r}); "
                            f"repair it with `m3lite bank verify BANK --repair`") from None
        if ix.count != info["count"]:
            raise BankError(f"index file {fp} holds {ix.count} vectors, the manifest says {info['count']}; "
                            f"repair it with `m3lite bank verify BANK --repair`")
        ix.mark_deleted(self._labels_of_docs(self._deleted_docs[info["deleted"]:], below=info["count"]))
        self._index = ix
        return ix

    def _labels_of_docs(self, doc_ids: Iterable[int], below: int) -> list[int]:
        out: list[int] = []
        for d in doc_ids:
            doc = self.docs[int(d)]
            out.extend(range(doc["first"], min(doc["first"] + doc["count"], below)))
        return out

    def search(self, vector: Any, k: int = 5, exact: bool | None = None,
               ef: int = HNSW_EF_SEARCH) -> tuple[np.ndarray, np.ndarray]:
        """The k live references most similar (cosine) to `vector`: ids int64 and scores float32, best first.

        Brute force when `exact` or when the bank has fewer than EXACT_BELOW live references (or no index);
        otherwise HNSW over the indexed references plus brute force over the references added since."""
        v = np.asarray(vector, np.float32).reshape(-1)
        if v.shape[0] != self.embed_dim:
            raise BadArgument(f"query vector has {v.shape[0]} values; this bank's embeddings have {self.embed_dim}")
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise BadArgument(f"k must be a positive integer, got {k!r}")
        v = _normalize(v)
        if exact is None:
            exact = self.live_count < EXACT_BELOW
        ix = None if exact else self._reader_index()
        if ix is None:
            return self._exact(v, int(k))
        n_ix = self._index_info["count"]
        live_ix = n_ix - int(self._dead[:n_ix].sum())
        kk = min(int(k), live_ix)
        ids, sc = ix.search(v, kk, ef) if kk else (np.zeros(0, np.int64), np.zeros(0, np.float32))
        if len(ids) < kk:  # hnswlib gave up (too many deletions for this ef): brute force is always right
            return self._exact(v, int(k))
        tid, tsc = self._exact(v, int(k), lo=n_ix)
        return _top_k(np.concatenate([ids, tid]), np.concatenate([sc, tsc]), int(k))

    def lexical_search(self, text: str, k: int = 5, skip: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The k live references with the best BM25 score for the words of `text` (exact, over every committed
        reference; see m3lite.lexical), leaving out the reference ids in `skip`: ids int64 and scores float32,
        best first; references scoring 0 are not returned."""
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise BadArgument(f"k must be a positive integer, got {k!r}")
        ix = self._lexical_index()
        sc = ix.scores(term_ids(text)) if self.count else np.zeros(0)
        out = self._dead.copy()
        out[[int(i) for i in skip if 0 <= int(i) < self.count]] = True
        return top(sc, int(k), out)

    def _lexical_index(self) -> TermIndex:
        """The stored BM25 index (checked against its sha256), or, when the bank has references it does not
        cover (an add was interrupted), one built now from the references' terms."""
        if self._lexical is not None:
            return self._lexical
        info = self.manifest.get("lexical")
        if info and info["count"] == self.count:
            fp = self.path / info["file"]
            if not fp.is_file() and self.refresh():
                return self._lexical_index()
            if not _file_ok(fp, info):
                raise BankError(f"lexical index {fp} is missing or does not match its checksum; repair it with "
                                f"`m3lite bank verify {self.path} --repair`")
            try:
                ix = TermIndex(**read_array_file(fp, info["sections"], info["bytes"]))
                ix.check()
                if ix.n != self.count:
                    raise ValueError(f"it covers {ix.n} references, the manifest says {self.count}")
            except ValueError as e:
                raise BankError(f"lexical index {fp} is unusable ({e}); repair it with "
                                f"`m3lite bank verify {self.path} --repair`") from None
        else:
            ix = _build_lexical(self.path, self.count, self._dead, self.docs)
        self._lexical = ix
        return ix

    # -------------------------------------------------------------------------------------- reporting

    def disk_bytes(self) -> int:
        return sum(x.stat().st_size for x in self.path.iterdir() if x.is_file())

    def info(self) -> dict[str, Any]:
        """Counts, sizes, compression and identity of the bank (its committed state)."""
        n = self.count
        tokens = int(self._refs["n_tokens"].astype(np.int64).sum()) if n else 0
        s = self.shape
        rec = self.rec_dtype.itemsize
        kv_tok = 2 * s.n_kv_heads * s.head_dim * 4  # fp32 K and V bytes of one token at one layer
        n_layers = self.manifest.get("meta", {}).get("n_layers")
        disk = self.disk_bytes()
        out: dict[str, Any] = {
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "references": n,
            "live_references": self.live_count,
            "documents": len(self.docs),
            "deleted_documents": len(self._deleted_docs),
            "generation": self.generation,
            "quantization": self.quant,
            "memory_shape": s.as_dict(),
            "embed_dim": self.embed_dim,
            "tokens": tokens,  # <ref> included
            "memory_record_bytes": rec,
            "memory_bytes": n * rec,
            "disk_bytes": disk,
            "bytes_per_reference": disk / n if n else 0.0,
            "fp32_kv_bytes_memory_layers": tokens * s.n_memory_layers * kv_tok,
            "compression_vs_fp32_kv_memory_layers": (tokens * s.n_memory_layers * kv_tok) / (n * rec) if n else 0.0,
            "indexed_references": (self._index_info or {}).get("count", 0),
            "stats": self.manifest.get("stats", {}),
        }
        if isinstance(n_layers, int) and n_layers > 0:
            out["fp32_kv_bytes_all_layers"] = tokens * n_layers * kv_tok
            out["compression_vs_fp32_kv_all_layers"] = (tokens * n_layers * kv_tok) / (n * rec) if n else 0.0
        return out

    def verify(self, strict: bool = True) -> dict[str, Any]:
        """Check every committed byte: the manifest and file checksums, each live reference's memory, text,
        tokens, terms and vector against its crc32, the reference and document tables, and both indexes.

        Returns a report {"ok", "references", "documents", "damaged": [{"reference", "document", "what"}],
        "damaged_documents": [ids to remove and add again], "problems": [lines]}; with `strict`, raises a
        one-line BankError naming the first problem (and the documents to re-add) instead of returning a
        failed report."""
        p, files = self.path, self.manifest["files"]
        problems: list[str] = []
        damaged: list[dict] = []
        n = self.count
        refs = np.asarray(self._refs)
        docs_of = refs["doc"].astype(np.int64) if n else np.zeros(0, np.int64)
        if n and docs_of.max() >= len(self.docs):
            problems.append("a reference names an unknown document")
        else:
            live = np.flatnonzero(~self._dead).tolist()
            ntok = refs["n_tokens"].astype(np.int64)
            tok_off = np.concatenate([[0], np.cumsum(ntok)[:-1]]) if n else ntok
            off, ln = refs["text_offset"].astype(np.int64), refs["text_length"].astype(np.int64)
            toff, tn = refs["terms_offset"].astype(np.int64), refs["n_terms"].astype(np.int64)
            if n and (off[0] != 0 or np.any(off[1:] != off[:-1] + ln[:-1]) or off[-1] + ln[-1] != files[TEXTS]["length"]):
                problems.append("reference texts do not tile texts.bin")
            elif n and (toff[0] != 0 or np.any(toff[1:] != toff[:-1] + tn[:-1]) or 8 * (toff[-1] + tn[-1]) != files[TERMS]["length"]):
                problems.append("reference terms do not tile terms.u64")
            elif 4 * int(ntok.sum()) != files[TOKENS]["length"]:
                problems.append("tokens.u32 does not hold the references' tokens")
            else:
                T = self.shape.tokens_per_head
                for i in live:
                    parts = (("memory", self._mem[i:i + 1]), ("text", self._texts[off[i]:off[i] + ln[i]]),
                             ("tokens", self._tokens[tok_off[i]:tok_off[i] + ntok[i]]),
                             ("terms", self._terms[toff[i]:toff[i] + tn[i]]), ("vector", self._vecs[i]))
                    for what, data in parts:
                        if zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B")) != int(self._checks[what][i]):
                            damaged.append({"reference": i, "document": self.docs[int(docs_of[i])]["id"],
                                            "what": what})
                            break
                    else:
                        c = self._mem[i]["count"]
                        if c.size and (c.min() < 0 or c.max() > T):
                            damaged.append({"reference": i, "document": self.docs[int(docs_of[i])]["id"],
                                            "what": "memory token count"})
                first = np.array([d["first"] for d in self.docs], np.int64)
                end = first + np.array([d["count"] for d in self.docs], np.int64)
                at = np.arange(n)
                if n and (np.any(first[docs_of] > at) or np.any(end[docs_of] <= at)):
                    problems.append("references are not grouped by document")
        for name in self.array_names():
            try:
                self.get_array(name)
            except BankError as e:
                problems.append(str(e))
        for what, load in (("index", self._reader_index), ("lexical index", self._lexical_index)):
            try:
                if what == "index":
                    self._index = None
                else:
                    self._lexical = None
                load()
            except BankError as e:
                problems.append(str(e))
        bad_docs = sorted({d["document"] for d in damaged})
        if damaged:
            problems.insert(0, f"{len(damaged)} damaged reference(s) in {len(bad_docs)} document(s) "
                               f"({', '.join(repr(d) for d in bad_docs[:5])}{', ...' if len(bad_docs) > 5 else ''}): "
                               f"remove them with `m3lite bank remove {p} --source ID` and add them again")
        report = {"ok": not problems, "references": n, "documents": len(self.docs), "damaged": damaged,
                  "damaged_documents": bad_docs, "problems": problems,
                  "indexed": (self._index_info or {}).get("count", 0),
                  "bytes_checked": sum(files[x]["length"] for x in DATA_FILES)}
        if strict and problems:
            raise BankError(f"bank {p} failed verification: {problems[0]}")
        return report

    # -------------------------------------------------------------------------------------- writing

    @contextmanager
    def _writer(self):
        lock = _Lock(self.path)
        try:
            m = _read_manifest(self.path)
            if m["fingerprint"] != self.fingerprint:
                raise FingerprintError(f"bank {self.path} was rebuilt for another model (fingerprint "
                                       f"{m['fingerprint']}, expected {self.fingerprint}); reopen it")
            self._load(m)
            w = _Writer(self)
            try:
                yield w
            finally:
                w.close()
        finally:
            lock.release()

    def add(self, documents: Iterable[Document], encode_fn: Callable, embed_fn: Callable, tokenizer: Any,
            max_tokens: int = 128, batch: int = 64, commit_every: int = 256, commit_seconds: float = 5.0,
            progress: Callable[[dict], None] | None = None,
            chunker: Callable[[Document], list] | None = None) -> dict[str, Any]:
        """Chunk documents into references, encode and embed them, and append them to the bank.

        `encode_fn(list of token-id lists, <ref> first)` returns keys and values [B, Lm, n_kv, T, hd] float32,
        positions [B, Lm, n_kv, T] and valid counts [B, Lm, n_kv]; `embed_fn(list of token-id lists without
        <ref>)` returns [B, embed_dim]. Documents whose content hash is already in the bank are skipped; a
        document whose id is present with other content replaces it. Commits at document boundaries every
        `commit_every` references or `commit_seconds`, and at the end; rerunning an interrupted add resumes.
        `progress(stats)` is called after each group of documents; `chunker(doc)` replaces chunk_document (for
        a caller that already cut the documents). Returns the stats."""
        if not isinstance(batch, int) or batch <= 0:
            raise BadArgument(f"batch must be a positive integer, got {batch!r}")
        t0 = time.monotonic()
        st = {"documents": 0, "documents_added": 0, "skipped": 0, "replaced": 0, "added": 0, "tokens": 0}
        with self._writer() as w:
            group: list[tuple[Document, list]] = []
            n_group = 0
            since = 0
            last = time.monotonic()

            def flush(final: bool) -> None:
                nonlocal group, n_group, since, last
                if group:
                    w.append(group, encode_fn, embed_fn, batch)
                    since += n_group
                    group, n_group = [], 0
                if final or since >= commit_every or time.monotonic() - last >= commit_seconds:
                    if w.dirty:
                        w.commit(final=final, stats=st)
                    since, last = 0, time.monotonic()
                if progress is not None:
                    # count: references appended so far; committed: those a crash now would keep
                    progress(dict(st, count=w.count, committed=self.count, seconds=time.monotonic() - t0))

            for doc in documents:
                st["documents"] += 1
                if doc.sha256 in w.live_hashes:
                    st["skipped"] += 1
                    continue
                refs = chunker(doc) if chunker is not None else chunk_document(doc, tokenizer, max_tokens)
                if doc.id in w.live_ids:
                    st["replaced"] += 1
                w.live_hashes.add(doc.sha256)
                group.append((doc, refs))
                n_group += len(refs)
                st["documents_added"] += 1
                st["added"] += len(refs)
                st["tokens"] += sum(len(r.ids) for r in refs)
                if n_group >= batch:
                    flush(False)
            flush(True)
        dt = time.monotonic() - t0
        st["seconds"] = round(dt, 3)
        st["references_per_s"] = round(st["added"] / dt, 1) if dt > 0 else 0.0
        st["count"] = self.count
        return st

    def remove(self, source_id: str) -> dict[str, int]:
        """Tombstone the live documents whose id is `source_id` (or, if none, whose source is `source_id`);
        their references leave search at once, in one atomic commit. Returns the counts removed."""
        with self._writer() as w:
            hits = [i for i, d in enumerate(self.docs) if d["id"] == source_id and i in w.live_docs]
            if not hits:
                hits = [i for i, d in enumerate(self.docs) if d["source"] == source_id and i in w.live_docs]
            n_refs = sum(self.docs[i]["count"] for i in hits)
            if hits:
                w.tombstone(hits)
                st = {"documents_removed": len(hits), "references_removed": n_refs}
                w.commit(final=True, stats=st, save_index=False)
        return {"documents": len(hits), "references": n_refs}

    def rebuild_index(self) -> int:
        """Build both indexes again, HNSW from the stored vectors and BM25 from the stored terms (after damage
        to or loss of an index file); returns the references indexed."""
        with self._writer() as w:
            w.build_index(fresh=True)  # from the vectors alone: the old file may be what is damaged
            w.commit(final=True, stats={}, save_index=True, force_lexical=True)
        return self.count


class _Writer:
    """Append state of one writing session; owns the open files, the running checksums and the index."""

    def __init__(self, bank: Bank):
        self.b = bank
        p, m = bank.path, bank.manifest
        files = m["files"]
        current = ({(m.get("index") or {}).get("file"), (m.get("lexical") or {}).get("file")}
                   | {a["file"] for a in m.get("arrays", {}).values()})
        for x in p.iterdir():  # leftovers of killed writers
            if _TMP_NAME.fullmatch(x.name) or ((_INDEX_NAME.fullmatch(x.name) or _ARRAY_NAME.fullmatch(x.name)
                                                or _LEXICAL_NAME.fullmatch(x.name)) and x.name not in current):
                try:
                    x.unlink()
                except OSError:
                    pass
        self.f: dict[str, Any] = {}
        self.len: dict[str, int] = {}
        self.h: dict[str, Any] = {}
        for name in DATA_FILES:
            f = open(p / name, "r+b")
            f.truncate(files[name]["length"])
            f.seek(files[name]["length"])
            self.f[name] = f
            self.len[name] = files[name]["length"]
        self.count = bank.count
        self.docs = list(bank.docs)
        self.deleted = [int(d) for d in bank._deleted_docs]
        dead = set(self.deleted)
        self.live_docs = {i for i in range(len(self.docs)) if i not in dead}
        self.live_hashes = {self.docs[i]["sha256"] for i in self.live_docs}
        self.live_ids = {self.docs[i]["id"]: i for i in self.live_docs}
        self.index: HnswIndex | None = None  # loaded when a commit saves it
        self.idx_covered = self.idx_applied = 0
        self.index_info = m.get("index")
        self.lexical_info = m.get("lexical")
        self._reported: dict[str, int] = {}
        self.dirty = False  # written since the last commit
        self.arrays: dict[str, dict] = {k: dict(v) for k, v in m.get("arrays", {}).items()}

    def close(self) -> None:
        for f in self.f.values():
            f.close()

    def _write(self, name: str, data: bytes) -> None:
        if name in HASHED and name not in self.h:
            # the running sha256 starts from the committed part, read once per session and only for the files
            # this session changes (remove touches deleted.u32 alone); it doubles as an integrity check
            committed = self.b.manifest["files"][name]
            h = _hash_prefix(self.b.path / name, committed["length"])
            if h.hexdigest() != committed["sha256"]:
                raise BankError(f"bank file {self.b.path / name} does not match the checksum in {MANIFEST}; the "
                                f"bank is damaged: rebuild it")
            self.h[name] = h
        self.f[name].write(data)
        self.dirty = True
        self.len[name] += len(data)
        if name in self.h:
            self.h[name].update(data)

    def build_index(self, fresh: bool = False) -> HnswIndex:
        """The index over every reference appended so far: the saved one (or a new one when `fresh` or when
        it is unusable), caught up with the vectors and tombstones since. Call after the files are flushed."""
        b = self.b
        if fresh:
            self.index = None
        if self.index is None:
            info = None if fresh else self.index_info
            cap = max(1024, 2 * self.count)
            ix = None
            if info and _file_ok(b.path / info["file"], info):
                try:
                    ix = HnswIndex.load(b.path / info["file"], b.embed_dim, cap, info["M"], info["ef_construction"])
                    if ix.count != info["count"]:
                        ix = None
                except (RuntimeError, MemoryError, ValueError, OSError):
                    ix = None
            if ix is None:
                self.index, self.idx_covered, self.idx_applied = HnswIndex.create(b.embed_dim, cap), 0, 0
            else:
                self.index, self.idx_covered, self.idx_applied = ix, info["count"], info["deleted"]
        ix = self.index
        if self.idx_covered < self.count:
            vec = _map(b.path / VECS, "<f4", self.count, (b.embed_dim,))
            checks = _map(b.path / CHECKS, CHECK_DTYPE, self.count)
            dead = self._dead()
            for s in range(self.idx_covered, self.count, 1 << 14):
                e = min(self.count, s + (1 << 14))
                rows = np.asarray(vec[s:e])
                for i in np.flatnonzero(~dead[s:e]).tolist():
                    if zlib.crc32(rows[i].tobytes()) != int(checks["vector"][s + i]):
                        raise BankError(f"bank {b.path}: the vector of reference {s + i} does not match its "
                                        f"checksum; run `m3lite bank verify {b.path}`")
                ix.add(rows, np.arange(s, e))
            del vec
            self.idx_covered = self.count
        ix.mark_deleted(self._labels(self.deleted[self.idx_applied:]))
        self.idx_applied = len(self.deleted)
        return ix

    def _dead(self) -> np.ndarray:
        dead = np.zeros(self.count, bool)
        for r in self._labels(self.deleted):
            dead[r] = True
        return dead

    def _labels(self, docs: Iterable[int]) -> list[int]:
        out: list[int] = []
        for d in docs:
            out.extend(range(self.docs[d]["first"], self.docs[d]["first"] + self.docs[d]["count"]))
        return out

    def tombstone(self, doc_indices: Sequence[int]) -> None:
        for d in doc_indices:
            if d in self.live_docs:
                self.live_docs.discard(d)
                self.live_hashes.discard(self.docs[d]["sha256"])
                if self.live_ids.get(self.docs[d]["id"]) == d:
                    del self.live_ids[self.docs[d]["id"]]
                self.deleted.append(d)
                self._write(DELETED, np.array([d], "<u4").tobytes())

    def append(self, group: list[tuple[Document, list]], encode_fn: Callable, embed_fn: Callable,
               batch: int) -> None:
        b = self.b
        s = b.shape
        rdt = b.rec_dtype
        Lm, H, T, hd = s.n_memory_layers, s.n_kv_heads, s.tokens_per_head, s.head_dim
        refs = [(di, r) for di, (_, rs) in enumerate(group) for r in rs]
        first_doc = len(self.docs)
        text_off = self.len[TEXTS]
        for s0 in range(0, len(refs), batch):
            sub = refs[s0:s0 + batch]
            B = len(sub)
            keys, values, pos, cnt = encode_fn([r.ids for _, r in sub])
            keys, values = np.asarray(keys, np.float32), np.asarray(values, np.float32)
            pos, cnt = np.asarray(pos), np.asarray(cnt)
            for what, a, want in (("keys", keys, (B, Lm, H, T, hd)), ("values", values, (B, Lm, H, T, hd)),
                                  ("positions", pos, (B, Lm, H, T)), ("counts", cnt, (B, Lm, H))):
                if a.shape != want:
                    raise BankError(f"encode_fn returned {what} of shape {a.shape}, this bank stores {want}: the "
                                    f"bank was made for another memory shape")
            if cnt.size and (cnt.min() < 0 or cnt.max() > T):
                raise BankError(f"encode_fn returned token counts outside [0, {T}]")
            valid = np.arange(T) < cnt[..., None]
            if pos.size and (np.where(valid, pos, 0).min() < 0 or np.where(valid, pos, 0).max() > 32767):
                raise BankError("encode_fn returned positions outside [0, 32767]")
            vecs = np.asarray(embed_fn([index_text(r) for di, r in sub]), np.float32)
            if vecs.shape != (B, b.embed_dim):
                raise BankError(f"embed_fn returned shape {vecs.shape}, this bank stores ({B}, {b.embed_dim}) "
                                f"vectors: the bank was made with another embedder")
            if not np.all(np.isfinite(vecs)):
                raise BankError("embed_fn returned non-finite values")
            vecs = _normalize(vecs)
            rec = np.zeros(B, rdt)
            kq, ks = Q.quantize(keys * valid[..., None], b.quant)
            vq, vs = Q.quantize(values * valid[..., None], b.quant)
            rec["k"], rec["v"] = kq, vq
            if ks is not None:
                rec["k_scale"], rec["v_scale"] = ks, vs
            rec["pos"] = np.where(valid, pos, 0).astype("<i2")
            rec["count"] = cnt.astype("<i2")
            raw = rec.tobytes()
            rs = rdt.itemsize
            rr = np.zeros(B, REF_DTYPE)
            texts = [r.text.encode("utf-8", "replace") for _, r in sub]  # a lone surrogate becomes "?"
            lens = np.array([len(t) for t in texts], np.int64)
            terms = [term_ids(index_text(r))[:65535] for di, r in sub]
            toks = [np.asarray(r.ids, "<u4") for _, r in sub]
            vbytes = vecs.astype("<f4").tobytes()
            ck = np.zeros(B, CHECK_DTYPE)
            ck["memory"] = [zlib.crc32(raw[i * rs:(i + 1) * rs]) for i in range(B)]
            ck["text"] = [zlib.crc32(t) for t in texts]
            ck["tokens"] = [zlib.crc32(t.tobytes()) for t in toks]
            ck["terms"] = [zlib.crc32(t.tobytes()) for t in terms]
            vs_ = 4 * b.embed_dim
            ck["vector"] = [zlib.crc32(vbytes[i * vs_:(i + 1) * vs_]) for i in range(B)]
            n_terms = np.array([len(t) for t in terms], np.int64)
            rr["doc"] = [first_doc + di for di, _ in sub]
            rr["char_start"] = [r.char_start for _, r in sub]
            rr["char_end"] = [r.char_end for _, r in sub]
            rr["text_offset"] = text_off + np.concatenate([[0], np.cumsum(lens)[:-1]])
            rr["text_length"] = lens
            rr["n_tokens"] = [len(r.ids) for _, r in sub]
            rr["terms_offset"] = self.len[TERMS] // 8 + np.concatenate([[0], np.cumsum(n_terms)[:-1]])
            rr["n_terms"] = n_terms
            text_off += int(lens.sum())
            self._write(MEM, raw)
            self._write(CHECKS, ck.tobytes())
            self._write(REFS, rr.tobytes())
            self._write(TEXTS, b"".join(texts))
            self._write(VECS, vbytes)
            self._write(TOKENS, np.concatenate(toks).tobytes())
            self._write(TERMS, np.concatenate(terms).astype("<u8").tobytes())
            self.count += B  # the index catches up at the commits that save it
        # documents after their references: a commit always lands at a document boundary
        first = self.count - len(refs)
        replaced: list[int] = []
        for di, (doc, rs) in enumerate(group):
            old = self.live_ids.get(doc.id)
            if old is not None:
                replaced.append(old)
            line = json.dumps({"id": doc.id, "title": doc.title, "source": doc.source, "sha256": doc.sha256,
                               "first": first, "count": len(rs)}, ensure_ascii=False)
            self._write(DOCS, line.encode("utf-8", "replace") + b"\n")
            self.docs.append({"id": doc.id, "title": doc.title, "source": doc.source, "sha256": doc.sha256,
                              "first": first, "count": len(rs)})
            idx = len(self.docs) - 1
            if old is not None:
                self.tombstone([old])
            self.live_docs.add(idx)
            self.live_hashes.add(doc.sha256)
            self.live_ids[doc.id] = idx
            first += len(rs)

    def commit(self, final: bool, stats: dict, save_index: bool | None = None, force_lexical: bool = False) -> None:
        b = self.b
        p = b.path
        for f in self.f.values():
            f.flush()
            os.fsync(f.fileno())
        old = b.manifest
        m = dict(old)
        m["count"] = self.count
        m["documents"] = len(self.docs)
        m["deleted_documents"] = len(self.deleted)
        m["generation"] = old["generation"] + 1
        m["files"] = {n: ({"length": self.len[n], "sha256": self.h[n].hexdigest()} if n in self.h
                          else {"length": self.len[n]} if n not in HASHED
                          else dict(old["files"][n])) for n in DATA_FILES}  # untouched this session
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        m["arrays"] = {k: dict(v) for k, v in self.arrays.items()}
        replaced = {v["file"] for v in old.get("arrays", {}).values()} - {v["file"] for v in self.arrays.values()}
        total = dict(old.get("stats", {}))
        for k in ("documents_added", "added", "tokens", "skipped", "replaced", "documents_removed",
                  "references_removed"):
            if k in stats:
                total[k] = total.get(k, 0) + stats[k] - self._reported.get(k, 0)
        self._reported = dict(stats)
        m["stats"] = total
        new_file = None
        saved = self.index_info or {"count": 0, "deleted": 0}
        if save_index is None:
            tail = self.count - saved["count"]
            stale = tail > 0 or len(self.deleted) > saved["deleted"]
            save_index = stale and (final or tail >= max(INDEX_SAVE_MIN_TAIL, saved["count"] // 8))
        if save_index:
            new_file = f"index.{m['generation']}.hnsw"
            saved_as = self.build_index().save(p / new_file)
            m["index"] = {"file": new_file, "count": self.count, "deleted": len(self.deleted),
                          "M": self.index.M, "ef_construction": self.index.ef_construction, **saved_as}
        lx = self.lexical_info or {"count": 0}
        if force_lexical or save_index is not False and self.count != lx["count"] and (
                final or self.count - lx["count"] >= max(INDEX_SAVE_MIN_TAIL, lx["count"] // 8)):
            data, sections = array_file_bytes(_build_lexical(p, self.count, self._dead(), self.docs).arrays())
            name = f"lexical.{m['generation']}.bin"
            _atomic_write(p / name, data)
            m["lexical"] = {"file": name, "count": self.count, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(), "sections": sections}
        _write_manifest(p, m)
        if m.get("lexical") != self.lexical_info:
            prev = (self.lexical_info or {}).get("file")
            self.lexical_info = m.get("lexical")
            if prev and prev != self.lexical_info["file"]:
                try:
                    os.unlink(p / prev)
                except OSError:
                    pass
        if new_file is not None:
            prev = (self.index_info or {}).get("file")
            self.index_info = m["index"]
            if prev and prev != new_file:
                try:
                    os.unlink(p / prev)
                except OSError:
                    pass
        for f in replaced:
            try:
                os.unlink(p / f)
            except OSError:
                pass
        self.dirty = False
        # the bank object now reads the state just committed (the writer's index stays with the writer)
        b._load(m, (self.docs, self.deleted))
