"""Training data for the two-stage trainer: corpora, the held-out split, QA samples, the training bank of
references, BM25 retrieval fixed at data-preparation time, the leakage filter, and batching.

Nothing here needs torch or a model: every array a training run reads is computed once from the corpus and the
tokenizer and cached as .npz (no pickle) under a work directory, keyed by everything that shapes it.

The held-out split: 10% of the Wikipedia articles, chosen by a stable hash of the title (`is_held_out`, defined in
m3lite.heldout with the QA samples, since `m3lite eval` needs them too). They never enter a training stage
(tokenizer training included: `training_tokenizer`); they form the evaluation bank (`wiki:en:heldout`).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3lite.errors import BadArgument
from m3lite.retrieval import BM25
from m3lite.heldout import QASample, is_held_out, qa_samples
from m3lite.chat_template import qa_prompt
from m3lite.modelfile import atomic_write_bytes, cache_dir, sha256_file
from m3lite.sources import Document, chunk_document, iter_documents, wiki_articles, wiki_file

from .tokenizer import BOS, EOS, N_SPECIAL, PAD, TRAINER_VERSION, corpus_at_hand, corpus_id, train_tokenizer

DATA_VERSION = 1  # bump when anything below changes what a cached array holds
LEAK_THRESHOLD = 0.9
DICTD_DIR = Path("/usr/share/dictd")
WORDNET_DIR = Path("/usr/share/wordnet")
DICTD_NAMES = ("gcide", "foldoc", "wn")  # Debian's dict-gcide, dict-foldoc, dict-wn
DEFAULT_CORPUS = ("wiki:en", "dict")
SPLITS = ("train", "heldout")


# ------------------------------------------------------------------------------------------- the split


def _in_split(title: str, split: str) -> bool:
    if split not in SPLITS:
        raise BadArgument(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return is_held_out(title) == (split == "heldout")


# ------------------------------------------------------------------------------------------- corpora


def split_articles(articles: dict[str, dict[str, str]], split: str,
                   max_docs: int | None = None) -> dict[str, dict[str, str]]:
    """The articles of one split ("train" or "heldout"), the first `max_docs` of them when given."""
    out = {t: a for t, a in articles.items() if _in_split(t, split)}
    if max_docs is not None:
        out = dict(list(out.items())[:max_docs])
    return out


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_DICT_NOISE = re.compile(r"\[(?:\d{4} Webster|PJC|WordNet[^\]]*|Century Dict\.|Webster \d{4})\]")


def _b64_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64[ch]
    return n


def _dictd_entries(index: Path, data: Path) -> Iterator[tuple[str, str]]:
    """(headword, definition text) of a dictd dictionary; a .dict.dz is dictzip, which gzip reads whole."""
    blob = gzip.decompress(data.read_bytes()) if data.suffix == ".dz" else data.read_bytes()
    seen: set[tuple[int, int]] = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        try:
            span = (_b64_number(parts[1]), _b64_number(parts[2]))
        except KeyError:
            continue
        if span in seen:  # alternate headwords share one definition
            continue
        seen.add(span)
        text = blob[span[0]:span[0] + span[1]].decode("utf-8", errors="replace")
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", _DICT_NOISE.sub("", text))]
        text = "\n\n".join(p for p in paras if p)
        if text:
            yield parts[0], text


def _wordnet_entries(folder: Path) -> Iterator[tuple[str, str]]:
    """(first lemma, "lemma, lemma: gloss") of each synset in WordNet's data.{noun,verb,adj,adv}."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = folder / f"data.{pos}"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:  # the licence header
                    continue
                head, gloss = line.rstrip("\n").split(" | ", 1)
                fields = head.split()
                try:
                    n = int(fields[3], 16)
                except (IndexError, ValueError):
                    continue
                words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n:2]]
                if words and gloss.strip():
                    yield words[0], f"{', '.join(words)}: {gloss.strip()}"


def _dictionary_files() -> list[tuple[str, Path, Path | None]]:
    found: list[tuple[str, Path, Path | None]] = []
    for name in DICTD_NAMES:
        index = DICTD_DIR / f"{name}.index"
        for data in (DICTD_DIR / f"{name}.dict.dz", DICTD_DIR / f"{name}.dict"):
            if index.is_file() and data.is_file():
                found.append((name, index, data))
                break
    if (WORDNET_DIR / "data.noun").is_file():
        found.append(("wordnet", WORDNET_DIR, None))
    return found


def dictionary_documents(max_chars: int = 4_000_000) -> list[Document]:
    """Entries of Debian's English dictionaries when installed (dict-gcide, dict-foldoc, dict-wn, wordnet-base;
    none: an empty list), up to about `max_chars` of text, chosen by a stable hash of the headword so that a
    budget takes a spread of the alphabet rather than its first letters."""
    entries: list[tuple[bytes, str, str, str]] = []
    for name, index, data in _dictionary_files():
        try:
            it = _wordnet_entries(index) if data is None else _dictd_entries(index, data)
            for word, text in it:
                key = hashlib.sha256(f"{name}/{word}/{text[:64]}".encode("utf-8", "replace")).digest()[:8]
                entries.append((key, name, word, text))
        except (OSError, EOFError, gzip.BadGzipFile):
            continue  # a broken install is the same as none: this text is extra
    entries.sort()
    out: list[Document] = []
    total = 0
    for _, name, word, text in entries:
        if total >= max_chars:
            break
        out.append(Document(id=f"dict:{name}/{word}", title=word, text=text, source=f"dict:{name}"))
        total += len(text)
    return out


def _source_identity(src: str, dict_max_chars: int) -> str:
    """What a cache key needs to know about a corpus source: its files' names, sizes and times."""
    if src.startswith("wiki:"):
        p = wiki_file(src[5:])
        return f"{src}:{p.stat().st_size}"
    if src == "dict":
        return "dict:" + ",".join(f"{n}:{i.stat().st_size}:{(d or i).stat().st_size}"
                                  for n, i, d in _dictionary_files()) + f":{dict_max_chars}"
    p = Path(src)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
    return f"{src}:" + ",".join(f"{q.name}:{q.stat().st_size}:{q.stat().st_mtime_ns}" for q in files)


def documents(corpus: Sequence[str], split: str, max_docs: int | None = None,
              dict_max_chars: int = 4_000_000) -> list[tuple[str, str]]:
    """(title, text) of the documents of `corpus` for a split: "wiki:LANG" gives that split's articles (their
    extracts); "dict" (Debian dictionaries) and file or folder paths (.txt .md .jsonl) only belong to "train"
    (the held-out split is Wikipedia articles: the evaluation bank). `max_docs` caps each source."""
    out: list[tuple[str, str]] = []
    for src in corpus:
        if src.startswith("wiki:"):
            arts = split_articles(wiki_articles(src[5:]), split, max_docs)
            out += [(t, a["extract"]) for t, a in arts.items()]
        elif split == "heldout":
            continue
        elif src == "dict":
            docs = dictionary_documents(dict_max_chars)
            out += [(d.title, d.text) for d in docs[:max_docs]]
        else:
            docs = list(iter_documents(src, on_warning=lambda msg: None))
            out += [(d.title, d.text) for d in docs[:max_docs]]
    return out


def training_tokenizer(vocab_size: int, max_chars: int = 6_000_000, model_type: str = "bpe",
                       progress: Callable[[str], None] | None = None) -> Path:
    """A tokenizer trained on the text at hand minus the held-out articles, cached in the user cache."""
    key = f"v{TRAINER_VERSION}-{model_type}-{vocab_size}-{corpus_id(max_chars)}-train{DATA_VERSION}"
    path = cache_dir() / "tokenizers" / f"{key}.model"
    if not path.is_file():
        if progress is not None:
            progress(f"training a {vocab_size}-piece tokenizer on the text at hand minus the held-out articles")
        train_tokenizer(corpus_at_hand(max_chars, exclude_titles=is_held_out), vocab_size, path,
                        model_type=model_type)
    return path


# ------------------------------------------------------------------------------------------- QA samples


def encode_qa(sample: QASample, tokenizer, max_tokens: int) -> tuple[list[int], int] | None:
    """[BOS] + qa_prompt(question) + " " + answer + [EOS] as ids, and the index of the first answer token (the
    loss covers the answer and EOS). None when the sample is longer than `max_tokens` (a cut answer would teach
    the model to stop mid-sentence) or the prompt's tokens are not a prefix of the whole sample's (then the
    answer does not start at a token boundary)."""
    prompt = qa_prompt(sample.question)
    p = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + " " + sample.answer.strip())
    if full[:len(p)] != p or len(full) == len(p) or len(full) + 2 > max_tokens:
        return None
    return [BOS] + full + [EOS], 1 + len(p)


# ------------------------------------------------------------------------------------------- references


