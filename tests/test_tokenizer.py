"""The Tokenizer interface over both backends: sentencepiece (our models) and BPE via `tokenizers`
(tokenizer.json, GGUF metadata), checked id-for-id against transformers."""
from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest

from m3lite.errors import TokenizerError
from m3lite.tokenizer import (BPETokenizer, SentencePieceTokenizer, StreamDecoder, Tokenizer, load_tokenizer)
from m3lite.tokenizer_gguf import bpe_json_from_gguf, tokenizer_config_from_gguf
from llama_files import smollm2_gguf
from textgen import sentence, train_small_tokenizer



# ---------------------------------------------------------------- varied text

LOOKALIKES = ["<|im_start|>", "<|im_end|>", "<|im_end", "im_start|>", "<|endoftext|>", "</s>", "<s>", "<ref>",
              "<pad>", "<unk>", "<repo_name>", "<|", "|>", "<|im_start|>user\n", "< |im_end| >"]
SCRIPTS = ["naïve café déjà vu", "Ñandú straße Œuvre ÆØÅ", "Ελληνικά γράμματα", "Русский текст, ёж",
           "العربية نص", "עברית כתובה", "हिन्दी पाठ", "ภาษาไทย", "中文字符和标点。", "日本語のテキスト、カタカナ",
           "한국어 문장입니다", "Tiếng Việt có dấu", "ქართული", "Հայերեն", "ᚠᛇᚻ runes", "e\u0301 a\u0308 combining",
           "ﬁ ligature ℌ ℕ", "Ω≈ç√∫˜µ≤≥÷", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙"]
EMOJI = ["😀", "👍🏽", "👩\u200d💻", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇫🇷🇯🇵", "1️⃣", "❤️", "🧑🏿\u200d🚀", "🐍🦀"]
CODE = ["def f(x):\n\treturn x ** 2  # square", "if (a && b) { return -1; }", "for i in range(10): print(i)",
        '{"key": [1, 2.5, null], "s": "v"}', "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id=42;",
        "x += y >> 3 | ~z", "#include <stdio.h>\nint main(void){}", "λx.x ∘ f", "a_b-c.d/e\\f"]
SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\u00a0", "\u3000", "\u2009", "\f", "\v"]
NUMBERS = ["0", "7", "42", "1234567890", "3.14159", "-0.5e10", "1,000,000", "2024-01-31", "１２３", "١٢٣",
           "²³", "½", "Ⅷ", "१२३", "10%", "$9.99", "0x1F"]
PUNCT = ["!!!", "...", "?!", "---", "—", "–", "«»", "“quoted”", "‘single’", "(!)", ";;", "::", "@#$%^&*", "¿¡"]
CONTRACTIONS = ["it's", "I'LL", "we're", "they've", "don't", "I'M", "you'd", "'s", "'T", "rock 'n' roll", "O'Neil"]


def _random_char(r: random.Random) -> str:
    while True:
        c = chr(r.choice([r.randint(0x20, 0x7e), r.randint(0xa0, 0x2fff), r.randint(0x3000, 0xd7ff),
                          r.randint(0xe000, 0xfffd), r.randint(0x10000, 0x1faff)]))
        if unicodedata.category(c) not in ("Cs", "Cn"):
            return c


def varied_strings(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    pools = [LOOKALIKES, SCRIPTS, EMOJI, CODE, SPACES, NUMBERS, PUNCT, CONTRACTIONS]
    out = [""] + [x for pool in pools for x in pool]
    while len(out) < n:
        parts = []
        for _ in range(r.randint(1, 8)):
            kind = r.random()
            if kind < 0.1:
                parts.append("".join(_random_char(r) for _ in range(r.randint(1, 6))))
            elif kind < 0.25:
                parts.append(sentence(r, 1, 8))
            else:
                parts.append(r.choice(r.choice(pools)))
            parts.append(r.choice(["", " ", " ", "", "\n", "  ", "\t"]))
        s = "".join(parts)
        if r.random() < 0.2:
            s = r.choice(SPACES) + s
        if r.random() < 0.2:
            s = s + r.choice(SPACES)
        out.append(s)
    return out[:n]


# ---------------------------------------------------------------- SmolLM2 GGUF against transformers

@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers as it loads the GGUF, transformers with SmolLM2's published pre-tokenizer)."""
    path = smollm2_gguf()
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    ours = Tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers' GGUF converter ignores tokenizer.ggml.pre "smollm" (every numeric character on its own, as
    # in SmolLM2's own tokenizer.json and in llama.cpp); a copy of its tokenizer gets that step back
    fixed = HFTokenizer.from_str(ref.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ours, ref, lambda s: fixed.encode(s, add_special_tokens=False).ids


def test_smollm2_attributes(smollm2):
    tok, ref, _ = smollm2
    assert isinstance(tok, BPETokenizer) and tok.kind == "bpe"
    assert tok.vocab_size == 49152 == len(ref)
    assert (tok.bos_id, tok.add_bos, tok.eos_id, tok.unk_id, tok.ref_id) == (1, False, 2, 0, -1)
    assert tok.eos_ids[0] == 2 and set(tok.eos_ids) == {0, 2}  # <|im_end|>, <|endoftext|>
    assert tok.token_id("<|im_start|>") == 1 and tok.token_id("no such piece") is None
    assert tok.special_tokens()["<|im_end|>"] == 2 and len(tok.special_tokens()) == 17
    assert tok.is_special(1) and not tok.is_special(tok.encode("hello")[0])
    assert tok.encode("hi", bos=True) == tok.encode("hi")  # SmolLM2 wants no BOS
    assert tok.encode("hi", eos=True)[-1] == 2
    assert tok.piece(tok.encode(" the")[0]) == "Ġthe"


def test_smollm2_parity_with_transformers(smollm2):
    tok, ref, fixed = smollm2
    specials = set(tok.special_tokens().values())
    for s in varied_strings(2500):
        got = tok.encode(s, special=True)
        assert got == fixed(s), repr(s)
        # without numerals, transformers as it loads the GGUF gives the same ids
        t = "".join(c for c in s if not unicodedata.category(c).startswith("N"))
        assert tok.encode(t, special=True) == ref(t, add_special_tokens=False)["input_ids"], repr(t)
        assert tok.decode(got) == s, repr(s)
        plain = tok.encode(s)
        assert not specials & set(plain), repr(s)  # user text never becomes a control token
        assert tok.decode(plain) == s, repr(s)
    # the look-alikes do make control tokens when asked to
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n", special=True)[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n")[0] != 1


def test_smollm2_stream_decoder(smollm2):
    tok = smollm2[0]
    s = "日本語 👩\u200d💻 🇫🇷 é ok ⌘"
    ids = tok.encode(s)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some character is split across tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == s == dec.text


def test_gguf_file_json_roundtrip(smollm2, tmp_path):
    """What an importer writes (tokenizer.json + tokenizer_config.json) loads to the same tokenizer."""
    from m3lite.tokenizer_gguf import read_gguf_fields

    tok = smollm2[0]
    fields = read_gguf_fields(smollm2_gguf())
    (tmp_path / "tokenizer.json").write_text(bpe_json_from_gguf(fields), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_from_gguf(fields)))
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer)
    assert (again.bos_id, again.add_bos, again.eos_ids, again.pad_id, again.vocab_size) == \
        (tok.bos_id, tok.add_bos, tok.eos_ids, tok.pad_id, tok.vocab_size)
    for s in varied_strings(200, seed=5):
        assert again.encode(s, special=True) == tok.encode(s, special=True)


# ---------------------------------------------------------------- synthetic byte-level BPE (no download)

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_bpe(path: Path, pre: str) -> Path:
    """A ~600-token byte-level BPE tokenizer.json, pre-tokenized as GGUF pre type `pre` says."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    tok.pre_tokenizer = {
        "gpt2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    r = random.Random(1)
    text = [sentence(r) for _ in range(400)] + [" ".join(r.choice(CODE + NUMBERS + CONTRACTIONS) for _ in range(6))
                                                for _ in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    doc = json.loads(tok.to_str())
    doc["model"]["ignore_merges"] = pre == "llama-bpe"  # as in Llama 3's tokenizer.json
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def _gguf_fields(tokenizer_json: Path, pre: str) -> dict:
    """GGUF tokenizer metadata as llama.cpp's converter writes it for that tokenizer.json."""
    doc = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True}


