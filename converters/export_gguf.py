"""Export an m3lite model directory as a llama.cpp GGUF file (architecture "llama"), F32, F16 or Q8_0.

    python -m converters.export_gguf MODEL_DIR --out model.gguf [--type f32|f16|q8_0]

The base model only: explicit memory has no place in llama.cpp. Needs numpy and the `gguf` package (pure
Python, `pip install 'm3lite[export]'`), not torch.

RoPE: our q/k weights are in the "rotate half" form (Hugging Face's: dimension j of a head pairs with
j + hd/2), while llama.cpp's llama architecture rotates adjacent pairs (2i, 2i+1). So, like llama.cpp's own
convert_hf_to_gguf.py, the rows of wq and wk are permuted within each head: new row 2i is old row i and new row
2i+1 is old row i + hd/2 (`interleave_rope_rows`). q.k is a sum over the head dimension, so the attention
scores, and everything after them, are unchanged; v and the other tensors are copied as they are.

Tensors: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
ffn_down}, output_norm, output (the token embedding again when the embeddings are tied). Q8_0 quantizes the
matrices (blocks of 32 along a row, one float16 scale: 34 bytes per 32 weights); norms, and any matrix whose row
length is not a multiple of 32, stay F32, as in llama.cpp's converter. The tokenizer is our sentencepiece model
("llama" tokenizer: pieces, scores and types from its proto; <unk> 0, <s> 1, </s> 2, <pad> 3).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from m3lite.config import ModelConfig
from m3lite.errors import BadArgument

from .export_hf import BOS, EOS, PAD, UNK, atomic_path, model_tensors, open_model, run_cli

TYPES = ("f32", "f16", "q8_0")
GGUF_LAYER_NAMES = {
    "attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down",
}
GGUF_GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
Q8_BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise BadArgument("the GGUF export needs the gguf package: pip install 'm3lite[export]' (or pip install "
                          "gguf)") from None
    return gguf


def gguf_name(kind: str, layer: int | None) -> str:
    if layer is None:
        return GGUF_GLOBAL_NAMES[kind] + ".weight"
    return f"blk.{layer}.{GGUF_LAYER_NAMES[kind]}.weight"


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q or k projection [n_heads * hd, in] from the rotate-half RoPE layout to llama.cpp's
    adjacent-pairs layout: within each head, row i -> 2i and row i + hd/2 -> 2i + 1."""
    rows, cols = w.shape
    hd = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols))


def _tokenizer_fields(tokenizer_path: Path) -> dict:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(tokenizer_path.read_bytes())
    return {
        "tokens": [p.piece.encode("utf-8") for p in m.pieces],
        "scores": [float(p.score) for p in m.pieces],
        # sentencepiece's piece types are numbered as llama.cpp's token types (1 normal, 2 unknown, 3 control,
        # 4 user defined, 5 unused, 6 byte)
        "types": [int(p.type) for p in m.pieces],
        "add_space_prefix": bool(m.normalizer_spec.add_dummy_prefix),
        "remove_extra_whitespaces": bool(m.normalizer_spec.remove_extra_whitespaces),
    }


