"""Read a Llama-family GGUF file (llama.cpp's format) as a Checkpoint: metadata through the `gguf` package,
tensors dequantized by `gguf.quants`, q/k rows put back in "rotate half" order, the tokenizer rebuilt from the
file's vocabulary, merges and pre-tokenizer type."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from .checkpoint import Checkpoint, CheckpointError, permute_back, reference_marker

# the types m3lite dequantizes (through the gguf package); others are refused by name
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = ("llama",)  # Llama 2/3, SmolLM, TinyLlama and Mistral all convert as "llama"
MAX_CONTEXT = 8192  # the engine's context is capped here (the KV cache is allocated for it, lazily)

# runtime name -> GGUF name ("{i}": the layer)
NAMES = {
    "tok_embeddings": "token_embd.weight", "norm": "output_norm.weight", "output": "output.weight",
    "attention_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight", "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight", "ffn_norm": "blk.{i}.ffn_norm.weight",
    "w1": "blk.{i}.ffn_gate.weight", "w3": "blk.{i}.ffn_up.weight", "w2": "blk.{i}.ffn_down.weight",
}


def read_gguf(path: str | Path) -> Checkpoint:
    import gguf

    path = Path(path)
    src = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{src} is not a readable GGUF file (truncated or corrupt: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    size = path.stat().st_size
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{src} is truncated: tensor {t.name} ends past the end of the file")

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            raise CheckpointError(f"{src}: metadata {key} is unreadable; the file is corrupt") from None

    arch = field("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{src}: architecture {arch!r} is not supported; m3lite imports Llama-family models "
                              f"({', '.join(ARCHITECTURES)})")

    def need(key: str) -> Any:
        v = field(f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{src}: metadata {arch}.{key} is missing")
        return v

    if (field(f"{arch}.expert_count") or 0) > 0:
        raise CheckpointError(f"{src}: mixture-of-experts models are not supported")
    scaling_type = field(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none") and not (scaling_type == "linear"
                                                   and field(f"{arch}.rope.scaling.factor", 1.0) == 1.0):
        raise CheckpointError(f"{src}: RoPE scaling {scaling_type!r} is not supported")
    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{src}: the file has no tokenizer (tokenizer.ggml.tokens)")
    n_heads = int(need("attention.head_count"))
    n_kv = int(field(f"{arch}.attention.head_count_kv", n_heads))
    dim = int(need("embedding_length"))
    hd = int(field(f"{arch}.attention.key_length", dim // n_heads))
    if int(field(f"{arch}.rope.dimension_count", hd)) != hd:
        raise CheckpointError(f"{src}: partial RoPE (rope.dimension_count != head size) is not supported")
    rope_scaling = None
    if "rope_freqs.weight" in tensors:
        rope_scaling = {"type": "freq_factors", "factors": [float(x) for x in _dequant(tensors["rope_freqs.weight"])]}
    try:
        cfg = ModelConfig(
            vocab_size=int(field(f"{arch}.vocab_size", len(tokens))), dim=dim, n_layers=int(need("block_count")),
            n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=int(need("feed_forward_length")),
            head_dim=hd if hd * n_heads != dim else None,
            norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
            max_seq_len=min(int(field(f"{arch}.context_length", 2048)), MAX_CONTEXT),
            tie_embeddings="output.weight" not in tensors, name=str(field("general.name", path.stem)))
    except Exception as e:  # BadArgument from validate: the metadata is inconsistent
        raise CheckpointError(f"{src}: {e}") from None

    def tensor(name: str, layer: int | None) -> np.ndarray:
        gname = NAMES[name].format(i=layer)
        t = tensors.get(gname)
        if t is None:
            raise CheckpointError(f"{src}: tensor {gname} is missing")
        a = _dequant(t, src)
        if name == "wq":
            a = permute_back(a, n_heads)
        elif name == "wk":
            a = permute_back(a, n_kv)
        return a

    from ..tokenizer_gguf import bpe_json_from_gguf

    fields = {k: field(k) for k in reader.fields if k.startswith("tokenizer.ggml.")}
    tok_json = bpe_json_from_gguf(fields)
    meta = _specials(fields, tokens)
    meta["ref_id"] = reference_marker(meta, {t: i for i, t in enumerate(tokens)}.get)
    meta["pre"] = str(fields.get("tokenizer.ggml.pre") or "default")  # for a GGUF export of the model
    return Checkpoint(source=src, config=cfg, tensor=tensor, tokenizer_json=tok_json, tokenizer_meta=meta,
                      chat_template=field("tokenizer.chat_template"),
                      info={"format": "gguf", "file_type": field("general.file_type"),
                            "types": sorted({t.tensor_type.name for t in reader.tensors})})


def _dequant(t, src: str = "") -> np.ndarray:
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{src}: tensor {t.name} has type {kind}, which m3lite does not import (supported: "
                              f"{', '.join(SUPPORTED_TYPES)}); convert the model with another quantization")
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


def _specials(fields: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    def tid(key: str) -> int:
        v = fields.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else -1

    bos, eos, eot = tid("bos_token_id"), tid("eos_token_id"), tid("eot_token_id")
    eos_ids = [i for i in (eos, eot) if i >= 0]
    if not eos_ids:
        raise CheckpointError("the GGUF tokenizer has no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: sentencepiece vocabularies add BOS, GPT-2-style ones do not
        add_bos = fields.get("tokenizer.ggml.model") == "llama"
    pad = tid("padding_token_id")
    return {"bos_id": bos, "add_bos": bool(add_bos) and bos >= 0, "eos_ids": list(dict.fromkeys(eos_ids)),
            "pad_id": pad if pad >= 0 else eos_ids[0],
            "bos_token": tokens[bos] if bos >= 0 else "", "eos_token": tokens[eos_ids[0]]}
