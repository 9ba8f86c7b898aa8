"""The m3lite command: JSON output, streaming, one-line errors with exit status 2."""
from __future__ import annotations

import json
import shutil

from clitools import one_line_error, run






def test_generate_json(tiny_model_dir):
    d = tiny_model_dir()
    p = run("generate", "hello", "--model", d, "--max-tokens", 16, "--json", "--seed", 1)
    out = json.loads(p.stdout)
    for key in ("text", "tokens", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in out
    assert 0 < len(out["tokens"]) <= 16 or out["finish_reason"] == "stop"
    assert isinstance(out["text"], str)


def test_generate_backends_agree_greedy(tiny_model_dir):
    d = tiny_model_dir()
    a = json.loads(run("generate", "hello", "--model", d, "-n", 12, "--temperature", 0, "--json").stdout)
    b = json.loads(run("generate", "hello", "--model", d, "-n", 12, "--temperature", 0, "--json",
                       "--backend", "onnxruntime").stdout)
    assert a["tokens"] == b["tokens"]


def test_generate_streams_text(tiny_model_dir):
    p = run("generate", "hello", "--model", tiny_model_dir(), "-n", 8, "--seed", 2)
    assert "tok/s" in p.stderr and p.stdout.endswith("\n")


def test_info(tiny_model_dir):
    d = tiny_model_dir()
    out = json.loads(run("info", "--model", d, "--json").stdout)
    assert out["params"] > 0 and out["disk_bytes"] > 0 and len(out["fingerprint"]) == 32
    assert out["config"]["dim"] == 64
    text = run("info", "--model", d).stdout
    assert "fingerprint" in text and out["fingerprint"] in text


def test_errors_are_one_line(tiny_model_dir, tmp_path):
    one_line_error(run("generate", "x", "--model", tmp_path / "missing", check=False))
    one_line_error(run("info", "--model", tmp_path / "missing", check=False))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir(), broken)
    (broken / "config.json").write_text("{")
    one_line_error(run("info", "--model", broken, check=False))
    one_line_error(run("generate", "x", "--model", tiny_model_dir(), "--backend", "gpu", check=False))
    one_line_error(run("generate", "x", "--model", tiny_model_dir(), "--top-p", "0", check=False))


def test_help_and_version():
    assert "generate" in run("--help").stdout
    assert "--max-tokens" in run("generate", "--help").stdout
    assert run("--version").stdout.startswith("m3lite ")
