"""The default model (SmolLM2-135M-Instruct, pulled on first use) and the default bank (wiki:en, built on first
use)."""
from __future__ import annotations

import os
from pathlib import Path

from .modelfile import atomic_write_bytes, cache_dir

DEFAULT_SOURCES = ("wiki:en",)
# The default bank's memories: int4 halves a record of the default model (memory at all 30 layers, 32 tokens
# per KV head: 202 KB per reference instead of 386 KB, ~2.6 GB for wiki:en's ~13,000 references instead of
# ~5 GB) for 66% instead of 73% of the made-up facts answered (the first adapter: 64 instead of 65; README,
# "Explicit memory ... adapted"). Banks users build from their own notes are int8.
DEFAULT_QUANT = "int4"


def needs_pull() -> bool:
    """Whether `default_model_dir()` would have to download the default model first."""
    from .pull import DEFAULT_NAME, pulled

    return not os.environ.get("M3LITE_MODEL") and pulled(DEFAULT_NAME) is None


def default_model_dir(say=None, progress=None) -> Path:
    """$M3LITE_MODEL, else the default model (m3lite.pull.DEFAULT_NAME), pulled into the cache the first time
    (`say(line)` announces it; `progress(stage, done, total)` follows the import)."""
    from .pull import DEFAULT_NAME, model_dir, pull, pulled

    env = os.environ.get("M3LITE_MODEL")
    if env:
        return Path(env)
    found = pulled(DEFAULT_NAME)
    if found is not None:
        return found
    if say:
        say(f"no model given: pulling the default model ({DEFAULT_NAME}) into {model_dir(DEFAULT_NAME)} once "
            f"(`m3lite pull`; --model DIR or $M3LITE_MODEL use another)")
    return Path(pull(DEFAULT_NAME, progress=progress, say=say)["model"])


def default_sources() -> list[str]:
    """What the default bank holds: $M3LITE_DEFAULT_SOURCES (comma-separated), else wiki:en."""
    env = os.environ.get("M3LITE_DEFAULT_SOURCES")
    return [s for s in env.split(",") if s] if env else list(DEFAULT_SOURCES)


def default_bank_dir(model) -> Path:
    """Where the default bank of `model` lives: one per model fingerprint and bank format, in the user's cache
    (a bank of an older format is left alone, not refused: a new one is built beside it)."""
    from .bank import VERSION

    tag = "-".join(s.replace(":", "-").replace("/", "_") for s in default_sources())
    return cache_dir() / "banks" / f"{tag}-{model.fingerprint[:16]}-v{VERSION}"


def default_bank_built(model) -> bool:
    """True when the default bank of `model` is built (its marker is written after the last reference)."""
    from .bank import Bank

    path = default_bank_dir(model)
    return path.with_name(path.name + ".complete").is_file() and Bank.exists(path)


def ensure_default_bank(model, progress=None, warn=print) -> Path:
    """The default bank of `model`: built on first use (resumable, with `progress`), then opened as it is.

    A marker beside the bank records a finished build, so later starts do not re-read the sources."""
    from .memory import build_or_add

    path = default_bank_dir(model)
    if default_bank_built(model):
        return path
    done = path.with_name(path.name + ".complete")
    path.parent.mkdir(parents=True, exist_ok=True)
    # lazy memories and vectors: a reference's memory is encoded when a question first retrieves it, and its
    # sentence vector computed when a word search first finds it, so the first answer waits for the references'
    # tokens and words (~12 s for wiki:en on 2 cores), not for every vector (~2 min) and memory (~30 min)
    build_or_add(model, path, default_sources(), quant=DEFAULT_QUANT, warn=warn, progress=progress, encode="lazy",
                 vectors="lazy")
    atomic_write_bytes(done, (model.fingerprint + "\n").encode())
    return path
