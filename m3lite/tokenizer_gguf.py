"""A Hugging Face tokenizer.json (and tokenizer_config.json settings) from a GGUF file's tokenizer metadata.

A GGUF stores no tokenizer.json, only llama.cpp's description of one: the vocabulary, the merges (byte-level
BPE) or scores (SentencePiece-style BPE), token types and special ids, and `tokenizer.ggml.pre`, a name for
how text is cut into words before BPE. The names map to the splitting rules llama.cpp applies for them.

`fields` everywhere is a plain dict of GGUF key -> Python value ("tokenizer.ggml.tokens": list of str, ...),
as `read_gguf_fields` returns it, so an importer can write the two files next to the weights.
"""
from __future__ import annotations

import json
import os

from .errors import TokenizerError

K = "tokenizer.ggml."
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_WORDS = _LLAMA3_WORDS.replace(r"\p{N}{1,3}", r"\p{N}")


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    # use_regex=True is the GPT-2 word regex built into the ByteLevel step
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges). "default" (or no key) is taken as GPT-2's rules, as
# transformers does; llama.cpp's own fallback also cuts punctuation runs apart, which no current converter
# writes on purpose.
PRE_TOKENIZERS = {
    "default": (_byte_level(True), False),
    "gpt2": (_byte_level(True), False),
    # SmolLM / StarCoder: every digit on its own, then GPT-2's rules
    "smollm": ({"type": "Sequence", "pretokenizers": [_split(r"\p{N}"), _byte_level(True)]}, False),
    "starcoder": ({"type": "Sequence", "pretokenizers": [_split(r"\p{N}"), _byte_level(True)]}, False),
    # Llama 3 looks a whole word up in the vocabulary before merging (ignore_merges)
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [_split(_LLAMA3_WORDS), _byte_level(False)]}, True),
    "llama3": ({"type": "Sequence", "pretokenizers": [_split(_LLAMA3_WORDS), _byte_level(False)]}, True),
    "llama-v3": ({"type": "Sequence", "pretokenizers": [_split(_LLAMA3_WORDS), _byte_level(False)]}, True),
    "qwen2": ({"type": "Sequence", "pretokenizers": [_split(_QWEN2_WORDS), _byte_level(False)]}, False),
}

# Besides eos/eot/eom ids, these control tokens end a turn in the chat templates of common models (llama.cpp
# stops on them too).
END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
               "<|end_of_text|>")


def read_gguf_fields(path: str | os.PathLike) -> dict:
    """The tokenizer.* (and general.architecture) metadata of a GGUF file, as plain Python values."""
    try:
        import gguf
    except ImportError:
        raise TokenizerError("reading a GGUF needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
        return {key: field.contents() for key, field in reader.fields.items()
                if key.startswith("tokenizer.") or key == "general.architecture"}
    except Exception as e:  # the reader fails on a damaged file with whatever numpy or struct raised
        lines = str(e).strip().splitlines()
        raise TokenizerError(f"cannot read GGUF {path}: {lines[0] if lines else type(e).__name__}") from None


def _text(t) -> str:
    return t.decode("utf-8", errors="replace") if isinstance(t, (bytes, bytearray)) else str(t)


def _merge_pair(m: str) -> list[str]:
    # a merge is "left right"; the left part may itself start with a space character, hence find(" ", 1)
    cut = m.find(" ", 1)
    if cut < 0:
        raise TokenizerError(f"GGUF tokenizer merge {m!r} has no space")
    return [m[:cut], m[cut + 1:]]


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """SentencePiece BPE merges whichever adjacent pair forms the best-scoring piece: as ranked merges, every
    way of cutting a piece in two, ordered by that piece's score."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, t in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(t) < 2:
            continue
        for k in range(1, len(t)):
            if t[:k] in index and t[k:] in index:
                found.append((-scores[i], i, k, t[:k], t[k:]))
    found.sort()
    return [[a, b] for *_, a, b in found]


def _special_id(fields: dict, name: str, n: int) -> int | None:
    v = fields.get(K + name)
    return int(v) if v is not None and 0 <= int(v) < n else None


def bpe_json_from_gguf(fields: dict) -> str:
    """A tokenizer.json (as text) equivalent to the GGUF's tokenizer; raises TokenizerError when unsupported."""
    model = fields.get(K + "model")
    tokens = [_text(t) for t in fields.get(K + "tokens") or []]
    if not tokens:
        raise TokenizerError("the GGUF has no tokenizer.ggml.tokens")
    n = len(tokens)
    types = [int(t) for t in fields.get(K + "token_type") or [NORMAL] * n]
    if len(types) != n:
        raise TokenizerError(f"the GGUF has {len(types)} token types for {n} tokens")
    unk = _special_id(fields, "unknown_token_id", n)
    if model == "gpt2":
        pre = fields.get(K + "pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})")
        pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
        merges = [_merge_pair(_text(m)) for m in fields.get(K + "merges") or []]
        bpe = {"unk_token": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges}
        normalizer = None
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    elif model == "llama":
        if K + "merges" in fields:
            merges = [_merge_pair(_text(m)) for m in fields[K + "merges"]]
        else:
            scores = fields.get(K + "scores")
            if scores is None or len(scores) != n:
                raise TokenizerError("the GGUF's SentencePiece vocabulary has no scores (tokenizer.ggml.scores)")
            merges = _merges_from_scores(tokens, [float(s) for s in scores], types)
        prefix = bool(fields.get(K + "add_space_prefix", True))
        bpe = {"unk_token": tokens[unk] if unk is not None else None, "fuse_unk": True, "byte_fallback": True,
               "ignore_merges": False}
        # a normalizer, not Metaspace: Metaspace adds no "▁" to text that starts with a space, while sentencepiece
        # and llama.cpp always do (llama.cpp also after each special token, as this does)
        space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, space]
                      if prefix else [space]}
        pre_tokenizer = None
        steps = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                 {"type": "Fuse"}]
        if prefix:  # the space the encoder put before the text
            steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        decoder = {"type": "Sequence", "decoders": steps}
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {model!r} (supported: gpt2, llama)")

    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] != USER_DEFINED}
             for i, t in enumerate(tokens) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)]
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  **bpe, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_config_from_gguf(fields: dict) -> dict:
    """tokenizer_config.json settings from the GGUF: special tokens, add_bos_token/add_eos_token, the chat
    template, and `eos_token_ids` (m3lite's own key: every id that ends generation, eos first)."""
    tokens = [_text(t) for t in fields.get(K + "tokens") or []]
    n = len(tokens)
    types = [int(t) for t in fields.get(K + "token_type") or [NORMAL] * n]
    ids = {name: _special_id(fields, key, n) for name, key in (
        ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"), ("eom", "eom_token_id"),
        ("pad", "padding_token_id"), ("unk", "unknown_token_id"))}
    # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise
    add_bos = fields.get(K + "add_bos_token", fields.get(K + "model") == "llama")
    cfg: dict = {f"{name}_token": tokens[i] for name, i in ids.items() if i is not None and name not in ("eot", "eom")}
    cfg["add_bos_token"] = bool(add_bos) and ids["bos"] is not None
    cfg["add_eos_token"] = bool(fields.get(K + "add_eos_token", False)) and ids["eos"] is not None
    ends = [ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None]
    ends += [i for i, t in enumerate(tokens) if types[i] == CONTROL and t in END_MARKERS]
    cfg["eos_token_ids"] = list(dict.fromkeys(ends))
    if fields.get("tokenizer.chat_template"):
        cfg["chat_template"] = _text(fields["tokenizer.chat_template"])
    return cfg
