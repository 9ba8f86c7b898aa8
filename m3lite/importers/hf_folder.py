"""Read a Hugging Face Llama-family model folder (config.json, *.safetensors, tokenizer.json) as a Checkpoint.

The safetensors files are read here rather than through the `safetensors` package: numpy has no bfloat16, in
which most checkpoints are published, and the format is one JSON header before raw little-endian arrays, so
reading it ourselves also lets us check every tensor's extent against the file before mapping it."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from .checkpoint import Checkpoint, CheckpointError, reference_marker

MODEL_TYPES = ("llama", "mistral")
MAX_CONTEXT = 8192
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
MAX_HEADER = 100 << 20

NAMES = {
    "tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight",
    "attention_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight", "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight", "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w1": "model.layers.{i}.mlp.gate_proj.weight", "w3": "model.layers.{i}.mlp.up_proj.weight",
    "w2": "model.layers.{i}.mlp.down_proj.weight",
}


def _json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing; a Hugging Face model folder needs config.json, "
                                  f"*.safetensors and tokenizer.json")
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return d


def safetensors_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header, offset of the data section, file size) of a .safetensors file, its header checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file or is truncated (header of {n} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header")
    return header, 8 + n, size


def safetensors_index(path: Path) -> dict[str, tuple[Path, str, tuple[int, ...], int, int]]:
    """name -> (file, dtype, shape, start, end) of every tensor in one .safetensors file, checked against its size."""
    header, base, size = safetensors_header(path)
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = t["dtype"], tuple(int(x) for x in t["shape"]), t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry") from None
        if base + b > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
        out[name] = (path, dtype, shape, base + a, base + b)
    return out


def read_tensor(entry, name: str) -> np.ndarray:
    """One tensor of a `safetensors_index` entry as float32 (memory-mapped, then converted)."""
    path, dtype, shape, a, b = entry
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name} is {dtype}; m3lite imports F32, F16 and BF16 safetensors")
    dt = DTYPES[dtype]
    if (b - a) != int(np.prod(shape)) * dt.itemsize:
        raise CheckpointError(f"{path}: tensor {name} has {b - a} bytes for shape {shape}; the file is corrupt")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=a, shape=(b - a,)) if b > a else np.zeros(0, np.uint8)
    x = raw.view(dt).reshape(shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def read_hf(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    src = str(folder)
    c = _json(folder / "config.json")
    model_type = c.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{src}: model_type {model_type!r} is not supported; m3lite imports Llama-family "
                              f"models ({', '.join(MODEL_TYPES)})")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise CheckpointError(f"{src}: attention or MLP biases are not supported")
    window = c.get("sliding_window")
    max_pos = int(c.get("max_position_embeddings", 2048))
    if window is not None and int(window) < min(max_pos, MAX_CONTEXT):
        raise CheckpointError(f"{src}: sliding-window attention ({window} tokens) is not supported")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(c.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = None
    if rope_type == "llama3":
        scaling = {"type": "llama3", **{k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                       "original_max_position_embeddings")}}
    elif rope_type not in ("default", None):
        raise CheckpointError(f"{src}: RoPE scaling {rope_type!r} is not supported")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no *.safetensors weights (other weight formats are not read)")
    index: dict[str, Any] = {}
    for f in files:
        index.update(safetensors_index(f))
    n_heads = int(c["num_attention_heads"]) if "num_attention_heads" in c else 0
    try:
        dim = int(c["hidden_size"])
        hd = int(c.get("head_dim") or dim // n_heads)
        tied = bool(c.get("tie_word_embeddings", False)) or "lm_head.weight" not in index
        cfg = ModelConfig(vocab_size=int(c["vocab_size"]), dim=dim, n_layers=int(c["num_hidden_layers"]),
                          n_heads=n_heads, n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
                          ffn_dim=int(c["intermediate_size"]), head_dim=hd if hd * n_heads != dim else None,
                          norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                          max_seq_len=min(max_pos, MAX_CONTEXT), tie_embeddings=tied,
                          name=str(c.get("_name_or_path") or folder.name))
    except KeyError as e:
        raise CheckpointError(f"{src}/config.json lacks {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{src}/config.json: {e}") from None
    except Exception as e:  # BadArgument from ModelConfig.validate
        raise CheckpointError(f"{src}/config.json: {e}") from None

    def tensor(name: str, layer: int | None) -> np.ndarray:
        key = NAMES[name].format(i=layer)
        if key not in index:
            raise CheckpointError(f"{src}: tensor {key} is missing")
        return read_tensor(index[key], key)

    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path} is missing; m3lite reads the tokenizer from tokenizer.json")
    tok_json = tok_path.read_text(encoding="utf-8")
    tcfg = _json(folder / "tokenizer_config.json", required=False)
    gen = _json(folder / "generation_config.json", required=False)
    meta = _specials(tok_json, tcfg, gen, c, src)
    template = tcfg.get("chat_template")
    jinja = folder / "chat_template.jinja"  # transformers >= 4.43 may save it as its own file
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return Checkpoint(source=src, config=cfg, tensor=tensor, tokenizer_json=tok_json, tokenizer_meta=meta,
                      chat_template=template, info={"format": "hf", "dtypes": sorted({e[1] for e in index.values()})})


def _specials(tok_json: str, tcfg: dict, gen: dict, c: dict, src: str) -> dict[str, Any]:
    try:
        tj = json.loads(tok_json)
        vocab = dict(tj["model"]["vocab"]) if isinstance(tj["model"].get("vocab"), dict) else {}
        for t in tj.get("added_tokens", []):
            vocab[t["content"]] = int(t["id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{src}/tokenizer.json is malformed ({e})") from None

    def text(v: Any) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    def ids(v: Any) -> list[int]:
        return [int(x) for x in (v if isinstance(v, list) else [v]) if x is not None]

    bos_token, eos_token = text(tcfg.get("bos_token")), text(tcfg.get("eos_token"))
    bos = vocab.get(bos_token, -1) if bos_token else ids(c.get("bos_token_id"))[0] if ids(c.get("bos_token_id")) else -1
    eos_ids = ids(gen.get("eos_token_id")) or ids(c.get("eos_token_id"))
    if eos_token in vocab:
        eos_ids = [vocab[eos_token]] + eos_ids
    eos_ids = list(dict.fromkeys(eos_ids))
    if not eos_ids:
        raise CheckpointError(f"{src}: no end-of-sequence token (eos_token in tokenizer_config.json)")
    inv = {i: t for t, i in vocab.items()}
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:  # tokenizer.json's post-processor inserts it for Llama-style tokenizers
        add_bos = bos >= 0 and bos_token is not None and f'"{bos_token}"' in json.dumps(tj.get("post_processor"))
    pad = ids(c.get("pad_token_id")) or ids(gen.get("pad_token_id"))
    meta = {"bos_id": bos, "add_bos": bool(add_bos) and bos >= 0, "eos_ids": eos_ids,
            "pad_id": pad[0] if pad else eos_ids[0], "bos_token": inv.get(bos, "") if bos >= 0 else "",
            "eos_token": inv.get(eos_ids[0], "")}
    meta["ref_id"] = reference_marker(meta, vocab.get)
    return meta
