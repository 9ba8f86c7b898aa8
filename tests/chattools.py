"""A model and a small bank for the chat and server tests, and a pseudo-terminal running `m3lite chat`."""
from __future__ import annotations

import os
import sys

import pytest

NOTES = {
    "volcano.md": "# Volcanoes\n\nA volcano is a rupture in the crust of a planet. Lava, ash and gases escape from a "
                  "magma chamber below the surface.\n\nMount Etna is an active volcano in Sicily.",
    "bread.txt": "Bread is a staple food prepared from a dough of flour and water, usually by baking. Yeast makes the "
                 "dough rise.",
    "rivers.md": "The Nile is a major river in north-eastern Africa. It flows into the Mediterranean Sea.",
}


@pytest.fixture(scope="session")
def notes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-notes")
    for name, text in NOTES.items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="session")
def chat_model(tiny_model_dir, notes_dir, tmp_path_factory):
    """(model dir, bank dir): a tiny random model with untied embeddings (a tied random model repeats its last
    input token whatever came before, so greedy answers would not show whether the context was kept) and a bank
    of three notes built with build_or_add."""
    import m3lite
    from m3lite.memory import build_or_add

    model_dir = tiny_model_dir(tie_embeddings=False)
    bank = tmp_path_factory.mktemp("chat-bank") / "bank"
    build_or_add(m3lite.load(model_dir), bank, [str(notes_dir)], warn=lambda msg: None)
    return model_dir, bank


@pytest.fixture(scope="session")
def endless_model(tiny_model_dir):
    """A tied random model with a long context: greedy, it repeats ':' after "Answer:" until the context ends,
    so an answer is still running when a test stops it."""
    return tiny_model_dir(max_seq_len=16384)


def spawn_chat(*args, cache, env: dict | None = None):
    """`m3lite chat ARGS` in a pseudo-terminal (pexpect), waiting for the first prompt."""
    pexpect = pytest.importorskip("pexpect")
    e = dict(os.environ, NO_COLOR="1", M3LITE_CACHE=str(cache), **(env or {}))
    p = pexpect.spawn(sys.executable, ["-m", "m3lite", "chat", *map(str, args)], env=e, encoding="utf-8",
                      codec_errors="replace", timeout=300, dimensions=(50, 500))
    p.expect_exact(">>> ")
    return p


def ask(p, line: str) -> str:
    """Send a line, wait for the next prompt; what was printed in between (the echoed line removed)."""
    p.sendline(line)
    p.expect_exact(">>> ")
    out = p.before.replace("\r\n", "\n")
    return out.split("\n", 1)[1] if "\n" in out else ""
