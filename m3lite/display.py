"""How references are shown in a terminal: one place for `ask`, `bank search` and `chat`'s sources."""
from __future__ import annotations


def snippet(text: str, n: int = 160) -> str:
    """A reference's text on one line, cut to `n` characters."""
    t = " ".join(text.split())
    return t if len(t) <= n else t[: n - 1] + "\u2026"


def reference_lines(n: int, r: dict) -> tuple[str, str]:
    """The two lines of the `n`-th reference `r` (title, document, score, share of the memory attention when
    measured; then its snippet)."""
    share = f", {100 * r['attention']:.1f}% of the attention" if "attention" in r else ""
    return f"[{n}] {r['title']} ({r['doc_id']}, score {r['score']:.3f}{share})", snippet(r["text"])
