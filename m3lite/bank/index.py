"""The bank's two indexes: HNSW over the sentence vectors (hnswlib) and the word index (m3lite.lexical) built
from the stored terms; what a reference is indexed by."""
from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..lexical import TermIndex
from ..modelfile import atomic_path
from .format import (BankError, CHECKS, CHECK_DTYPE, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, REFS, REF_DTYPE,
                     TERMS, _hash_prefix, _map)


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
        with atomic_path(path) as tmp:
            self.index.save_index(str(tmp))
            size = os.path.getsize(tmp)
            sha = _hash_prefix(tmp, size).hexdigest()
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
