"""The model directory: a missing, truncated, altered or malformed file is refused with a one-line message."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from m3lite.config import ModelConfig
from m3lite.errors import BadArgument, ModelFileError
from m3lite.modelfile import CONFIG_FILE, DATA_FILE, TOKENIZER_FILE, ModelFiles, signed_json, tensor_shapes


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model_dir(), dst)
    return dst


def refused(path, match: str) -> str:
    with pytest.raises(ModelFileError, match=match) as e:
        ModelFiles.open(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_opens_zero_copy(tiny_model_dir):
    f = ModelFiles.open(tiny_model_dir())
    assert set(f.weights) == set(tensor_shapes(f.config))
    for name, a in f.weights.items():
        assert isinstance(a.base, np.ndarray) or isinstance(a, np.memmap), name
        assert not a.flags.writeable
    assert len(f.fingerprint) == 32


def test_missing_dir_and_files(model_copy, tmp_path):
    refused(tmp_path / "nope", "does not exist")
    (tmp_path / "afile").write_text("x")
    refused(tmp_path / "afile", "not a model directory")
    (model_copy / DATA_FILE).unlink()
    refused(model_copy, "missing")


def test_missing_tokenizer(model_copy):
    (model_copy / TOKENIZER_FILE).unlink()
    refused(model_copy, "missing")


def test_missing_manifest(model_copy):
    (model_copy / CONFIG_FILE).unlink()
    refused(model_copy, "config.json is missing")


def test_truncated_weights(model_copy):
    data = model_copy / DATA_FILE
    b = data.read_bytes()
    data.write_bytes(b[: len(b) // 2])
    refused(model_copy, "truncated")


def test_altered_weights(model_copy):
    data = model_copy / DATA_FILE
    b = bytearray(data.read_bytes())
    b[len(b) // 3] ^= 0x40
    data.write_bytes(bytes(b))
    refused(model_copy, "checksum")


def test_malformed_manifest(model_copy):
    c = model_copy / CONFIG_FILE
    c.write_text("{not json")
    refused(model_copy, "not valid JSON")
    c.write_text(json.dumps({"format": "something-else"}))
    refused(model_copy, "not an m3lite model")


def test_manifest_path_cannot_escape(model_copy):
    c = model_copy / CONFIG_FILE
    m = json.loads(c.read_text())
    m["weights"]["file"] = "../../etc/passwd"
    c.write_text(json.dumps(m))
    refused(model_copy, "checksum")  # the manifest checks itself; signed again, the path is refused
    c.write_bytes(signed_json(m))
    refused(model_copy, "plain file name")


def test_bad_config_in_manifest(model_copy):
    c = model_copy / CONFIG_FILE
    m = json.loads(c.read_text())
    m["config"]["n_heads"] = 3
    c.write_bytes(signed_json(m))
    refused(model_copy, "invalid model config")


def test_config_json_round_trip_and_presets():
    for name in ("tiny", "default", "bench-110m", "bench-1b"):
        c = ModelConfig.preset(name)
        assert ModelConfig.from_json(c.to_json()) == c
    assert ModelConfig.preset("default").memory_layer_ids == [0, 1, 2, 3]
    c = ModelConfig.preset("bench-1b")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (2048, 22, 32, 4, 5632, 32000)
    with pytest.raises(BadArgument):
        ModelConfig.preset("nope")
    with pytest.raises(BadArgument):
        ModelConfig.from_json('{"dim": 64, "bogus": 1}')
    with pytest.raises(BadArgument):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
