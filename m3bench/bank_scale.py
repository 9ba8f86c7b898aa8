"""`m3lite bench --bank-scale N`: a bank of N synthetic references with the default model's memory shape, written
once into the cache, then measured in a fresh process: open time, lexical/dense/hybrid search p50 and p99, the
fetch of 5 memories, RSS after open and after the queries, disk bytes.

The references are made up (words drawn from a Zipf law over a synthetic vocabulary, ~45 per reference, token ids
at random, sentence vectors around 2,000 centres), so that sizes and access patterns are a real bank's: ten
references per document, ~250 bytes of text and 64 tokens each, 384-dimensional vectors. The bank is lazy, as
`m3lite bank build` makes it: only ENCODED references have a memory (random records of the right size), because
N memories of the default model would not fit a laptop's disk (202 KB each in int4); memory fetches read those.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from m3lite.bank import Bank
from m3lite.modelfile import atomic_write_bytes, cache_dir
from m3lite.sources import Document

# the default model's memory (SmolLM2-135M with its memory adapter: every layer, 32 tokens per KV head) and bank
SHAPE = (30, 3, 32, 64)
QUANT = "int4"
DIM = 384
REFS_PER_DOC = 10
TOKENS = 64
VOCAB = 50_000
CENTRES = 2_000
ENCODED = 2_000
QUERIES = 1_000
SEED = 1234


class _Ref:
    __slots__ = ("text", "ids", "title", "char_start", "char_end")

    def __init__(self, text, ids, title, start):
        self.text, self.ids, self.title = text, ids, title
        self.char_start, self.char_end = start, start + len(text)


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.minimum(rng.zipf(1.2, n), VOCAB) - 1


def _word(i: int) -> str:
    """A made-up word for vocabulary index i (letters from its digits in base 20)."""
    s = ""
    i += 20
    while i:
        i, r = divmod(i, 20)
        s += "bcdfghjklmnpqrstvwxz"[r] + "aeiou"[r % 5]
    return s


class _Synthetic:
    """Deterministic documents, their references and vectors (the same bank every time for a given N)."""

    def __init__(self, n_refs: int):
        self.n_docs = -(-n_refs // REFS_PER_DOC)
        self.n_refs = n_refs
        self.rng = np.random.default_rng(SEED)
        self.centres = self.rng.standard_normal((CENTRES, DIM)).astype(np.float32)
        self.vocab = [_word(i) for i in range(VOCAB)]

    def documents(self):
        for d in range(self.n_docs):
            yield Document(f"synthetic/{d}", f"Document {d}", f"synthetic document {d}", "bench")

    def references(self, doc: Document) -> list:
        d = int(doc.id.split("/")[1])
        r = np.random.default_rng([SEED, d])
        n = min(REFS_PER_DOC, self.n_refs - d * REFS_PER_DOC)
        out, start = [], 0
        for _ in range(n):
            words = _words(r, int(r.integers(30, 60)))
            text = " ".join(self.vocab[w] for w in words) + "."
            ids = [4] + r.integers(5, 49152, TOKENS - 1).tolist()
            out.append(_Ref(text, ids, doc.title, start))
            start += len(text) + 1
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        c = self.centres[[hash_text(t) % CENTRES for t in texts]]
        return c + 0.3 * self.rng.standard_normal(c.shape).astype(np.float32)


def hash_text(t: str) -> int:
    return zlib.crc32(t.encode())


def bank_path(n: int) -> Path:
    return cache_dir() / "bench" / "banks" / f"scale-{n}"


def ensure_bank(n: int, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """The synthetic bank of n references, built into the cache the first time (a marker says it is complete;
    an interrupted build resumes at its last commit)."""
    path = bank_path(n)
    done = path.with_name(path.name + ".complete")
    if done.is_file() and Bank.exists(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    syn = _Synthetic(n)
    b = Bank.create(path, "synthetic-bank-scale", SHAPE, quant=QUANT, embed_dim=DIM, lazy=True, exist_ok=True,
                    meta={"embedder": "synthetic", "n_layers": SHAPE[0]})

    def prog(st):
        if progress:
            progress(st["count"], n, "writing the synthetic bank")

    b.add(syn.documents(), None, syn.embed, None, batch=4096, commit_every=max(100_000, n // 5),
          commit_seconds=1e9, progress=prog, chunker=syn.references)
    have = b.encoded_count
    if have < min(ENCODED, n):  # memories for some references: random records of the bank's size
        r = np.random.default_rng(SEED + 1)
        ids = np.sort(r.choice(n, min(ENCODED, n), replace=False))
        recs = np.zeros(len(ids), b.rec_dtype)
        raw = recs.view(np.uint8).reshape(len(ids), -1)
        raw[:] = r.integers(0, 256, raw.shape, dtype=np.uint8)
        for f in ("k_scale", "v_scale"):
            recs[f] = 0.01
        recs["count"] = SHAPE[2]
        recs["pos"] = np.arange(1, SHAPE[2] + 1, dtype=np.int16)
        for s in range(0, len(ids), 256):
            b._lazy.append(ids[s:s + 256], recs[s:s + 256])
    atomic_write_bytes(done, b"synthetic\n")
    return path


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or a part of it: RssAnon (its own) or RssFile (mapped files: the
    bank's pages the kernel may drop at any time)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def measure(path: Path) -> dict:
    """The figures, in this process (run it in a fresh one: RSS is the bank's and the interpreter's)."""
    from m3lite.retrieval import Retriever

    rss0 = _rss_mb()
    opens = []
    for _ in range(5):
        t0 = time.perf_counter()
        b = Bank.open(path)
        opens.append(time.perf_counter() - t0)
    rss_open = _rss_mb()
    n = b.count
    syn = _Synthetic(min(n, REFS_PER_DOC))  # its centres and vocabulary, not its references
    r = np.random.default_rng(SEED + 2)
    queries = [" ".join(syn.vocab[w] for w in _words(r, 3)) for _ in range(QUERIES)]
    t0 = time.perf_counter()
    b.lexical_search(queries[0], 5)
    lex_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    b.search(syn.centres[0], 5)
    dense_load = time.perf_counter() - t0
    lex, dense, hybrid, fetch = [], [], [], []
    ret = Retriever(b, "hybrid", embedder=lambda texts, exact=False: syn.embed(list(texts)))
    encoded = np.flatnonzero(b._lazy.slot >= 0)
    for i, q in enumerate(queries):
        v = syn.embed([q])[0]
        t0 = time.perf_counter()
        b.lexical_search(q, 5)
        t1 = time.perf_counter()
        b.search(v, 5)
        t2 = time.perf_counter()
        ret.search(q, 5)
        t3 = time.perf_counter()
        lex.append(t1 - t0)
        dense.append(t2 - t1)
        hybrid.append(t3 - t2)
        if len(encoded) >= 5 and i < 200:
            ids = r.choice(encoded, 5, replace=False)
            t0 = time.perf_counter()
            b.memories(ids)
            fetch.append(time.perf_counter() - t0)
    return {
        "references": n, "documents": len(b.docs), "memories": b.encoded_count,
        "memory_shape": list(SHAPE), "quant": QUANT, "record_bytes": b.rec_dtype.itemsize,
        "disk_bytes": b.disk_bytes(),
        "open_ms": round(float(np.median(opens)) * 1000, 2), "first_open_ms": round(opens[0] * 1000, 2),
        "lexical_index_load_s": round(lex_load, 3), "dense_index_load_s": round(dense_load, 3),
        "lexical": _pct(lex), "dense": _pct(dense), "hybrid": _pct(hybrid),
        "fetch_5_memories": _pct(fetch) if fetch else None,
        "rss_python_mb": round(rss0, 1), "rss_after_open_mb": round(rss_open, 1),
        "rss_after_queries_mb": round(_rss_mb(), 1), "rss_anon_after_queries_mb": round(_rss_mb("RssAnon"), 1),
        "rss_file_after_queries_mb": round(_rss_mb("RssFile"), 1), "queries": QUERIES,
        "note": "hybrid and dense take the query vector from a synthetic embedder; a real query adds the "
                "sentence embedder's time (query_embed_ms, measured apart when the embedder is installed)",
    }


def query_embed_ms() -> float | None:
    """Median time of the sentence embedder on one short query, or None when it is not installed."""
    try:
        from m3lite.embedder import default_embedder, default_embedder_ready

        if not default_embedder_ready():
            return None
        e = default_embedder()
    except Exception:
        return None
    e(["warm up"], exact=False)
    ts = []
    for q in ("what is the capital of france", "when was the eiffel tower built", "who wrote hamlet") * 10:
        t0 = time.perf_counter()
        e([q], exact=False)
        ts.append(time.perf_counter() - t0)
    return round(float(np.median(ts)) * 1000, 2)


def run_bank_scale(n: int, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Build (once) and measure the n-reference bank; the measuring runs in a fresh process."""
    if not isinstance(n, int) or n < 1:
        raise ValueError("the bank scale must be a positive number of references")
    t0 = time.monotonic()
    path = ensure_bank(n, progress)
    built_s = time.monotonic() - t0
    if progress:
        progress(0, 1, "measuring")
    p = subprocess.run([sys.executable, "-m", "m3bench.bank_scale", str(path)], capture_output=True, text=True,
                       env=dict(os.environ))
    if p.returncode != 0:
        raise RuntimeError(f"measuring the bank failed: {p.stderr.strip().splitlines()[-1] if p.stderr else ''}")
    res = json.loads(p.stdout)
    res["bank"] = str(path)
    res["build_s_this_run"] = round(built_s, 1)
    res["query_embed_ms"] = query_embed_ms()
    return res


