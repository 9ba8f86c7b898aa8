"""The append session of one writer: open files, running checksums, the indexes it saves, the commit."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .. import memory_quant as Q
from .. import pq as PQ
from ..lexical import array_file_bytes, term_ids
from ..sources import Document
from .format import (BankError, CHECKS, CHECK_DTYPE, DATA_FILES, DELETED, DOCS, HASHED, INDEX_SAVE_MIN_TAIL, MANIFEST,
                     MEM, REFS, REF_DTYPE, TERMS, TEXTS, TOKENS, VECS, _ARRAY_NAME, _INDEX_NAME, _LEXICAL_NAME,
                     _TMP_NAME, _atomic_write, _hash_prefix, _map, _write_manifest)
from .lazy import record_crcs
from .index import HnswIndex, _build_lexical, _file_ok, _normalize, index_text


def checked_encoding(b, B: int, encoded) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What an encode_fn returned for B references (keys, values, positions, counts), checked against the
    memory shape of bank `b`."""
    keys, values, pos, cnt = encoded
    s = b.shape
    Lm, H, T, hd = s.n_memory_layers, s.n_kv_heads, s.tokens_per_head, s.head_dim
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
    return keys, values, pos, cnt


def memory_records(b, encoded, codebooks: np.ndarray | None = None) -> np.ndarray:
    """The memory records of bank `b` for a checked encoding (`checked_encoding`), quantized as the bank stores
    them; a pq bank needs its `codebooks`."""
    keys, values, pos, cnt = encoded
    valid = np.arange(b.shape.tokens_per_head) < cnt[..., None]
    rec = np.zeros(len(keys), b.rec_dtype)
    if b.quant == "pq":
        kq, ks = PQ.encode(keys, codebooks, 0) * valid[..., None], None
        vq, vs = PQ.encode(values, codebooks, 1) * valid[..., None], None
    else:
        kq, ks = Q.quantize(keys * valid[..., None], b.quant)
        vq, vs = Q.quantize(values * valid[..., None], b.quant)
    rec["k"], rec["v"] = kq, vq
    if ks is not None:
        rec["k_scale"], rec["v_scale"] = ks, vs
    rec["pos"] = np.where(valid, pos, 0).astype("<i2")
    rec["count"] = cnt.astype("<i2")
    return rec


