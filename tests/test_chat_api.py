"""The embedding API: Chat (multi-turn over a bank, KV state kept, save/load), cancel from another thread, and
one generation at a time per model."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import m3lite
from m3lite.chat import Chat, ChatFileError, ContextLengthError
from m3lite.errors import BadArgument, BusyError

Q1, Q2, Q3 = "What is a volcano?", "Where is Mount Etna?", "How is bread made?"


@pytest.fixture(scope="module")
def model(chat_model):
    return m3lite.load(chat_model[0])


@pytest.fixture(scope="module")
def bank(chat_model):
    return m3lite.Bank.open(chat_model[1])


def test_turns_continue_the_context(model, bank):
    chat = model.chat(bank=bank, max_new_tokens=12)
    assert isinstance(chat, m3lite.Chat) and chat.mode == "memory"
    a1 = chat.send(Q1)
    r1 = chat.last_result
    assert r1.references and "volcano" in r1.references[0]["doc_id"]
    assert all(0 <= x["attention"] <= 1 for x in r1.references) and sum(x["attention"] for x in r1.references) > 0
    used = chat.context_tokens
    a2 = chat.send(Q2)
    r2 = chat.last_result
    # the second turn prefills only what it adds; the context holds both turns
    assert r2.prompt_tokens < len(model.tokenizer.encode(f"Question: {Q1}\nAnswer: {a1}\nQuestion: {Q2}\nAnswer:"))
    assert used + r2.prompt_tokens <= chat.context_tokens <= used + r2.prompt_tokens + len(r2.tokens)
    assert [t.question for t in chat.turns] == [Q1, Q2] and chat.turns[0].answer == a1
    alone = model.chat(bank=bank, max_new_tokens=12).send(Q2)
    assert a2 != alone  # the first turn is in the context


def test_streaming_pieces_make_the_answer(model, bank):
    chat = Chat(model, bank=bank, mode="rag", max_new_tokens=10)
    pieces = list(chat.send(Q1, stream=True))
    assert "".join(pieces).strip() == chat.turns[-1].answer
    assert chat.last_result.mode == "rag" and chat.last_result.references
    assert "Reference: " in chat.turns[-1].context


@pytest.mark.parametrize("mode", ["memory", "rag", "none"])
def test_save_load_continues_exactly(model, bank, mode, tmp_path):
    a = model.chat(bank=bank, mode=mode, max_new_tokens=10)
    a.send(Q1)
    path = a.save(tmp_path / "talk.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: loads without pickle
        assert {"k", "v", "ids", "meta"} <= set(z.files)
    b = Chat.load(path, model=model)
    assert b.mode == mode and [t.question for t in b.turns] == [Q1]
    assert b.context_tokens == a.context_tokens and b.bank.path == bank.path  # the bank it was saved with
    assert b.send(Q2) == a.send(Q2)
    assert b.last_result.tokens == a.last_result.tokens
    assert [r["id"] for r in b.last_result.references] == [r["id"] for r in a.last_result.references]


def test_load_refuses_wrong_files(model, tiny_model_dir, tmp_path):
    chat = model.chat(max_new_tokens=4)
    chat.send(Q1)
    path = chat.save(tmp_path / "talk.npz")
    with pytest.raises(ChatFileError, match="another model"):
        Chat.load(path, model=m3lite.load(tiny_model_dir()))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ChatFileError, match="not a saved"):
        Chat.load(tmp_path / "junk.npz", model=model)
    with pytest.raises(ChatFileError, match="no saved"):
        Chat.load(tmp_path / "missing.npz", model=model)


def test_full_context_drops_oldest_turns(model):
    chat = model.chat(max_new_tokens=120, repetition_penalty=1.0)
    notes = []
    for i in range(12):
        chat.send(f"Question number {i}: tell me everything about volcanoes, bread and rivers.")
        notes += chat.last_result.notes
        assert chat.context_tokens <= chat.max_context
    assert any("dropped the" in n and "oldest turn" in n for n in notes)
    assert 0 < len(chat.turns) < 12 and chat.turns[-1].question.startswith("Question number 11")


def test_question_too_long_and_bad_settings(model, bank):
    chat = model.chat(bank=bank)
    with pytest.raises(ContextLengthError):
        chat.send("volcano " * 2000)
    with pytest.raises(BadArgument):
        chat.send("   ")
    with pytest.raises(BadArgument):
        chat.send(Q1, temperature=-1)
    with pytest.raises(BadArgument, match="needs a bank"):
        model.chat(mode="memory")
    assert chat.turns == [] and chat.send(Q1, max_new_tokens=3) is not None  # still usable


def test_cancel_from_another_thread(endless_model):
    m = m3lite.load(endless_model)
    cancel, started, out = threading.Event(), threading.Event(), {}

    def run():
        n = 0
        for _ in m.generate("Question: what?\nAnswer:", max_new_tokens=10000, temperature=0, stream=True,
                            cancel=cancel.is_set):
            n += 1
            started.set()
        out["n"] = n

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(120)
    with pytest.raises(BusyError):  # one generation at a time per model, from any thread
        m.generate("x", max_new_tokens=1)
    cancel.set()
    t.join(120)
    assert not t.is_alive()
    assert m.last_result.finish_reason == "cancelled" and len(m.last_result.tokens) < 10000
    assert m.generate("x", max_new_tokens=2, temperature=0) is not None  # free again


def test_chat_cancel_keeps_partial_answer(endless_model):
    chat = m3lite.load(endless_model).chat(max_new_tokens=10000, loop_guard=0)  # it loops on purpose
    cancel, seen = threading.Event(), threading.Event()
    for i, _ in enumerate(chat.send(Q1, stream=True, cancel=cancel.is_set)):
        if i == 5:
            seen.set()
            threading.Thread(target=cancel.set).start()  # the stop comes from another thread
    assert seen.is_set() and chat.last_result.finish_reason == "cancelled"
    assert chat.turns[-1].finish_reason == "cancelled" and chat.turns[-1].answer.startswith(":")
    before = chat.context_tokens
    chat.send(Q2, max_new_tokens=3)
    assert chat.context_tokens > before  # the stopped answer stayed, the next turn follows it


def test_closing_the_stream_stops_and_frees_the_model(endless_model):
    m = m3lite.load(endless_model)
    chat = m.chat(max_new_tokens=10000, loop_guard=0)
    it = chat.send(Q1, stream=True)
    next(it)
    with pytest.raises(BusyError):
        chat.save("/nonexistent/x.npz")
    it.close()
    assert chat.last_result.finish_reason == "cancelled" and len(chat.turns) == 1
    assert m.generate("x", max_new_tokens=2, temperature=0) is not None


def test_an_answer_that_loops_stops_with_a_note(endless_model):
    from m3lite.generate import repeat_period

    assert repeat_period([5, 1, 2, 1, 2, 1, 2, 1, 2], 6) == 2 and repeat_period([1, 2, 1, 2, 1, 3], 4) == 0
    assert repeat_period([7] * 40, 32) == 1 and repeat_period([7] * 32, 32) == 0  # the span, then one more
    sentence = list(range(100, 140))  # 40 tokens, then written again with a new number in front: period 41
    assert repeat_period([1] + sentence + [2] + sentence[:31], 32) == 0
    assert repeat_period([1] + sentence + [2] + sentence[:32], 32) == 41
    assert repeat_period([1] + sentence + [2] + sentence[5:37], 32) == 36  # any 32 of them, from their start
    assert repeat_period(sentence + [0] + sentence + [0] + sentence[:32], 32) == 41  # the latest time
    assert repeat_period(sentence[:32] + sentence[:32], 32) == 32  # written at the very start
    assert repeat_period(sentence + sentence[::-1], 32) == 0
    m = m3lite.load(endless_model)
    text = m.ask("What?", max_new_tokens=500)  # ':' over and over: stopped after the guard's 32 tokens
    r = m.last_result
    assert r.finish_reason == "stop" and 33 <= len(r.tokens) <= 40 and text.startswith(":")
    assert any("repeated the same 1 token" in n for n in r.notes)
    assert len(m.ask("What?", max_new_tokens=100, loop_guard=0) and m.last_result.tokens) == 100
    chat = m.chat(max_new_tokens=500)
    chat.send("What?")
    assert chat.last_result.finish_reason == "stop" and len(chat.last_result.tokens) <= 40


def test_examples_run(chat_model, notes_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    model, _ = chat_model
    env = dict(os.environ, M3LITE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, examples / "ask_my_notes.py", notes_dir, "What is a volcano?", "--model",
                        model, "--max-tokens", "8"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "Sources:" in p.stdout and "volcano.md" in p.stdout and "% of the attention" in p.stdout
    assert "3 references (3 new)" in p.stderr
    again = subprocess.run([sys.executable, examples / "ask_my_notes.py", notes_dir, "Bread?", "--model", model,
                            "--max-tokens", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "3 references (0 new)" in again.stderr  # the bank is reused
    env.pop("WAYLAND_DISPLAY", None)
    p = subprocess.run([sys.executable, examples / "desktop_chat.py", "--model", model], capture_output=True,
                       text=True, env=dict(env, DISPLAY=""), timeout=600)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "desktop_chat" in p.stderr


def test_rag_leaves_out_the_references_that_do_not_fit(tiny_model_dir, notes_dir, tmp_path):
    """ask and Chat fit RAG references the same way: the best-ranked ones that fit the context with room for
    the answer; those left out are neither in the prompt nor reported as used, and a note says how many."""
    from m3lite.memory import build_or_add, search_bank

    model_dir = tiny_model_dir(tie_embeddings=False, max_seq_len=180)
    build_or_add(m3lite.load(model_dir), tmp_path / "bank", [str(notes_dir)], warn=lambda msg: None)
    model, bank = m3lite.load(model_dir), m3lite.Bank.open(tmp_path / "bank")
    q = "volcano lava bread dough Nile river"  # finds every note
    found = search_bank(model, bank, q, model.config.retrieval_top_k)
    msgs = [{"role": "user", "content": q}]
    fits = [n for n in range(len(found) + 1)
            if len(model.prompt(msgs, [r["text"] for r in found[:n]])) <= model.config.max_seq_len - 8]
    n = max(fits)
    assert 0 < n < len(found)  # the setting this test needs: some references fit, not all
    model.ask(q, bank=bank, mode="rag", max_new_tokens=8)
    chat = model.chat(bank=bank, mode="rag", max_new_tokens=8)
    chat.send(q)
    for r in (model.last_result, chat.last_result):
        assert [x["id"] for x in r.references] == [x["id"] for x in found[:n]]
        assert any(f"{len(found) - n} of {len(found)} references left out" in note for note in r.notes)
