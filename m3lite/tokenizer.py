"""One tokenizer interface, two backends: sentencepiece (the models trained here; <ref> is the Memory3 reference
BOS) and BPE through the `tokenizers` library (Hugging Face tokenizer.json, or a GGUF's tokenizer metadata).

`Tokenizer(path)` and `load_tokenizer(path)` pick the backend from the path: *.model is sentencepiece; *.json,
*.gguf or a directory holding tokenizer.json is BPE (a directory holding tokenizer.model is sentencepiece).
Callers use only the attributes and methods of `Tokenizer`, never a backend's internals.
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from .errors import TokenizerError
from .tokenizer_gguf import END_MARKERS

REF_PIECE = "<ref>"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _id(i: int | None) -> int:
    return -1 if i is None else i


def _backend_for(path) -> type:
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.model").exists():
            return SentencePieceTokenizer
        if (p / "tokenizer.json").exists():
            return BPETokenizer
        raise TokenizerError(f"{p} holds neither tokenizer.model nor tokenizer.json")
    suffix = p.suffix.lower()
    if suffix == ".model":
        return SentencePieceTokenizer
    if suffix in (".json", ".gguf"):
        return BPETokenizer
    raise TokenizerError(f"cannot tell the kind of tokenizer {p}: expected *.model, *.json or *.gguf")


class Tokenizer:
    """The interface. Attributes: vocab_size, bos_id (-1: none), add_bos (the model wants BOS first), eos_id
    (the primary end), eos_ids (every id that ends generation), pad_id, unk_id, ref_id (-1: none), kind."""

    kind = ""
    vocab_size: int
    bos_id: int
    add_bos: bool
    eos_id: int
    eos_ids: tuple[int, ...]
    pad_id: int
    unk_id: int
    ref_id: int

    def __new__(cls, path=None, *args, **kwargs):
        # Tokenizer(path) keeps working: it builds the backend the path calls for
        if cls is Tokenizer:
            if path is None:
                raise TokenizerError("Tokenizer() needs the path of a tokenizer file")
            cls = _backend_for(path)
        return super().__new__(cls)

    def _apply_ids(self, meta: dict | None) -> None:
        """Special ids given outright (a model manifest's tokenizer entry: bos_id, add_bos, eos_id, eos_ids,
        pad_id, unk_id, ref_id) win over what the tokenizer file implies."""
        meta = meta or {}
        for key in ("bos_id", "eos_id", "pad_id", "unk_id", "ref_id"):
            if meta.get(key) is not None:
                setattr(self, key, int(meta[key]))
        if meta.get("eos_ids") or meta.get("eos_id") is not None:
            given = [int(i) for i in meta.get("eos_ids") or ()]
            if meta.get("eos_id") is None:
                self.eos_id = given[0]
            # the end-of-turn markers the file has still stop generation
            self.eos_ids = tuple(dict.fromkeys(i for i in [self.eos_id, *given, *self._end_markers()] if i >= 0))
        if meta.get("add_bos") is not None:
            self.add_bos = bool(meta["add_bos"])
        self.add_bos = self.add_bos and self.bos_id >= 0

    def _end_markers(self) -> list[int]:
        specials = self.special_tokens()
        return [specials[t] for t in END_MARKERS if t in specials]

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]:
        """Token ids of `text`. bos: prepend BOS if the model uses one; eos: append EOS. special: parse
        special tokens written in the text (a rendered chat template); otherwise they are plain text."""
        ids = self._encode(text, special)
        if bos and self.add_bos and self.bos_id >= 0:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        return [self._encode(t, special) for t in texts]

    def decode(self, ids, skip_special: bool = False) -> str:
        raise NotImplementedError

    def piece(self, i: int) -> str:
        """The vocabulary's spelling of token i (e.g. "▁the" or "Ġthe")."""
        raise NotImplementedError

    def is_special(self, i: int) -> bool:
        """True for control and unknown tokens."""
        raise NotImplementedError

    def token_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def special_tokens(self) -> dict[str, int]:
        raise NotImplementedError

    def _encode(self, text: str, special: bool) -> list[int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} vocab={self.vocab_size} {getattr(self, 'path', '')}>"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, config: dict | None = None):
        """`config`: special ids that replace the file's (see Tokenizer._apply_ids)."""
        import sentencepiece as spm

        p = Path(path)
        self.path = str(p / "tokenizer.model" if p.is_dir() else p)
        try:
            # kept as `sp` until the callers that still batch through it (m3lite.sources, converters.data)
            # move to encode_batch
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load tokenizer {self.path}: {_first_line(e)}") from None
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
        if min(self.bos_id, self.eos_id) < 0:
            raise TokenizerError(f"tokenizer {self.path} has no BOS/EOS tokens; retrain it with converters.tokenizer")
        self.add_bos = True
        self.eos_ids = (self.eos_id,)
        self.ref_id = _id(self.token_id(REF_PIECE))
        self._specials = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                          if sp.is_control(i) or sp.is_unknown(i)}
        names = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._apply_ids(config)

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special or self._special_re is None:
            return self.sp.encode(text, out_type=int)
        # sentencepiece never makes a control id from text: cut the text at the special pieces it spells
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self.sp.encode(text[pos:m.start()], out_type=int)
            ids.append(self._specials[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:], out_type=int)
        return ids

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        if special:
            return super().encode_batch(texts, special)
        return self.sp.encode(list(texts), out_type=int) if texts else []

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if not self.is_special(i)]
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def is_special(self, i: int) -> bool:
        return self.sp.is_control(int(i)) or self.sp.is_unknown(int(i))

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.sp.id_to_piece(i) else i

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)


