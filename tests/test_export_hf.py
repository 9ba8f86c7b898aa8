"""The Hugging Face export (converters/export_hf.py): the safetensors file and config as written, and, when torch
and transformers are installed, LlamaForCausalLM giving m3lite's logits and greedy tokens."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from converters.export_hf import export_hf
from m3lite.modelfile import ModelFiles

VARIANTS = {"tied": {}, "untied": dict(tie_embeddings=False, head_dim=24, n_kv_heads=1)}
PROMPT = [1, 300, 301, 400, 17, 290, 42, 333, 260, 261, 500, 7]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """(variant, dtype) -> (model dir, checkpoint dir); a float16 checkpoint comes from a float16 model."""
    made = {}

    def get(variant: str, dtype: str = "float32"):
        if (variant, dtype) not in made:
            d = tiny_model_dir(seed=7, dtype=dtype, **VARIANTS[variant])
            made[variant, dtype] = (d, export_hf(d, tmp_path_factory.mktemp("hf"), dtype=dtype))
        return made[variant, dtype]

    return get


def read_safetensors(path) -> dict[str, np.ndarray]:
    """A safetensors file read by hand (format: u64 header size, JSON header, data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0
    header.pop("__metadata__")
    data = raw[8 + n:]
    ends = sorted(h["data_offsets"][1] for h in header.values())
    assert ends[-1] == len(data)  # no trailing bytes
    dt = {"F32": "<f4", "F16": "<f2"}
    return {k: np.frombuffer(data[h["data_offsets"][0]:h["data_offsets"][1]], dt[h["dtype"]]).reshape(h["shape"])
            for k, h in header.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_files(exported, variant):
    d, out = exported(variant)
    f = ModelFiles.open(d)
    c, w = f.config, f.weights
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == \
        (c.dim, c.ffn_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hd, c.vocab_size)
    assert cfg["tie_word_embeddings"] == c.tie_embeddings and cfg["rms_norm_eps"] == c.norm_eps
    assert cfg["rope_parameters"]["rope_theta"] == c.rope_theta == cfg["rope_theta"]
    assert (out / "tokenizer.model").read_bytes() == f.tokenizer_path.read_bytes()

    t = read_safetensors(out / "model.safetensors")
    assert ("lm_head.weight" in t) == (not c.tie_embeddings)
    assert len(t) == 2 + 9 * c.n_layers + (not c.tie_embeddings)
    np.testing.assert_array_equal(t["model.embed_tokens.weight"], w["tok_embeddings"])
    np.testing.assert_array_equal(t["model.norm.weight"], w["norm"])
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        for kind, name in (("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"), ("wv", "self_attn.v_proj"),
                           ("wo", "self_attn.o_proj"), ("w1", "mlp.gate_proj"), ("w3", "mlp.up_proj"),
                           ("w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
                           ("ffn_norm", "post_attention_layernorm")):
            np.testing.assert_array_equal(t[p + name + ".weight"], w[kind][i])


def test_safetensors_package_reads_it(exported):
    st = pytest.importorskip("safetensors.numpy")
    d, out = exported("untied")
    ours = read_safetensors(out / "model.safetensors")
    theirs = st.load_file(str(out / "model.safetensors"))
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])


def _transformers_logits(out, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=24, eos_token_id=2, pad_token_id=3)
    tokens = [int(x) for x in gen[0, len(ids):]]
    return logits, (tokens[:tokens.index(2)] if 2 in tokens else tokens)


@pytest.mark.parametrize("variant,dtype", [("tied", "float32"), ("untied", "float32"), ("tied", "float16")])
def test_transformers_same_logits_and_greedy_tokens(exported, variant, dtype):
    import m3lite

    d, out = exported(variant, dtype)
    logits, tokens = _transformers_logits(out, PROMPT)
    m = m3lite.load(d)
    assert np.abs(logits - m.logits(PROMPT)).max() <= 1e-4
    m.generate(PROMPT, max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    assert tokens == m.last_result.tokens


def test_cli_and_errors(exported, tmp_path):
    d, _ = exported("tied")
    p = subprocess.run([sys.executable, "-m", "converters.export_hf", str(d), "--out", str(tmp_path / "hf")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert {x.name for x in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors", "tokenizer.model",
                                                             "tokenizer_config.json", "generation_config.json"}
    p = subprocess.run([sys.executable, "-m", "converters.export_hf", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: ")
