"""Retrieval: the model's own query embedder, search over a bank, and a cache of dequantized memories.

The embedder needs no second model: a text's vector is the IDF-weighted mean of the model's input
embeddings of its tokens (special tokens weigh nothing), L2-normalised, compared by cosine. The IDF is
the bank's (BM25's formula over the bank's references at build time), stored in the bank, so query and
references are embedded alike.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

N_SPECIAL = 5  # ids 0..4: <unk> <s> </s> <pad> <ref>


def idf_from_counts(df: np.ndarray, n_docs: int) -> np.ndarray:
    """BM25 IDF from document frequencies: log(1 + (N - df + 0.5) / (df + 0.5)).

    Specials and tokens absent from every reference get 0: they cannot match anything in the bank, and with
    the highest IDF they would drown a query (a prompt template's words, say) in noise."""
    df = np.asarray(df, np.float64)
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    idf[:N_SPECIAL] = 0.0
    idf[df == 0] = 0.0
    return idf


def document_frequencies(token_lists: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    df = np.zeros(vocab_size, np.int64)
    for ids in token_lists:
        u = np.unique(np.asarray(ids, np.int64))
        df[u[(u >= 0) & (u < vocab_size)]] += 1
    return df


class Embedder:
    """text tokens -> unit vector [dim]: IDF-weighted mean of the model's token embeddings."""

    def __init__(self, tok_embeddings: np.ndarray, idf: np.ndarray):
        self.emb = tok_embeddings
        self.idf = np.asarray(idf, np.float32)
        self.dim = tok_embeddings.shape[1]

    def __call__(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        out = np.zeros((len(token_lists), self.dim), np.float32)
        for r, ids in enumerate(token_lists):
            ids = np.asarray(ids, np.int64)
            if ids.size == 0:
                continue
            u, c = np.unique(ids, return_counts=True)
            w = self.idf[u] * c
            if w.sum() <= 0:
                continue
            v = w @ np.asarray(self.emb[u], np.float32)
            n = np.linalg.norm(v)
            if n > 0:
                out[r] = v / n
        return out


class MemoryCache:
    """Recently used memories, dequantized (neighbouring chunks often retrieve the same references)."""

    def __init__(self, bank, capacity: int = 256):
        self.bank = bank
        self.capacity = capacity
        self._d: OrderedDict[int, tuple] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, ids: Sequence[int]) -> list[tuple]:
        missing = [int(i) for i in ids if int(i) not in self._d]
        if missing:
            k, v, pos, cnt = self.bank.memories(missing)
            for j, i in enumerate(missing):
                self._d[i] = (k[j], v[j], pos[j], cnt[j])
        out = []
        for i in ids:
            i = int(i)
            self._d.move_to_end(i)
            out.append(self._d[i])
        self.misses += len(missing)
        self.hits += len(ids) - len(missing)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return out
