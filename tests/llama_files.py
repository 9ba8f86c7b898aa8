"""Random small Llama checkpoints as other tools write them: GGUF files (the `gguf` package, llama.cpp's q/k row
order, every tensor type m3lite imports) and Hugging Face folders (`safetensors`), with a tiny byte-level BPE
tokenizer and a ChatML template. Weights are returned in the Hugging Face layout, the reference for parity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# K-quants pack 256 weights per block: every row length is a multiple of 256
SHAPE = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, rope_theta=10000.0, eps=1e-5)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. 12345 apples, "
        "don't stop: it's here! Émile wrote café notes.\n\tCode: def f(x): return x * 2\n")


def tiny_tokenizer_json(vocab_size: int = 320) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok.to_str()


def hf_weights(vocab: int, seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """Random float32 weights named as in a Hugging Face LlamaForCausalLM."""
    rng = np.random.default_rng(seed)
    d, f, L = SHAPE["dim"], SHAPE["ffn_dim"], SHAPE["n_layers"]
    hd = d // SHAPE["n_heads"]
    kv = SHAPE["n_kv_heads"] * hd

    def w(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, d, scale=0.5), "model.norm.weight": 1 + w(d, scale=0.1)}
    if not tied:
        out["lm_head.weight"] = w(vocab, d)
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": 1 + w(d, scale=0.1),
                    p + "post_attention_layernorm.weight": 1 + w(d, scale=0.1),
                    p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
                    p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
                    p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                    p + "mlp.down_proj.weight": w(d, f)})
    return out


def llama_cpp_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row indices of llama.cpp's converter's q/k permutation: stored[r] = hf[order[r]]."""
    idx = np.arange(n_rows)
    return idx.reshape(n_heads, 2, n_rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    i, rest = hf[len("model.layers."):].split(".", 1)
    return f"blk.{i}.{GGUF_NAMES[rest[:-len('.weight')]]}.weight"


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Raw bytes of a K-quant tensor (gguf cannot quantize these): random codes with small finite scales."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    half = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    name = qtype.name
    if name in ("Q4_K", "Q5_K"):  # d and dmin lead the block
        raw[..., 0:2] = half
        raw[..., 2:4] = half
    elif name == "Q6_K":  # d ends the block
        raw[..., -2:] = half
    return raw.reshape(rows, -1)


def write_gguf(path: Path, qtype: str = "F32", seed: int = 0, tied: bool = True, arch: str = "llama",
               drop: str | None = None) -> dict[str, np.ndarray]:
    """A GGUF file of random weights with matrices stored as `qtype`; returns the weights the file holds,
    dequantized, in the Hugging Face layout (the reference). `drop` leaves out one tensor (by GGUF name)."""
    import gguf

    tok = json.loads(tiny_tokenizer_json())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    n_vocab = len(tokens)
    hf = hf_weights(n_vocab, seed, tied)
    rng = np.random.default_rng(seed + 1)
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    d, L = SHAPE["dim"], SHAPE["n_layers"]
    w.add_block_count(L)
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_feed_forward_length(SHAPE["ffn_dim"])
    w.add_head_count(SHAPE["n_heads"])
    w.add_head_count_kv(SHAPE["n_kv_heads"])
    w.add_rope_freq_base(SHAPE["rope_theta"])
    w.add_layer_norm_rms_eps(SHAPE["eps"])
    w.add_rope_dimension_count(d // SHAPE["n_heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    ref: dict[str, np.ndarray] = {}
    for name, a in hf.items():
        gname = _gguf_name(name)
        stored = a
        if "q_proj" in name:
            stored = a[llama_cpp_order(a.shape[0], SHAPE["n_heads"])]
        elif "k_proj" in name:
            stored = a[llama_cpp_order(a.shape[0], SHAPE["n_kv_heads"])]
        if a.ndim == 1 or qtype == "F32":
            raw, kind = stored, gguf.GGMLQuantizationType.F32
        elif qtype in ("Q4_K", "Q5_K", "Q6_K"):
            raw, kind = _random_blocks(qt, *stored.shape, rng), qt
        else:
            raw, kind = gguf.quants.quantize(stored, qt), qt
        back = np.asarray(gguf.quants.dequantize(raw, kind), np.float32).reshape(stored.shape)
        if "q_proj" in name or "k_proj" in name:  # the reference: the stored weights in Hugging Face row order
            order = llama_cpp_order(a.shape[0], SHAPE["n_heads" if "q_proj" in name else "n_kv_heads"])
            back = back[np.argsort(order)]
        ref[name] = back
        if gname != drop:
            w.add_tensor(gname, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def hf_config(vocab: int, tied: bool = True, model_type: str = "llama") -> dict:
    d = SHAPE["dim"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": model_type, "hidden_size": d,
            "intermediate_size": SHAPE["ffn_dim"], "num_hidden_layers": SHAPE["n_layers"],
            "num_attention_heads": SHAPE["n_heads"], "num_key_value_heads": SHAPE["n_kv_heads"],
            "rms_norm_eps": SHAPE["eps"], "rope_theta": SHAPE["rope_theta"], "vocab_size": vocab,
            "max_position_embeddings": 512, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


def write_hf(folder: Path, seed: int = 0, tied: bool = False, dtype: str = "float32",
             model_type: str = "llama", rope_scaling: dict | None = None) -> dict[str, np.ndarray]:
    """A Hugging Face folder of random weights saved as `dtype` (float32, float16 or bfloat16); returns the
    weights as stored, in float32 (the reference)."""
    folder.mkdir(parents=True, exist_ok=True)
    tj = tiny_tokenizer_json()
    (folder / "tokenizer.json").write_text(tj, encoding="utf-8")
    vocab = len(json.loads(tj)["model"]["vocab"])
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}))
    cfg = hf_config(vocab, tied, model_type)
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    (folder / "config.json").write_text(json.dumps(cfg))
    w = hf_weights(vocab, seed, tied)
    if dtype == "bfloat16":
        import torch
        from safetensors.torch import save_file as save_torch

        t = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()}
        save_torch(t, str(folder / "model.safetensors"))
        return {k: v.float().numpy() for k, v in t.items()}
    from safetensors.numpy import save_file

    stored = {k: v.astype(np.dtype(dtype)) for k, v in w.items()}
    names = sorted(stored)  # two shards, as large checkpoints come
    save_file({k: stored[k] for k in names[: len(names) // 2]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: stored[k] for k in names[len(names) // 2:]}, str(folder / "model-00002-of-00002.safetensors"))
    return {k: v.astype(np.float32) for k, v in stored.items()}


def transformers_logits(hf: dict[str, np.ndarray], ids: list[int], tied: bool, rope_scaling: dict | None = None):
    """Logits [n, vocab] of transformers' LlamaForCausalLM with these weights (the independent reference)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = hf["model.embed_tokens.weight"].shape[0]
    c = hf_config(vocab, tied)
    for k in ("architectures", "model_type", "torch_dtype"):
        c.pop(k)
    if rope_scaling:
        c["rope_scaling"] = rope_scaling
    model = LlamaForCausalLM(LlamaConfig(**c)).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()}
    model.load_state_dict(state, strict=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_as_transformers(path):
    """transformers' LlamaForCausalLM holding a llama GGUF's weights (dequantized by `gguf`, q/k rows put back in
    Hugging Face order by this file's own index arithmetic): an independent reference for an imported GGUF."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    r = gguf.GGUFReader(str(path))

    def f(key):
        return r.fields[key].contents()

    n_heads, n_kv = f("llama.attention.head_count"), f("llama.attention.head_count_kv")
    inv = {v: k for k, v in GGUF_NAMES.items()}
    state = {}
    for t in r.tensors:
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, i, kind, _ = t.name.split(".")
            name = f"model.layers.{i}.{inv[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                a = a[np.argsort(llama_cpp_order(a.shape[0], n_heads if kind == "attn_q" else n_kv))]
        state[name] = torch.from_numpy(np.array(a, np.float32))  # a writable copy
    cfg = LlamaConfig(vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=f("llama.embedding_length"),
                      intermediate_size=f("llama.feed_forward_length"), num_hidden_layers=f("llama.block_count"),
                      num_attention_heads=n_heads, num_key_value_heads=n_kv,
                      rms_norm_eps=f("llama.attention.layer_norm_rms_epsilon"), rope_theta=f("llama.rope.freq_base"),
                      max_position_embeddings=f("llama.context_length"),
                      tie_word_embeddings="lm_head.weight" not in state)
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if "lm_head.weight" not in state:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF: $M3LITE_TEST_GGUF, else the checked checkpoint `m3lite pull` keeps in
    the cache (CI pulls the default model before the tests); skips the test when neither is there (nothing is
    downloaded: `pytest -m slow` pulls it)."""
    import os

    import pytest

    from m3lite.pull import checkpoint_path

    p = Path(os.environ.get("M3LITE_TEST_GGUF") or checkpoint_path())
    if not p.is_file():
        pytest.skip(f"no SmolLM2 GGUF at {p} (run `m3lite pull`, or set M3LITE_TEST_GGUF)")
    return p
