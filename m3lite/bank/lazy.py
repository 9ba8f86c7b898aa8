"""Memories encoded, and sentence vectors computed, on first use (a lazy bank: `memory.lazy` and `vectors_lazy`
in the manifest).

A lazy bank stores its references (text, tokens, words, the word index) at once, and no memories in memories.bin
(`memory.lazy`) or no vectors in vectors.f32 (`vectors_lazy`, then there is no HNSW index either). A reference's
memory is encoded when retrieval first selects it (or by `Bank.encode`), its sentence vector computed when a
word search first finds it (or by `Bank.embed`), and each is kept in two append-only files outside the manifest:

    lazy.bin, lazyvec.bin   records (the bank's memory record dtype; VECTOR_FIELD float32 vectors), in the order
                            they were computed
    lazy.idx, lazyvec.idx   one 16-byte entry per record, in the same order: the reference, the crc32 of the
                            record, and a crc32 over those two and the record's slot (a torn or garbled entry
                            fails it)

They are a cache of what the model and the embedder compute from the reference's tokens and text: a record that
is missing, or fails its crc32, is computed again and appended (the last good entry of a reference wins), never
served.

Writing holds the bank's writer lock (a writer busy elsewhere means the memory is used but not kept this time):
the tails past the last whole entry are cut, the records are appended and fsynced, then their entries are
appended and fsynced. A kill at any moment leaves at most records without entries or a torn entry, which readers
ignore and the next writer cuts.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from .format import BankBusyError, _Lock

LAZY_MEM, LAZY_IDX = "lazy.bin", "lazy.idx"
LAZY_VEC, LAZY_VEC_IDX = "lazyvec.bin", "lazyvec.idx"
LAZY_FILES = (LAZY_MEM, LAZY_IDX, LAZY_VEC, LAZY_VEC_IDX)
VECTOR_FIELD = "v"
ENTRY = np.dtype([("ref", "<u4"), ("crc", "<u4"), ("check", "<u4"), ("pad", "<u4")])


def _entry_check(ref: np.ndarray, crc: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """crc32 of each entry's (ref, crc, slot) as three little-endian uint32."""
    packed = np.stack([ref, crc, slot], axis=1).astype("<u4")
    return np.array([zlib.crc32(row.tobytes()) for row in packed], np.uint32)


def record_crcs(recs: np.ndarray) -> np.ndarray:
    """crc32 of each record's bytes (padding included), as checks.bin and lazy.idx store them."""
    raw = recs.tobytes()
    n = recs.dtype.itemsize
    return np.array([zlib.crc32(raw[i * n:(i + 1) * n]) for i in range(len(recs))], np.uint32)


def vector_dtype(dim: int) -> np.dtype:
    """The record of one lazily computed sentence vector."""
    return np.dtype([(VECTOR_FIELD, "<f4", (dim,))])