class _Writer:
    """Append state of one writing session; owns the open files, the running checksums and the index."""

    def __init__(self, bank):  # the Bank (m3lite.bank.reader) being written
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
        self.codebooks = bank.codebooks() if bank.quant == "pq" else None  # trained on the first batch if None

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
        refs = [(di, r) for di, (_, rs) in enumerate(group) for r in rs]
        first_doc = len(self.docs)
        text_off = self.len[TEXTS]
        for s0 in range(0, len(refs), batch):
            sub = refs[s0:s0 + batch]
            B = len(sub)
            if b.lazy_vectors:  # computed when a search first finds the reference (m3lite.bank.lazy)
                vecs = np.zeros((0, b.embed_dim), np.float32)
            else:
                vecs = np.asarray(embed_fn([index_text(r) for di, r in sub]), np.float32)
                if vecs.shape != (B, b.embed_dim):
                    raise BankError(f"embed_fn returned shape {vecs.shape}, this bank stores ({B}, {b.embed_dim}) "
                                    f"vectors: the bank was made with another embedder")
                if not np.all(np.isfinite(vecs)):
                    raise BankError("embed_fn returned non-finite values")
                vecs = _normalize(vecs)
            if b.lazy:  # memories are encoded on first use (m3lite.bank.lazy)
                raw, mem_crc = b"", np.zeros(B, np.uint32)
            else:
                encoded = checked_encoding(b, B, encode_fn([r.ids for _, r in sub]))
                if b.quant == "pq" and self.codebooks is None:
                    self._store_codebooks(PQ.train(encoded[0], encoded[1], encoded[3]))
                rec = memory_records(b, encoded, self.codebooks)
                raw, mem_crc = rec.tobytes(), record_crcs(rec)
            rr = np.zeros(B, REF_DTYPE)
            texts = [r.text.encode("utf-8", "replace") for _, r in sub]  # a lone surrogate becomes "?"
            lens = np.array([len(t) for t in texts], np.int64)
            terms = [term_ids(index_text(r))[:65535] for di, r in sub]
            toks = [np.asarray(r.ids, "<u4") for _, r in sub]
            vbytes = vecs.astype("<f4").tobytes()
            ck = np.zeros(B, CHECK_DTYPE)
            ck["memory"] = mem_crc
            ck["text"] = [zlib.crc32(t) for t in texts]
            ck["tokens"] = [zlib.crc32(t.tobytes()) for t in toks]
            ck["terms"] = [zlib.crc32(t.tobytes()) for t in terms]
            vs_ = 4 * b.embed_dim
            ck["vector"] = 0 if b.lazy_vectors else [zlib.crc32(vbytes[i * vs_:(i + 1) * vs_]) for i in range(B)]
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
        for doc, rs in group:
            self._add_document({"id": doc.id, "title": doc.title, "source": doc.source, "sha256": doc.sha256,
                                "first": first, "count": len(rs)})
            first += len(rs)

    def _add_document(self, d: dict) -> None:
        """Record a document whose references were just appended; it replaces a live one of the same id."""
        old = self.live_ids.get(d["id"])
        self._write(DOCS, json.dumps(d, ensure_ascii=False).encode("utf-8", "replace") + b"\n")
        self.docs.append(d)
        idx = len(self.docs) - 1
        if old is not None:
            self.tombstone([old])
        self.live_docs.add(idx)
        self.live_hashes.add(d["sha256"])
        self.live_ids[d["id"]] = idx

    def copy_document(self, src, d: int) -> int:
        """Append document `d` of bank `src` (same model, memory shape, quantization and embedder) with its
        references as they are stored there: memories (unless lazy), texts, tokens, words, vectors, checks.
        Each part is checked against its crc32 first, so damage is never copied. Returns its references."""
        b = self.b
        doc = src.docs[d]
        lo, n = doc["first"], doc["count"]
        rr = np.array(src._refs[lo:lo + n])
        ck = np.array(src._checks[lo:lo + n])
        texts, toks, terms = [], [], []
        for j in range(n):
            i = lo + j
            r = src.reference(i)  # text checked
            texts.append(r["text"].encode("utf-8", "replace"))
            toks.append(src.tokens(i))
            t0, tn = int(rr["terms_offset"][j]), int(rr["n_terms"][j])
            t = np.array(src._terms[t0:t0 + tn], "<u8")
            src._check(i, "terms", t)
            terms.append(t)
        vecs = src.vectors(np.arange(lo, lo + n)) if n else np.zeros((0, b.embed_dim), np.float32)
        if not b.lazy:
            if src.lazy:
                raise BankError(f"bank {src.path} holds no memories (lazy); it cannot be merged into a bank "
                                f"encoded as it is built")
            for i in range(lo, lo + n):
                src._check(i, "memory", src._mem[i:i + 1])
            self._write(MEM, np.asarray(src._mem[lo:lo + n]).tobytes())
        else:
            ck["memory"] = 0
        lens = np.array([len(t) for t in texts], np.int64)
        n_terms = np.array([len(t) for t in terms], np.int64)
        rr["doc"] = len(self.docs)
        rr["text_offset"] = self.len[TEXTS] + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        rr["terms_offset"] = self.len[TERMS] // 8 + np.concatenate([[0], np.cumsum(n_terms)[:-1]]).astype(np.int64)
        self._write(CHECKS, ck.tobytes())
        self._write(REFS, rr.tobytes())
        self._write(TEXTS, b"".join(texts))
        self._write(VECS, np.asarray(vecs, "<f4").tobytes())
        if n:
            self._write(TOKENS, np.concatenate(toks).astype("<u4").tobytes())
            self._write(TERMS, np.concatenate(terms).tobytes())
        first = self.count
        self.count += n
        self._add_document(dict(doc, first=first))
        return n

    def store_array(self, name: str, a: np.ndarray) -> None:
        """A named numeric array in its own .npy file (`Bank.put_array`), recorded by the next commit."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        fname = f"array.{name}.{sha[:16]}.npy"
        _atomic_write(self.b.path / fname, data)
        self.arrays[name] = {"file": fname, "bytes": len(data), "sha256": sha}
        self.dirty = True

    def _store_codebooks(self, cb: np.ndarray) -> None:
        self.store_array(PQ.CODEBOOKS, cb)
        self.codebooks = cb

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
        if save_index and not b.lazy_vectors:  # lazy vectors: no HNSW index, brute force (m3lite.bank.lazy)
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
