"""Export a model to an m3lite model directory: weights, tokenizer, the hand-built ONNX graph
(m3lite.onnx_graph), manifest. Weights are stored as float32 or float16 (`dtype`: half the disk).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from m3lite.config import ModelConfig
from m3lite.errors import BadArgument
from m3lite.modelfile import (CONFIG_FILE, FLOAT_DTYPES, TOKENIZER_FILE, atomic_write_bytes, fingerprint,
                              sha256_file, write_manifest, write_weights)
from m3lite.onnx_graph import write_graph


def export(model: Any, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
           dtype: str = "float32") -> str:
    """Write `model` (a converters.model.Transformer) and its tokenizer as a model directory with its weights
    stored as `dtype` ("float32" or "float16"); return the fingerprint."""
    from .model import to_stacked

    return export_stacked(model.cfg, to_stacked(model), tokenizer_path, out_dir, dtype=dtype)


def export_stacked(cfg: ModelConfig, tensors: dict[str, np.ndarray], tokenizer_path: str | os.PathLike,
                   out_dir: str | os.PathLike, dtype: str = "float32") -> str:
    """Like `export`, from stacked float32 runtime tensors (see m3lite.modelfile.tensor_shapes)."""
    check_dtype(dtype)
    out = Path(out_dir)
    tok_src = Path(tokenizer_path)
    _check_tokenizer(tok_src, cfg.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    # An older model here must stop looking valid before its files are replaced; config.json comes back last.
    (out / CONFIG_FILE).unlink(missing_ok=True)

    index = write_weights(out, cfg, tensors, dtype=dtype)
    tok = out / TOKENIZER_FILE
    if not (tok.exists() and tok.resolve() == tok_src.resolve()):
        _atomic_copy(tok_src, tok)
    fp = fingerprint(cfg, index["sha256"], sha256_file(tok))

    write_graph(out, cfg, index, fp)

    written = write_manifest(out, cfg, index)
    assert written == fp, "fingerprint mismatch between graph metadata and manifest"
    return fp


def check_dtype(dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise BadArgument(f"unknown weight dtype {dtype!r}; exports write {' or '.join(FLOAT_DTYPES)}")


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    if not path.is_file():
        raise BadArgument(f"tokenizer {path} does not exist")
    try:
        n = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (RuntimeError, OSError) as e:
        raise BadArgument(f"{path} is not a sentencepiece model ({e})") from None
    if n != vocab_size:
        raise BadArgument(f"tokenizer {path} has {n} pieces but the model's vocab_size is {vocab_size}; "
                          f"train a tokenizer of that size")


def _atomic_copy(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, Path(src).read_bytes())
