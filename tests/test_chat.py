"""`m3lite chat` driven through a pseudo-terminal, as a person uses it."""
from __future__ import annotations

import re

import pytest

from chattools import ask, spawn_chat

pexpect = pytest.importorskip("pexpect")

Q1, Q2 = "What is a volcano?", "Where is Mount Etna?"


def _quit(p) -> None:
    p.sendeof()  # Ctrl-D
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


def test_answer_streams_with_sources_and_mode_none(chat_model, tmp_path):
    model, bank = chat_model
    p = spawn_chat("--model", model, "--bank", bank, "-n", "64", cache=tmp_path)  # two turns fit the context
    assert "mode memory" in p.before and "3 references" in p.before
    out = ask(p, Q1)
    head, _, sources = out.partition("Sources:\n")
    assert sources, out
    refs = re.findall(r"\[(\d)\] (.+) \((\S+), score [\d.]+, ([\d.]+)% of the attention\)", sources)
    assert [r[0] for r in refs][:1] == ["1"] and "volcano.md" in refs[0][2]  # hybrid: only related notes
    assert "Mount Etna is an active volcano" in sources  # the snippet of the memory
    assert 0 < sum(float(r[3]) for r in refs) <= 100
    assert "mode none" in ask(p, "/mode none")
    out = ask(p, Q2)
    assert "Sources:" not in out and out.strip()
    assert "2 turns, mode none" in ask(p, "/stats")
    assert "mode rag" in ask(p, "/mode rag")
    out = ask(p, Q1)
    assert "Sources:" in out and "of the attention" not in out  # rag: references, no attention shares
    assert "sources off" in ask(p, "/sources off")
    assert "Sources:" not in ask(p, Q2)
    _quit(p)


def test_save_then_load_in_a_new_process_continues(chat_model, tmp_path):
    model, bank = chat_model
    args = ("--model", model, "--bank", bank, "--max-tokens", 24)
    both = spawn_chat(*args, cache=tmp_path)
    first = ask(both, Q1)
    expected = ask(both, Q2)
    _quit(both)

    a = spawn_chat(*args, cache=tmp_path)
    assert ask(a, Q1) == first
    saved = tmp_path / "talk.npz"
    assert "saved 1 turn " in ask(a, f"/save {saved}")
    a.sendline("/quit")
    a.expect(pexpect.EOF)

    b = spawn_chat(*args, cache=tmp_path)
    assert "loaded 1 turn " in ask(b, f"/load {saved}")
    got = ask(b, Q2)
    assert got == expected
    fresh = spawn_chat(*args, cache=tmp_path)
    assert ask(fresh, Q2) != expected  # without the first turn the answer differs: the context was restored
    _quit(fresh)
    assert "context" in ask(b, "/stats")
    _quit(b)


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(endless_model, tmp_path):
    p = spawn_chat("--model", endless_model, "--loop-guard", "0", cache=tmp_path)  # it loops on purpose
    assert "no bank" in p.before  # the plain model, said in one line
    ask(p, "/max 100000")
    p.sendline(Q1)
    p.expect(":{40}")  # the answer is streaming
    p.sendintr()  # Ctrl-C
    p.expect_exact("[stopped]")
    p.expect_exact(">>> ")
    stats = ask(p, "/stats")
    used, total = map(int, re.search(r"context (\d+) of (\d+) tokens", stats).groups())
    assert used < total // 2  # stopped long before the context's end
    ask(p, "/max 3")
    assert "[stopped]" not in ask(p, Q2)  # the session goes on
    p.sendintr()  # Ctrl-C at the prompt leaves
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


def test_bad_commands_are_one_line_errors(chat_model, tmp_path):
    model, bank = chat_model
    p = spawn_chat("--model", model, cache=tmp_path)
    for line, msg in [("/temp hot", "error: usage: /temp"), ("/max 0", "error: usage: /max"),
                      ("/mode memory", "error: mode 'memory' needs a bank"), ("/frobnicate", "error: unknown command"),
                      (f"/load {tmp_path / 'missing.npz'}", "error: no saved conversation"),
                      ("/bank /nonexistent", "error: no bank at /nonexistent")]:
        out = ask(p, line).strip()
        assert out.startswith(msg) and len(out.splitlines()) == 1, out
    assert "mode memory" in ask(p, f"/bank {bank}")
    assert "Sources:" in ask(p, Q1)
    assert "conversation cleared" in ask(p, "/reset")
    assert "0 turns" in ask(p, "/stats")
    assert "/save FILE" in ask(p, "/help")
    _quit(p)


def test_default_model_and_bank(chat_model, notes_dir, tmp_path):
    model, _ = chat_model
    p = spawn_chat(cache=tmp_path, env={"M3LITE_MODEL": str(model), "M3LITE_DEFAULT_SOURCES": str(notes_dir)})
    assert "mode memory" in p.before and str(tmp_path) in p.before  # the default bank, built into the cache
    assert "Sources:" in ask(p, Q1)
    _quit(p)


def test_a_bank_with_lazy_vectors_gets_them_while_the_prompt_waits(chat_model, notes_dir, tmp_path):
    import time

    from clitools import run
    from m3lite.bank import Bank

    model, _ = chat_model
    bank = tmp_path / "lazyvec"
    run("bank", "build", notes_dir, "--out", bank, "--model", model, "--vectors", "lazy")
    assert Bank.open(bank).embedded_count == 0
    p = spawn_chat("--model", model, "--bank", bank, cache=tmp_path)
    assert "no sentence vector yet" in p.before  # said in one line
    deadline = time.monotonic() + 120
    while Bank.open(bank).embedded_count < Bank.open(bank).count and time.monotonic() < deadline:
        time.sleep(0.2)
    b = Bank.open(bank)
    assert b.embedded_count == b.count and b.verify()["ok"]
    assert "Sources:" in ask(p, Q1)
    _quit(p)


def test_without_the_default_bank_chat_answers_from_the_model_alone(chat_model, notes_dir, tmp_path):
    # offline, with no sentence embedder pulled: the default bank cannot be built, the session still starts
    model, _ = chat_model
    p = spawn_chat(cache=tmp_path, env={"M3LITE_MODEL": str(model), "M3LITE_DEFAULT_SOURCES": str(notes_dir),
                                        "M3LITE_EMBEDDER": "", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                                        "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)})
    assert "default bank is not available" in p.before and "answering from the model alone" in p.before
    assert "no bank" in p.before and "Traceback" not in p.before
    assert "Sources:" not in ask(p, Q1)
    _quit(p)


def test_startup_errors_are_one_line(chat_model, tmp_path):
    from clitools import one_line_error, run

    model, bank = chat_model
    one_line_error(run("chat", "--model", tmp_path / "missing", check=False))
    one_line_error(run("chat", "--model", model, "--bank", tmp_path / "nobank", check=False))
    one_line_error(run("chat", "--model", model, "--mode", "telepathy", check=False))
