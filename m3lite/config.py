"""ModelConfig: the shape of a model and its explicit-memory settings, in one dataclass."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadArgument


@dataclass
class ModelConfig:
    """Shape of a Llama-architecture decoder plus the Memory3 settings.

    `memory_layers` is None for "the first half of the layers" (the paper's choice); use
    `memory_layer_ids` for the resolved list.
    """

    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 768
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # see m3lite.kernels.rope.rope_inv_freq
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    # explicit memory (Memory3)
    memory_layers: list[int] | None = None
    memory_tokens_per_head: int = 8
    reference_max_tokens: int = 128
    retrieval_interval: int = 64
    retrieval_top_k: int = 5
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.hd

    @property
    def memory_layer_ids(self) -> list[int]:
        if self.memory_layers is None:
            return list(range(max(1, self.n_layers // 2)))
        return sorted(self.memory_layers)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise BadArgument(f"invalid model config: {msg}")

        for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            need(isinstance(getattr(self, k), int) and getattr(self, k) > 0, f"{k} must be a positive integer")
        need(self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads")
        need(self.head_dim is not None or self.dim % self.n_heads == 0,
             "dim must be a multiple of n_heads (or set head_dim)")
        need(self.hd % 2 == 0, "head dimension must be even (RoPE rotates pairs)")
        need(self.norm_eps > 0 and self.rope_theta > 0, "norm_eps and rope_theta must be positive")
        if self.rope_scaling is not None:
            from .kernels.rope import rope_inv_freq

            try:
                ok = np.isfinite(rope_inv_freq(self.hd, self.rope_theta, self.rope_scaling)).all()
            except (ValueError, KeyError, TypeError) as e:
                ok = False
                need(False, f"rope_scaling {self.rope_scaling!r} is not understood ({e})")
            need(bool(ok), "rope_scaling gives non-finite frequencies")
        if self.memory_layers is not None:
            need(all(0 <= i < self.n_layers for i in self.memory_layers), "memory_layers out of range")
            need(len(set(self.memory_layers)) == len(self.memory_layers), "memory_layers has duplicates")
        for k in ("memory_tokens_per_head", "reference_max_tokens", "retrieval_interval", "retrieval_top_k"):
            need(getattr(self, k) > 0, f"{k} must be positive")

    def n_params(self) -> int:
        d, L = self.dim, self.n_layers
        per_layer = 2 * d + d * self.q_dim * 2 + 2 * d * self.kv_dim + 3 * d * self.ffn_dim
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + L * per_layer + d + out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadArgument(f"invalid model config: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise BadArgument(f"invalid model config: {e}") from None

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise BadArgument(f"invalid model config JSON: {e}") from None
        if not isinstance(d, dict):
            raise BadArgument("invalid model config JSON: expected an object")
        return cls.from_dict(d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise BadArgument(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        d = dict(PRESETS[name], name=name)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # for tests: compiles and runs in milliseconds
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=512),
    # the shipped model's shape: trains on a 2-core CPU inside a session
    "default": dict(vocab_size=8192, dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=1024),
    "bench-110m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                       max_seq_len=2048),
    "bench-1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                     max_seq_len=2048),
}
