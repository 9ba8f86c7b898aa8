"""The Python API: `m3lite.load(dir)` -> Model, with `generate` and `logits` over either backend."""
from __future__ import annotations

import os
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from .config import ModelConfig
from .errors import BadArgument, BusyError
from .kernels.sampling import sample
from .generate import GenerationResult, stream as _stream
from .params import ANSWER, DEFAULTS, SamplingParams
from .modelfile import ModelFiles
from .int8_weights import check_weights, load as load_q8, resolve_weights
from .tokenizer import load_tokenizer

BACKENDS = ("numba", "onnxruntime")


class Model:
    """A loaded model: config, tokenizer, memory-mapped weights and lazily built backends.

    One generation at a time per Model; a second concurrent call raises BusyError.
    `weights` ("fp32" or "int8"; default int8 when the model directory holds int8 weights, see
    `m3lite.int8_weights`) is what the numba backend runs; onnxruntime always runs the float graph.
    """

    def __init__(self, files: ModelFiles, n_threads: int | None = None, weights: str | None = None,
                 verify: bool = True):
        self.files = files
        self.weights = resolve_weights(weights, files)
        self._q8 = load_q8(files, verify=verify) if self.weights == "int8" else None
        self.config: ModelConfig = files.config
        self.tokenizer = load_tokenizer(files.tokenizer_path, files.manifest.get("tokenizer"))
        # an imported embedding may have more rows than the tokenizer has tokens (padded vocabularies)
        if not 0 < self.tokenizer.vocab_size <= self.config.vocab_size:
            raise BadArgument(f"tokenizer has {self.tokenizer.vocab_size} pieces but the model expects "
                              f"{self.config.vocab_size}; the model directory is inconsistent")
        self.chat_template = None  # the model's own (imported models); None: the Question:/Answer: format
        source = files.manifest.get("chat_template")
        if source:
            from .chat_template import ChatTemplate

            meta = files.manifest["tokenizer"]
            self.chat_template = ChatTemplate(source, bos_token=meta.get("bos_token", ""),
                                              eos_token=meta.get("eos_token", ""))
        self.n_threads = n_threads
        self._engines: dict[str, object] = {}
        self._lock = threading.Lock()
        self.last_result: GenerationResult | None = None

    @classmethod
    def load(cls, model_dir: str | os.PathLike, verify: bool = True, n_threads: int | None = None,
             weights: str | None = None) -> "Model":
        check_weights(weights)  # a bad name fails before the model is read
        return cls(ModelFiles.open(model_dir, verify=verify), n_threads=n_threads, weights=weights, verify=verify)

    @property
    def fingerprint(self) -> str:
        return self.files.fingerprint

    def engine(self, backend: str = "numba"):
        if backend not in BACKENDS:
            raise BadArgument(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend not in self._engines:
            if backend == "numba":
                self._engines[backend] = self._numba_engine(self.files.weights)
            else:
                from .ort_backend import OrtEngine

                self._engines[backend] = OrtEngine(self.config, self.files.onnx_path, n_threads=self.n_threads)
            eng = self._engines[backend]
            # load the compiled code (numba's cache) now, so the first answer's latency is the model's own
            bos = max(self.tokenizer.bos_id, 0)
            logits = eng.prefill([bos, bos])  # two tokens: the matrix kernels (one token takes the vector ones)
            eng.decode(bos)
            eng.reset()
            sample(logits, 0.8, 40, 0.95, 1.1, np.zeros(1, np.int64), 1, 0.5)
        return self._engines[backend]

    def _numba_engine(self, weights):
        from .engine import Engine

        c = self.config
        return Engine(c, weights, n_threads=self.n_threads,
                      prefix_capacity=1 + c.retrieval_top_k * c.memory_tokens_per_head,
                      q8=self._q8.tensors if self._q8 is not None else None, ref_id=max(self.tokenizer.ref_id, 0))

    def new_engine(self):
        """A numba Engine with its own KV cache over this model's weights (those of `engine()`, shared, not
        copied): for a caller that keeps its context between generations, as `Chat` does."""
        return self._numba_engine(self.engine("numba").weights)

    def _ids(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise BadArgument("no tokens given")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise BadArgument(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    def logits(self, token_ids: Sequence[int], backend: str = "numba") -> np.ndarray:
        """Logits [n, vocab] of a fresh forward over `token_ids` (no BOS added)."""
        ids = self._ids(token_ids)
        with self.generation_lock():
            eng = self.engine(backend)
            eng.reset()
            return np.array(eng.prefill(ids, all_logits=True), dtype=np.float32, copy=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=True)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = DEFAULTS.max_new_tokens,
                 temperature: float = DEFAULTS.temperature,
                 top_k: int = DEFAULTS.top_k, top_p: float = DEFAULTS.top_p,
                 repetition_penalty: float = DEFAULTS.repetition_penalty, seed: int | None = None,
                 stop: Sequence[str] | None = None, stream: bool = False, backend: str = "numba",
                 cancel=None, bank=None, mode: str | None = None, retriever: str = "hybrid") -> str | Iterator[str]:
        """Generate a continuation of `prompt` (text, or token ids used as given).

        With a `bank` (an `m3lite.Bank` or its path), `mode` is "memory" (default: retrieved explicit memories
        are attended at the memory layers), "rag" (the same references' text goes before the prompt) or
        "none"; `retriever` is "hybrid" (default), "lexical" or "dense" (see m3lite.retrieval);
        `last_result.references` lists the references used.

        stream=False returns the text; stream=True returns an iterator of text pieces. After the call (or the
        iteration) `model.last_result` holds tokens, finish reason and timings. `cancel` is an optional
        callable (e.g. `threading.Event().is_set`) that stops the generation when it returns True: it is
        checked before every token, so another thread (a desktop app's Stop button) can call `event.set()`
        and the generation ends at the next token with finish reason "cancelled". Closing the stream's
        iterator stops it too. One generation at a time per Model: a second one, from any thread, raises
        BusyError while the first runs (or while its stream is open and not exhausted).
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()))
        params.validate()
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(self._ids(prompt))
        self.engine(backend)  # fail early on a bad backend name
        session = self.memory_session(bank, mode, backend, retriever)
        return _text_or_stream(self._run(list(ids), params, backend, cancel, session), stream, self)

    def system_message(self, system: str | None = None) -> str:
        """The system message of an answer (`ask`, `Chat`, `eval`): `system` when given ("" for none: the
        template's own default), else, for a model with a chat template, `chat_template.ANSWER_SYSTEM`."""
        if system is None:
            from .chat_template import ANSWER_SYSTEM

            return ANSWER_SYSTEM if self.chat_template is not None else ""
        if not isinstance(system, str):
            raise BadArgument(f"system must be a string, got {type(system).__name__}")
        return system

    def answer_messages(self, question: str, system: str | None = None) -> list[dict]:
        """The conversation `ask` sends: the system message (`system_message(system)`) unless blank, then
        `question` as the user turn."""
        system = self.system_message(system)
        return ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": question}]

    def chat(self, bank=None, mode: str | None = None, **settings):
        """A conversation with this model (an `m3lite.Chat`), optionally over `bank`; see `m3lite.chat`."""
        from .chat import Chat

        return Chat(self, bank=bank, mode=mode, **settings)

    def memory_session(self, bank, mode: str | None, backend: str = "numba", retriever="hybrid",
                       refs: int | None = None):
        """A MemorySession for `bank` in `mode` retrieving `refs` references (default the model's
        retrieval_top_k, at most that), or None for the plain model."""
        from .memory import MemorySession, check_mode, open_bank

        mode = check_mode(mode or (self.bank_mode if bank is not None else "none"))
        if mode == "none":
            return None
        if bank is None:
            raise BadArgument(f"mode {mode!r} needs a bank: pass bank=... (or use mode='none')")
        if mode == "memory" and backend != "numba":
            raise BadArgument("memory mode runs on the numba backend only (the ONNX graph has no memory inputs)")
        from .bank import Bank

        if not isinstance(bank, Bank):
            bank = open_bank(bank, self)
        else:
            bank.check_model(self.fingerprint)
        return MemorySession(self, bank, mode=mode, retriever=retriever, top_k=self.check_refs(refs))

    def check_refs(self, refs: int | None) -> int | None:
        """`refs` (references per question) if this model can attend to that many, else BadArgument."""
        top = self.config.retrieval_top_k
        if refs is not None and not (isinstance(refs, int) and 1 <= refs <= top):
            raise BadArgument(f"references per question must be 1..{top} (the model's retrieval_top_k), got {refs}")
        return refs

    @property
    def bank_mode(self) -> str:
        """The mode used with a bank when none is asked for: memory for models trained with explicit memory
        here and for imported models with a memory adapter merged in; rag for other imported ones, whose
        attention has not been adapted to sparse memories (unadapted, they answer little from memory)."""
        m = self.files.manifest
        return "rag" if "source" in m and not m.get("adapter") else "memory"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends an answer besides the end-of-turn tokens: a template-less model starting the next
        "Question:" on its own."""
        return () if self.chat_template is not None else ("\nQuestion:",)

    def prompt(self, messages: Sequence[dict], references: Sequence[str] = ()) -> list[int]:
        """Token ids asking the model to answer `messages` (a conversation ending with a user turn): rendered
        with the model's chat template, `references` (RAG) inside the last user turn; for a model without a
        template, the Question:/Answer: format with the references before the question."""
        from .chat_template import plain_prompt, rag_context, with_references

        msgs = [dict(m) for m in messages]
        if self.chat_template is not None:
            if references:
                msgs[-1]["content"] = with_references(msgs[-1]["content"], references)
            return self.tokenizer.encode(self.chat_template.render(msgs), special=True)
        if references:
            msgs[-1]["context"] = rag_context(references)
        return self.tokenizer.encode(plain_prompt(msgs), bos=True)

    def ask(self, question: str, bank=None, mode: str | None = None, system: str | None = None,
            max_new_tokens: int = ANSWER.max_new_tokens, temperature: float = ANSWER.temperature,
            top_k: int = ANSWER.top_k, top_p: float = ANSWER.top_p,
            repetition_penalty: float = ANSWER.repetition_penalty, seed: int | None = None, stop: Sequence[str] = (),
            stream: bool = False, backend: str = "numba", cancel=None, retriever: str = "hybrid",
            refs: int | None = None, loop_guard: int = ANSWER.loop_guard) -> str | Iterator[str]:
        """Answer `question` in the model's chat format (greedy by default), from `bank` in `mode` as
        `generate` (with `refs` references, default the model's retrieval_top_k); retrieval searches with the
        question alone, never with the template around it. `system` is the system message: None gives a model
        with a chat template `chat_template.ANSWER_SYSTEM` (a direct, brief answer), "" none (the template's own
        default). An answer whose last `loop_guard` tokens repeat one short cycle, or were written earlier in
        it, stops there, with a note (0: never).
        Returns the answer (or, with stream=True, an iterator of its pieces); `last_result` as `generate`."""
        question = check_question(question)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed,
                                stop=self.stop_strings + tuple(stop), loop_guard=loop_guard,
                                finish_lead_in=ANSWER.finish_lead_in)
        params.validate()
        msgs = self.answer_messages(question, system)
        self.engine(backend)
        session = self.memory_session(bank, mode, backend, retriever, refs)
        if session is not None:
            session.query = question
        it = self._run(self.prompt(msgs), params, backend, cancel, session,
                       with_refs=lambda texts: self.prompt(msgs, texts))
        return _text_or_stream(it, stream, self)

    def _rag_ids(self, session, query, with_refs, max_new_tokens: int, notes: list[str]) -> list[int]:
        """The prompt with as many references retrieved for `query` as fit the context (best first)."""
        budget = self.config.max_seq_len - max(1, max_new_tokens)

        def render(texts: list[str]) -> list[int] | None:
            ids = with_refs(texts)
            return ids if len(ids) <= budget else None

        ids = session.fit(session.retrieve(query), render, self.config.max_seq_len, notes)
        return ids if ids is not None else with_refs([])  # too long even alone: the prefill says so

    def _raw_with_refs(self, ids: list[int]):
        """For a raw prompt (`generate`): references go before it, in the plain RAG format."""
        from .chat_template import rag_context

        tok = self.tokenizer
        body = ids[1:] if ids and ids[0] == tok.bos_id else ids
        return lambda texts: tok.encode("", bos=True) + (tok.encode(rag_context(texts)) if texts else []) + body

    def _run(self, ids, params, backend, cancel, session=None, with_refs=None) -> Iterator[str]:
        with self.generation_lock():
            eng = self.engine(backend)
            eng.reset()
            result = GenerationResult()
            self.last_result = result
            memory = None
            eng.pos_offset = 0
            if session is not None:
                result.mode = session.mode
                t0 = time.perf_counter()
                if session.mode == "rag":
                    # a raw prompt (`generate`) is its own query: its first chunk
                    query = session.query if session.query is not None else ids[:self.config.retrieval_interval]
                    ids = self._rag_ids(session, query, with_refs or self._raw_with_refs(ids),
                                        params.max_new_tokens, result.notes)
                else:
                    memory = session
                    eng.pos_offset = self.config.reference_max_tokens
                    eng.reset_prefix_attention()
                t_rag = time.perf_counter() - t0
            try:
                yield from _stream(eng, self.tokenizer, ids, params, result, cancel=cancel, memory=memory)
            finally:
                if session is not None:
                    session.finish(eng, result)
                    if memory is None:  # rag: retrieval happens before the prefill; count it in time to first token
                        result.ttft_s += t_rag

    def generation_lock(self):
        """A context manager holding this model for one generation (or any use of its engines); BusyError at
        once, not a wait, when another thread holds it."""
        model = self

        class _G:
            def __enter__(self):
                if not model._lock.acquire(blocking=False):
                    raise BusyError("this model is already generating in another thread; wait for it to finish, "
                                    "or load a second Model")

            def __exit__(self, *exc):
                model._lock.release()

        return _G()


def _text_or_stream(pieces: Iterator[str], stream: bool, model: Model) -> str | Iterator[str]:
    """A generation's pieces as the caller asked: the iterator, or run to the end and the whole text."""
    if stream:
        return pieces
    for _ in pieces:
        pass
    return model.last_result.text


def check_question(question) -> str:
    """A question as asked: BadArgument (one line) when it is not text or holds nothing but whitespace."""
    if not isinstance(question, str) or not question.strip():
        raise BadArgument("the question is empty: ask something")
    return question.strip()
