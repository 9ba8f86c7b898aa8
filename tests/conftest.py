"""Shared fixtures. Model directories are built without torch (numpy weights, cached tokenizer)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(seed=0, dtype="float32", **config_overrides) -> Path of a random model directory
    built from the "tiny" preset with those overrides (e.g. n_kv_heads=1, head_dim=48, tie_embeddings=False),
    its weights stored as `dtype`. Directories are built once per session and shared: treat them as
    read-only."""
    pytest.importorskip("onnx")
    from converters.init import init_model_dir
    from m3lite.config import ModelConfig

    made: dict[tuple, Path] = {}

    def make(seed: int = 0, dtype: str = "float32", **overrides) -> Path:
        key = (seed, dtype, repr(sorted(overrides.items())))
        if key not in made:
            cfg = ModelConfig.preset("tiny", **overrides)
            out = tmp_path_factory.mktemp("model")
            init_model_dir(out, cfg, seed=seed, dtype=dtype)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def sentence_embedder():
    """Banks embed their references with the sentence embedder: it is pulled once into the user's (or CI's)
    cache, and every test, and every command a test runs, is pointed at it with M3LITE_EMBEDDER (tests that
    set their own M3LITE_CACHE would otherwise pull it again)."""
    import os

    if not os.environ.get("M3LITE_EMBEDDER"):
        from m3lite.embedder import DEFAULT_EMBEDDER, embedder_pulled, pull_embedder

        os.environ["M3LITE_EMBEDDER"] = str(embedder_pulled(DEFAULT_EMBEDDER) or pull_embedder(DEFAULT_EMBEDDER))
    return os.environ["M3LITE_EMBEDDER"]
