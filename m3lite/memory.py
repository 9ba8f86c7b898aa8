"""Explicit memory at run time: encode references into memories, build banks, and put retrieved memories
in front of the context while a model reads and writes (the Memory3 schedule).

Modes, all with the same retrieval (`m3lite.retrieval`: hybrid BM25 + sentence embeddings by default):
  memory  each `retrieval_interval`-token chunk of the prompt, and every `retrieval_interval` generated tokens,
          retrieves `retrieval_top_k` references; their memories (plus the <ref> key/value) are attended at
          the memory layers. Context positions start after the memories' shared interval [0, 128).
  rag     the same references' text is placed in the prompt (the baseline Memory3 is measured against)
  none    the plain model
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .bank import Bank, BankError
from .errors import BadArgument
from .retrieval import MemoryCache, Retriever, bank_embedder, check_retriever
from .sources import Document, chunk_document, iter_documents

MODES = ("memory", "rag", "none")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BadArgument(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


# ------------------------------------------------------------------------------------------------ banks

def open_bank(path, model) -> Bank:
    p = Path(path)
    if not Bank.exists(p):
        raise BankError(f"no bank at {p}: build one with `m3lite bank build SOURCE --out {p}`")
    return Bank.open(p, fingerprint=model.fingerprint)


def collect_documents(sources: Sequence[str | Document], warn: Callable[[str], None]) -> list[Document]:
    """The documents of `sources`: source strings (see `iter_documents`) or Document objects, taken as they are."""
    docs: list[Document] = []
    for s in sources:
        if isinstance(s, Document):
            docs.append(s)
        else:
            docs.extend(iter_documents(s, on_warning=warn))
    return docs


ENCODE = ("lazy", "all")
VECTORS = ("now", "lazy")  # when a reference's sentence vector is computed (see build_or_add)
LAZY_BATCH = 512  # references embedded at a time by a lazy build


def build_or_add(model, bank_path, sources: Sequence[str | Document], quant: str = "int8", create: bool = True,
                 warn: Callable[[str], None] = print, progress: Callable[[dict, int], None] | None = None,
                 encode: str = "all", encode_progress: Callable[[dict], None] | None = None,
                 vectors: str = "now") -> dict:
    """Add the documents of `sources` (source strings or Document objects) to the bank at `bank_path`
    (created if `create`).

    Each reference is embedded by the sentence embedder (its vector), indexed by its words and encoded by the
    model (its memory). `encode`: "all" encodes every memory now; "lazy" creates a bank whose memories are
    encoded when retrieval first selects them (a bank that exists keeps its own way; "all" on a lazy bank
    then encodes what it lacks). `vectors`: "now" embeds each reference as it is added; "lazy" creates a bank
    whose sentence vectors are computed when a word search first finds a reference (or by `m3lite bank
    encode`): ready in seconds, dense search covering what has a vector. Documents already present (same
    content hash) are skipped, so rerunning an interrupted build resumes it. `progress(stats, total_references)` is called as references are added,
    `encode_progress(stats)` as memories are encoded by "all" on a lazy bank.
    """
    if encode not in ENCODE:
        raise BadArgument(f"encode must be one of {', '.join(ENCODE)}, got {encode!r}")
    if vectors not in VECTORS:
        raise BadArgument(f"vectors must be one of {', '.join(VECTORS)}, got {vectors!r}")
    cfg = model.config
    docs = collect_documents(sources, warn)
    if not docs:
        raise BadArgument(f"no documents found in {', '.join(s if isinstance(s, str) else s.id for s in sources)}")
    exists = Bank.exists(bank_path)
    if not exists and not create:
        raise BankError(f"no bank at {bank_path}: build one with `m3lite bank build SOURCE --out {bank_path}`")
    tok = model.tokenizer
    if exists:
        bank = open_bank(bank_path, model)
        embed = bank_embedder(bank)
    else:
        import sys

        from .embedder import default_embedder

        embed = default_embedder(say=lambda s: print(f"m3lite: {s}", file=sys.stderr))
        mem_shape = (len(cfg.memory_layer_ids), cfg.n_kv_heads, cfg.memory_tokens_per_head, cfg.hd)
        bank = Bank.create(bank_path, model.fingerprint, mem_shape, quant=quant, embed_dim=embed.dim,
                           meta={"n_layers": cfg.n_layers, "model": cfg.name, "embedder": embed.fingerprint},
                           lazy=encode == "lazy", lazy_vectors=vectors == "lazy")
    present = bank.live_hashes()
    todo = [d for d in docs if d.sha256 not in present]
    chunks = {d.sha256: chunk_document(d, tok, cfg.reference_max_tokens) for d in todo}  # cut once
    total = sum(len(c) for c in chunks.values())
    eng = model.engine("numba")
    cb = (lambda st: progress(st, total)) if progress is not None else None
    with model.generation_lock():
        # a lazy bank only embeds: larger batches let the embedder group references of one padded length
        stats = bank.add(todo, eng.encode_references, embed, tok, max_tokens=cfg.reference_max_tokens,
                         batch=LAZY_BATCH if bank.lazy else 64, progress=cb, chunker=lambda d: chunks[d.sha256])
        if bank.lazy and encode == "all":
            stats["encoded"] = bank.encode(eng.encode_references, progress=encode_progress)
    stats["skipped"] += len(docs) - len(todo)
    stats["lazy"] = bank.lazy
    stats["memories"] = bank.encoded_count
    stats["lazy_vectors"] = bank.lazy_vectors
    stats["vectors"] = bank.embedded_count
    stats["documents"] = len(docs)
    stats["bank"] = str(bank.path)
    return stats


# ------------------------------------------------------------------------------------------------ at run time

@dataclass
class Hit:
    id: int
    score: float
    mass: float = 0.0  # attention the generated tokens paid to this memory at the memory layers


@dataclass
class MemorySession:
    """Retrieval for one generation: chooses memories and installs them in the engine (memory mode)."""

    model: object
    bank: Bank
    mode: str = "memory"
    top_k: int | None = None
    retriever: "str | Retriever" = "hybrid"  # a name (see m3lite.retrieval), or a Retriever of this bank to share
    # what the prompt retrieves with: the user's question (`Model.ask`), never the template around it; None:
    # each retrieval_interval chunk of a raw prompt retrieves for itself (the paper's schedule)
    query: str | None = None
    cache: MemoryCache | None = None
    retrieval_s: float = 0.0
    attention_total: float = 0.0  # all attention mass at memory layers while memories were installed
    hits: dict[int, Hit] = field(default_factory=dict)  # every reference used, in order of first use
    _segments: list[tuple[int, int, int]] = field(default_factory=list)  # (ref id, first slot, end slot)
    _by_doc: tuple[list, dict[str, list[int]]] | None = field(default=None, repr=False)  # doc id -> ref ids

    def __post_init__(self):
        if isinstance(self.retriever, Retriever):
            self.search = self.retriever
        else:
            self.search = Retriever(self.bank, check_retriever(self.retriever))
            self.search.warm()  # one-time costs (index loads, the embedder) at open, not in the first answer
        self.k = self.top_k or self.model.config.retrieval_top_k
        if self.cache is None:
            # a lazy bank's memories not encoded yet are encoded by the model as they are first retrieved
            self.cache = MemoryCache(self.bank, encode_fn=lambda refs: self.model.engine("numba").encode_references(refs))
        if self.mode == "memory":
            self.model.engine("numba").ref_kv()

    def excluded(self, exclude: Iterable[int | str] | None) -> set[int]:
        """Reference ids named by `exclude`: bank reference ids (int) and document ids (str: all of that
        document's references, e.g. "wiki:en/Japan"; an id the bank does not hold names nothing)."""
        out: set[int] = set()
        for x in exclude or ():
            if isinstance(x, str):
                out.update(self._doc_references().get(x, ()))
            elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                out.add(int(x))
            else:
                raise BadArgument(f"exclude takes reference ids (int) or document ids (str), got {x!r}")
        return out

    def _doc_references(self) -> dict[str, list[int]]:
        docs = self.bank.docs  # a new list whenever the bank moves to another committed state
        if self._by_doc is None or self._by_doc[0] is not docs:
            by_doc: dict[str, list[int]] = {}
            for d in docs:
                by_doc.setdefault(d["id"], []).extend(range(d["first"], d["first"] + d["count"]))
            self._by_doc = (docs, by_doc)
        return self._by_doc[1]

    def retrieve(self, query: str | Sequence[int],
                 exclude: Iterable[int | str] | None = None) -> list[tuple[int, float]]:
        """The top-k references for `query` (text, or token ids: their text, specials left out), best first, as
        (id, score), leaving out those named by `exclude` (see `excluded`)."""
        t0 = time.perf_counter()
        if not isinstance(query, str):
            tok = self.model.tokenizer
            query = tok.decode([int(t) for t in query if not tok.is_special(int(t))])
        found = self.search.search(query, self.k, self.excluded(exclude))
        for i, s in found:
            if i not in self.hits:
                self.hits[i] = Hit(i, s)
            else:
                self.hits[i].score = max(self.hits[i].score, s)
        self.retrieval_s += time.perf_counter() - t0
        return found

    def fit(self, found: list[tuple[int, float]], render: Callable[[list[str]], object | None], context: int,
            notes: list[str]):
        """RAG: the most of the retrieved references `found` (best first) that fit the prompt. render(texts)
        gives what to prefill with those references' texts, or None when it does not fit the `context`. The
        references left out are removed from `found` and from those reported as used, and a note says so.
        Returns render's result for the references kept (None when even none fit)."""
        texts = [self.bank.reference(i)["text"] for i, _ in found]
        for n in range(len(found), -1, -1):
            got = render(texts[:n])
            if got is not None:
                break
        if n < len(found):
            notes.append(f"rag: {len(found) - n} of {len(found)} references left out: they do not fit the context "
                         f"({context} tokens)")
            for j, _ in found[n:]:
                self.hits.pop(j, None)
            del found[n:]
        return got

    def install(self, engine, token_ids: Sequence[int], exclude: Iterable[int | str] | None = None) -> None:
        """Retrieve for `token_ids` and put those memories in front of the context at the memory layers
        (`exclude`: references or documents not to retrieve, as in `retrieve`)."""
        self.collect_attention(engine)
        found = self.retrieve(token_ids, exclude)
        t0 = time.perf_counter()
        mems = self.cache.get([i for i, _ in found])
        ref_k, ref_v = engine.ref_kv()
        cfg = self.model.config
        segs = []
        for j, layer in enumerate(cfg.memory_layer_ids):
            ks, vs = [ref_k[j]], [ref_v[j]]
            slot = 1
            for (rid, _), (k, v, pos, cnt) in zip(found, mems):
                c = int(cnt[j].min())
                ks.append(k[j, :, :c])
                vs.append(v[j, :, :c])
                if j == 0:
                    segs.append((rid, slot, slot + c))
                slot += c
            engine.set_prefix(layer, np.concatenate(ks, axis=1), np.concatenate(vs, axis=1))
        self._segments = segs
        self.retrieval_s += time.perf_counter() - t0

    def collect_attention(self, engine) -> None:
        """Add the attention the decoded tokens paid to the current memories to their hits."""
        mass = engine.prefix_attention()  # [m] over the installed prefix slots, summed over layers/heads/steps
        if mass is None or not self._segments:
            return
        self.attention_total += engine.prefix_attention_total()
        for rid, a, b in self._segments:
            self.hits[rid].mass += float(mass[a:b].sum())
        engine.reset_prefix_attention()

    def finish(self, engine, result=None) -> None:
        """Call after generation: takes in the attention of the last memories installed; with a
        GenerationResult, puts the retrieval time and the references used (with their share of the memory
        attention) in it."""
        if self.mode == "memory":
            self.collect_attention(engine)
        if result is not None:
            result.retrieval_s = self.retrieval_s
            result.references = self.references()

    def references(self, attention: bool = True) -> list[dict]:
        out = []
        for h in self.hits.values():
            r = self.bank.reference(h.id)
            r["score"] = round(h.score, 4)
            if attention and self.mode == "memory":
                r["attention"] = round(h.mass / self.attention_total, 4) if self.attention_total > 0 else 0.0
            out.append(r)
        return out


def search_bank(model, bank: Bank, query: str, k: int = 5, retriever=None) -> list[dict]:
    """The `k` references of `bank` that best match `query`, best first, as ask, chat and serve retrieve them
    (`retriever`: a name of m3lite.retrieval.RETRIEVERS or a Retriever; default hybrid): dicts with id, doc_id,
    source, title, text and score. What `m3lite bank search` prints and the server's /v1/banks/search returns."""
    s = MemorySession(model, bank, mode="rag", top_k=k, retriever=retriever or "hybrid")
    s.retrieve(query)
    return s.references(attention=False)
