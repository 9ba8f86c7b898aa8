"""Memories encoded on first use (a lazy bank, `memory.lazy` in the manifest).

A lazy bank stores its references (text, tokens, words, vectors, both indexes) at once and no memories in
memories.bin. A reference's memory is encoded when retrieval first selects it (or by `Bank.encode`) and kept in
two append-only files outside the manifest:

    lazy.bin   memory records (the bank's record dtype), in the order they were encoded
    lazy.idx   one 16-byte entry per record of lazy.bin, in the same order: the reference, the crc32 of the
               record, and a crc32 over those two and the record's slot (a torn or garbled entry fails it)

They are a cache of what the model computes from the reference's tokens: a record that is missing, or fails its
crc32, is encoded again and appended (the last good entry of a reference wins), never served.

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
LAZY_FILES = (LAZY_MEM, LAZY_IDX)
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


class LazyMemories:
    """The encoded memories of a lazy bank: which references have one, reading them, appending new ones."""

    def __init__(self, path: Path, rec_dtype: np.dtype, count: int):
        self.path = Path(path)
        self.rec = rec_dtype
        self.slot = np.full(count, -1, np.int64)  # record of each reference in lazy.bin, -1: none
        self.crc = np.zeros(count, np.uint32)
        self.n = 0  # entries of lazy.idx read so far
        self._mem: np.ndarray | None = None
        self.refresh()

    def grow(self, count: int) -> None:
        """The bank now holds `count` references (an add committed): entries for them become usable."""
        old = len(self.slot)
        if count > old:
            self.slot = np.concatenate([self.slot, np.full(count - old, -1, np.int64)])
            self.crc = np.concatenate([self.crc, np.zeros(count - old, np.uint32)])
            self.n = 0  # entries skipped as beyond the bank may now count
            self.refresh()

    def refresh(self) -> None:
        """Read the entries appended since the last call (by this or another process)."""
        fp = self.path / LAZY_IDX
        try:
            n = fp.stat().st_size // ENTRY.itemsize
            have = (self.path / LAZY_MEM).stat().st_size // self.rec.itemsize
        except OSError:
            return
        n = min(n, have)  # an entry whose record is not (or no longer) on disk is not used
        if n <= self.n:
            return
        e = np.fromfile(fp, ENTRY, count=n - self.n, offset=self.n * ENTRY.itemsize)
        slots = np.arange(self.n, self.n + len(e), dtype=np.int64)
        ok = (e["ref"] < len(self.slot)) & (e["check"] == _entry_check(e["ref"], e["crc"], slots))
        r = e["ref"][ok].astype(np.int64)
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
        if self.n and self._mem is None:
            self._mem = np.memmap(self.path / LAZY_MEM, dtype=self.rec, mode="r", shape=(self.n,))
        for j, i in enumerate(ids.tolist()):
            s = int(self.slot[i])
            if s < 0:
                continue
            one = self._mem[s:s + 1]
            if zlib.crc32(memoryview(np.ascontiguousarray(one)).cast("B")) == int(self.crc[i]):
                out[j] = one[0]
                good[j] = True
        return out, good

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
        mem_p, idx_p = self.path / LAZY_MEM, self.path / LAZY_IDX
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
    """Drop the encoded memories of a bank that is being created in a folder (a stale cache)."""
    for name in LAZY_FILES:
        try:
            os.unlink(Path(path) / name)
        except FileNotFoundError:
            pass
