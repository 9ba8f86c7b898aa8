"""Retrieval: which references of a bank answer a text.

Three retrievers over the same bank, chosen with `--retriever`:
  lexical  exact BM25 over the references' words (`m3lite.lexical`; the index is stored in the bank)
  dense    cosine similarity of sentence embeddings (`m3lite.embedder`, the bank's embedder) over HNSW
  hybrid   reciprocal-rank fusion of the two (the default): score = sum over retrievers of 1 / (RRF_K + rank),
           over each retriever's best POOL references, keeping those that one search found relevant by itself
           (`relevant`). Lexical search finds names and rare words; dense search finds paraphrases that share no
           word with the reference.

`BM25` is the same index over token ids: the trainer retrieves with it at data-preparation time.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

from .errors import BadArgument
from .lexical import TermIndex, top

N_SPECIAL = 5  # ids 0..4 of models trained here: <unk> <s> </s> <pad> <ref>
RETRIEVERS = ("hybrid", "lexical", "dense")
RRF_K = 5  # measured: 5 beat 20 and 60 on both held-out sets (see README)
POOL = 40  # candidates each retriever brings to the fusion
MIN_COSINE = 0.25  # hybrid keeps a reference whose embedding is at least this similar to the question's...
LEX_SHARE = 0.3  # ...or whose BM25 score is at least this share of the best one


def check_retriever(name: str) -> str:
    if name not in RETRIEVERS:
        raise BadArgument(f"unknown retriever {name!r}; choose one of {', '.join(RETRIEVERS)}")
    return name


class BM25(TermIndex):
    """Okapi BM25 over documents given as token ids (ids 0..4, the specials of models trained here, weigh
    nothing). The trainer's retrieval at data-preparation time."""

    def __init__(self, documents: Sequence[Sequence[int]], vocab_size: int | None = None):
        lengths = np.array([len(d) for d in documents], np.int64)
        flat = (np.concatenate([np.asarray(d, np.int64) for d in documents]) if len(documents)
                else np.zeros(0, np.int64))
        self._from(flat, lengths)

    def _from(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        ix = TermIndex.build(np.asarray(flat, np.int64).astype(np.uint64), lengths, ignore=range(N_SPECIAL))
        TermIndex.__init__(self, **ix.arrays(), ignore=range(N_SPECIAL))

    @classmethod
    def from_references(cls, ids: np.ndarray, n_tokens: np.ndarray, vocab_size: int | None = None) -> "BM25":
        """References given as one token array `ids` (reference i: its n_tokens[i] ids after reference i - 1's,
        <ref> first); each reference's <ref> is dropped."""
        self = cls.__new__(cls)
        ids, n_tokens = np.asarray(ids, np.int64), np.asarray(n_tokens, np.int64)
        keep = np.ones(len(ids), bool)
        keep[(np.cumsum(n_tokens) - n_tokens)[n_tokens > 0]] = False
        self._from(ids[keep], np.maximum(n_tokens - 1, 0))
        return self

    def scores(self, query: Sequence[int]) -> np.ndarray:  # type: ignore[override]
        q = np.asarray(query, np.int64)
        return super().scores(q[q >= 0].astype(np.uint64))

    def ranked(self, query: Sequence[int], n_best: int) -> np.ndarray:
        """Up to `n_best` documents with a positive score, best first (equal scores: lower index first)."""
        return top(self.scores(query), n_best)[0]


def bank_embedder(bank):
    """The sentence embedder a bank's vectors were made with (pulled on first use); BankError if this m3lite's
    embedder is another."""
    from .bank import BankError
    from .embedder import default_embedder

    e = default_embedder()
    made = bank.manifest.get("meta", {}).get("embedder")
    if made != e.fingerprint or bank.embed_dim != e.dim:
        raise BankError(f"bank {bank.path} was built with the embedder {made!r}; this m3lite embeds with "
                        f"{e.fingerprint!r}: rebuild the bank")
    return e


def relevant(fused: list[tuple[int, float]], lex: list[tuple[int, float]],
             dense: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The fused references that either search found relevant in itself: a sentence similarity of at least
    MIN_COSINE, or a BM25 score of at least LEX_SHARE of the best one; best first. Rank fusion alone would hand
    a small model every reference of a small bank, related or not, and unrelated notes derail its answers."""
    cos = dict(dense)
    bm = dict(lex)
    best = max(bm.values(), default=0.0)
    keep = [(i, s) for i, s in fused if cos.get(i, -1.0) >= MIN_COSINE or (best > 0 and bm.get(i, 0.0) >= LEX_SHARE * best)]
    # equal fused scores (first in one search and second in the other, say) are ordered by the searches' own
    # scores, sentence similarity plus the share of the best BM25 score: measured on the 1,100 paraphrased
    # questions over wiki:en, the right article came first for 69.5% instead of 67.5% (by lower id)
    own = {i: max(cos.get(i, 0.0), 0.0) + (bm.get(i, 0.0) / best if best > 0 else 0.0) for i, _ in keep}
    return sorted(keep, key=lambda x: (-round(x[1], 12), -own[x[0]], x[0]))


def fuse(rankings: Sequence[Sequence[int]], k: int) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: the best `k` of the ids in `rankings` (each best first) as (id, score)."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for r, i in enumerate(ranking):
            score[int(i)] = score.get(int(i), 0.0) + 1.0 / (RRF_K + r + 1)
    return sorted(score.items(), key=lambda x: (-x[1], x[0]))[:k]


class Retriever:
    """Search one bank with one retriever (see the module docstring). `embedder` (dense, hybrid) turns texts
    into the vectors the bank's were made with; without one, the bank's own is loaded."""

    def __init__(self, bank, kind: str = "hybrid", embedder=None):
        self.bank = bank
        self.kind = check_retriever(kind)
        self.embedder = embedder
        if self.kind != "lexical" and self.embedder is None:
            self.embedder = bank_embedder(bank)

    def warm(self) -> None:
        """Pay the one-time costs (index loads, the embedder's first run) now, not in the first answer."""
        if self.bank.live_count:
            self.search("warm up", 1)

    def search(self, text: str, k: int, skip: Iterable[int] = ()) -> list[tuple[int, float]]:
        """The best `k` live references for `text`, best first, as (id, score), leaving out the ids in `skip`."""
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise BadArgument(f"k must be a positive integer, got {k!r}")
        skip = {int(i) for i in skip}
        if not text.strip() or not self.bank.live_count:
            return []
        n = k if self.kind != "hybrid" else max(k, POOL)
        lex = dense = None
        if self.kind != "dense":
            ids, sc = self.bank.lexical_search(text, n, skip)
            lex = list(zip(ids.tolist(), sc.tolist()))
        if self.kind != "lexical":
            v = self.embedder([text], exact=False)[0]
            if np.any(v):
                ids, sc = self.bank.search(v, min(n + len(skip), self.bank.live_count))
                if lex and self.bank.lazy_vectors:
                    ids, sc = self._with_word_hits(v, [i for i, _ in lex], ids, sc)
                dense = [(i, s) for i, s in zip(ids.tolist(), sc.tolist()) if i not in skip][:n]
            else:
                dense = []
        if self.kind == "lexical":
            return lex[:k]
        if self.kind == "dense":
            return dense[:k]
        return relevant(fuse([[i for i, _ in lex], [i for i, _ in dense]], len(lex) + len(dense)), lex, dense)[:k]

    def _with_word_hits(self, v: np.ndarray, lex_ids: list[int], ids: np.ndarray, sc: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """A bank with lazy vectors (m3lite.bank.lazy): the word search's candidates get their sentence vectors
        now (kept in the bank), so fusion knows their similarity before the bank has every vector; merged into
        the dense results (ids, sc), best first."""
        lid = np.array(lex_ids, np.int64)
        cs = self.bank.vectors(lid, embed_fn=self.embedder) @ (v / max(float(np.linalg.norm(v)), 1e-30))
        best: dict[int, float] = dict(zip(ids.tolist(), sc.tolist()))
        for i, s in zip(lid.tolist(), cs.tolist()):
            best[i] = max(best.get(i, -2.0), float(s))
        order = sorted(best.items(), key=lambda x: (-x[1], x[0]))
        return np.array([i for i, _ in order], np.int64), np.array([s for _, s in order], np.float32)


class MemoryCache:
    """Recently used memories, dequantized (neighbouring chunks often retrieve the same references).
    `encode_fn` encodes the memories a lazy bank does not have yet (see Bank.memories)."""

    def __init__(self, bank, capacity: int = 256, encode_fn=None):
        self.bank = bank
        self.encode_fn = encode_fn
        self.capacity = capacity
        self._d: OrderedDict[int, tuple] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, ids: Sequence[int]) -> list[tuple]:
        missing = [int(i) for i in ids if int(i) not in self._d]
        if missing:
            k, v, pos, cnt = self.bank.memories(missing, self.encode_fn)
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
