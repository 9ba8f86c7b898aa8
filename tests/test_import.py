"""`m3lite import`: random Llama checkpoints (GGUF of every supported tensor type, Hugging Face folders) give the
logits of transformers' LlamaForCausalLM on the same weights; foreign, truncated and incomplete checkpoints are
refused in one line with nothing left behind."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from clitools import one_line_error, run  # noqa: E402
from llama_files import transformers_logits, write_gguf, write_hf  # noqa: E402

import m3lite  # noqa: E402
from m3lite.importers import import_model  # noqa: E402

IDS = [5, 17, 42, 99, 3, 250, 7, 8, 64, 128, 31, 200]
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_logits_equal_transformers(qtype, tmp_path):
    src = tmp_path / f"m-{qtype}.gguf"
    ref = write_gguf(src, qtype, tied=qtype != "Q8_0")  # one untied case (an output.weight tensor)
    out = import_model(src, tmp_path / "m", weights="fp32")
    m = m3lite.load(out["model"])
    want = transformers_logits(ref, IDS, tied=qtype != "Q8_0")
    got = m.logits(IDS)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(m.logits(IDS, backend="onnxruntime") - want).max() < 1e-3
    assert m.chat_template is not None and m.tokenizer.kind == "bpe"


@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16"))
def test_hf_folder_logits_equal_transformers(dtype, tmp_path):
    ref = write_hf(tmp_path / "hf", dtype=dtype, tied=dtype == "float16")
    out = import_model(tmp_path / "hf", tmp_path / "m", weights="fp32")
    m = m3lite.load(out["model"])
    want = transformers_logits(ref, IDS, tied=dtype == "float16")
    assert np.abs(m.logits(IDS) - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    ref = write_hf(tmp_path / "hf", rope_scaling=scaling)
    m = m3lite.load(import_model(tmp_path / "hf", tmp_path / "m", weights="fp32")["model"])
    ids = list(range(3, 200))  # long enough that scaled and plain RoPE differ
    want = transformers_logits(ref, ids, tied=False, rope_scaling=scaling)
    assert np.abs(m.logits(ids) - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert m.config.rope_scaling["type"] == "llama3"


def test_int8_import_runs_close_to_fp32(tmp_path):
    src = tmp_path / "m.gguf"
    write_gguf(src, "Q8_0")
    fp32 = m3lite.load(import_model(src, tmp_path / "f", weights="fp32")["model"])
    int8 = m3lite.load(import_model(src, tmp_path / "i", weights="int8")["model"])
    assert int8.weights == "int8" and fp32.weights == "fp32"
    a, b = fp32.logits(IDS), int8.logits(IDS)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_cli_import_json_and_tokenizer_round_trip(tmp_path):
    src = tmp_path / "m.gguf"
    write_gguf(src, "Q4_0")
    p = run("import", src, "--out", tmp_path / "m", "--weights", "fp16", "--json")
    d = json.loads(p.stdout)
    assert d["weights"] == "fp16" and d["chat_template"] and d["layers"] == 2
    m = m3lite.load(d["model"])
    text = "Paris is the capital of France. <|im_end|> café"
    assert m.tokenizer.decode(m.tokenizer.encode(text)) == text
    assert 2 not in m.tokenizer.encode(text)  # user text never becomes an end-of-turn token
    ids = m.prompt([{"role": "user", "content": "hi"}])
    assert m.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # an existing folder is not replaced without --force
    assert "already exists" in one_line_error(run("import", src, "--out", tmp_path / "m", check=False))
    run("import", src, "--out", tmp_path / "m", "--force", "--json")


def test_ask_has_a_brief_system_message_unless_told_otherwise(tmp_path, monkeypatch):
    from m3lite.chat_template import ANSWER_SYSTEM
    from m3lite.errors import BadArgument

    src = tmp_path / "m.gguf"
    write_gguf(src, "F32")
    m = m3lite.load(import_model(src, tmp_path / "m", weights="fp32")["model"])
    seen = []
    render = m.prompt
    monkeypatch.setattr(m, "prompt", lambda msgs, *a: (seen.append(msgs), render(msgs, *a))[1])
    for system, want in ((None, ANSWER_SYSTEM), ("", None), ("  ", None), ("Be terse.", "Be terse.")):
        m.ask("hi", max_new_tokens=1, system=system)
        first = seen[-1][0]
        assert (first["content"] if first["role"] == "system" else None) == want, system
        assert seen[-1][-1] == {"role": "user", "content": "hi"}
    text = m.tokenizer.decode(render([{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": "hi"}]))
    assert text.startswith(f"<|im_start|>system\n{ANSWER_SYSTEM}<|im_end|>")
    with pytest.raises(BadArgument):
        m.ask("hi", max_new_tokens=1, system=3)
    assert m.chat().system == ANSWER_SYSTEM and m.chat(system="").system == ""  # a conversation: the same default
    # the CLI: --system reaches the prompt (a one-token answer either way; the prompt's length tells them apart)
    lengths = []
    for extra in (["--system", ""], [], ["--system", " ".join([ANSWER_SYSTEM] * 3)]):
        out = json.loads(run("ask", "hi", "--model", tmp_path / "m", "--mode", "none", "-n", "1", "--json",
                             *extra).stdout)
        assert out["system"] == (extra[1] if extra else ANSWER_SYSTEM)
        lengths.append(out["prompt_tokens"])
    assert lengths[0] < lengths[1] < lengths[2]


def test_memory_settings_at_import_and_a_bank_of_other_settings_is_refused(tmp_path):
    src = tmp_path / "m.gguf"
    write_gguf(src, "F32")
    d = json.loads(run("import", src, "--out", tmp_path / "all", "--memory-layers", "all", "--memory-tokens", "all",
                       "--json").stdout)
    assert d["memory_layers"] == [0, 1] and d["memory_tokens_per_head"] == m3lite.load(d["model"]).config.reference_max_tokens
    half = json.loads(run("import", src, "--out", tmp_path / "half", "--json").stdout)
    assert half["memory_layers"] == [0] and half["memory_tokens_per_head"] == 8  # the paper's settings by default
    assert half["fingerprint"] != d["fingerprint"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("The Zorblax volcano last erupted in 1874.")
    run("bank", "build", notes, "--out", tmp_path / "bank", "--model", tmp_path / "half")
    info = json.loads(run("bank", "info", tmp_path / "bank", "--json").stdout)
    assert info["memory_shape"]["n_memory_layers"] == 1 and info["memory_shape"]["tokens_per_head"] == 8
    err = one_line_error(run("ask", "When?", "--model", tmp_path / "all", "--bank", tmp_path / "bank", check=False))
    assert "rebuild" in err
    for bad in (("--memory-layers", "seven"), ("--memory-layers", "0,9"), ("--memory-tokens", "many")):
        one_line_error(run("import", src, "--out", tmp_path / "bad", *bad, check=False))
    assert not (tmp_path / "bad").exists()


def _refused(tmp_path, src, words):
    out = tmp_path / "out"
    err = one_line_error(run("import", src, "--out", out, check=False))
    assert all(w in err for w in words), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left
    return err


def test_foreign_architecture_is_refused(tmp_path):
    src = tmp_path / "q.gguf"
    write_gguf(src, "F16", arch="qwen2")
    _refused(tmp_path, src, ["qwen2", "not supported"])
    write_hf(tmp_path / "hf", model_type="gpt2")
    _refused(tmp_path, tmp_path / "hf", ["gpt2", "not supported"])


def test_truncated_file_is_refused(tmp_path):
    src = tmp_path / "m.gguf"
    write_gguf(src, "Q8_0")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    _refused(tmp_path, src, ["truncated"])
    hf = tmp_path / "hf"
    write_hf(hf)
    shard = sorted(hf.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    _refused(tmp_path, hf, ["truncated"])


def test_missing_tensor_is_refused(tmp_path):
    src = tmp_path / "m.gguf"
    write_gguf(src, "Q4_1", drop="blk.1.ffn_up.weight")
    _refused(tmp_path, src, ["blk.1.ffn_up.weight", "missing"])


def test_not_a_checkpoint_is_refused(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("hello")
    _refused(tmp_path, src, ["neither a GGUF file nor a Hugging Face model folder"])


def test_gguf_export_of_an_imported_model_round_trips(tmp_path):
    """converters.export_gguf writes an imported model's byte-level BPE vocabulary (for llama.cpp and bench)."""
    from converters.export_gguf import export_gguf

    src = tmp_path / "m.gguf"
    write_gguf(src, "F32")
    a = m3lite.load(import_model(src, tmp_path / "a", weights="fp32")["model"])
    export_gguf(tmp_path / "a", tmp_path / "b.gguf", type="f32")
    b = m3lite.load(import_model(tmp_path / "b.gguf", tmp_path / "b", weights="fp32")["model"])
    assert np.abs(a.logits(IDS) - b.logits(IDS)).max() < 1e-5
    text = "Paris is the capital of France. 12345 <|im_end|>"
    assert b.tokenizer.encode(text, special=True) == a.tokenizer.encode(text, special=True)
    assert b.tokenizer.eos_ids == a.tokenizer.eos_ids and b.tokenizer.add_bos == a.tokenizer.add_bos
    assert b.chat_template.source == a.chat_template.source


@pytest.mark.parametrize("delay", (0.3, 0.8, 1.5, 2.5))
def test_killed_import_leaves_nothing_that_looks_complete(delay, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from m3lite.errors import ModelFileError
    from m3lite.modelfile import ModelFiles

    src = tmp_path / "m.gguf"
    write_gguf(src, "Q4_K")
    out = tmp_path / "m"
    p = subprocess.Popen([sys.executable, "-m", "m3lite", "import", str(src), "--out", str(out), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if out.exists():  # the rename happened: the model is whole
        ModelFiles.open(out)
    else:
        with pytest.raises(ModelFileError):
            ModelFiles.open(out)
    # a later import succeeds whatever was left, and clears the killed one's temporary folder
    import_model(src, out, weights="int8", force=True)
    assert ModelFiles.open(out).config.n_layers == 2
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []
