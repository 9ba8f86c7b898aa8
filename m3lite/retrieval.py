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


class BM25:
    """Okapi BM25 (k1 1.2, b 0.75) over documents given as token ids, exact (an inverted index of precomputed
    term weights, every posting scored). IDF is m3lite.retrieval's, the bank embedder's formula
    log(1 + (N - df + 0.5) / (df + 0.5)), so specials and tokens absent from every document weigh nothing. A
    query is its set of distinct tokens (a repeated word counts once). A bank's text search (`Bank.lexical_search`),
    the baseline of `m3lite eval` and the trainer's retrieval at data-preparation time."""

    def __init__(self, documents: Sequence[Sequence[int]], vocab_size: int, k1: float = 1.2, b: float = 0.75):
        lengths = np.array([len(d) for d in documents], np.int64)
        flat = (np.concatenate([np.asarray(d, np.int64) for d in documents]) if len(documents)
                else np.zeros(0, np.int64))
        self._build(flat, lengths, vocab_size, k1, b)

    @classmethod
    def from_references(cls, ids: np.ndarray, n_tokens: np.ndarray, vocab_size: int | None = None,
                        k1: float = 1.2, b: float = 0.75) -> "BM25":
        """References given as one token array `ids` (reference i: its n_tokens[i] ids after reference i - 1's,
        <ref> first); each reference's <ref> is dropped. The vocabulary defaults to the largest id + 1."""
        self = cls.__new__(cls)
        ids, n_tokens = np.asarray(ids, np.int64), np.asarray(n_tokens, np.int64)
        keep = np.ones(len(ids), bool)
        keep[(np.cumsum(n_tokens) - n_tokens)[n_tokens > 0]] = False
        V = vocab_size if vocab_size is not None else (int(ids.max()) + 1 if ids.size else 1)
        self._build(ids[keep], np.maximum(n_tokens - 1, 0), V, k1, b)
        return self

    def _build(self, flat: np.ndarray, lengths: np.ndarray, vocab_size: int, k1: float, b: float) -> None:
        """Documents as one token array `flat` and their `lengths` (document i follows document i - 1)."""
        self.n = n = len(lengths)
        self.vocab_size = V = vocab_size
        flat = np.asarray(flat, np.int64)
        docs = np.repeat(np.arange(n, dtype=np.int64), lengths)
        ok = (flat >= 0) & (flat < V)
        keys, tf = np.unique(docs[ok] * V + flat[ok], return_counts=True)
        d, t = keys // V, keys % V
        df = np.bincount(t, minlength=V)
        self.idf = idf_from_counts(df, n)
        avg = max(float(lengths.mean()) if n else 1.0, 1.0)
        w = self.idf[t] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[d] / avg))
        order = np.argsort(t, kind="stable")
        self.post_doc = d[order].astype(np.int64)
        self.post_w = w[order].astype(np.float64)
        self.indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)

    def scores(self, query: Sequence[int]) -> np.ndarray:
        """The BM25 score of every document for `query` [n] (float64)."""
        q = np.asarray(query, np.int64)
        u = np.unique(q[(q >= 0) & (q < self.vocab_size)])
        u = u[self.idf[u] > 0]
        starts, ends = self.indptr[u], self.indptr[u + 1]
        lens = ends - starts
        if lens.sum() == 0:
            return np.zeros(self.n)
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        return np.bincount(self.post_doc[idx], weights=self.post_w[idx], minlength=self.n)

    def ranked(self, query: Sequence[int], n_best: int) -> np.ndarray:
        """Up to `n_best` documents with a positive score, best first (equal scores: lower index first)."""
        s = self.scores(query)
        cand = np.flatnonzero(s > 0)
        if len(cand) > n_best:
            cut = np.partition(s[cand], len(cand) - n_best)[len(cand) - n_best]
            cand = cand[s[cand] >= cut]
        return cand[np.lexsort((cand, -s[cand]))][:n_best]


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
