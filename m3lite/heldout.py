"""The held-out split and its questions, shared by the trainer (which keeps these articles out of every stage) and
`m3lite eval` (which measures on them).

The split: 10% of the Wikipedia articles, chosen by a stable hash of the title. The questions come from an
article's own fields: "What is {title}?" is answered by its description, "Tell me about {title}." by the first
sentence of its extract.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

HELD_OUT_BUCKETS = 10  # 1 in 10 articles is held out


def is_held_out(title: str) -> bool:
    """True for the 10% of articles kept out of every training stage (a stable hash of the title)."""
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h % HELD_OUT_BUCKETS == 0


@dataclass(frozen=True)
class QASample:
    title: str
    question: str
    answer: str


_FIRST_SENTENCE = re.compile(r"[a-z0-9)\]\"'%]{2}[.!?](?=\s+[A-Z0-9\"'(\[])")


def first_sentence(text: str) -> str:
    """The text up to the first sentence end (two lowercase letters before the stop, so "Dr." or "U.S." do
    not end it)."""
    text = " ".join(text.split())
    m = _FIRST_SENTENCE.search(text)
    return text[:m.end()] if m else text


def article_questions(title: str, article: dict[str, str]) -> list[QASample]:
    """The QA pairs of one article: "What is {title}?" -> the description (when there is one), "Tell me about
    {title}." -> the extract's first sentence (when there is an extract)."""
    out: list[QASample] = []
    if article.get("description"):
        out.append(QASample(title, f"What is {title}?", article["description"]))
    sentence = first_sentence(article.get("extract", ""))
    if sentence:
        out.append(QASample(title, f"Tell me about {title}.", sentence))
    return out


def qa_samples(articles: dict[str, dict[str, str]], held_out: bool = False) -> list[QASample]:
    """QA pairs from the articles' own fields, for the training articles (or the held-out ones)."""
    out: list[QASample] = []
    for title, art in articles.items():
        if is_held_out(title) == held_out:
            out.extend(article_questions(title, art))
    return out
