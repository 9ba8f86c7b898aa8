"""The Python API: `m3lite.load(dir)` -> Model, with `generate` and `logits` over either backend."""
from __future__ import annotations

import os
import threading
from typing import Iterator, Sequence

import numpy as np

from .config import ModelConfig
from .errors import BadArgument, BusyError
from .generate import GenerationResult, SamplingParams, stream as _stream
from .modelfile import ModelFiles
from .tokenizer import Tokenizer

BACKENDS = ("numba", "onnxruntime")


class Model:
    """A loaded model: config, tokenizer, memory-mapped weights and lazily built backends.

    One generation at a time per Model; a second concurrent call raises BusyError.
    """

    def __init__(self, files: ModelFiles, n_threads: int | None = None):
        self.files = files
        self.config: ModelConfig = files.config
        self.tokenizer = Tokenizer(files.tokenizer_path)
        if self.tokenizer.vocab_size != self.config.vocab_size:
            raise BadArgument(f"tokenizer has {self.tokenizer.vocab_size} pieces but the model expects "
                              f"{self.config.vocab_size}; the model directory is inconsistent")
        self.n_threads = n_threads
        self._engines: dict[str, object] = {}
        self._lock = threading.Lock()
        self.last_result: GenerationResult | None = None

    @classmethod
    def load(cls, model_dir: str | os.PathLike, verify: bool = True, n_threads: int | None = None) -> "Model":
        return cls(ModelFiles.open(model_dir, verify=verify), n_threads=n_threads)

    @property
    def fingerprint(self) -> str:
        return self.files.fingerprint

    def engine(self, backend: str = "numba"):
        if backend not in BACKENDS:
            raise BadArgument(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend not in self._engines:
            if backend == "numba":
                from .engine import Engine

                self._engines[backend] = Engine(self.config, self.files.weights, n_threads=self.n_threads)
            else:
                from .ort_backend import OrtEngine

                self._engines[backend] = OrtEngine(self.config, self.files.onnx_path, n_threads=self.n_threads)
        return self._engines[backend]

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
        with self._guard():
            eng = self.engine(backend)
            eng.reset()
            return np.array(eng.prefill(ids, all_logits=True), dtype=np.float32, copy=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=True)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.1, seed: int | None = None,
                 stop: Sequence[str] | None = None, stream: bool = False, backend: str = "numba",
                 cancel=None) -> str | Iterator[str]:
        """Generate a continuation of `prompt` (text, or token ids used as given).

        stream=False returns the text; stream=True returns an iterator of text pieces. After the call (or the
        iteration) `model.last_result` holds tokens, finish reason and timings. `cancel` is an optional
        callable (e.g. `threading.Event().is_set`) that stops the generation when it returns True.
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()))
        params.validate()
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(self._ids(prompt))
        self.engine(backend)  # fail early on a bad backend name
        it = self._run(ids, params, backend, cancel)
        if stream:
            return it
        for _ in it:
            pass
        return self.last_result.text

    def _run(self, ids, params, backend, cancel) -> Iterator[str]:
        with self._guard():
            eng = self.engine(backend)
            eng.reset()
            result = GenerationResult()
            self.last_result = result
            yield from _stream(eng, self.tokenizer, ids, params, result, cancel=cancel)

    def _guard(self):
        model = self

        class _G:
            def __enter__(self):
                if not model._lock.acquire(blocking=False):
                    raise BusyError("this model is already generating in another thread; wait for it to finish, "
                                    "or load a second Model")

            def __exit__(self, *exc):
                model._lock.release()

        return _G()
