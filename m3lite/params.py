"""Sampling settings and their defaults, in a module light enough for the CLI to import at start."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import BadArgument


@dataclass
class SamplingParams:
    """How a generation samples; its defaults are the library's, the CLI's and the server's (see DEFAULTS)."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    repeat_window: int = 64
    seed: int | None = None
    stop: Sequence[str] = ()
    # stop when the last `loop_guard` tokens were already written earlier in the answer: a small model's loop,
    # of a few tokens ("1.1.1.1...") or of a sentence over and over (generate.repeat_period); 0: never
    loop_guard: int = 0
    # an answer's lead-in ("The answer to this question is:") does not end it: while the text so far ends with a
    # colon the end-of-turn tokens are not sampled (a small model sometimes stops right there, answering nothing)
    finish_lead_in: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise BadArgument("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise BadArgument("temperature must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise BadArgument("top_k must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise BadArgument("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise BadArgument("repetition_penalty must be > 0 (1 disables it)")
        if self.repeat_window < 0:
            raise BadArgument("repeat_window must be >= 0")
        if self.loop_guard < 0:
            raise BadArgument("loop_guard must be >= 0 (0 disables it)")


DEFAULTS = SamplingParams()  # generating text (`generate`, the server): sampled, with a repetition penalty
# answering a question (`ask`, `chat`, the Chat API): greedy, no repetition penalty, as `m3lite eval` measures
# and an answer that falls into a loop stops (m3lite.generate)
ANSWER = SamplingParams(max_new_tokens=256, temperature=0.0, repetition_penalty=1.0, loop_guard=32,
                        finish_lead_in=True)
# `m3lite eval`'s answers: the gold answers are one phrase or sentence (95% of first sentences within 58 tokens)
EVAL_MAX_TOKENS = 64
LOOP_PERIOD = 8  # a loop of at most this many tokens is "the same few tokens over and over" in its note
