"""`m3lite import`: a pretrained Llama-family checkpoint (a GGUF file or a Hugging Face folder) -> an m3lite
model directory (ONNX graph + external weights, tokenizer.json, chat template, fingerprint; int8 weights with
`weights="int8"`).

The directory is written into a temporary sibling folder and renamed into place at the end, so a failure or a
kill leaves nothing at `out` that looks like a model.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BadArgument, ModelFileError
from ..modelfile import (CONFIG_FILE, ModelFiles, atomic_write_bytes, fingerprint, sha256_file, write_manifest,
                         write_weights)
from .checkpoint import Checkpoint, CheckpointError

IMPORT_WEIGHTS = ("int8", "fp16", "fp32")
TOKENIZER_JSON = "tokenizer.json"

__all__ = ["import_model", "read_checkpoint", "Checkpoint", "CheckpointError", "IMPORT_WEIGHTS"]


def read_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """Open a GGUF file or a Hugging Face folder; CheckpointError (one line) for anything m3lite cannot import."""
    p = Path(src)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_dir():
        from .hf_folder import read_hf

        return read_hf(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{p} is neither a GGUF file nor a Hugging Face model folder")
    from .gguf_file import read_gguf

    return read_gguf(p)


def memory_settings(cfg, layers: str | None = None, tokens: str | int | None = None):
    """`cfg` with explicit-memory settings from the command line: `layers` "half" (the first half, the paper's),
    "all", or a comma list of layer indices; `tokens` the tokens kept per KV head, or "all" (a whole reference)."""
    from dataclasses import replace

    if layers is not None:
        if layers == "half":
            cfg = replace(cfg, memory_layers=None)
        elif layers == "all":
            cfg = replace(cfg, memory_layers=list(range(cfg.n_layers)))
        else:
            try:
                ids = [int(x) for x in str(layers).split(",") if x.strip()]
            except ValueError:
                raise BadArgument(f"--memory-layers {layers!r}: give half, all or layer numbers like 0,1,2") from None
            cfg = replace(cfg, memory_layers=ids)
    if tokens is not None:
        n = cfg.reference_max_tokens if str(tokens) == "all" else tokens
        try:
            n = int(n)
        except ValueError:
            raise BadArgument(f"--memory-tokens {tokens!r}: give a number of tokens per KV head, or all") from None
        cfg = replace(cfg, memory_tokens_per_head=min(n, cfg.reference_max_tokens))
    cfg.validate()
    return cfg


def import_model(src: str | os.PathLike, out: str | os.PathLike, weights: str = "int8", force: bool = False,
                 progress: Callable[[int, int], None] | None = None, memory_layers: str | None = None,
                 memory_tokens: str | int | None = None, adapter: str | os.PathLike | None = None) -> dict[str, Any]:
    """Import `src` into the model directory `out`; returns what was written. `progress(done, total)` is called
    with bytes of float32 weights converted so far. `memory_layers` and `memory_tokens` set the explicit-memory
    settings (see `memory_settings`; default: the first half of the layers, 8 tokens per KV head). `adapter`: a
    memory adapter file (`m3lite.adapter`) merged into the float32 weights before they are stored; the model
    then takes the adapter's memory settings (giving others as well is refused)."""
    if weights not in IMPORT_WEIGHTS:
        raise BadArgument(f"unknown weights {weights!r}; choose one of {', '.join(IMPORT_WEIGHTS)}")
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise BadArgument(f"{out} already exists; choose a new folder or pass --force to replace it")
    ad = None
    if adapter is not None:
        from ..adapter import read_adapter

        if memory_layers is not None or memory_tokens is not None:
            raise BadArgument("an adapter brings its own memory settings: drop --memory-layers/--memory-tokens")
        ad = read_adapter(adapter)
    ck = read_checkpoint(src)
    cfg = memory_settings(ck.config, memory_layers, memory_tokens)
    if ad is not None:
        ad.check(cfg)
        cfg = ad.settings(cfg)
    from ..tokenizer import load_tokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    for prefix in (f".{out.name}.importing-", f".{out.name}.old-"):
        remove_stale(out.parent, prefix)
    tmp = out.with_name(f".{out.name}.importing-{os.getpid()}")
    tmp.mkdir()
    try:
        tok_path = tmp / TOKENIZER_JSON
        atomic_write_bytes(tok_path, ck.tokenizer_json.encode("utf-8"))
        tok_meta = {**ck.tokenizer_meta, "kind": "bpe"}
        tok = load_tokenizer(tok_path, tok_meta)
        if tok.vocab_size > cfg.vocab_size:
            raise CheckpointError(f"{ck.source}: the tokenizer has {tok.vocab_size} tokens but the embedding only "
                                  f"{cfg.vocab_size} rows")
        total = 4 * cfg.n_params()
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total)

        dtype = "float32" if weights == "fp32" else "float16"
        tensors = ck.stacked(step)
        index = write_weights(tmp, cfg, ad.merged(tensors) if ad is not None else tensors, dtype=dtype)
        extra = {"source": {"path": str(Path(src).resolve()), **ck.info},
                 "chat_template": ck.chat_template}
        if ad is not None:
            extra["adapter"] = ad.info()
        from ..onnx_graph import write_graph  # onnx takes ~1 s to import: only an import needs it

        write_graph(tmp, cfg, index, fingerprint(cfg, index["sha256"], sha256_file(tok_path)))
        fp = write_manifest(tmp, cfg, index, extra=extra, tokenizer_file=TOKENIZER_JSON, tokenizer_meta=tok_meta)
        files = ModelFiles.open(tmp, verify=False)
        if weights == "int8":
            from ..int8_weights import write as write_q8

            write_q8(tmp, files)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"model": str(out), "fingerprint": fp, "weights": weights, "params": cfg.n_params(),
            "source": str(src), "layers": cfg.n_layers, "vocab": cfg.vocab_size,
            "chat_template": ck.chat_template is not None, "memory_layers": cfg.memory_layer_ids,
            "memory_tokens_per_head": cfg.memory_tokens_per_head, "adapter": ad.info() if ad is not None else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove the folders `prefix + PID` in `folder` that a killed process left (its PID no longer runs)."""
    for p in folder.glob(prefix + "*"):
        try:
            os.kill(int(p.name[len(prefix):].split(".")[0]), 0)
            continue  # still running: not ours to remove
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`; an old `out` (force) is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        try:
            # an old model stops looking valid before it is moved
            (out / CONFIG_FILE).unlink(missing_ok=True) if out.is_dir() else None
            os.replace(out, old)
        except OSError as e:
            raise ModelFileError(f"cannot replace {out}: {e.strerror or e}") from None
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