def markdown(res: dict) -> str:
    f = res["fetch_5_memories"] or {"p50_ms": "-", "p99_ms": "-"}
    rows = [
        ("references / documents", f"{res['references']:,} / {res['documents']:,}"),
        ("disk", f"{res['disk_bytes'] / 1e9:.2f} GB ({res['memories']:,} memories of {res['record_bytes']:,} B)"),
        ("open (median of 5 / first)", f"{res['open_ms']} / {res['first_open_ms']} ms"),
        ("first lexical / dense search (index load)", f"{res['lexical_index_load_s']} / {res['dense_index_load_s']} s"),
        ("lexical search p50 / p99", f"{res['lexical']['p50_ms']} / {res['lexical']['p99_ms']} ms"),
        ("dense search p50 / p99", f"{res['dense']['p50_ms']} / {res['dense']['p99_ms']} ms"),
        ("hybrid search p50 / p99", f"{res['hybrid']['p50_ms']} / {res['hybrid']['p99_ms']} ms"),
        ("query embedding (MiniLM, one query)", f"{res['query_embed_ms']} ms" if res.get("query_embed_ms") else "-"),
        ("fetch 5 memories p50 / p99", f"{f['p50_ms']} / {f['p99_ms']} ms"),
        ("RSS: Python / after open / after queries",
         f"{res['rss_python_mb']} / {res['rss_after_open_mb']} / {res['rss_after_queries_mb']} MB"),
        ("RSS after queries: own / mapped bank pages",
         f"{res['rss_anon_after_queries_mb']} / {res['rss_file_after_queries_mb']} MB"),
    ]
    out = "| bank scale | |\n|---|---:|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
    return out


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]))))
