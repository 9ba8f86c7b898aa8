"""A pseudo-terminal running `m3lite chat` (the chat tests' model and bank are fixtures in conftest.py)."""
from __future__ import annotations

import os
import sys

import pytest


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