def _bpe_fields(files) -> dict:
    """An imported model's byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" vocabulary: tokens by
    id, merges, types (3 for special tokens), the special ids and the pre-tokenizer the import recorded."""
    import json

    doc = json.loads(files.tokenizer_path.read_text(encoding="utf-8"))
    model = doc.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise BadArgument(f"{files.tokenizer_path} is not a BPE tokenizer; the GGUF export writes BPE and "
                          f"sentencepiece vocabularies")
    vocab = dict(model["vocab"])
    special = set()
    for t in doc.get("added_tokens") or ():
        vocab[t["content"]] = int(t["id"])
        if t.get("special"):
            special.add(int(t["id"]))
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(files.config.vocab_size)]
    for t, i in vocab.items():
        tokens[i] = t
    meta = files.manifest["tokenizer"]
    return {"model": "gpt2", "tokens": tokens[:max(n, files.config.vocab_size)],
            "types": [3 if i in special else 1 for i in range(len(tokens))],
            "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()],
            "pre": meta.get("pre", "default"), "bos": meta.get("bos_id", -1), "eos": meta["eos_ids"][0],
            "pad": meta.get("pad_id", -1), "add_bos": bool(meta.get("add_bos")),
            "chat_template": files.manifest.get("chat_template")}


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, type: str = "f32") -> Path:
    """Write the base model at `model_dir` as a GGUF file at `out_path` (`type`: f32, f16 or q8_0); return it."""
    if type not in TYPES:
        raise BadArgument(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    gguf = _gguf()
    files = open_model(model_dir)
    cfg: ModelConfig = files.config
    if files.tokenizer_path.suffix == ".json":
        tok = _bpe_fields(files)
    else:
        tok = _tokenizer_fields(files.tokenizer_path)
    if len(tok["tokens"]) != cfg.vocab_size:
        raise BadArgument(f"the tokenizer has {len(tok['tokens'])} pieces but the model's vocab_size is "
                          f"{cfg.vocab_size}")
    out = Path(out_path)
    with atomic_path(out) as tmp:
        _write(gguf, tmp, cfg, files, tok, type)
    return out


def _write(gguf, path: Path, cfg: ModelConfig, files, tok: dict, type: str) -> None:
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(f"m3lite {cfg.name}")
    w.add_string("m3lite.fingerprint", files.fingerprint)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.hd)
    w.add_value_length(cfg.hd)
    w.add_rope_dimension_count(cfg.hd)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(ftype)
    if type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tok.get("model") == "gpt2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for add, key in ((w.add_bos_token_id, "bos"), (w.add_eos_token_id, "eos"), (w.add_pad_token_id, "pad")):
            if tok[key] >= 0:
                add(tok[key])
        w.add_add_bos_token(tok["add_bos"])
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(tok["tokens"])
        w.add_token_scores(tok["scores"])
        w.add_token_types(tok["types"])
        w.add_unk_token_id(UNK)
        w.add_bos_token_id(BOS)
        w.add_eos_token_id(EOS)
        w.add_pad_token_id(PAD)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(tok["add_space_prefix"])
        w.add_remove_extra_whitespaces(tok["remove_extra_whitespaces"])
    if cfg.rope_scaling:  # llama.cpp's form of any scaling: each frequency's divisor
        from m3lite.kernels.rope import rope_inv_freq

        factors = rope_inv_freq(cfg.hd, cfg.rope_theta) / rope_inv_freq(cfg.hd, cfg.rope_theta, cfg.rope_scaling)
        w.add_tensor("rope_freqs.weight", factors.astype(np.float32))

    for kind, layer, a in model_tensors(cfg, files.weights, tied_output=True):
        a = np.asarray(a, dtype=np.float32)
        if kind == "wq":
            a = interleave_rope_rows(a, cfg.n_heads)
        elif kind == "wk":
            a = interleave_rope_rows(a, cfg.n_kv_heads)
        name = gguf_name(kind, layer)
        if a.ndim == 1 or type == "f32":
            w.add_tensor(name, np.ascontiguousarray(a))
        elif type == "f16":
            w.add_tensor(name, a.astype(np.float16))
        elif a.shape[-1] % Q8_BLOCK == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="GGUF file to write")
        p.add_argument("--type", default="f32", choices=TYPES, help="weight type of the matrices (default f32)")

    def export(args) -> str:
        out = export_gguf(args.model, args.out, type=args.type)
        return f"{out}: GGUF (llama, {args.type.upper()}), {out.stat().st_size:,} bytes"

    return run_cli("python -m converters.export_gguf", "Export an m3lite model as a llama.cpp GGUF file.",
                   add_args, export)


if __name__ == "__main__":
    sys.exit(main())
