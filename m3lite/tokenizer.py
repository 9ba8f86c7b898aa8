"""sentencepiece wrapper with the special tokens m3lite relies on (<ref> is the Memory3 reference BOS)."""
from __future__ import annotations

import os

import sentencepiece as spm

from .errors import TokenizerError

REF_PIECE = "<ref>"


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load tokenizer {self.path}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        ref = self.sp.piece_to_id(REF_PIECE)
        self.ref_id = ref if ref != self.unk_id else -1
        if min(self.bos_id, self.eos_id) < 0:
            raise TokenizerError(f"tokenizer {self.path} has no BOS/EOS tokens; retrain it with converters.tokenizer")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text, out_type=int)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def is_special(self, i: int) -> bool:
        return self.sp.is_control(int(i)) or self.sp.is_unknown(int(i))


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 byte sequences."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        # a byte-fallback character may still be partial: wait for the rest
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