@dataclass
class ReferenceSet:
    """References as token ids: reference i is ids[offsets[i]:offsets[i+1]] (<ref> first); doc[i] indexes
    titles (the article it was cut from)."""

    ids: np.ndarray  # int32, all references one after the other
    offsets: np.ndarray  # int64 [R + 1]
    doc: np.ndarray  # int32 [R]
    titles: np.ndarray  # str [D]

    def __len__(self) -> int:
        return len(self.doc)

    def tokens(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def text_tokens(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] + 1:self.offsets[i + 1]]

    def padded(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [len(rows), longest] (right padding with <pad>) and lengths, for encode_memory."""
        lengths = np.array([self.offsets[r + 1] - self.offsets[r] for r in rows], np.int64)
        out = np.full((len(rows), int(lengths.max(initial=1))), PAD, np.int64)
        for j, r in enumerate(rows):
            out[j, :lengths[j]] = self.tokens(r)
        return out, lengths

    def arrays(self, prefix: str = "ref_") -> dict[str, np.ndarray]:
        return {f"{prefix}ids": self.ids, f"{prefix}offsets": self.offsets, f"{prefix}doc": self.doc,
                f"{prefix}titles": self.titles}

    @classmethod
    def from_arrays(cls, a, prefix: str = "ref_") -> "ReferenceSet":
        return cls(a[f"{prefix}ids"], a[f"{prefix}offsets"], a[f"{prefix}doc"], a[f"{prefix}titles"])


def build_references(articles: dict[str, dict[str, str]], tokenizer, max_tokens: int = 128) -> ReferenceSet:
    """The articles' extracts cut by m3lite.sources.chunk_document into references of <= max_tokens ids."""
    ids: list[np.ndarray] = []
    doc: list[int] = []
    titles = list(articles)
    for d, title in enumerate(titles):
        document = Document(id=f"wiki/{title}", title=title, text=articles[title]["extract"], source="wiki")
        for ref in chunk_document(document, tokenizer, max_tokens):
            ids.append(np.asarray(ref.ids, np.int32))
            doc.append(d)
    lengths = np.array([len(x) for x in ids], np.int64)
    return ReferenceSet(ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
                        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        doc=np.asarray(doc, np.int32), titles=np.asarray(titles, dtype=str))


def reference_bm25(refs: ReferenceSet, vocab_size: int) -> BM25:
    """Okapi BM25 (m3lite.retrieval's, as a bank searches) over the references' tokens (each <ref> dropped)."""
    return BM25.from_references(refs.ids, np.diff(refs.offsets), vocab_size)


# ------------------------------------------------------------------------------------------- leakage


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of a and b, bit-parallel over a (Hyyro's formulation: one
    addition per element of b, the bit vector as a Python integer)."""
    n = len(a)
    if n == 0 or len(b) == 0:
        return 0
    masks: dict[int, int] = {}
    for i, x in enumerate(a):
        masks[int(x)] = masks.get(int(x), 0) | (1 << i)
    full = (1 << n) - 1
    v = full
    get = masks.get
    for y in b:
        u = v & get(int(y), 0)
        v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def leaks(reference_ids: Sequence[int], sequence_ids: Sequence[int], threshold: float = LEAK_THRESHOLD) -> bool:
    """True when the reference overlaps the sequence by more than `threshold`: the longest common subsequence of
    the reference's text tokens (specials such as the leading <ref> dropped) and some window of the sequence of
    twice the reference's length, divided by the reference's length (the Memory3 leakage guard).

    Exact, and fast because cheap upper bounds settle most cases: LCS <= the multiset overlap of the two token
    lists, and LCS against a window <= LCS against any longer stretch that contains it."""
    ref = np.asarray(reference_ids, np.int64)
    ref = ref[ref >= N_SPECIAL]
    seq = np.asarray(sequence_ids, np.int64)
    n = len(ref)
    if n == 0 or len(seq) == 0:
        return False
    need = threshold * n  # leak iff LCS > need
    uniq, counts = np.unique(ref, return_counts=True)
    eq = seq[None, :] == uniq[:, None]  # [distinct ref tokens, len(seq)]
    if np.minimum(eq.sum(1), counts).sum() <= need:
        return False
    ref_list, seq_list = ref.tolist(), seq.tolist()
    if lcs_length(ref_list, seq_list) <= need:
        return False
    w = 2 * n
    if len(seq) <= w:
        return True  # the whole sequence is the only window, and its LCS was just measured
    cs = np.concatenate([np.zeros((len(uniq), 1), np.int64), np.cumsum(eq, axis=1)], axis=1)
    bound = np.minimum(cs[:, w:] - cs[:, :-w], counts[:, None]).sum(0)  # [starts]: multiset overlap
    starts = np.flatnonzero(bound > need)
    if len(starts) == 0:
        return False
    # runs of consecutive candidate starts: one LCS over the run's whole stretch clears all its windows
    breaks = np.flatnonzero(np.diff(starts) > 1)
    for run in np.split(starts, breaks + 1):
        if lcs_length(ref_list, seq_list[run[0]:run[-1] + w]) <= need:
            continue
        for s in run[np.argsort(-bound[run], kind="stable")]:
            if lcs_length(ref_list, seq_list[s:s + w]) > need:
                return True
    return False


# ------------------------------------------------------------------------------------------- retrieval


def retrieve_for_chunks(sequences: np.ndarray, seq_len: int, refs: ReferenceSet, bm25: BM25, chunk: int,
                        threshold: float = LEAK_THRESHOLD, candidates: int = 32) -> np.ndarray:
    """For each `chunk`-token chunk of each sequence's first `seq_len` tokens (the model's inputs), the best
    reference by BM25 over the chunk's tokens that does not leak into the sequence (all of its tokens,
    targets included): int32 [N, n_chunks], -1 where none qualifies."""
    n_chunks = -(-seq_len // chunk)
    out = np.full((len(sequences), n_chunks), -1, np.int32)
    for i, seq in enumerate(sequences):
        verdict: dict[int, bool] = {}  # neighbouring chunks often rank the same references
        for c in range(n_chunks):
            for r in bm25.ranked(seq[c * chunk:min(seq_len, (c + 1) * chunk)], candidates).tolist():
                if r not in verdict:
                    verdict[r] = leaks(refs.text_tokens(r), seq, threshold)
                if not verdict[r]:
                    out[i, c] = r
                    break
    return out


def retrieve_for_queries(queries: Sequence[Sequence[int]], bm25: BM25, k: int) -> np.ndarray:
    """The top-k references of each query by BM25: int32 [N, k], -1 padded."""
    out = np.full((len(queries), k), -1, np.int32)
    for i, q in enumerate(queries):
        top = bm25.ranked(q, k)
        out[i, :len(top)] = top
    return out


# ------------------------------------------------------------------------------------------- batching


def pack(token_lists: Iterable[Sequence[int]], seq_len: int) -> np.ndarray:
    """Documents as BOS + ids + EOS, concatenated and cut into windows of seq_len + 1 tokens (inputs and
    shifted targets) that overlap by one token, so every token is a target once: int32 [N, seq_len + 1]."""
    parts = [np.concatenate([[BOS], np.asarray(ids, np.int32), [EOS]]).astype(np.int32) for ids in token_lists]
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = max(0, (len(stream) - 1) // seq_len)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx] if n else np.zeros((0, seq_len + 1), np.int32)


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def batch_indices(n_items: int, step: int, global_batch: int, seed: int, rank: int = 0,
                  world: int = 1) -> np.ndarray:
    """The items of 0-based step `step`: the global batch is the next `global_batch` items of a sequence of
    seeded per-epoch permutations; rank r of `world` takes the r-th contiguous slice of it. A pure function of
    its arguments, so a resumed run sees exactly the batches an uninterrupted one would."""
    if n_items <= 0:
        raise BadArgument("no training items: the corpus slice is too small for this sequence length")
    if global_batch % world:
        raise BadArgument(f"the batch {global_batch} must be a multiple of the number of processes {world}")
    pos, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, off = divmod(pos, n_items)
        take = min(global_batch - len(out), n_items - off)
        out.extend(_epoch_order(n_items, seed, epoch)[off:off + take].tolist())
        pos += take
    per = global_batch // world
    return np.asarray(out[rank * per:(rank + 1) * per], np.int64)


# ------------------------------------------------------------------------------------------- stages


@dataclass
class DataSpec:
    """Everything that shapes a stage's arrays (and so their cache key)."""

    tokenizer: str
    seq_len: int = 256
    corpus: tuple[str, ...] = DEFAULT_CORPUS
    max_docs: int | None = None
    dict_max_chars: int = 4_000_000
    reference_max_tokens: int = 128
    chunk: int = 64
    top_k: int = 5
    leak_threshold: float = LEAK_THRESHOLD

    def key(self, stage: str, split: str) -> str:
        parts = [f"v{DATA_VERSION}", stage, split, sha256_file(Path(self.tokenizer)), str(self.seq_len),
                 str(self.max_docs), str(self.reference_max_tokens), str(self.chunk), str(self.top_k),
                 repr(self.leak_threshold)]
        corpus = self.corpus if stage != "sft" else tuple(s for s in self.corpus if s.startswith("wiki:"))
        parts += [_source_identity(s, self.dict_max_chars) for s in corpus]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class StageData:
    """The arrays one stage reads, for one split.

    warmup: sequences [N, T+1]. memory: sequences, retrieved [N, n_chunks] and the references. sft: qa_ids /
    qa_offsets (sample i is qa_ids[qa_offsets[i]:qa_offsets[i+1]]), qa_start (first answer token), qa_refs
    [N, top_k] and the references."""

    stage: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.stage == "sft":
            return len(self.arrays["qa_start"])
        return len(self.arrays["sequences"])

    @property
    def refs(self) -> ReferenceSet:
        return ReferenceSet.from_arrays(self.arrays)

    def sample(self, i: int) -> np.ndarray:
        a = self.arrays
        return a["qa_ids"][a["qa_offsets"][i]:a["qa_offsets"][i + 1]]