def _token_text(v) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class BPETokenizer(Tokenizer):
    """BPE through `tokenizers`: byte-level (GPT-2 style) or SentencePiece-style with byte fallback.

    `config` holds tokenizer_config.json settings (bos_token, eos_token, pad_token, unk_token, add_bos_token,
    and m3lite's own eos_token_ids: every id that ends generation) and/or special ids given outright, as a model
    manifest's tokenizer entry has them (bos_id, add_bos, eos_ids, pad_id, ref_id; see Tokenizer._apply_ids)."""

    kind = "bpe"

    def __init__(self, path: str | os.PathLike, config: dict | None = None):
        p = Path(path)
        if p.suffix.lower() == ".gguf":
            from .tokenizer_gguf import bpe_json_from_gguf, read_gguf_fields, tokenizer_config_from_gguf

            fields = read_gguf_fields(p)
            self._setup(bpe_json_from_gguf(fields), {**tokenizer_config_from_gguf(fields), **(config or {})}, p)
            return
        if p.is_dir():
            p = p / "tokenizer.json"
        try:
            text = p.read_text(encoding="utf-8")
            if config is None and (p.parent / "tokenizer_config.json").exists():
                config = json.loads((p.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise TokenizerError(f"cannot load tokenizer {p}: {_first_line(e)}") from None
        self._setup(text, config, p)

    @classmethod
    def from_str(cls, tokenizer_json: str, config: dict | None = None) -> BPETokenizer:
        tok = cls.__new__(cls)
        tok._setup(tokenizer_json, config, "<string>")
        return tok

    @classmethod
    def from_gguf_fields(cls, fields: dict, config: dict | None = None) -> BPETokenizer:
        """From GGUF tokenizer metadata as a plain dict (see m3lite.tokenizer_gguf)."""
        from .tokenizer_gguf import bpe_json_from_gguf, tokenizer_config_from_gguf

        return cls.from_str(bpe_json_from_gguf(fields), {**tokenizer_config_from_gguf(fields), **(config or {})})

    def _setup(self, text: str, config: dict | None, where) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError("BPE tokenizers need the tokenizers package: pip install tokenizers") from None
        self.path = str(where)
        try:
            self._tok = HFTokenizer.from_str(text)
            doc = json.loads(text)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"cannot load tokenizer {where}: {_first_line(e)}") from None
        config = config or {}
        self._lock = threading.Lock()  # encode_special_tokens is a setting of the shared tokenizer object
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        self._specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

        def find(name: str) -> int:
            return _id(self.token_id(_token_text(config.get(name)) or ""))

        model_unk = (doc.get("model") or {}).get("unk_token")
        self.unk_id = find("unk_token") if config.get("unk_token") else _id(self.token_id(model_unk or ""))
        if self.unk_id >= 0:
            self._specials.setdefault(self.piece(self.unk_id), self.unk_id)
        # a tokenizer.json that adds BOS itself (Llama 3) says so in its post-processor
        template_bos = _template_first(doc.get("post_processor"))
        self.bos_id = find("bos_token")
        if self.bos_id < 0 and template_bos is not None:
            self.bos_id = _id(self.token_id(template_bos))
        self.add_bos = bool(config.get("add_bos_token", template_bos is not None)) and self.bos_id >= 0
        self.eos_id = find("eos_token")
        self.pad_id = find("pad_token")
        self.ref_id = _id(self.token_id(REF_PIECE))
        ends = [self.eos_id] + [int(i) for i in config.get("eos_token_ids") or ()] + self._end_markers()
        self.eos_ids = tuple(dict.fromkeys(i for i in ends if 0 <= i < self.vocab_size))
        if self.eos_id < 0 and self.eos_ids:
            self.eos_id = self.eos_ids[0]
        self._special_ids = frozenset(self._specials.values())
        self._apply_ids(config)

    def _encode(self, text: str, special: bool) -> list[int]:
        with self._lock:
            self._tok.encode_special_tokens = not special  # True: special tokens in the text stay plain text
            return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        with self._lock:
            self._tok.encode_special_tokens = not special
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def piece(self, i: int) -> str:
        p = self._tok.id_to_token(int(i))
        if p is None:
            raise IndexError(f"token id {i} is out of range (vocabulary of {self.vocab_size})")
        return p

    def is_special(self, i: int) -> bool:
        return int(i) in self._special_ids

    def token_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece) if piece else None

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)


def _template_first(post: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts first, if any."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        for p in post.get("processors") or ():
            if (t := _template_first(p)) is not None:
                return t
        return None
    if post.get("type") == "TemplateProcessing" and post.get("single"):
        first = post["single"][0]
        if "SpecialToken" in first:
            return first["SpecialToken"]["id"]
    return None


def load_tokenizer(path: str | os.PathLike, specials: dict | None = None) -> Tokenizer:
    """The tokenizer at `path` (*.model, tokenizer.json, *.gguf, or a model directory). `specials`: special
    ids that replace the file's (bos_id, add_bos, eos_ids, pad_id, unk_id, ref_id: a model manifest's tokenizer
    entry), and for a BPE tokenizer settings in tokenizer_config.json form (bos_token, eos_token, add_bos_token,
    ...), used instead of a tokenizer_config.json next to it."""
    return Tokenizer(path, specials)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 byte sequences
    (byte fallback or byte-level BPE can split one character over several tokens; the partial bytes decode
    to U+FFFD until the rest arrives)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd" and len(text) - end < 3:
            end -= 1
        piece = text[self.emitted:end]
        self.emitted = end
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)
