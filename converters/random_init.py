"""The random initial weights: the order they are drawn in and the draw, shared by `converters.model.Transformer`
(the PyTorch reference) and `converters.init` (numpy, no torch), so both give the same values for a seed."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from m3lite.config import ModelConfig

INIT_STD = 0.02
MATRIX_KINDS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def init_order(cfg: ModelConfig) -> Iterator[tuple[str, int | None]]:
    """The (kind, layer) order in which random weights are drawn; norms are ones and draw nothing."""
    yield "tok_embeddings", None
    for i in range(cfg.n_layers):
        for kind in MATRIX_KINDS:
            yield kind, i
    if not cfg.tie_embeddings:
        yield "output", None


def fill_random(cfg: ModelConfig, seed: int,
                target: Callable[[str, int | None], np.ndarray]) -> Iterator[tuple[str, int | None, np.ndarray]]:
    """Fill `target(kind, layer)` (a C-contiguous float32 array) with normal(0, INIT_STD) for each weight in
    `init_order`, yielding (kind, layer, array) after each fill."""
    rng = np.random.Generator(np.random.PCG64(seed))
    for kind, layer in init_order(cfg):
        a = target(kind, layer)
        rng.standard_normal(dtype=np.float32, out=a)
        a *= np.float32(INIT_STD)
        yield kind, layer, a
