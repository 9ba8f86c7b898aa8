"""The sampling loop: prefill, then one compiled decode step and one compiled sample per token; streaming."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .errors import BadArgument
from .params import LOOP_PERIOD, SamplingParams
from .kernels.sampling import sample
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationResult:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = ""  # "stop" (EOS or stop string), "length" (max tokens or context), "cancelled"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    retrieval_s: float = 0.0
    mode: str = "none"
    references: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. references left out)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(0, len(self.tokens) - 1)  # the first token comes from the prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0

    def timings(self) -> dict:
        """The figures every face reports: retrieval and first-token times in ms, prefill and decode tokens/s."""
        return {"retrieval_ms": round(self.retrieval_s * 1000, 3), "ttft_ms": round(self.ttft_s * 1000, 3),
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": list(self.tokens),
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            **self.timings(),
            "mode": self.mode,
            "references": self.references,
            "notes": self.notes,
        }


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def _prefill(engine, prompt_ids, memory) -> np.ndarray:
    ids = np.asarray(prompt_ids, np.int64)
    if memory is None:
        return engine.prefill(ids)
    if memory.query is not None:  # one retrieval for the whole prompt, with the question
        memory.install(engine, memory.query)
        return engine.prefill(ids)
    n = memory.model.config.retrieval_interval
    for c0 in range(0, len(ids), n):  # each chunk attends to the memories retrieved for it
        memory.install(engine, ids[c0:c0 + n])
        logits = engine.prefill(ids[c0:c0 + n])
    return logits


def repeat_period(tokens: list[int], span: int) -> int:
    """How far back the last `span` tokens were last written before, in that order: the period of the loop an
    answer is in (1 for "1.1.1..." over `span` tokens, a sentence's length when a sentence comes again, perhaps
    numbered anew each time); 0 when they are new."""
    n = len(tokens)
    if n <= span:
        return 0
    tail, last = tokens[-span:], tokens[-1]
    latest, i = -1, 0
    while True:  # candidates found by list.index (C speed): a few µs a token for answers of hundreds of tokens
        try:
            i = tokens.index(tail[0], i, n - span)
        except ValueError:
            return n - span - latest if latest >= 0 else 0
        if tokens[i + span - 1] == last and tokens[i:i + span] == tail:
            latest = i
        i += 1


def stream(engine, tok: Tokenizer, prompt_ids: Sequence[int], p: SamplingParams,
           result: GenerationResult, cancel=None, memory=None) -> Iterator[str]:
    """Yield text pieces as tokens are produced; fill `result` as it goes. `cancel()` -> True stops early.

    With `memory` (a MemorySession in memory mode), the prompt is prefilled in retrieval_interval chunks,
    each with its own memories, and every retrieval_interval generated tokens the memories are replaced by
    those retrieved with the last retrieval_interval tokens as the query."""
    p.validate()
    stops = [s for s in p.stop if s]
    if len(prompt_ids) == 0:
        raise BadArgument("the prompt is empty")
    if len(prompt_ids) + engine.n_past > engine.max_ctx:
        raise BadArgument(f"the prompt has {len(prompt_ids)} tokens but the context holds {engine.max_ctx}; "
                          f"shorten it")
    rng = np.random.default_rng(p.seed)
    eos = frozenset(tok.eos_ids)
    recent = np.zeros(max(1, p.repeat_window), np.int64)
    n_recent = 0
    for t in list(prompt_ids)[-p.repeat_window:] if p.repeat_window else []:
        recent[n_recent % len(recent)] = t
        n_recent += 1
    result.prompt_tokens = len(prompt_ids)
    t0 = time.perf_counter()
    engine.fit_threads()  # fewer threads while other programs keep cores busy
    logits = _prefill(engine, prompt_ids, memory)
    t1 = time.perf_counter()
    result.prefill_s = t1 - t0
    dec = StreamDecoder(tok)
    out = ""  # text produced so far, stop strings not yet cut
    sent = 0  # characters of `out` already yielded
    result.finish_reason = "length"
    cut_by_stop = False
    for i in range(p.max_new_tokens):
        if cancel is not None and cancel():
            result.finish_reason = "cancelled"
            break
        if p.finish_lead_in and eos and out[-32:].rstrip().endswith(":"):  # the tail: no copy of the whole answer
            logits = logits.copy()
            logits[list(eos)] = -np.inf
        token = int(sample(logits, p.temperature, p.top_k, p.top_p, p.repetition_penalty, recent,
                           min(n_recent, len(recent)), rng.random()))
        if i == 0:
            result.ttft_s = time.perf_counter() - t0
        if token in eos:
            result.finish_reason = "stop"
            break
        result.tokens.append(token)
        recent[n_recent % len(recent)] = token
        n_recent += 1
        out += dec.push(token)
        cut = min((out.find(s) for s in stops if s in out), default=-1)
        if cut >= 0:
            out = out[:cut]
            result.finish_reason = "stop"
            cut_by_stop = True
            break
        upto = len(out) - _held_back(out, stops)
        if upto > sent:
            result.text = out[:upto]  # what the caller has seen, should it stop iterating here
            yield out[sent:upto]
            sent = upto
        if p.loop_guard and (k := repeat_period(result.tokens, p.loop_guard)):
            result.finish_reason = "stop"
            result.notes.append(f"stopped: the answer repeated the same {k} token{'s' if k > 1 else ''} over and "
                                f"over (a small model's loop)" if k <= LOOP_PERIOD else
                                f"stopped: the answer began to repeat {p.loop_guard} tokens it had already written "
                                f"(a small model's loop)")
            break
        if i + 1 == p.max_new_tokens or engine.n_past >= engine.max_ctx:
            break
        if memory is not None and len(result.tokens) % memory.model.config.retrieval_interval == 0:
            n = memory.model.config.retrieval_interval
            memory.install(engine, result.tokens[-n:])
        logits = engine.decode(token)
    if not cut_by_stop:
        out += dec.flush()
    result.decode_s = max(0.0, time.perf_counter() - t1 - result.ttft_s + result.prefill_s) if result.tokens else 0.0
    result.text = out
    if len(out) > sent:
        yield out[sent:]
