"""Synthetic text and a small tokenizer trained on it, for tests that need words but not a model."""
from __future__ import annotations

import io
import random
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from his her are were be this which an or has had "
         "memory model bank reference token river mountain city music history science language paper water "
         "light system energy number people world king war church art book time year house garden school").split()


def sentence(r: random.Random, lo: int = 4, hi: int = 20) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi))).capitalize() + r.choice(".!?")


def train_small_tokenizer(path) -> Path:
    """A 400-piece BPE tokenizer with m3lite's special ids (0 unk, 1 <s>, 2 </s>, 3 <pad>, <ref> control)."""
    import sentencepiece as spm

    r = random.Random(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([sentence(r) for _ in range(2000)]), model_writer=buf, model_type="bpe",
        vocab_size=400, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=3, control_symbols=["<ref>"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)
