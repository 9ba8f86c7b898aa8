"""Running the m3lite command in a subprocess, as a user would, and checking its one-line errors."""
from __future__ import annotations

import subprocess
import sys


def run(*args, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "m3lite", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """The command failed with exit status 2 and one line `error: ...` on stderr, no traceback."""
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]
