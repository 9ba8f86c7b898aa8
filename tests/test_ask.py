"""Explicit memory end to end through the CLI: bank build/add/info/search/remove and ask in three modes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import m3lite
from m3lite.bank import Bank, FingerprintError
from clitools import one_line_error, run

NOTES = {
    "volcano.md": "# Volcanoes\n\nA volcano is a rupture in the crust of a planet. Lava, ash and gases escape "
                  "from a magma chamber below the surface.\n\nMount Etna is an active volcano in Sicily.",
    "bread.txt": "Bread is a staple food prepared from a dough of flour and water, usually by baking. "
                 "Yeast makes the dough rise.",
    "sub/rivers.md": "The Nile is a major river in north-eastern Africa. It flows into the Mediterranean Sea.",
    "cats.jsonl": json.dumps({"id": "c1", "title": "Cats", "text": "The cat is a small domesticated carnivorous "
                                                                   "mammal. Cats purr."}) + "\n",
}




@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    d = tmp_path_factory.mktemp("notes")
    for name, text in NOTES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def built(tiny_model_dir, notes, tmp_path_factory):
    model = tiny_model_dir()
    bank = tmp_path_factory.mktemp("b") / "bank"
    out = json.loads(run("bank", "build", notes, "--out", bank, "--model", model, "--encode", "all", "--json").stdout)
    assert out["added"] >= 4 and out["count"] == out["added"]
    return model, bank


def test_info_and_search(built):
    model, bank = built
    info = json.loads(run("bank", "info", bank, "--json").stdout)
    assert info["references"] >= 4 and info["quantization"] == "int8"
    assert info["fingerprint"] == m3lite.load(model).fingerprint
    assert info["compression_vs_fp32_kv_all_layers"] > 1
    hits = json.loads(run("bank", "search", bank, "Mount Etna volcano lava", "--model", model, "--json",
                          "--k", "2", "--retriever", "dense").stdout)  # dense: the nearest, related or not
    assert len(hits) == 2 and "volcano" in hits[0]["doc_id"]
    assert hits[0]["score"] >= hits[1]["score"]


@pytest.mark.parametrize("mode", ["memory", "rag", "none"])
def test_ask_modes(built, mode):
    model, bank = built
    out = json.loads(run("ask", "What is a volcano?", "--model", model, "--bank", bank, "--mode", mode,
                         "--max-tokens", "8", "--json").stdout)
    assert set(out) >= {"answer", "references", "timings"}
    assert set(out["timings"]) == {"retrieval_ms", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s"}
    if mode == "none":
        assert out["references"] == []
    else:
        refs = out["references"]
        assert refs and all({"id", "source", "title", "text", "score"} <= set(r) for r in refs)
        assert "volcano" in refs[0]["doc_id"]
        if mode == "memory":
            assert all(0 <= r["attention"] <= 1 for r in refs)
            assert sum(r["attention"] for r in refs) > 0


def test_ask_streams_and_lists_sources(built):
    model, bank = built
    p = run("ask", "Where does the Nile flow?", "--model", model, "--bank", bank, "--max-tokens", "6")
    assert "Sources:" in p.stdout and "[1]" in p.stdout


def test_add_skips_present_and_remove(built, notes, tmp_path):
    model, bank = built
    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    before = Bank.open(copy).count
    again = json.loads(run("bank", "add", copy, notes, "--model", model, "--json").stdout)
    assert again["added"] == 0 and again["skipped"] == len(NOTES)
    (tmp_path / "new.txt").write_text("Photosynthesis turns light into chemical energy in plants.")
    more = json.loads(run("bank", "add", copy, tmp_path / "new.txt", "--model", model, "--json").stdout)
    assert more["added"] == 1 and Bank.open(copy).count == before + 1
    rm = json.loads(run("bank", "remove", copy, "--source", str(tmp_path / "new.txt"), "--json").stdout)
    assert rm["documents"] == 1
    assert Bank.open(copy).live_count == before


def test_foreign_model_refused(built, tiny_model_dir):
    _, bank = built
    other = tiny_model_dir(seed=1)
    p = run("ask", "volcano?", "--model", other, "--bank", bank, check=False)
    assert p.returncode == 2 and "another model" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    with pytest.raises(FingerprintError):
        m3lite.load(other).generate("x", bank=Bank.open(bank), max_new_tokens=1)


def test_bad_sources(tiny_model_dir, tmp_path):
    model = tiny_model_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    (empty / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    p = run("bank", "build", empty, "--out", tmp_path / "bank", "--model", model, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "blank.txt" in p.stderr and "blob.txt" in p.stderr
    p = run("bank", "build", tmp_path / "nope", "--out", tmp_path / "bank2", "--model", model, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_api_generate_with_bank(built):
    model_dir, bank = built
    m = m3lite.load(model_dir)
    b = m3lite.Bank.open(bank)
    text = m.generate("Question: What is bread?\nAnswer:", bank=b, mode="memory", max_new_tokens=4,
                      temperature=0)
    assert isinstance(text, str) and m.last_result.references
    with pytest.raises(m3lite.M3Error):
        m.generate("x", bank=b, mode="memory", backend="onnxruntime")
    with pytest.raises(m3lite.M3Error):
        m.generate("x", mode="rag")




def test_damaged_banks_refused_in_one_line(built, tmp_path):
    model, bank = built
    trunc = tmp_path / "trunc"
    shutil.copytree(bank, trunc)
    mem = trunc / "memories.bin"
    mem.write_bytes(mem.read_bytes()[:-10])
    assert "truncated" in one_line_error(run("bank", "info", trunc, check=False))
    assert "truncated" in one_line_error(run("ask", "volcano?", "--model", model, "--bank", trunc, check=False))
    altered = tmp_path / "altered"
    shutil.copytree(bank, altered)
    man = json.loads((altered / "manifest.json").read_text())
    man["count"] += 1
    (altered / "manifest.json").write_text(json.dumps(man))
    one_line_error(run("bank", "info", altered, check=False))
    (altered / "manifest.json").write_text("{ not json")
    one_line_error(run("bank", "info", altered, check=False))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "something"}))
    one_line_error(run("bank", "search", foreign, "x", "--model", model, check=False))
    one_line_error(run("bank", "info", tmp_path / "missing", check=False))


@pytest.mark.slow
def test_one_megabyte_single_line(tiny_model_dir, tmp_path):
    words = ("alpha beta gamma delta epsilon zeta eta theta " * 30000)[: 1 << 20]
    (tmp_path / "big.txt").write_text(words)
    out = json.loads(run("bank", "build", tmp_path / "big.txt", "--out", tmp_path / "bank", "--model",
                         tiny_model_dir(), "--json").stdout)
    assert out["added"] > 1000


@pytest.mark.slow
def test_killed_bank_add_keeps_last_commit_and_resumes(tiny_model_dir, tmp_path):
    """SIGKILL a real `m3lite bank add` at random moments: the bank always opens at a commit and verifies."""
    import random
    import signal
    import time

    model = tiny_model_dir()
    base = tmp_path / "base"
    base.mkdir()
    (base / "seed.txt").write_text("The first document of the bank.")
    bank = tmp_path / "bank"
    run("bank", "build", base, "--out", bank, "--model", model)
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(0)
    words = "river mountain city music science history planet language animal energy".split()
    n_docs = 600  # each reference is also embedded (~100/s): enough for an add to outlast the kills
    for i in range(n_docs):
        (docs / f"d{i:04d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + f" doc {i}.")
    counts = [Bank.open(bank).count]
    killed_running = 0
    for trial in range(4):
        p = subprocess.Popen([sys.executable, "-m", "m3lite", "bank", "add", str(bank), str(docs), "--model",
                              str(model)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while p.poll() is None and Bank.open(bank).count == counts[-1] and time.monotonic() < deadline:
            time.sleep(0.02)  # wait for this run's first commit, then kill at a random moment after it
        time.sleep(rng.uniform(0.0, 0.4))
        killed_running += p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait()
        b = Bank.open(bank)
        b.verify()
        assert b.count >= counts[-1]
        counts.append(b.count)
    assert killed_running >= 3 and len(Bank.open(bank).docs) < n_docs + 1  # the kills did interrupt the add
    run("bank", "add", bank, docs, "--model", model)
    b = Bank.open(bank)
    b.verify()
    assert len(b.docs) == n_docs + 1
    assert len({d["sha256"] for d in b.docs}) == n_docs + 1


def test_long_work_says_what_it_does_without_a_terminal(tiny_model_dir, notes, tmp_path):
    """stderr is a pipe here (a log file for a user): no progress bar, but a line that says what was done,
    how much and how long; --json stays quiet."""
    model = tiny_model_dir()
    p = run("bank", "build", notes, "--out", tmp_path / "bank", "--model", model)
    lines = [s for s in p.stderr.splitlines() if s.startswith("m3lite: adding references:")]
    assert len(lines) == 1 and "(done)" in lines[0] and " s" in lines[0], p.stderr
    assert "\r" not in p.stderr and "\x1b[" not in p.stderr  # nothing a terminal bar would draw
    q = run("bank", "build", notes, "--out", tmp_path / "bank2", "--model", model, "--json")
    assert "m3lite:" not in q.stderr
