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


def pytest_sessionfinish(session, exitstatus):
    """llama-cpp-python opens os.devnull twice at import and never closes it: close those here, so that the run
    ends without a ResourceWarning (the llama.cpp parity tests import it in this process)."""
    import sys

    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        f = getattr(utils, name, None)
        if f is not None and hasattr(f, "close"):
            f.close()


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


# ---- a model and a small bank for the chat and server tests ----------------------------------------------

NOTES = {
    "volcano.md": "# Volcanoes\n\nA volcano is a rupture in the crust of a planet. Lava, ash and gases escape from a "
                  "magma chamber below the surface.\n\nMount Etna is an active volcano in Sicily.",
    "bread.txt": "Bread is a staple food prepared from a dough of flour and water, usually by baking. Yeast makes the "
                 "dough rise.",
    "rivers.md": "The Nile is a major river in north-eastern Africa. It flows into the Mediterranean Sea.",
}


@pytest.fixture(scope="session")
def notes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-notes")
    for name, text in NOTES.items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="session")
def chat_model(tiny_model_dir, notes_dir, tmp_path_factory):
    """(model dir, bank dir): a tiny random model with untied embeddings (a tied random model repeats its last
    input token whatever came before, so greedy answers would not show whether the context was kept) and a bank
    of three notes built with build_or_add."""
    import m3lite
    from m3lite.memory import build_or_add

    model_dir = tiny_model_dir(tie_embeddings=False)
    bank = tmp_path_factory.mktemp("chat-bank") / "bank"
    build_or_add(m3lite.load(model_dir), bank, [str(notes_dir)], warn=lambda msg: None)
    return model_dir, bank


@pytest.fixture(scope="session")
def endless_model(tiny_model_dir):
    """A tied random model with a long context: greedy, it repeats ':' after "Answer:" until the context ends,
    so an answer is still running when a test stops it."""
    return tiny_model_dir(max_seq_len=16384)