def _tokenizer(path: str):
    from m3lite.tokenizer import Tokenizer

    return Tokenizer(path)


def _encode_many(tok, texts: list[str]) -> list[list[int]]:
    return tok.encode_batch(texts) if texts else []


def build_stage(stage: str, spec: DataSpec, split: str = "train",
                progress: Callable[[str], None] | None = None) -> StageData:
    """Compute a stage's arrays (no cache; see `load_stage`)."""
    say = progress or (lambda msg: None)
    tok = _tokenizer(spec.tokenizer)
    arrays: dict[str, np.ndarray] = {}
    wiki = [s for s in spec.corpus if s.startswith("wiki:")]
    if stage in ("memory", "sft"):
        if not wiki:
            raise BadArgument(f"stage {stage} needs a wiki:LANG corpus: its references are the articles")
        articles: dict[str, dict[str, str]] = {}
        for src in wiki:
            articles.update(split_articles(wiki_articles(src[5:]), split, spec.max_docs))
        say(f"cutting {len(articles)} {split} articles into references")
        refs = build_references(articles, tok, spec.reference_max_tokens)
        arrays.update(refs.arrays())
        bm25 = reference_bm25(refs, tok.vocab_size)
    if stage in ("warmup", "memory"):
        docs = documents(spec.corpus, split, spec.max_docs, spec.dict_max_chars)
        say(f"tokenizing {len(docs)} {split} documents")
        seqs = pack(_encode_many(tok, [text for _, text in docs]), spec.seq_len)
        arrays["sequences"] = seqs
        if stage == "memory":
            say(f"retrieving references for {len(seqs)} sequences (BM25, leakage filter)")
            arrays["retrieved"] = retrieve_for_chunks(seqs, spec.seq_len, refs, bm25, spec.chunk,
                                                      spec.leak_threshold)
    elif stage == "sft":
        samples = qa_samples(articles, held_out=split == "heldout")
        encoded = [(s, encode_qa(s, tok, spec.seq_len + 1)) for s in samples]
        encoded = [(s, e) for s, e in encoded if e is not None]
        lengths = np.array([len(e[0]) for _, e in encoded], np.int64)
        arrays["qa_ids"] = (np.concatenate([np.asarray(e[0], np.int32) for _, e in encoded])
                            if encoded else np.zeros(0, np.int32))
        arrays["qa_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays["qa_start"] = np.array([e[1] for _, e in encoded], np.int64)
        say(f"retrieving references for {len(encoded)} questions (BM25)")
        queries = [tok.encode(qa_prompt(s.question)) for s, _ in encoded]
        arrays["qa_refs"] = retrieve_for_queries(queries, bm25, spec.top_k)
    else:
        raise BadArgument(f"unknown stage {stage!r}")
    return StageData(stage, arrays)


def load_stage(stage: str, spec: DataSpec, split: str = "train", work_dir: str | os.PathLike | None = None,
               progress: Callable[[str], None] | None = None) -> StageData:
    """A stage's arrays from the cache in `work_dir` (default: the user cache's train-data folder), computed and
    stored (atomically, npz without pickle) on first use."""
    folder = Path(work_dir) if work_dir is not None else cache_dir() / "train-data"
    path = folder / f"{stage}-{split}-{spec.key(stage, split)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return StageData(stage, {k: z[k] for k in z.files})
    data = build_stage(stage, spec, split, progress)
    folder.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    np.savez(buf, **data.arrays)
    atomic_write_bytes(path, buf.getvalue())
    return data
