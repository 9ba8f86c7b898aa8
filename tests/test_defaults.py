"""The default model and bank: picked without --model/--bank, the bank built into the cache once, then reused."""
from __future__ import annotations

import json
import os

from clitools import run


def test_default_bank_built_once_then_reused(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("The Eiffel Tower is a wrought-iron lattice tower in Paris, France.")
    (notes / "b.md").write_text("Bread is baked from a dough of flour and water.")
    env = dict(os.environ, M3LITE_MODEL=str(tiny_model_dir()), M3LITE_CACHE=str(tmp_path / "cache"),
               M3LITE_DEFAULT_SOURCES=str(notes))
    first = run("ask", "What is the Eiffel Tower?", "--max-tokens", "4", "--json", env=env, check=False)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["references"] and out["mode"] == "memory"
    banks = sorted((tmp_path / "cache" / "banks").iterdir())
    assert [p.name.endswith(".complete") for p in banks] == [False, True]
    (notes / "c.md").write_text("A new note that must not be picked up by a later start.")
    second = run("ask", "What is bread?", "--max-tokens", "4", env=env, check=False)
    assert second.returncode == 0, second.stderr
    assert "building the default bank" not in second.stderr and "Sources:" in second.stdout
    info = json.loads(run("bank", "info", banks[0], "--json", env=env, check=False).stdout)
    assert info["documents"] == 2 and info["quantization"] == "int4"  # the default bank stores int4 memories
    assert info["lazy"] and info["lazy_vectors"]  # ready in seconds: vectors and memories made on first use
    assert 0 < info["vectors"] <= info["references"]  # the questions' word hits got theirs


def test_model_without_bank_needs_a_bank(tiny_model_dir, tmp_path):
    env = dict(os.environ, M3LITE_CACHE=str(tmp_path / "cache"))
    p = run("ask", "What?", "--model", tiny_model_dir(), env=env, check=False)
    assert p.returncode == 2 and "--bank" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run("ask", "What?", "--model", tiny_model_dir(), "--mode", "none", "--max-tokens", "2", env=env, check=False)
    assert p.returncode == 0, p.stderr


def test_default_model_from_environment_or_pulled(tiny_model_dir, tmp_path):
    env = dict(os.environ, M3LITE_MODEL=str(tiny_model_dir()), M3LITE_CACHE=str(tmp_path / "cache"))
    assert json.loads(run("info", "--json", env=env, check=False).stdout)["config"]["dim"] == 64
    # without a model and offline (pip cannot reach an index): one line that says how to pull or pass --model
    env.pop("M3LITE_MODEL")
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    p = run("info", env=env, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()  # what it tried, then the one-line error
    err = lines[-1]
    assert "pulling the default model" in lines[0] and all(ln.startswith("m3lite: ") for ln in lines[:-1])
    assert err.startswith("error: ") and "m3lite pull" in err and "--model" in err
    # nothing that looks like a model was left behind
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    assert not (tmp_path / "cache" / "checkpoints").exists()