class LazyRecords:
    """The records a lazy bank computed so far (memories, or sentence vectors): which references have one,
    reading them, appending new ones. `files`: (records, entries), LAZY_MEM/LAZY_IDX or LAZY_VEC/LAZY_VEC_IDX."""

    def __init__(self, path: Path, rec_dtype: np.dtype, count: int, files: tuple[str, str] = (LAZY_MEM, LAZY_IDX)):
        self.path = Path(path)
        self.rec = rec_dtype
        self.files = files
        self.slot = np.full(count, -1, np.int64)  # record of each reference, -1: none
        self.crc = np.zeros(count, np.uint32)
        self.ref_of = np.zeros(0, np.int64)  # reference of each slot read so far, -1: a bad entry
        self.crc_of = np.zeros(0, np.uint32)  # the crc32 each slot's entry gives its record
        self._ok = np.zeros(0, bool)  # slots whose record `current` checked against its crc32, and the verdict
        self.n = 0  # entries read so far
        self._mem: np.ndarray | None = None
        self.refresh()

    def grow(self, count: int) -> None:
        """The bank now holds `count` references (an add committed): entries for them become usable."""
        old = len(self.slot)
        if count > old:
            self.slot = np.concatenate([self.slot, np.full(count - old, -1, np.int64)])
            self.crc = np.concatenate([self.crc, np.zeros(count - old, np.uint32)])
            self.n = 0  # entries skipped as beyond the bank may now count
            self.ref_of, self.crc_of, self._ok = np.zeros(0, np.int64), np.zeros(0, np.uint32), np.zeros(0, bool)
            self.refresh()

    def refresh(self) -> None:
        """Read the entries appended since the last call (by this or another process)."""
        fp = self.path / self.files[1]
        try:
            n = fp.stat().st_size // ENTRY.itemsize
            have = (self.path / self.files[0]).stat().st_size // self.rec.itemsize
        except OSError:
            return
        n = min(n, have)  # an entry whose record is not (or no longer) on disk is not used
        if n <= self.n:
            return
        e = np.fromfile(fp, ENTRY, count=n - self.n, offset=self.n * ENTRY.itemsize)
        slots = np.arange(self.n, self.n + len(e), dtype=np.int64)
        ok = (e["ref"] < len(self.slot)) & (e["check"] == _entry_check(e["ref"], e["crc"], slots))
        r = e["ref"][ok].astype(np.int64)
        self.ref_of = np.concatenate([self.ref_of, np.where(ok, e["ref"].astype(np.int64), -1)])
        self.crc_of = np.concatenate([self.crc_of, e["crc"].astype(np.uint32)])
        self.slot[r] = slots[ok]  # in order: a later entry of a reference replaces an earlier one
        self.crc[r] = e["crc"][ok]
        self.n = n
        self._mem = None

    @property
    def encoded(self) -> int:
        return int((self.slot >= 0).sum())

    def has(self, ids: np.ndarray) -> np.ndarray:
        return self.slot[ids] >= 0

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Records of references `ids` (zeros where missing) and a mask of those that are good (present and
        matching their crc32). Missing ones are looked for again in entries other processes appended since."""
        if not np.all(self.has(ids)):
            self.refresh()
        out = np.zeros(len(ids), self.rec)
        good = np.zeros(len(ids), bool)
        self._map()
        for j, i in enumerate(ids.tolist()):
            s = int(self.slot[i])
            if s < 0:
                continue
            one = self._mem[s:s + 1]
            if zlib.crc32(memoryview(np.ascontiguousarray(one)).cast("B")) == int(self.crc[i]):
                out[j] = one[0]
                good[j] = True
        return out, good

    def _map(self) -> np.ndarray | None:
        if self.n and self._mem is None:
            self._mem = np.memmap(self.path / self.files[0], dtype=self.rec, mode="r", shape=(self.n,))
        return self._mem

    def current(self) -> tuple[np.ndarray, np.ndarray]:
        """All records read so far (memory-mapped) and, per slot, its reference where the slot is the reference's
        current record and matches its crc32 (each slot checked once), else -1 (an older, bad or damaged one)."""
        self.refresh()
        mem = self._map()
        if mem is None:
            return np.zeros(0, self.rec), np.zeros(0, np.int64)
        step = max(1, (64 << 20) // self.rec.itemsize)  # records checked at a time: ~64 MiB
        for s in range(len(self._ok), self.n, step):  # slots new since the last call
            e = min(self.n, s + step)
            self._ok = np.concatenate([self._ok, record_crcs(np.ascontiguousarray(mem[s:e])) == self.crc_of[s:e]])
        ref = self.ref_of.copy()
        ok = (ref >= 0) & self._ok
        ok[ok] = self.slot[ref[ok]] == np.flatnonzero(ok)
        ref[~ok] = -1
        return mem, ref

    def damaged(self) -> np.ndarray:
        """References whose record in lazy.bin fails its crc32 (they count as not encoded)."""
        self.refresh()
        ids = np.flatnonzero(self.slot >= 0)
        bad = []
        for s in range(0, len(ids), 4096):
            _, good = self.read(ids[s:s + 4096])
            bad.extend(ids[s:s + 4096][~good].tolist())
        return np.array(bad, np.int64)

    def append(self, ids: np.ndarray, recs: np.ndarray, locked: bool = False) -> bool:
        """Persist records `recs` of references `ids`; False (nothing written) when another process holds the
        bank's writer lock or the folder is read-only. `locked`: the caller holds the lock."""
        lock = None
        try:
            if not locked:
                lock = _Lock(self.path)
            self._append_locked(np.asarray(ids, np.int64), recs)
        except (BankBusyError, PermissionError, OSError):
            if locked:
                raise
            return False
        finally:
            if lock is not None:
                lock.release()
        self.refresh()
        return True

    def _append_locked(self, ids: np.ndarray, recs: np.ndarray) -> None:
        mem_p, idx_p = self.path / self.files[0], self.path / self.files[1]
        with open(mem_p, "ab+") as fm, open(idx_p, "ab+") as fi:
            n = min(os.fstat(fi.fileno()).st_size // ENTRY.itemsize,
                    os.fstat(fm.fileno()).st_size // self.rec.itemsize)
            fm.truncate(n * self.rec.itemsize)  # records without entries, left by a killed writer
            fi.truncate(n * ENTRY.itemsize)  # a torn entry
            fm.write(recs.tobytes())
            fm.flush()
            os.fsync(fm.fileno())
            e = np.zeros(len(ids), ENTRY)
            e["ref"] = ids
            e["crc"] = record_crcs(recs)
            e["check"] = _entry_check(e["ref"], e["crc"], np.arange(n, n + len(ids)))
            fi.write(e.tobytes())
            fi.flush()
            os.fsync(fi.fileno())


def remove_lazy_files(path: Path) -> None:
    """Drop the lazy records of a bank that is being created in a folder (a stale cache)."""
    for name in LAZY_FILES:
        try:
            os.unlink(Path(path) / name)
        except FileNotFoundError:
            pass
