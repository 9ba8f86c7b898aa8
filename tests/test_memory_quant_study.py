"""converters.memory_quant_study: the schemes' arithmetic, their bytes, and a study run on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from converters.memory_quant_study import Scheme, StudyBank, main, min_max
from m3lite.errors import BadArgument


def test_min_max_stays_within_half_a_step_and_zeroes_the_padding():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 2, 8, 16)).astype(np.float32) * rng.uniform(0.1, 20, size=(1, 1, 1, 1, 16))
    counts = np.array([[[8, 5]] * 3, [[3, 0]] * 3])
    valid = (np.arange(8) < counts[..., None])[..., None]
    for bits in (2, 3, 4):
        for axis in (3, 4):  # per channel over a head's tokens, per vector
            d = min_max(x, bits, axis, valid)
            lo = np.where(valid, x, np.inf).min(axis=axis, keepdims=True)
            hi = np.where(valid, x, -np.inf).max(axis=axis, keepdims=True)
            step = np.where(np.isfinite(lo), hi - lo, 0) / ((1 << bits) - 1)
            err = np.abs(d - x)
            assert np.all(np.where(valid, err <= step * 0.502 + 1e-2 * np.abs(x) + 1e-3, True))
            assert np.all(d[~np.broadcast_to(valid, x.shape)] == 0)
    more = [np.abs(min_max(x, b, 3, valid) - x)[np.broadcast_to(valid, x.shape)].mean() for b in (2, 3, 4)]
    assert more[0] > more[1] > more[2]  # more bits, less error


def test_scheme_bytes_and_refusals():
    assert Scheme("int8:int8", 32, 64).bytes_per_slot == 66 + 66 + 2
    assert Scheme("pq:pq", 32, 64).bytes_per_slot == 16 + 16 + 2
    assert Scheme("int4:pq", 32, 64).bytes_per_slot == 34 + 16 + 2
    assert Scheme("chan2:tok2", 32, 64).bytes_per_slot == (16 + 8) + (16 + 4) + 2  # fp16 scale + zero
    for bad in ("int8", "int8:int3", "chan9:pq", "chanchan2:pq", "a:b:c"):
        with pytest.raises(BadArgument):
            Scheme(bad, 32, 64)


@pytest.fixture(scope="module")
def facts_bank(tiny_model_dir, tmp_path_factory):
    import m3lite
    from converters.facts import make_facts, write_jsonl
    from m3lite.memory import build_or_add

    model_dir = tiny_model_dir(tie_embeddings=False)
    d = tmp_path_factory.mktemp("study")
    notes, questions = make_facts("eval", n_entities=4)
    write_jsonl(d / "notes.jsonl", notes)
    write_jsonl(d / "qa.jsonl", questions)
    build_or_add(m3lite.load(model_dir), d / "f32", [str(d / "notes.jsonl")], quant="f32", warn=lambda m: None)
    build_or_add(m3lite.load(model_dir), d / "int8", [str(d / "notes.jsonl")], warn=lambda m: None)
    return model_dir, d


def test_a_study_answers_through_each_scheme(facts_bank, capsys, monkeypatch):
    model_dir, d = facts_bank
    seen = []
    real = StudyBank.memories

    def spy(self, ids, encode_fn=None):
        out = real(self, ids, encode_fn)
        seen.append((self.scheme.text if self.scheme else None, out[0].copy()))
        return out

    monkeypatch.setattr(StudyBank, "memories", spy)
    rc = main(["--bank", str(d / "f32"), "--qa", str(d / "qa.jsonl"), "--model", str(model_dir), "--limit", "3",
               "f32:f32", "chan2:pq", "f32:f32"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["scheme"] for r in rows] == ["f32:f32", "chan2:pq", "f32:f32"]
    assert all(r["questions"] == 3 for r in rows)
    # the tiny model: head_dim 16, 8 tokens per head; int8 is 18 B a vector
    assert rows[0]["bytes_per_slot"] == 64 + 64 + 2 and rows[0]["vs_int8"] == round(130 / 38, 3)
    assert rows[1]["bytes_per_slot"] == (4 + 4 * 16 / 8) + 4 + 2
    assert rows[2]["right_only_first"] == rows[2]["right_only_this"] == 0  # the same scheme answers the same
    keys = {s: k for s, k in seen if s is not None}
    assert not np.array_equal(keys["f32:f32"], keys["chan2:pq"])  # the scheme reached the answers' memories


def test_a_quantized_bank_or_a_bad_scheme_is_refused(facts_bank, capsys):
    model_dir, d = facts_bank
    assert main(["--bank", str(d / "int8"), "--qa", str(d / "qa.jsonl"), "--model", str(model_dir),
                 "int8:int8"]) == 2
    assert "float32 memories" in capsys.readouterr().err
    assert main(["--bank", str(d / "f32"), "--qa", str(d / "qa.jsonl"), "--model", str(model_dir), "int3:pq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown scheme side 'int3'" in err
