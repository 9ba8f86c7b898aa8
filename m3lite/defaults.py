"""The default model (shipped inside the package) and the default bank (wiki:en, built on first use)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import M3Error
from .modelfile import CONFIG_FILE, atomic_write_bytes, cache_dir

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "default-model"
DEFAULT_SOURCES = ("wiki:en",)


def default_model_dir() -> Path:
    """$M3LITE_MODEL, else the model shipped in the package."""
    env = os.environ.get("M3LITE_MODEL")
    if env:
        return Path(env)
    if (DEFAULT_MODEL / CONFIG_FILE).is_file():
        return DEFAULT_MODEL
    raise M3Error("no default model is installed in this copy of m3lite: pass --model DIR (make a random one "
                  "with `python -m converters.init --preset tiny --out DIR`)")


def default_sources() -> list[str]:
    """What the default bank holds: $M3LITE_DEFAULT_SOURCES (comma-separated), else wiki:en."""
    env = os.environ.get("M3LITE_DEFAULT_SOURCES")
    return [s for s in env.split(",") if s] if env else list(DEFAULT_SOURCES)


def default_bank_dir(model) -> Path:
    """Where the default bank of `model` lives: one per model fingerprint, in the user's cache."""
    tag = "-".join(s.replace(":", "-").replace("/", "_") for s in default_sources())
    return cache_dir() / "banks" / f"{tag}-{model.fingerprint[:16]}"


def ensure_default_bank(model, progress=None, warn=print) -> Path:
    """The default bank of `model`: built on first use (resumable, with `progress`), then opened as it is.

    A marker beside the bank records a finished build, so later starts do not re-read the sources."""
    from .memory import build_or_add

    path = default_bank_dir(model)
    done = path.with_name(path.name + ".complete")
    if done.is_file() and (path / "manifest.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    build_or_add(model, path, default_sources(), warn=warn, progress=progress)
    atomic_write_bytes(done, (model.fingerprint + "\n").encode())
    return path
