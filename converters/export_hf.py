"""Export an m3lite model directory as a Hugging Face Llama checkpoint that `transformers.LlamaForCausalLM` loads.

    python -m converters.export_hf MODEL_DIR --out HF_DIR [--dtype float32|float16]

Writes config.json, model.safetensors, tokenizer.model (our sentencepiece model, as it is), tokenizer_config.json
and generation_config.json. The safetensors file is written here (an 8-byte header length, a JSON header, the raw
little-endian tensors back to back), so the export needs numpy only: no torch, no safetensors package.

Our math is HF Llama's: RMSNorm, SwiGLU, GQA and RoPE in the "rotate half" form, so every tensor is copied as
it is (no q/k permutation; the GGUF export is the one that permutes). The checkpoint is the base model: the
explicit-memory settings have no place in a Llama config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from m3lite.config import ModelConfig
from m3lite.errors import BadArgument, M3Error
from m3lite.modelfile import ModelFiles

# runtime kind -> HF name inside model.layers.{i}
HF_LAYER_NAMES = {
    "attention_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj",
}
HF_GLOBAL_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
LAYER_ORDER = tuple(HF_LAYER_NAMES)
HF_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}
BOS, EOS, UNK, PAD = 1, 2, 0, 3


def model_tensors(cfg: ModelConfig, weights: dict[str, np.ndarray],
                  tied_output: bool = False) -> Iterator[tuple[str, int | None, np.ndarray]]:
    """(kind, layer, array) of every tensor of a Llama checkpoint, in checkpoint order: embeddings, each layer's
    tensors, final norm, output. A tied model has no output tensor unless `tied_output` (then the token
    embedding is given again as "output"). Arrays are views of `weights` in their stored dtype."""
    yield "tok_embeddings", None, weights["tok_embeddings"]
    for i in range(cfg.n_layers):
        for kind in LAYER_ORDER:
            yield kind, i, weights[kind][i]
    yield "norm", None, weights["norm"]
    if not cfg.tie_embeddings:
        yield "output", None, weights["output"]
    elif tied_output:
        yield "output", None, weights["tok_embeddings"]


def hf_name(kind: str, layer: int | None) -> str:
    if layer is None:
        return HF_GLOBAL_NAMES[kind] + ".weight"
    return f"model.layers.{layer}.{HF_LAYER_NAMES[kind]}.weight"


def open_model(model_dir: str | os.PathLike) -> ModelFiles:
    """The model directory to export, checked (one-line errors for a missing or corrupt model)."""
    return ModelFiles.open(model_dir)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; it becomes `path` only when the block completes (renamed), and
    is removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A file opened for writing that appears at `path` only when the block completes (tmp + fsync + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json of the checkpoint (read by transformers 4.x and 5.x alike)."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": float(cfg.norm_eps),
        "rope_theta": float(cfg.rope_theta),  # transformers 4.x
        "rope_scaling": None,
        "rope_parameters": rope,  # transformers 5.x
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]], dtype: str,
                      metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (name, array) as a safetensors file of `dtype`; return its size in bytes. Each tensor is
    converted as it is written, so peak memory is one tensor, not the model."""
    code, np_dtype = HF_DTYPES[dtype]
    le = np.dtype(np_dtype).newbyteorder("<")
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, a in tensors:
        n = int(np.prod(a.shape)) * le.itemsize
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)  # the data starts 8-byte aligned
    with atomic_output(path) as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, a in tensors:
            with np.errstate(over="ignore"):  # float16 overflow is refused just below
                b = np.ascontiguousarray(a, dtype=le)
            if dtype == "float16" and not np.isfinite(b).all():
                raise BadArgument(f"tensor {name} has values that float16 cannot hold; export as float32")
            f.write(memoryview(b.reshape(-1)).cast("B"))
    return 8 + len(head) + offset


def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the model at `model_dir` as a Hugging Face Llama checkpoint in `out_dir`; return `out_dir`."""
    if dtype not in HF_DTYPES:
        raise BadArgument(f"unknown dtype {dtype!r}; choose one of {', '.join(HF_DTYPES)}")
    files = open_model(model_dir)
    cfg = files.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # written last: an interrupted export does not look loadable
    tensors = [(hf_name(kind, layer), a) for kind, layer, a in model_tensors(cfg, files.weights)]
    write_safetensors(out / "model.safetensors", tensors, dtype,
                      {"format": "pt", "m3lite.fingerprint": files.fingerprint})
    _write_bytes(out / "tokenizer.model", files.tokenizer_path.read_bytes())
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False,
    }
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    _write_json(out / "config.json", hf_config(cfg, dtype))
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)


def _write_json(path: Path, obj: dict) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def run_cli(prog: str, description: str, add_args, export) -> int:
    """The shared `python -m converters.export_*` entry: parse, export, print one line; errors: one line,
    exit 2."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("model", help="m3lite model directory to export")
    add_args(p)
    args = p.parse_args()
    try:
        print(export(args))
    except M3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the export: {e}", file=sys.stderr)
        return 2
    return 0


def main() -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="checkpoint folder to write (created)")
        p.add_argument("--dtype", default="float32", choices=list(HF_DTYPES), help="tensor dtype (default float32)")

    def export(args) -> str:
        out = export_hf(args.model, args.out, dtype=args.dtype)
        return f"{out}: Hugging Face Llama checkpoint ({args.dtype}); load it with " \
               f"transformers.LlamaForCausalLM.from_pretrained({str(out)!r})"

    return run_cli("python -m converters.export_hf", "Export an m3lite model as a Hugging Face Llama checkpoint.",
                   add_args, export)


if __name__ == "__main__":
    sys.exit(main())