@pytest.fixture(scope="module", params=["gpt2", "smollm", "llama-bpe"])
def tiny_bpe(request, tmp_path_factory):
    pre = request.param
    return pre, _train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", pre)


def test_tokenizer_json_matches_transformers(tiny_bpe):
    transformers = pytest.importorskip("transformers")
    _, path = tiny_bpe
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    ref.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok = load_tokenizer(path, {"eos_token": "<|im_end|>"})
    assert tok.kind == "bpe" and tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.add_bos, tok.unk_id, tok.ref_id, tok.eos_id) == (-1, False, -1, -1, 2)
    assert tok.eos_ids == (2, 0)
    for s in varied_strings(400, seed=2):
        ids = tok.encode(s, special=True)
        assert ids == ref(s, add_special_tokens=False)["input_ids"], repr(s)
        assert tok.decode(ids) == s == tok.decode(tok.encode(s)), repr(s)
        assert not {0, 1, 2} & set(tok.encode(s)), repr(s)


def test_manifest_ids_win(tiny_bpe):
    """A model manifest's tokenizer entry (as importers write it) sets the special ids outright."""
    meta = {"kind": "bpe", "file": "tokenizer.json", "sha256": "0" * 64, "bos_id": 1, "add_bos": True,
            "eos_ids": [2], "pad_id": 2, "ref_id": 0, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    tok = load_tokenizer(tiny_bpe[1], meta)
    assert (tok.bos_id, tok.add_bos, tok.eos_id, tok.eos_ids, tok.pad_id, tok.ref_id) == (1, True, 2, (2, 0), 2, 0)
    assert tok.encode("hi", bos=True)[0] == 1
    plain = load_tokenizer(tiny_bpe[1], {"add_bos": True})  # no BOS token: nothing to add
    assert (plain.bos_id, plain.add_bos) == (-1, False) and plain.encode("hi", bos=True) == plain.encode("hi")


def test_gguf_fields_match_tokenizer_json(tiny_bpe):
    pre, path = tiny_bpe
    want = BPETokenizer(path)
    fields = _gguf_fields(path, pre)
    tok = BPETokenizer.from_gguf_fields(fields)
    assert (tok.bos_id, tok.add_bos, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, True, 2, 0, want.vocab_size)
    assert tok.encode("hi", bos=True)[0] == 1
    for s in varied_strings(400, seed=3):
        assert tok.encode(s) == want.encode(s), repr(s)
        assert tok.encode(s, special=True) == want.encode(s, special=True), repr(s)
        assert tok.decode(tok.encode(s)) == s, repr(s)
    if pre == "gpt2":  # "default" (no pre type) reads as GPT-2's rules
        fields.pop("tokenizer.ggml.pre")
        assert BPETokenizer.from_gguf_fields(fields).encode("it's 12345 ok") == want.encode("it's 12345 ok")


def test_stream_decoder_bpe_holds_split_characters(tiny_bpe):
    tok = BPETokenizer(tiny_bpe[1])
    for s in ["é日本", "👨\u200d👩\u200d👧\u200d👦 family", "🇫🇷中文 text ✓", "a\u0301"]:
        ids = tok.encode(s)
        assert len(ids) > len(s)  # the tiny vocabulary spells these byte by byte
        dec = StreamDecoder(tok)
        pieces = [dec.push(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) + dec.flush() == s


def test_gguf_refusals():
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1]}
    with pytest.raises(TokenizerError, match="pre-tokenizer 'nonesuch'") as e:
        bpe_json_from_gguf({**base, "tokenizer.ggml.pre": "nonesuch"})
    assert "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="tokenizer model 'bert'"):
        bpe_json_from_gguf({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        bpe_json_from_gguf({"tokenizer.ggml.model": "gpt2"})
    tok = BPETokenizer.from_gguf_fields(base)
    assert tok.encode("abba") == [2, 1, 0] and tok.eos_ids == () and tok.eos_id == -1


@pytest.mark.parametrize("name,content", [("missing.model", None), ("missing.json", None), ("bad.model", b"junk"),
                                          ("bad.json", b"{not json"), ("wrong.json", b'{"model": 3}'),
                                          ("bad.gguf", b"GGUF junk"), ("tok.txt", b"")])
def test_bad_files_raise_tokenizer_error(tmp_path, name, content):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        Tokenizer(p)
    assert "\n" not in str(e.value)
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path / "empty-dir-or-missing")


# ---------------------------------------------------------------- sentencepiece through the interface

@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("spm") / "tokenizer.model")


