"""Prompts for chat models: a model's own chat template, or the plain "Question: ...\\nAnswer:" format.

A chat template is the Jinja source an instruct model ships with (`tokenizer.chat_template` in a GGUF or in
tokenizer_config.json). `ChatTemplate` renders it the way transformers' `apply_chat_template` does, so the
prompt matches what the model was trained on byte for byte:

    tpl = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    prompt = tpl.render([{"role": "user", "content": "Hi"}])    # ends with the assistant's header
    tpl.assistant_suffix()                                       # e.g. "<|im_end|>\\n": closes an answer

Models without a template use `plain_prompt`, the format the models trained here learned.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Sequence

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import BadArgument, ModelFileError

ROLES = ("system", "user", "assistant")
SPLIT_MARKER = "<<M3LITE_SPLIT>>"

# The user turn of a RAG question for a chat model: plain words a 135M instruct model follows.
# Measured with the default model: on 16 questions about 6 made-up notes, this wording's answers contain the fact
# 15 times; "...answer in one short sentence." 11 (it scores higher held-out F1, 35.0 against 28.6 on 80
# questions, by being short, and answers the wrong fact more often); "Answer this question with the notes above" 14
REFERENCES_PROMPT = "Use these notes to answer.\n\n{notes}\n\nQuestion: {question}"
REFERENCE_LINE = "[{n}] {text}"

# The system message of an answer (`ask`, `eval`, which measures it, and `m3lite chat`) for a model with a chat
# template, unless the caller gives one ("" keeps the template's own default). Measured with the default model
# (greedy, 64 tokens, first line; README, "Evaluation"): against SmolLM2's own default it raised held-out F1 in
# every mode (300 questions: none 15.4 -> 17.4, memory 29.4 -> 31.1, rag 36.0 -> 37.3) and the made-up facts
# answered from memory (contains 64 -> 66 of 100), and its answers read as answers ("The landmark of Penmoor is
# the Drebar lens."); "Answer the question in one sentence." scored lower in memory mode (29.1 / 60).
ANSWER_SYSTEM = "You are a helpful assistant. Answer the question directly and briefly."


class TemplateError(BadArgument):
    """The chat template refused a conversation (its `raise_exception`) or failed while rendering it."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ---- the Jinja environment (transformers' choices, so templates render the same) -----------------------------

