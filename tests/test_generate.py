"""The sampling loop and the Model API: streaming, stop conditions, seeds, cancel, one generation at a time."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import m3lite
from m3lite.errors import BadArgument, BusyError
from m3lite.tokenizer import StreamDecoder


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return m3lite.load(tiny_model_dir())


def test_stream_pieces_join_to_text(model):
    pieces = list(model.generate("hello world", max_new_tokens=20, temperature=0.9, seed=3, stream=True))
    r = model.last_result
    assert "".join(pieces) == r.text
    assert r.text == model.tokenizer.decode(r.tokens)
    assert r.prompt_tokens == len(model.encode_prompt("hello world"))
    assert r.finish_reason in ("length", "stop")


def test_seed_reproducible_and_greedy_deterministic(model):
    a = model.generate("abc", max_new_tokens=16, temperature=1.0, seed=5)
    b = model.generate("abc", max_new_tokens=16, temperature=1.0, seed=5)
    assert a == b
    g1 = model.generate("abc", max_new_tokens=16, temperature=0)
    t1 = list(model.last_result.tokens)
    model.generate("abc", max_new_tokens=16, temperature=0, seed=99)
    assert model.last_result.tokens == t1 and g1


def test_max_tokens(model):
    model.generate("x", max_new_tokens=7, temperature=0, repetition_penalty=1.0)
    r = model.last_result
    assert len(r.tokens) <= 7
    if r.finish_reason == "length":
        assert len(r.tokens) == 7


def test_stop_string_cuts_text(model):
    full = model.generate("the", max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    # pick a stop string from the middle of the greedy continuation
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("greedy continuation has no usable stop string")
    out = model.generate("the", max_new_tokens=24, temperature=0, repetition_penalty=1.0, stop=[stop])
    assert out == full[: full.find(stop)]
    assert model.last_result.finish_reason == "stop"
    streamed = "".join(model.generate("the", max_new_tokens=24, temperature=0, repetition_penalty=1.0,
                                      stop=[stop], stream=True))
    assert streamed == out


def test_cancel(model):
    ev = threading.Event()
    n = 0
    for _ in model.generate("a", max_new_tokens=50, temperature=1.0, seed=1, stream=True, cancel=ev.is_set):
        n += 1
        if n == 3:
            ev.set()
    assert model.last_result.finish_reason == "cancelled"
    assert len(model.last_result.tokens) <= 4


def test_one_generation_at_a_time(model):
    it = model.generate("a", max_new_tokens=10, temperature=1.0, seed=1, stream=True)
    next(it)
    with pytest.raises(BusyError):
        model.generate("b", max_new_tokens=2)
    for _ in it:
        pass
    assert model.generate("b", max_new_tokens=2, temperature=0) is not None  # free again


def test_bad_arguments(model):
    with pytest.raises(BadArgument):
        model.generate("a", temperature=-1)
    with pytest.raises(BadArgument):
        model.generate("a", top_p=0)
    with pytest.raises(BadArgument):
        model.generate("a", backend="cuda")
    with pytest.raises(BadArgument):
        model.logits([model.config.vocab_size])
    long_prompt = list(np.ones(model.config.max_seq_len + 1, dtype=np.int64) * 7)
    with pytest.raises(BadArgument, match="context"):
        model.generate(long_prompt, max_new_tokens=1)


def test_context_limit_ends_generation(model):
    n = model.config.max_seq_len
    model.generate([1] + [9] * (n - 3), max_new_tokens=50, temperature=1.0, seed=0)
    r = model.last_result
    assert r.prompt_tokens + len(r.tokens) <= n + 1
    assert r.finish_reason in ("length", "stop")


def test_stream_decoder_holds_partial_utf8(model):
    tok = model.tokenizer
    ids = tok.encode("é日本")
    dec = StreamDecoder(tok)
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == "é日本"
    assert "\ufffd" not in text


def test_tokenizer_specials(model):
    tok = model.tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.ref_id) == (0, 1, 2, 3, 4)
    ids = tok.encode("<ref> <s> </s> <pad> plain text")
    assert not set(ids) & {1, 2, 3, 4}
    for s in ("plain ASCII, with punctuation!", "accentué: çà et là, Ñandú", "中文字符和日本語のテキスト"):
        assert tok.decode(tok.encode(s)) == s


class _ScriptedEngine:
    """An engine whose next-token logits follow a script: each step's favourite token, then the runner-up."""

    def __init__(self, vocab: int, script: list[tuple[int, int]]):
        self.V, self.script, self.step, self.n_past, self.max_ctx = vocab, script, 0, 0, 1000

    def fit_threads(self) -> int:
        return 1

    def _logits(self) -> np.ndarray:
        best, second = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        out = np.zeros(self.V, np.float32)
        out[best], out[second] = 2.0, 1.0
        return out

    def prefill(self, ids):
        self.n_past += len(ids)
        return self._logits()

    def decode(self, token):
        self.n_past += 1
        return self._logits()


@pytest.mark.parametrize("finish", [False, True])
def test_a_lead_in_does_not_end_the_answer(model, finish):
    """A model that would end its turn right after "...is:" goes on with its next best token when the answer
    finishes lead-ins (`ask` and `chat` do), and ends there when it does not (plain generation)."""
    from m3lite.generate import GenerationResult, stream
    from m3lite.params import ANSWER, SamplingParams

    assert ANSWER.finish_lead_in
    tok = model.tokenizer
    lead, word = tok.encode("is:"), tok.encode(" yes")
    eos = tok.eos_ids[0]
    script = [(t, eos) for t in lead] + [(eos, word[0])] + [(t, eos) for t in word[1:]] + [(eos, eos)]
    p = SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0, finish_lead_in=finish)
    result = GenerationResult()
    text = "".join(stream(_ScriptedEngine(model.config.vocab_size, script), tok, [1, 2], p, result))
    assert text == (tok.decode(lead + word) if finish else "is:") and text.startswith("is:")
    assert result.finish_reason == "stop"
