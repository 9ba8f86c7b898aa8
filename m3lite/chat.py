"""A conversation with a model: multi-turn questions and answers over a bank, in the SFT prompt format.

The conversation keeps its own KV cache (an `Engine` sharing the model's weights), so each turn prefills only
what it adds; `save`/`load` write and read that state (an .npz of plain arrays plus JSON, no pickle), so a long
conversation resumes without recomputing it.

    chat = model.chat(bank=bank)              # or Chat(model, bank=..., mode="memory"|"rag"|"none")
    print(chat.send("What is a volcano?"))
    for piece in chat.send("Where is Etna?", stream=True):
        print(piece, end="", flush=True)
    chat.last_result.references               # the memories used, with the share of attention they received
    chat.save("talk.npz"); chat = Chat.load("talk.npz", model=model)
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .bank import Bank
from .errors import BadArgument, BusyError, M3Error, another_model
from .generate import GenerationResult, stream as _stream
from .params import ANSWER, SamplingParams
from .chat_template import rag_context, with_references
from .memory import MemorySession, check_mode
from .modelfile import atomic_write_bytes

FORMAT = "m3lite-chat"
VERSION = 1
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


class ContextLengthError(BadArgument):
    """A question (with the room asked for its answer) does not fit the model's context even alone."""


class ChatFileError(M3Error):
    """A saved conversation is missing, damaged, or was saved with another model."""


@dataclass
class Turn:
    question: str
    answer: str = ""
    context: str = ""  # text placed before the question (rag: the references' text; models without a template)
    prompt: str = ""  # the user message as the model read it, when not the question alone (rag, chat template)
    references: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"
    mode: str = "none"


def reference_summary(r: dict) -> dict:
    """The fields of a used reference that answers report (`ask --json`, the server's `m3lite` field)."""
    return {k: r[k] for k in ("id", "doc_id", "source", "title", "text", "score", "attention") if k in r}


