"""onnxruntime as a second, independent backend over the same model.onnx (same interface as Engine)."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import BadArgument, ModelFileError
from .threads import default_threads


class OrtEngine:
    def __init__(self, cfg: ModelConfig, onnx_path, n_threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        self.n_threads = so.intra_op_num_threads = default_threads(n_threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelFileError(f"onnxruntime cannot load {onnx_path}: {str(e).splitlines()[0]}") from None
        self.cfg = cfg
        self.max_ctx = cfg.max_seq_len
        self.pos_offset = 0
        self.reset()

    def fit_threads(self) -> int:
        """onnxruntime keeps its own thread pool, of the size it was made with (no adapting to busy cores)."""
        return self.n_threads

    def reset(self) -> None:
        c = self.cfg
        empty = np.zeros((1, c.n_kv_heads, 0, c.hd), np.float32)
        self.past = [(empty, empty) for _ in range(c.n_layers)]
        self._n = 0

    @property
    def n_past(self) -> int:
        return self._n

    def _run(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        if self._n + n > self.max_ctx:
            raise BadArgument(f"context full: {self._n} + {n} tokens exceed the model's limit of {self.max_ctx}")
        feed = {
            "input_ids": np.asarray(ids, np.int64).reshape(1, n),
            "position_ids": (self.pos_offset + self._n + np.arange(n, dtype=np.int64)).reshape(1, n),
        }
        for i, (k, v) in enumerate(self.past):
            feed[f"past_key_{i}"] = k
            feed[f"past_value_{i}"] = v
        outs = self.sess.run(None, feed)
        logits = outs[0][0]
        self.past = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.cfg.n_layers)]
        self._n += n
        return logits

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        logits = self._run(np.asarray(ids))
        return logits if all_logits else logits[-1]

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([token]))[-1]