def _raise_exception(message):
    raise TemplateError(f"the chat template refused the conversation: {_one_line(message)}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change prompt text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _DictMaker:
    """`dict(...)` and `dict.fromkeys(...)` for templates, which are untrusted code: not the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() that refuses underscore names, so a template cannot plant dunder attributes."""

    def __init__(*args, **kwargs):  # noqa: N805  (Jinja's signature, so that namespace(self=...) works)
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template may not set {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictMaker(),
                       namespace=_Namespace)
    return env


# ---- messages ----------------------------------------------------------------------------------------------

def check_messages(messages) -> list[dict]:
    """`messages` as plain dicts ({"role": "system"|"user"|"assistant", "content": str, ...}); BadArgument if
    they are not."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadArgument("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadArgument(f"message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadArgument(f"message {i} has role {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadArgument(f"message {i} ({role}) needs a string 'content', not {type(content).__name__}")
        out.append(dict(m))
    return out


# ---- the model's template ---------------------------------------------------------------------------------

class ChatTemplate:
    """A model's Jinja chat template, rendered as transformers' `apply_chat_template(..., tokenize=False)` does.

    `bos_token`/`eos_token` are the texts of those tokens (templates write them); `extra` holds other variables
    the template reads (e.g. unk_token, pad_token). A template that does not compile raises ModelFileError.
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", extra: dict | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ModelFileError("the chat template is empty or not text")
        self.source = source
        self.variables = {"bos_token": bos_token, "eos_token": eos_token, **(extra or {})}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ModelFileError(f"the chat template does not compile (line {e.lineno}): {_one_line(e.message)}")
        except jinja2.TemplateError as e:
            raise ModelFileError(f"the chat template does not compile: {_one_line(e)}")
        self._suffix: str | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`; with `add_generation_prompt`, it ends where the assistant's answer
        starts. `kwargs` are further template variables (they override the tokens given at construction)."""
        messages = check_messages(messages)
        # transformers always passes tools and documents, so `tools is none` style checks behave the same
        variables = {"tools": None, "documents": None, **self.variables, **kwargs}
        try:
            return self._template.render(messages=messages, add_generation_prompt=bool(add_generation_prompt),
                                         **variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed: {_one_line(e)}")
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise TemplateError(f"the chat template failed: {type(e).__name__}: {_one_line(e)}")

    def assistant_suffix(self) -> str:
        """The text the template writes after an assistant message's content (e.g. "<|im_end|>\\n" for
        ChatML): what closes an answer before the next turn, when a conversation keeps its KV cache."""
        if self._suffix is None:
            text = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": SPLIT_MARKER}],
                               add_generation_prompt=False)
            if SPLIT_MARKER not in text:
                raise ModelFileError("the chat template does not write assistant messages' content")
            self._suffix = text[text.rindex(SPLIT_MARKER) + len(SPLIT_MARKER):]
        return self._suffix


# ---- models without a template -----------------------------------------------------------------------------

def qa_prompt(question: str) -> str:
    """The question format of the SFT stage of models trained here (no chat template)."""
    return f"Question: {question.strip()}\nAnswer:"


def rag_context(texts: Sequence[str]) -> str:
    """The retrieved references' text as RAG places it before a plain (template-less) prompt."""
    return "".join(f"Reference: {t.strip()}\n" for t in texts)


def plain_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """`messages` in the SFT format of the models trained here: the system text on its own line, then
    "Question: q\\nAnswer: a" per turn, joined by newlines; a final user message (required with
    `add_generation_prompt`) ends open, with "Answer:". A user message's optional "context" key is text placed
    before its question (RAG's references), as a Turn's `context`."""
    messages = check_messages(messages)
    system = "\n".join(m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip())
    turns: list[list[str]] = []  # [context, question, answer]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            context = m.get("context", "")
            if not isinstance(context, str):
                raise BadArgument(f"message {i} has a non-string 'context'")
            turns.append([context, m["content"], ""])
        elif m["role"] == "assistant":
            if i == 0 or messages[i - 1]["role"] != "user":
                raise BadArgument(f"message {i} (assistant) must follow a user message")
            turns[-1][2] = m["content"]
    if not turns:
        raise BadArgument("messages hold no user message")
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise BadArgument("the last message must be the user's when add_generation_prompt is set")
    parts = [system] if system else []
    parts += [context + qa_prompt(q) + (" " + answer if answer else "") for context, q, answer in turns]
    return "\n".join(parts)


def with_references(question: str, texts: Sequence[str]) -> str:
    """A user message that puts retrieved `texts` first, numbered when there are several, then `question`
    (REFERENCES_PROMPT); the question alone when there are none. A single note goes unnumbered: the default
    model (one reference per question) given "[1] note" wrote note numbers ("[2] ...") in 10 answers to 12
    made-up-fact questions, given the note alone in 1; its RAG answers then held the fact 71 times in 100
    against 67 (F1 16.4 against 10.9), held-out Wikipedia F1 unchanged (35.6 against 35.4, 300 questions)."""
    if not isinstance(question, str) or isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise BadArgument("with_references needs a question string and a list of reference strings")
    notes = [t.strip() for t in texts if t.strip()]
    if not notes:
        return question.strip()
    lines = notes[0] if len(notes) == 1 else "\n".join(REFERENCE_LINE.format(n=n, text=t)
                                                      for n, t in enumerate(notes, 1))
    return REFERENCES_PROMPT.format(notes=lines, question=question.strip())