def test_sentencepiece_backend(spm_path):
    tok = Tokenizer(spm_path)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer) and tok.kind == "sentencepiece"
    assert type(load_tokenizer(spm_path)) is type(load_tokenizer(spm_path.parent)) is SentencePieceTokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.ref_id) == (0, 1, 2, 3, 4)
    assert tok.add_bos and tok.eos_ids == (2,) and tok.vocab_size == 400
    same = load_tokenizer(spm_path, {"file": "tokenizer.model", "sha256": "0" * 64})  # a trained model's manifest
    assert (same.bos_id, same.add_bos, same.eos_ids, same.ref_id) == (1, True, (2,), 4)
    assert tok.special_tokens() == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<ref>": 4}
    assert tok.token_id("<ref>") == 4 and tok.token_id("no such piece") is None and tok.piece(4) == "<ref>"
    text = "<ref> <s> </s> <pad> plain text"
    assert not {1, 2, 3, 4} & set(tok.encode(text))
    ids = tok.encode(text, special=True)
    assert [i for i in ids if i < 5] == [4, 1, 2, 3]
    assert tok.encode("the river", bos=True, eos=True) == [1] + tok.encode("the river") + [2]
    assert tok.decode([1] + tok.encode("the river") + [2], skip_special=True) == "the river"
    assert tok.encode_batch(["a b", "the city"]) == [tok.encode("a b"), tok.encode("the city")]
    for s in ["plain ASCII, with punctuation!", "accentué: çà et là, Ñandú", "中文字符和日本語のテキスト", "  two\n\tlines "]:
        assert tok.decode(tok.encode(s)) == s
    dec = StreamDecoder(tok)
    ids = tok.encode("é日本 👍🏽")
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "é日本 👍🏽"


def test_sentencepiece_as_gguf_llama_bpe(spm_path):
    """GGUF "llama" vocabularies (SentencePiece BPE: scores, byte fallback) through the BPE backend give
    sentencepiece's ids."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    m = pb.ModelProto()
    m.ParseFromString(spm_path.read_bytes())
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p.piece for p in m.pieces],
              "tokenizer.ggml.scores": [p.score for p in m.pieces],
              "tokenizer.ggml.token_type": [int(p.type) for p in m.pieces],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 3}
    sp, tok = Tokenizer(spm_path), BPETokenizer.from_gguf_fields(fields)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.ref_id, tok.add_bos) == (0, 1, 2, 3, 4, True)
    r = random.Random(4)
    strings = [sentence(r) for _ in range(200)] + varied_strings(300, seed=4)
    for s in strings:
        assert tok.encode(s) == sp.encode(s), repr(s)
        assert tok.decode(tok.encode(s)) == s, repr(s)