class Chat:
    """A conversation with `model`, optionally over a `bank` (an `m3lite.Bank` or its path).

    mode: "memory" (default with a bank), "rag" or "none" (default without). system: the system message, as
    `Model.system_message` (None: a brief-answer one for a model with a chat template; "": the template's own).
    Sampling settings are attributes
    (`temperature` 0 = greedy, the default; `max_new_tokens`, `top_k`, `top_p`, `repetition_penalty`, `seed`)
    and can be overridden per `send`. Earlier turns stay in the context up to the model's limit; when a new
    turn does not fit, the oldest turns are dropped and `last_result.notes` says so.

    Thread safety: one generation at a time per model (`Model`'s lock; a concurrent call raises BusyError).
    Cancel an answer from any thread with `send(..., cancel=event.is_set)` and `event.set()`.
    """

    def __init__(self, model, bank=None, mode: str | None = None, *, system: str | None = None,
                 max_new_tokens: int = ANSWER.max_new_tokens, temperature: float = ANSWER.temperature, top_k: int = ANSWER.top_k, top_p: float = ANSWER.top_p,
                 repetition_penalty: float = ANSWER.repetition_penalty,
                 seed: int | None = None, retriever: str = "hybrid", loop_guard: int = ANSWER.loop_guard):
        from .retrieval import check_retriever

        self.model = model
        self.retriever = check_retriever(retriever)
        self.system = model.system_message(system)
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.top_p, self.repetition_penalty, self.seed = top_p, repetition_penalty, seed
        self.loop_guard = loop_guard  # an answer repeating one short cycle this long stops (m3lite.generate)
        self._sampling()  # refuse bad settings now
        self.bank = None
        self._cache = self._search = None
        self.mode = "none"
        if bank is not None:
            self.set_bank(bank)
        self.set_mode(mode or (model.bank_mode if bank is not None else "none"))
        self.engine = model.new_engine()  # a KV cache of its own; the weights are the model's
        # every mode reads the context at positions after the memories' interval, so a conversation can change
        # mode without recomputing it (RoPE attention depends on relative positions only)
        self.engine.pos_offset = model.config.reference_max_tokens
        self.turns: list[Turn] = []
        self.last_result: GenerationResult | None = None
        self._ids: list[int] = []  # the token ids the engine's context holds, in order
        self._epoch = 0  # changes whenever the context does: a plan made before is stale
        self._answering = False

    # ---- settings ----------------------------------------------------------------------------------------

    def set_bank(self, bank) -> None:
        """Use `bank` (a Bank or a path; refused if built by another model); None: no bank, mode "none"."""
        if bank is None:
            self.bank, self._cache, self._search = None, None, None
            self.mode = "none"
            return
        s = self.model.memory_session(bank, "rag", retriever=self.retriever)  # opens it, checks its fingerprint
        self.bank, self._cache, self._search = s.bank, s.cache, s.search

    def set_mode(self, mode: str) -> None:
        check_mode(mode)
        if mode != "none" and self.bank is None:
            raise BadArgument(f"mode {mode!r} needs a bank: open one first (chat.set_bank(PATH), /bank PATH in "
                              f"`m3lite chat`), or use mode none")
        self.mode = mode

    def _sampling(self, **overrides) -> SamplingParams:
        d = {k: getattr(self, k) for k in SETTINGS}
        d.update({k: v for k, v in overrides.items() if v is not None})
        stop = self.model.stop_strings + tuple(d.pop("stop", None) or ())
        for k in ("max_new_tokens", "top_k"):
            if isinstance(d[k], bool) or not isinstance(d[k], (int, np.integer)):
                raise BadArgument(f"{k} must be an integer")
        p = SamplingParams(stop=stop, loop_guard=self.loop_guard, finish_lead_in=ANSWER.finish_lead_in, **d)
        p.validate()
        return p

    # ---- the conversation ----------------------------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        """Tokens the context holds now (of `max_context`)."""
        return len(self._ids)

    @property
    def max_context(self) -> int:
        return self.engine.max_ctx

    def reset(self, history: Sequence[Turn] | Sequence[tuple[str, str]] = (), system: str | None = None) -> None:
        """Forget the conversation; optionally start from `history` (Turns or (question, answer) pairs, read
        again at the next `send`) and a new `system` text."""
        self.turns = [t if isinstance(t, Turn) else Turn(question=t[0], answer=t[1]) for t in history]
        if system is not None:
            self.system = system
        self._ids = []
        self._epoch += 1
        self.engine.reset()

    def send(self, text: str, stream: bool = False, cancel=None, reserve: int | None = None,
             **overrides) -> str | Iterator[str]:
        """Ask `text` in the conversation; return the answer (stream=False) or an iterator of its pieces.

        overrides: max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed (this answer only) and
        stop (extra stop strings). `reserve`: context tokens kept free for the answer, dropping old turns if
        needed (default min(max_new_tokens, a quarter of the context); the answer stops at the context's end);
        ContextLengthError if the question with that room does not fit even alone. `cancel`: a callable
        (e.g. `threading.Event().is_set`) that stops the answer when it returns True; closing the iterator
        stops it too. After the answer, `last_result` holds it with references, timings and notes, and `turns`
        the conversation. The answer so far stays in the context however the answer ends.
        """
        question = " ".join(str(text).split())
        if not question:
            raise BadArgument("the message is empty")
        params = self._sampling(**overrides)
        if reserve is None:
            reserve = min(params.max_new_tokens, self.max_context // 4)
        result = GenerationResult(mode=self.mode)
        session = None if self.mode == "none" else \
            MemorySession(self.model, self.bank, mode=self.mode, cache=self._cache, retriever=self._search)
        if session is not None:  # retrieval searches with the question alone (and the previous one)
            session.query = self._query(question)
        found = session.retrieve(session.query) if self.mode == "rag" else []
        plan = self._plan(question, found, session, reserve, result)
        self.last_result = result
        it = self._answer(question, found, session, reserve, result, params, cancel, plan)
        if stream:
            return it
        for _ in it:
            pass
        return result.text.strip()

    def _query(self, question: str) -> str:
        """What a turn retrieves with: its question, and the previous turn's question before it, so that a
        follow-up ("Where was he born?") still finds the conversation's subject."""
        prev = self.turns[-1].question + "\n" if self.turns else ""
        return prev + question

    def _messages(self, turns: Sequence[Turn], question: str) -> list[dict]:
        """The conversation as messages: earlier turns as the model read them (their references included),
        then `question` (its references are added by `Model.prompt`)."""
        msgs = [{"role": "system", "content": self.system.strip()}] if self.system.strip() else []
        for t in turns:
            user = {"role": "user", "content": t.prompt or t.question}
            if t.context and self.model.chat_template is None:
                user["context"] = t.context
            msgs += [user, {"role": "assistant", "content": t.answer}]
        return msgs + [{"role": "user", "content": question}]

    def _plan(self, question: str, found: list, session, reserve: int, result: GenerationResult) -> tuple:
        """What to prefill: (epoch, the conversation's token ids, how many of them the cache already holds,
        references' texts, oldest turns dropped).

        The whole conversation is rendered again (the chat template or the plain format) and the cache keeps
        its longest common prefix with it, so a turn prefills only what it adds. When it does not fit, the
        oldest turns are dropped; a rag turn that does not fit even alone leaves out its lowest-ranked
        references."""
        ctx = self.max_context
        alone: list[int] = []

        def render(texts: list[str]):  # the conversation with these references, oldest turns dropped as needed
            for drop in range(len(self.turns) + 1):
                ids = self.model.prompt(self._messages(self.turns[drop:], question), texts)
                if len(ids) + reserve <= ctx:
                    return ids, texts, drop
            alone[:] = ids
            return None

        got = render([]) if session is None else session.fit(found, render, ctx, result.notes)
        if got is None:
            raise ContextLengthError(f"the question takes {len(alone)} tokens and its answer {reserve} more, but "
                                     f"the context holds {ctx}: shorten the question or ask for a shorter answer")
        ids, texts, drop = got
        if drop:
            result.notes.append(f"the context is full ({ctx} tokens): dropped the {drop} oldest "
                                f"turn{'s' if drop > 1 else ''} of the conversation")
        keep = 0
        while keep < min(len(ids) - 1, len(self._ids)) and ids[keep] == self._ids[keep]:
            keep += 1
        return self._epoch, ids, keep, texts, drop

    def _answer(self, question, found, session, reserve, result, params, cancel, plan) -> Iterator[str]:
        eng = self.engine
        with self.model.generation_lock():
            if plan[0] != self._epoch:  # the conversation moved on since send() planned this turn
                plan = self._plan(question, found, session, reserve, result)
            _, ids, keep, texts, drop = plan
            eng.truncate(keep)
            if keep == 0:
                eng.reset()
            self._ids = self._ids[:keep]
            self.turns = self.turns[drop:]
            seg = ids[keep:]
            memory = session if self.mode == "memory" else None
            if memory is None:
                eng.clear_prefix()
            eng.reset_prefix_attention()
            base = eng.n_past
            done = False
            self._answering = True
            try:
                yield from _stream(eng, self.model.tokenizer, seg, params, result, cancel=cancel, memory=memory)
                done = True
            finally:
                self._answering = False
                if not done and result.finish_reason != "stop":
                    result.finish_reason = "cancelled"  # the caller stopped reading (or interrupted us)
                if session is not None:
                    session.finish(eng, result)
                if eng.n_past >= eng.max_ctx and result.finish_reason == "length":
                    result.notes.append(f"the answer stopped at the end of the context ({eng.max_ctx} tokens); "
                                        f"the next question drops the oldest turns")
                self._commit(question, texts, base, seg, result)

    def _commit(self, question: str, texts: list[str], base: int, seg: list[int], result: GenerationResult) -> None:
        """Record the turn; the cache keeps the prompt and the answer's tokens it holds (the next turn's
        `_plan` keeps only what still matches the conversation as rendered again)."""
        eng = self.engine
        self._epoch += 1
        if eng.n_past < base + len(seg):  # the prompt never entered the cache (an error in the prefill)
            eng.truncate(min(base, eng.n_past))
            self._ids = self._ids[:eng.n_past]
            return
        keep = eng.n_past - base - len(seg)  # generated tokens whose keys/values are in the cache
        self._ids = self._ids + list(seg) + list(result.tokens[:keep])
        templated = self.model.chat_template is not None
        prompt = with_references(question, texts) if templated and texts else ""
        context = rag_context(texts) if texts and not templated else ""
        self.turns.append(Turn(question=question, answer=result.text.strip(), context=context, prompt=prompt,
                               references=[reference_summary(r) for r in result.references],
                               finish_reason=result.finish_reason, mode=result.mode))

    def stats(self) -> dict:
        """The last answer's speeds and times, and how full the context is."""
        r = self.last_result
        d = {"turns": len(self.turns), "context_tokens": self.context_tokens, "max_context": self.max_context,
             "mode": self.mode}
        if r is not None:
            d.update({"answer_tokens": len(r.tokens), "prompt_tokens": r.prompt_tokens, **r.timings()})
        return d

    # ---- save / load ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation, its KV state and current memories to `path` (an .npz: plain arrays and a
        JSON record, no pickle), atomically."""
        if self._answering:
            raise BusyError("this chat is answering; save it when the answer is finished (or cancelled)")
        meta = {"format": FORMAT, "version": VERSION, "model": self.model.fingerprint, "mode": self.mode,
                "bank": str(self.bank.path) if self.bank is not None else None,
                "bank_fingerprint": self.bank.fingerprint if self.bank is not None else None,
                "settings": {k: getattr(self, k) for k in SETTINGS}, "system": self.system,
                "turns": [asdict(t) for t in self.turns]}
        arrays = dict(self.engine.snapshot(), ids=np.asarray(self._ids, np.int32),
                      meta=np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), np.uint8))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        p = Path(path).expanduser()
        try:
            atomic_write_bytes(p, buf.getvalue())
        except OSError as e:
            raise ChatFileError(f"cannot write {p}: {e.strerror or e}") from None
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, model, bank=None) -> "Chat":
        """A conversation saved by `save`, ready to continue. `bank`: the bank to use (a Bank or a path);
        default: the one it was saved with, if it is still there."""
        p = Path(path).expanduser()
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(bytes(arrays.pop("meta")).decode())
            ok = isinstance(meta, dict) and meta.get("format") == FORMAT
        except FileNotFoundError:
            raise ChatFileError(f"no saved conversation at {p}") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            raise ChatFileError(f"{p} is not a saved m3lite conversation ({str(e).splitlines()[0] or 'unreadable'})"
                                ) from None
        if not ok or meta.get("version") != VERSION:
            raise ChatFileError(f"{p} is not a saved m3lite conversation (format {FORMAT} v{VERSION})")
        if meta.get("model") != model.fingerprint:
            raise ChatFileError(another_model(f"the conversation {p}", meta.get("model"), model.fingerprint,
                                              "load it with that model"))
        if bank is None and meta.get("bank"):
            if not Bank.exists(meta["bank"]):
                raise ChatFileError(f"{p} was saved with the bank {meta['bank']}, which is gone: give another "
                                    f"bank (/bank PATH, Chat.load(..., bank=...))")
            bank = meta["bank"]
        mode = meta.get("mode", "none") if bank is not None else "none"
        try:
            settings = {k: v for k, v in meta.get("settings", {}).items() if k in SETTINGS}
            chat = cls(model, bank=bank, mode=mode, system=str(meta.get("system", "")), **settings)
            chat.turns = [Turn(**t) for t in meta.get("turns", [])]
            ids = [int(i) for i in arrays.pop("ids")]
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatFileError(f"{p} is damaged: {e}") from None
        try:
            chat.engine.restore(arrays)
        except (KeyError, TypeError, ValueError) as e:
            raise ChatFileError(f"{p} is damaged: {e}") from None
        except BadArgument as e:
            raise ChatFileError(f"{p} does not fit this model: {e}") from None
        if chat.engine.n_past != len(ids):
            raise ChatFileError(f"{p} is damaged: its token list and its KV state disagree")
        chat._ids = ids
        return chat
