"""Seeded fuzz of a bank and a model directory: bit flips, zeroed spans, truncations and appended garbage in
one file at a time, then ask (memory and rag), bank search, bank info and generate, in-process. Each either
gives exactly the undamaged result or fails with a one-line M3Error: never a traceback, a crash or a silently
different answer."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

import m3lite
from m3lite.bank import Bank
from m3lite.errors import M3Error
from m3lite.memory import MemorySession, build_or_add

TRIALS = 240
NOTES = {
    "etna.md": "Mount Etna is an active volcano on the east coast of Sicily. It erupts often.",
    "nile.md": "The Nile is a major river in north-eastern Africa. It flows into the Mediterranean Sea.",
    "bread.md": "Bread is baked from a dough of flour and water. Yeast makes the dough rise.\n\n" * 3,
    "cats.md": "The cat is a small domesticated carnivorous mammal. Cats purr and sleep a lot.",
}
QUESTION = "Where is Mount Etna?"


def outcomes(model_dir: Path, bank_dir: Path) -> dict:
    """What a user gets from each command: a value, or the one-line error (as ("error", type))."""
    out: dict = {}

    def attempt(name, fn):
        try:
            out[name] = fn()
        except M3Error as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"{name}: not a one-line error: {msg!r}"
            out[name] = ("error", type(e).__name__)

    model: list = []

    def load():
        model.append(m3lite.load(model_dir))
        return True

    attempt("load", load)
    if model:
        m = model[0]
        attempt("generate", lambda: m.generate("The volcano", max_new_tokens=3, temperature=0))
        for mode in ("memory", "rag"):
            attempt(f"ask-{mode}", lambda mode=mode: (m.ask(QUESTION, bank=bank_dir, mode=mode, max_new_tokens=3),
                                                      [r["id"] for r in m.last_result.references],
                                                      [r["text"] for r in m.last_result.references]))
        attempt("search", lambda: [(i, round(s, 5), Bank.open(bank_dir).reference(i)["text"]) for i, s in
                                   MemorySession(m, Bank.open(bank_dir), mode="rag", retriever="hybrid")
                                   .retrieve("Etna volcano Sicily")])

    def info():
        d = Bank.open(bank_dir).info()
        return {k: v for k, v in d.items() if k not in ("disk_bytes", "bytes_per_reference", "path")}

    attempt("info", info)
    return out


def damage(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "zero", "truncate", "append"] if data else ["append"])
    if kind == "flip":
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        at = rng.randrange(len(data))
        data[at:at + 64] = bytes(len(data[at:at + 64]))
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
    path.write_bytes(bytes(data))
    return kind


@pytest.fixture(scope="module")
def pristine(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    notes = root / "notes"
    notes.mkdir()
    for name, text in NOTES.items():
        (notes / name).write_text(text)
    model_dir = root / "model"
    shutil.copytree(tiny_model_dir(), model_dir)
    bank_dir = root / "bank"
    build_or_add(m3lite.load(model_dir), bank_dir, [str(notes)], warn=lambda s: None)
    return model_dir, bank_dir


@pytest.mark.slow
def test_fuzz_bank_and_model_files(pristine, tmp_path):
    model_src, bank_src = pristine
    want = outcomes(model_src, bank_src)
    assert all(not (isinstance(v, tuple) and v and v[0] == "error") for v in want.values()), want
    model_dir, bank_dir = tmp_path / "model", tmp_path / "bank"
    shutil.copytree(model_src, model_dir)
    shutil.copytree(bank_src, bank_dir)
    files = sorted([p for p in bank_dir.iterdir() if p.is_file() and p.name != "lock"]) + \
        sorted(p for p in model_dir.iterdir() if p.is_file())
    rng = random.Random(1234)
    seen: dict[str, int] = {}
    for trial in range(TRIALS):
        target = files[trial % len(files)]
        good = target.read_bytes()
        kind = damage(target, rng)
        got = outcomes(model_dir, bank_dir)
        for name, value in got.items():
            ok = value == want[name] or (isinstance(value, tuple) and value and value[0] == "error")
            assert ok, f"trial {trial}: {kind} in {target.name}: {name} gave {value!r}, undamaged {want[name]!r}"
            if value != want[name]:
                seen[target.name] = seen.get(target.name, 0) + 1
        target.write_bytes(good)
    # the damage that matters was noticed: every file the commands read refused some trial
    for name in ("manifest.json", "memories.bin", "checks.bin", "refs.bin", "texts.bin", "docs.jsonl",
                 "config.json", "model.onnx.data"):
        assert seen.get(name), f"no damage to {name} was ever refused: {seen}"
