"""`Bank`: a bank opened at one committed state; reading (memories, references, vectors, tokens), search,
reports and verification; `add`/`remove` run through the writer."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .. import memory_quant as Q
from .. import pq as PQ
from ..errors import BadArgument, another_model
from ..lexical import TermIndex, read_array_file, term_ids, top, top_k
from ..sources import Document, chunk_document
from .format import (BankError, CHECKS, CHECK_DTYPE, DATA_FILES, DELETED, DOCS, EXACT_BELOW, FORMAT, FingerprintError,
                     HASHED, HNSW_EF_SEARCH, LOCK, MANIFEST, MEM, MemShape, REFS, REF_DTYPE, TERMS, TEXTS, TOKENS,
                     VECS, VERSION, _ARRAY_NAME, _INDEX_NAME, _Lock, _TMP_NAME, _hash_prefix, _map,
                     _read_manifest, _write_manifest, foreign_bank, record_dtype)
from .index import HnswIndex, _build_lexical, _file_ok, _normalize, index_text
from .lazy import LAZY_FILES, LAZY_VEC, LAZY_VEC_IDX, VECTOR_FIELD, LazyRecords, remove_lazy_files, vector_dtype
from .writer import _Writer, checked_encoding, memory_records


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
               embed_dim: int = 0, meta: dict | None = None, exist_ok: bool = False, lazy: bool = False,
               lazy_vectors: bool = False) -> "Bank":
        """Create an empty bank folder for a model (`fingerprint`) and memory shape
        (n_memory_layers, n_kv_heads, tokens_per_head, head_dim). With `exist_ok`, an existing bank of the
        same model, shape, quantization and embedding size is opened instead. `lazy`: memories are encoded when
        first used, or by `encode` (m3lite.bank.lazy), instead of as references are added. `lazy_vectors`:
        sentence vectors are computed when a word search first finds a reference, or by `embed`, instead of as
        references are added (a bank ready in the time its words take; dense search then covers the references
        that have a vector, by brute force)."""
        p = Path(path)
        shape = MemShape.of(mem_shape)
        rdt = record_dtype(shape, quant)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise BadArgument("a bank needs the model fingerprint")
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise BadArgument(f"embed_dim must be a positive integer, got {embed_dim!r}")
        if lazy and quant == "pq":
            raise BadArgument("a pq bank is encoded as it is built (its codebooks are trained on its first "
                              "memories): build it with --encode all")
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise BadArgument(f"bank meta must be JSON-serializable: {e}") from None
        if (p / MANIFEST).exists():
            if not exist_ok:
                raise BankError(f"a bank already exists at {p}; open it or choose another folder")
            b = cls.open(p, fingerprint=fingerprint)
            if (b.shape != shape or b.quant != quant or b.embed_dim != embed_dim or b.lazy != lazy
                    or b.lazy_vectors != lazy_vectors):
                raise BankError(f"the bank at {p} has memory shape {tuple(b.shape.as_dict().values())}, "
                                f"{b.quant}, embedding size {b.embed_dim}, {'lazy' if b.lazy else 'encoded'} "
                                f"memories, {'lazy' if b.lazy_vectors else 'stored'} vectors; not the requested "
                                f"ones: use another folder")
            return b
        if p.exists() and not p.is_dir():
            raise BankError(f"{p} exists and is not a folder; choose another path for the bank")
        if p.is_dir():
            ours = set(DATA_FILES) | {LOCK} | set(LAZY_FILES)
            foreign = [x.name for x in p.iterdir() if x.name not in ours and not _TMP_NAME.fullmatch(x.name)
                       and not _INDEX_NAME.fullmatch(x.name) and not _ARRAY_NAME.fullmatch(x.name)]
            if foreign:
                raise BankError(f"{p} is not empty and not a bank (it holds {foreign[0]}); choose an empty folder")
        p.mkdir(parents=True, exist_ok=True)
        lock = _Lock(p)
        try:
            if (p / MANIFEST).exists():  # another process created it while we were checking
                lock.release()
                return cls.create(p, fingerprint, shape, quant, embed_dim, meta, exist_ok, lazy, lazy_vectors)
            empty = hashlib.sha256(b"").hexdigest()
            remove_lazy_files(p)  # memories of an earlier bank in this folder
            for name in DATA_FILES:
                with open(p / name, "wb") as f:
                    os.fsync(f.fileno())
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            m = {
                "format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                "memory": dict(shape.as_dict(), quant=quant, record_bytes=rdt.itemsize, position_dtype="int16",
                               lazy=bool(lazy)),
                "embed_dim": embed_dim, "vectors_lazy": bool(lazy_vectors), "count": 0, "documents": 0,
                "deleted_documents": 0, "generation": 0,
                "files": {n: ({"length": 0, "sha256": empty} if n in HASHED else {"length": 0}) for n in DATA_FILES},
                "index": None, "lexical": None, "arrays": {}, "meta": meta, "stats": {}, "created": now, "updated": now,
            }
            _write_manifest(p, m)
        finally:
            lock.release()
        return cls(p, _read_manifest(p))

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether `path` holds a bank (its manifest; whether it is sound is for `open` to say)."""
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: str | None = None) -> "Bank":
        """Open a bank at its last commit. Checks the manifest, file sizes and the cheap checksums; with a
        `fingerprint`, refuses a bank built by another model."""
        p = Path(path)
        m = _read_manifest(p)
        if fingerprint is not None and m["fingerprint"] != fingerprint:
            raise foreign_bank(p, m["fingerprint"], fingerprint)
        return cls(p, m)

    def check_model(self, fingerprint: str) -> None:
        """FingerprintError (one line) unless this bank was built by the model with `fingerprint`."""
        if self.fingerprint != fingerprint:
            raise foreign_bank(self.path, self.fingerprint, fingerprint)

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
        self.lazy: bool = bool(mem.get("lazy", False))
        self.rec_dtype = record_dtype(self.shape, self.quant)
        self.embed_dim: int = m["embed_dim"]
        self.lazy_vectors: bool = bool(m.get("vectors_lazy", False))
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
            self._docs: list[dict] | None = None  # parsed when first needed (a million references: ~0.2 s)
            deleted = np.fromfile(p / DELETED, dtype="<u4", count=m["deleted_documents"]) \
                if m["deleted_documents"] else np.zeros(0, "<u4")
        else:
            self._docs = list(state[0])
            deleted = np.array(state[1], "<u4")
        n = self.count
        self._mem = _map(p / MEM, self.rec_dtype, 0 if self.lazy else n)
        self._refs = _map(p / REFS, REF_DTYPE, n)
        self._vecs = None if self.lazy_vectors else _map(p / VECS, "<f4", n, (self.embed_dim,))
        self._texts = _map(p / TEXTS, np.uint8, files[TEXTS]["length"])
        self._tokens = _map(p / TOKENS, "<u4", files[TOKENS]["length"] // 4)
        self._terms = _map(p / TERMS, "<u8", files[TERMS]["length"] // 8)
        self._checks = _map(p / CHECKS, CHECK_DTYPE, n)
        self._lexical: TermIndex | None = None  # BM25 over the references' words, loaded on the first text search
        self._vectors_checked = 0  # vectors [0, this) passed their crc32 (brute-force search reads them all)
        if len(deleted) and (int(deleted.max()) >= m["documents"] or len(np.unique(deleted)) != len(deleted)):
            raise BankError(f"bank file {p / DELETED} names unknown documents; the bank is damaged: rebuild it")
        self._deleted_docs = deleted.astype(np.int64)
        self._dead = np.zeros(n, bool)
        for d in self._deleted_docs:
            doc = self.docs[int(d)]
            self._dead[doc["first"]:doc["first"] + doc["count"]] = True
        self._index = None
        self._index_info = m.get("index")
        self._codebooks: np.ndarray | None = None
        self._tok_off: np.ndarray | None = None  # where each reference's tokens start, computed when first needed
        if not self.lazy:
            self._lazy = None
        elif getattr(self, "_lazy", None) is None or self._lazy.rec != self.rec_dtype:
            self._lazy = LazyRecords(p, self.rec_dtype, n)
        else:
            self._lazy.grow(n)
        if not self.lazy_vectors:
            self._lazyvec = None
        elif getattr(self, "_lazyvec", None) is None:
            self._lazyvec = LazyRecords(p, vector_dtype(self.embed_dim), n, (LAZY_VEC, LAZY_VEC_IDX))
        else:
            self._lazyvec.grow(n)

    @property
    def docs(self) -> list[dict]:
        """The documents (id, title, source, sha256, first reference, reference count), in order; removed ones
        included (see is_deleted)."""
        if self._docs is None:
            self._docs = self._read_docs(self.manifest["files"][DOCS]["length"], self.manifest["documents"])
        return self._docs

    def _read_docs(self, length: int, n_docs: int) -> list[dict]:
        fp = self.path / DOCS
        with open(fp, "rb") as f:
            data = f.read(length)
        bad = BankError(f"bank file {fp} is malformed; the bank is damaged: rebuild it")
        if data and not data.endswith(b"\n"):
            raise bad
        try:  # one line per document, none with a raw newline inside (JSON escapes them): one parse for all
            docs = json.loads(b"[" + data[:-1].replace(b"\n", b",") + b"]" if data else b"[]")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise bad from None
        if not isinstance(docs, list) or len(docs) != n_docs:
            raise bad
        expect = 0
        for d in docs:
            if not (type(d) is dict and type(d.get("id")) is str and type(d.get("title")) is str
                    and type(d.get("source")) is str and type(d.get("sha256")) is str
                    and type(d.get("first")) is int and d["first"] == expect and type(d.get("count")) is int and d["count"] >= 0):
                raise bad
            expect += d["count"]
        if expect != self.manifest["count"]:
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

    def memories(self, ids: Any, encode_fn: Callable | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray]:
        """Dequantized memories of references: keys and values [k, Lm, n_kv, T, hd] float32, positions
        [k, Lm, n_kv, T] int32 and valid-token counts [k, Lm, n_kv] int32 (slots past the count are zero).
        Each record is checked against its crc32 (BankError naming it if damaged). In a lazy bank, memories not
        encoded yet are encoded with `encode_fn` (as for `add`) and kept; without it they are a BankError."""
        a = self._check_ids(ids)
        if self.lazy:
            encode = encode_fn and (lambda todo: self._encode_records(todo, encode_fn))
            rec = self._lazy_records(self._lazy, a, encode, "memory", "encoded when first used by a model")
        else:
            rec = self._mem[a] if a.size else np.zeros(0, self.rec_dtype)
            for i in a.tolist():  # on the mapped bytes: a copy of a padded record need not copy its padding
                self._check(i, "memory", self._mem[i:i + 1])
        if self.quant == "pq":
            cb = self.codebooks()
            if cb is None:
                if a.size:
                    raise self._damaged(int(a[0]), "memory")  # records without the codebooks they were made with
                cb = np.zeros((self.shape.n_memory_layers, self.shape.n_kv_heads, 2, rec["k"].shape[-1],
                               PQ.CENTROIDS, PQ.SUB_DIM), np.float32)
            k, v = PQ.decode(rec["k"], cb, 0), PQ.decode(rec["v"], cb, 1)
        elif Q.has_scales(self.quant):
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

    def vectors(self, ids: Any, embed_fn: Callable | None = None) -> np.ndarray:
        """Unit embedding vectors of references (each checked against its crc32). A bank with lazy vectors
        computes those it does not have yet with `embed_fn` (the bank's embedder: texts -> [n, embed_dim]) and
        keeps them (when the writer lock is free; used either way); without `embed_fn` they are an error."""
        a = self._check_ids(ids)
        if not self.lazy_vectors:
            v = np.asarray(self._vecs[a], np.float32)
            for j, i in enumerate(a.tolist()):
                self._check(i, "vector", v[j])
            return v
        rec = self._lazy_records(self._lazyvec, a, embed_fn and (lambda todo: self._embed_records(todo, embed_fn)),
                                 "sentence vector", "computed when a word search first finds them")
        return np.array(rec[VECTOR_FIELD], np.float32)

    def _lazy_records(self, store: LazyRecords, a: np.ndarray, compute: Callable | None, what: str,
                      when: str) -> np.ndarray:
        """Records of references `a` from a lazy store; those missing (or failing their crc32) computed by
        `compute(sorted unique ids)`, each once, and kept; without `compute` they are a BankError."""
        rec, good = store.read(a)
        if not good.all():
            need = np.flatnonzero(~good)
            if compute is None:
                raise BankError(f"bank {self.path}: reference {int(a[need[0]])} has no {what} yet; those of this "
                                f"bank are {when}, or by `m3lite bank encode {self.path}`")
            todo = np.unique(a[need])
            new = compute(todo)
            store.append(todo, new)  # kept when the writer lock is free; used either way
            rec[need] = new[np.searchsorted(todo, a[need])]
        return rec

    def _embed_records(self, ids: np.ndarray, embed_fn: Callable) -> np.ndarray:
        """Vector records of references `ids`, computed from their stored title and text as a build does."""
        texts = []
        for i in ids.tolist():
            r = self.reference(i)
            texts.append(index_text(SimpleNamespace(title=r["title"], text=r["text"])))
        vecs = np.asarray(embed_fn(texts), np.float32)
        if vecs.shape != (len(ids), self.embed_dim) or not np.all(np.isfinite(vecs)):
            raise BankError(f"the embedder returned {vecs.shape} vectors for {len(ids)} references of bank "
                            f"{self.path} ({self.embed_dim} values each): it is another embedder")
        out = np.zeros(len(ids), vector_dtype(self.embed_dim))
        out[VECTOR_FIELD] = _normalize(vecs)
        return out

    @property
    def embedded_count(self) -> int:
        """References with a sentence vector: all of them, unless the bank's vectors are lazy."""
        return self._lazyvec.encoded if self.lazy_vectors else self.count

    def embed(self, embed_fn: Callable, batch: int = 256, progress: Callable[[dict], None] | None = None,
              limit: int | None = None) -> dict[str, Any]:
        """Compute the sentence vectors a bank with lazy vectors does not have yet (live references, in order),
        holding the writer lock; killed, it keeps every batch written, and a rerun goes on. `progress(stats)`
        after each batch. `limit`: at most this many, without looking for damaged records first (a background
        fill, a batch at a time: m3lite.background). Returns the stats (embedded, total, vectors, seconds,
        references_per_s); BankBusyError when another process is writing the bank."""
        return self._fill(self._lazyvec if self.lazy_vectors else None, "vectors",
                          lambda ids: self._embed_records(ids, embed_fn), batch, progress, limit)

    def tokens(self, i: int) -> np.ndarray:
        """A reference's token ids (<ref> first), checked against its crc32."""
        i = int(self._check_ids([i])[0])
        if self._tok_off is None:
            n = self._refs["n_tokens"].astype(np.int64)
            self._tok_off = np.concatenate([[0], np.cumsum(n)])
        start, end = int(self._tok_off[i]), int(self._tok_off[i + 1])
        t = np.array(self._tokens[start:end], np.uint32)
        self._check(i, "tokens", t)
        return t

    def _encode_records(self, ids: np.ndarray, encode_fn: Callable) -> np.ndarray:
        """Memory records of references `ids`, encoded from their stored tokens."""
        toks = [self.tokens(int(i)).astype(np.int64).tolist() for i in ids]
        return memory_records(self, checked_encoding(self, len(toks), encode_fn(toks)), self.codebooks())

    @property
    def encoded_count(self) -> int:
        """References with a memory: all of them, unless the bank is lazy."""
        return self._lazy.encoded if self.lazy else self.count

    def encode(self, encode_fn: Callable, batch: int = 16, progress: Callable[[dict], None] | None = None
               ) -> dict[str, Any]:
        """Encode the memories a lazy bank does not have yet (live references, in order), holding the writer
        lock; killed, it keeps every batch written, and a rerun goes on. `progress(stats)` after each batch.
        Returns the stats (encoded, total, seconds, references_per_s); a bank encoded as it was built has nothing
        to encode."""
        return self._fill(self._lazy if self.lazy else None, "memories",
                          lambda ids: self._encode_records(ids, encode_fn), batch, progress)

    def _fill(self, store: LazyRecords | None, what: str, compute: Callable, batch: int,
              progress: Callable[[dict], None] | None, limit: int | None = None) -> dict[str, Any]:
        """Compute and keep the records `store` lacks (encode, embed); the stats name them `what`."""
        if not isinstance(batch, int) or batch <= 0:
            raise BadArgument(f"batch must be a positive integer, got {batch!r}")
        done = "encoded" if what == "memories" else "embedded"
        t0 = time.monotonic()
        if store is None:  # computed as the bank was built: every reference has its record
            return {done: 0, "total": 0, what: self.count, "references": self.live_count,
                    "seconds": 0.0, "references_per_s": 0.0}
        lock = _Lock(self.path)
        try:
            self.refresh()
            store = self._lazy if what == "memories" else self._lazyvec  # refresh may have replaced it
            store.refresh()
            need = store.slot < 0
            if limit is None:
                need[store.damaged()] = True
            todo = np.flatnonzero(~self._dead & need)[:limit]
            st = {done: 0, "total": len(todo), what: store.encoded, "references": self.live_count}
            for s0 in range(0, len(todo), batch):
                ids = todo[s0:s0 + batch]
                store.append(ids, compute(ids), locked=True)
                st[done] += len(ids)
                st[what] = store.encoded
                if progress is not None:
                    progress(dict(st, seconds=time.monotonic() - t0))
        finally:
            lock.release()
        dt = time.monotonic() - t0
        st["seconds"] = round(dt, 3)
        st["references_per_s"] = round(st[done] / dt, 1) if dt > 0 else 0.0
        return st

    def _checked_vectors(self, hi: int) -> None:
        """Check the crc32 of the live vectors below `hi` not checked yet (brute-force search reads them)."""
        for s in range(self._vectors_checked, hi, 1 << 14):
            e = min(hi, s + (1 << 14))
            rows = np.asarray(self._vecs[s:e])
            for i in np.flatnonzero(~self._dead[s:e]).tolist():
                self._check(s + i, "vector", rows[i])
        self._vectors_checked = max(self._vectors_checked, hi)

    def codebooks(self) -> np.ndarray | None:
        """A pq bank's codebooks (m3lite.pq), None before its first references; read once, checked."""
        if self._codebooks is None and PQ.CODEBOOKS in self.manifest.get("arrays", {}):
            s = self.shape
            try:
                self._codebooks = PQ.check_codebooks(self.get_array(PQ.CODEBOOKS), s.n_memory_layers, s.n_kv_heads,
                                                     s.head_dim)
            except BadArgument as e:
                raise BankError(f"bank {self.path}: {e}; the bank is damaged: rebuild it") from None
        return self._codebooks

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
        with self._writer() as w:
            w.store_array(name, a)
            w.commit(final=True, stats={}, save_index=False)

    def _exact_lazy(self, v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the vectors a bank with lazy vectors has so far (each record checked against its
        crc32 the first time it is read; one that fails counts as missing)."""
        mem, ref = self._lazyvec.current()
        use = ref >= 0
        use[use] = ~self._dead[ref[use]]
        if not use.any():
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        sc = mem[VECTOR_FIELD] @ v  # every record, read in place (a gather of the used ones would copy them)
        return top_k(ref[use], sc[use].astype(np.float32), k)

    def _exact(self, v: np.ndarray, k: int, lo: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if self.lazy_vectors:
            return self._exact_lazy(v, k)
        self._checked_vectors(self.count)
        ids_all: list[np.ndarray] = []
        sc_all: list[np.ndarray] = []
        step = 1 << 16
        for s in range(lo, self.count, step):
            e = min(self.count, s + step)
            sc = np.asarray(self._vecs[s:e]) @ v
            live = ~self._dead[s:e]
            ids = np.arange(s, e)[live]
            ids, sc = top_k(ids, sc[live], k)
            ids_all.append(ids)
            sc_all.append(sc)
        if not ids_all:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return top_k(np.concatenate(ids_all), np.concatenate(sc_all), k)

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

        Brute force when `exact` or when the bank has fewer than EXACT_BELOW live references (or no index: a
        bank with lazy vectors, then over the references that have one); otherwise HNSW over the indexed
        references plus brute force over the references added since."""
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
        return top_k(np.concatenate([ids, tid]), np.concatenate([sc, tsc]), int(k))

    def lexical_search(self, text: str, k: int = 5, skip: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The k live references with the best BM25 score for the words of `text` (exact, over every committed
        reference; see m3lite.lexical), leaving out the reference ids in `skip`: ids int64 and scores float32,
        best first; references scoring 0 are not returned."""
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise BadArgument(f"k must be a positive integer, got {k!r}")
        ix = self._lexical_index()
        out = self._dead.copy()
        out[[int(i) for i in skip if 0 <= int(i) < self.count]] = True
        if not self.count:
            return top(np.zeros(0), int(k), out)
        return ix.best(term_ids(text), int(k), out)

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
            "documents": self.manifest["documents"],
            "deleted_documents": len(self._deleted_docs),
            "generation": self.generation,
            "quantization": self.quant,
            "memory_shape": s.as_dict(),
            "embed_dim": self.embed_dim,
            "tokens": tokens,  # <ref> included
            "memory_record_bytes": rec,
            "lazy": self.lazy,
            "memories": self.encoded_count,  # references with a memory (a lazy bank encodes on first use)
            "memory_bytes": self.encoded_count * rec,
            "lazy_vectors": self.lazy_vectors,
            "vectors": self.embedded_count,  # references with a sentence vector (lazy vectors: on first use)
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
                    parts = ((() if self.lazy else (("memory", self._mem[i:i + 1]),))
                             + (("text", self._texts[off[i]:off[i] + ln[i]]),
                                ("tokens", self._tokens[tok_off[i]:tok_off[i] + ntok[i]]),
                                ("terms", self._terms[toff[i]:toff[i] + tn[i]]))
                             + (() if self.lazy_vectors else (("vector", self._vecs[i]),)))
                    for what, data in parts:
                        if zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B")) != int(self._checks[what][i]):
                            damaged.append({"reference": i, "document": self.docs[int(docs_of[i])]["id"],
                                            "what": what})
                            break
                    else:
                        if self.lazy:
                            continue
                        c = self._mem[i]["count"]
                        if c.size and (c.min() < 0 or c.max() > T):
                            damaged.append({"reference": i, "document": self.docs[int(docs_of[i])]["id"],
                                            "what": "memory token count"})
                first = np.array([d["first"] for d in self.docs], np.int64)
                end = first + np.array([d["count"] for d in self.docs], np.int64)
                at = np.arange(n)
                if n and (np.any(first[docs_of] > at) or np.any(end[docs_of] <= at)):
                    problems.append("references are not grouped by document")
        for store, what, verb in ((self._lazy, "encoded memories", "encoded"),
                                  (self._lazyvec, "sentence vectors", "computed")):
            bad = store.damaged() if store is not None else ()
            if len(bad):
                problems.append(f"{len(bad)} {what} fail their checksum (first: reference {int(bad[0])}); they "
                                f"are {verb} again when next used, or now by `m3lite bank encode {p}`")
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
                raise FingerprintError(another_model(f"bank {self.path}", m["fingerprint"], self.fingerprint,
                                                     "it was rebuilt since it was opened; reopen it"))
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

            def first_batch() -> int:  # a pq bank trains its codebooks on the first batch: a larger one
                return max(batch, PQ.TRAIN_REFS) if self.quant == "pq" and w.codebooks is None else batch

            def flush(final: bool) -> None:
                nonlocal group, n_group, since, last
                if group:
                    w.append(group, encode_fn, embed_fn, first_batch())
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
                if n_group >= first_batch():
                    flush(False)
            flush(True)
        dt = time.monotonic() - t0
        st["seconds"] = round(dt, 3)
        st["references_per_s"] = round(st["added"] / dt, 1) if dt > 0 else 0.0
        st["count"] = self.count
        return st

    def merge(self, sources: Iterable["Bank"], progress: Callable[[dict], None] | None = None,
              commit_every: int = 1024) -> dict[str, int]:
        """Append the live documents of banks `sources`, in order, as they are stored there (built by the same
        model, memory shape, quantization, encoding and embedder: m3lite.shards builds such parts). Documents
        already here (same content) are skipped, so a killed merge resumes; commits at document boundaries.
        Returns the counts copied."""
        st = {"documents": 0, "references": 0, "skipped": 0}
        if self.quant == "pq":
            raise BankError(f"bank {self.path} is a pq bank: its memories are codes into its own codebooks, so other "
                            f"banks cannot be merged into it")
        sources = list(sources)
        for b in [self, *sources]:
            if b.lazy_vectors:
                raise BankError(f"bank {b.path} computes its sentence vectors lazily; banks are merged with their "
                                f"vectors: build the parts without --vectors lazy")
        mine = (self.fingerprint, self.shape, self.quant, self.lazy, self.embed_dim,
                self.manifest.get("meta", {}).get("embedder"))
        with self._writer() as w:
            for src in sources:
                theirs = (src.fingerprint, src.shape, src.quant, src.lazy, src.embed_dim,
                          src.manifest.get("meta", {}).get("embedder"))
                if mine != theirs:
                    raise BankError(f"bank {src.path} was built with other settings than {self.path} (model, "
                                    f"memory shape, quantization, encoding or embedder); it cannot be merged")
                dead = set(src._deleted_docs.tolist())
                since = 0
                for d in range(len(src.docs)):
                    if d in dead:
                        continue
                    if src.docs[d]["sha256"] in w.live_hashes:
                        st["skipped"] += 1
                        continue
                    n = w.copy_document(src, d)
                    st["documents"] += 1
                    st["references"] += n
                    since += n
                    if since >= commit_every:
                        w.commit(final=False, stats={"documents_added": st["documents"], "added": st["references"]})
                        since = 0
                        if progress is not None:
                            progress(dict(st))
            if w.dirty:
                w.commit(final=True, stats={"documents_added": st["documents"], "added": st["references"]})
        if progress is not None:
            progress(dict(st))
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
        """Build both indexes again, HNSW from the stored vectors (a bank with lazy vectors has none) and BM25
        from the stored terms (after damage to or loss of an index file); returns the references indexed."""
        with self._writer() as w:
            if not self.lazy_vectors:
                w.build_index(fresh=True)  # from the vectors alone: the old file may be what is damaged
            w.commit(final=True, stats={}, save_index=True, force_lexical=True)
        return self.count
