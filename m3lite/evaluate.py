"""`m3lite eval`: the modes side by side on the held-out Wikipedia articles.

For each held-out article that has a description (`m3lite.heldout`: the 10% no training stage sees) and that the
bank holds (documents "wiki:LANG/<title>", as `m3lite bank build wiki:en:heldout` makes them), two questions:
"What is {title}?" (answered by the description) and "Tell me about {title}." (the extract's first sentence).

- QA: each mode (none, memory, rag; the same retrieval, `MemorySession`) answers the question with `Model.ask`
  (the model's chat template, or the Question:/Answer: format; greedy, no repetition penalty), stopping at
  "\\n"; exact match and token F1 after SQuAD's normalisation.
- Retrieval: recall@5, the share of questions whose article's own references are among the 5 found for the
  question (the question alone is the query, as in the modes), for the bank's
  lexical search (BM25 over the references' stored tokens, what the modes use), for the model's own dense
  embedder (HNSW) and for an exact BM25 over the bank's reference texts re-tokenized (the baseline).
- Speed: medians over the questions of time to first token and decode tokens/s, per mode.
- Perplexity of the held-out summaries (the extract, cut to the model's context) without memory (a plain
  forward) and with memory (the memory-mode prefill: 64-token chunks, each attending to its own top-k) where the
  summary's own references may not be retrieved: memory can help only with what other articles hold.
"""
from __future__ import annotations

import math
import re
import statistics
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadArgument, M3Error
from .heldout import QASample, article_questions, is_held_out
from .retrieval import BM25

MODES = ("none", "memory", "rag")
RECALL_K = 5
DEFAULT_MAX_TOKENS = 64
N_EXAMPLES = 5
STOP = "\n"  # an answer is its first line: the gold answers are one phrase or sentence


# ------------------------------------------------------------------------------------------------ metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, punctuation removed (ASCII and Unicode), the articles a/an/the removed,
    whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the normalised whitespace tokens (a bag: repeated tokens count as often as they appear in both).
    Two empty answers agree (1); one empty answer gets 0."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:
        return float(p == t)
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def next_token_nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood (nats, float64) of each of ids[1:] under the logits of the token before it:
    logits [n, V] are a forward's outputs over ids [n]."""
    x = np.asarray(logits, np.float64)[:-1]
    t = np.asarray(ids, np.int64)[1:]
    if x.shape[0] != t.shape[0]:
        raise BadArgument(f"{x.shape[0] + 1} rows of logits for {t.shape[0] + 1} tokens")
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return lse - x[np.arange(len(t)), t]


def perplexity(nll_sum: float, n_tokens: int) -> float | None:
    """exp of the mean NLL per predicted token; None without tokens."""
    return math.exp(nll_sum / n_tokens) if n_tokens else None


def hit(found: Iterable[int], relevant: Iterable[int]) -> bool:
    """True when any of `found` is one of `relevant`."""
    return not set(int(i) for i in found).isdisjoint(int(i) for i in relevant)


# ------------------------------------------------------------------------------------------------ the articles


@dataclass(frozen=True)
class EvalArticle:
    title: str
    doc_id: str  # "wiki:LANG/<title>", the bank document
    extract: str
    questions: tuple[QASample, ...]
    references: frozenset[int]  # the bank's live references of this article


def bank_documents(bank) -> dict[str, list[int]]:
    """Document id -> the ids of its live references in `bank`."""
    out: dict[str, list[int]] = {}
    for d in bank.docs:
        live = [i for i in range(d["first"], d["first"] + d["count"]) if not bank.is_deleted(i)]
        if live:
            out.setdefault(d["id"], []).extend(live)
    return out


def heldout_articles(bank, lang: str = "en", limit: int | None = None,
                     warn: Callable[[str], None] | None = None) -> list[EvalArticle]:
    """The held-out `lang` articles that have a description and are in `bank`, in the summaries' order; the
    first `limit` of them when given. Raises M3Error when the bank holds none of them."""
    from .sources import wiki_articles

    if limit is not None and limit < 1:
        raise BadArgument(f"--limit must be at least 1, got {limit}")
    candidates = [(t, a) for t, a in wiki_articles(lang).items() if is_held_out(t) and a["description"]]
    in_bank = bank_documents(bank)
    out: list[EvalArticle] = []
    missing = 0
    for title, art in candidates:
        doc_id = f"wiki:{lang}/{title}"
        refs = in_bank.get(doc_id)
        if not refs:
            missing += 1
            continue
        if limit is None or len(out) < limit:
            out.append(EvalArticle(title, doc_id, art["extract"], tuple(article_questions(title, art)),
                                   frozenset(refs)))
    if not out:
        raise M3Error(f"the bank {bank.path} holds none of the {len(candidates)} held-out wiki:{lang} articles "
                      f"(documents wiki:{lang}/<title>): build one with `m3lite bank build wiki:{lang}:heldout "
                      f"--out BANK --model MODEL`")
    if missing and warn is not None:
        warn(f"{missing} of the {len(candidates)} held-out wiki:{lang} articles with a description are not in the "
             f"bank; evaluating on {'the first ' if limit else ''}{len(out)} of those that are")
    return out


# ------------------------------------------------------------------------------------------------ running


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _forward(model, ids: Sequence[int], session=None, exclude=None) -> np.ndarray:
    """Logits [n, V] of a fresh forward over `ids`: plain, or (with a MemorySession) the memory-mode prefill,
    each retrieval_interval-token chunk attending to the memories retrieved for it (minus `exclude`)."""
    cfg = model.config
    with model._guard():
        eng = model.engine("numba")
        eng.reset()
        if session is None:
            eng.pos_offset = 0
            return eng.prefill(np.asarray(ids, np.int64), all_logits=True)
        eng.pos_offset = cfg.reference_max_tokens
        n = cfg.retrieval_interval
        parts = []
        try:
            for c0 in range(0, len(ids), n):
                chunk = np.asarray(ids[c0:c0 + n], np.int64)
                session.install(eng, chunk, exclude)
                parts.append(eng.prefill(chunk, all_logits=True))
        finally:
            eng.reset()
            eng.pos_offset = 0
        return np.concatenate(parts)


def evaluate(model, bank, limit: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, lang: str = "en",
             progress: Callable[[int, int, str], None] | None = None,
             warn: Callable[[str], None] | None = None) -> dict:
    """Run the evaluation (see the module's docstring) of `model` with `bank` (an open Bank built by this
    model); `progress(done, total, what)` is called after each question and each summary. Returns the results
    as a JSON-ready dict (fractions in [0, 1], times in ms; None where there is nothing to measure)."""
    from .memory import MemorySession

    if bank.fingerprint != model.fingerprint:
        from .bank import FingerprintError

        raise FingerprintError(f"bank {bank.path} was built for another model (fingerprint {bank.fingerprint}, "
                               f"this model is {model.fingerprint}): rebuild the bank with this model")
    if max_tokens < 1:
        raise BadArgument(f"--max-tokens must be at least 1, got {max_tokens}")
    t_start = time.perf_counter()
    articles = heldout_articles(bank, lang, limit, warn)
    cfg, tok = model.config, model.tokenizer
    n_questions = sum(len(a.questions) for a in articles)
    total, done = n_questions + len(articles), 0
    say = progress or (lambda d, t, what: None)
    say(0, total, "preparing retrieval")

    search = {r: MemorySession(model, bank, mode="rag", top_k=RECALL_K, retriever=r)  # the bank's searches
              for r in ("lexical", "dense")}
    live = np.flatnonzero([not bank.is_deleted(i) for i in range(bank.count)])
    texts = [bank.reference(int(i))["text"] for i in live]
    bm25 = BM25([tok.encode(t) for t in texts], cfg.vocab_size)

    def answer(question: str, mode: str, n: int) -> str:  # greedy, in the model's chat format, first line
        return model.ask(question, max_new_tokens=n, bank=bank, mode=mode, stop=[STOP])

    for mode in MODES:  # untimed: the first call of a mode pays one-time costs (compiled code, page faults)
        answer(articles[0].questions[0].question, mode, 2)
    per_mode = {m: {"em": [], "f1": [], "ttft": [], "tps": []} for m in MODES}
    recall = {"lexical": 0, "dense": 0, "bm25": 0}
    examples: list[dict] = []
    for art in articles:
        for q in art.questions:
            query = tok.encode(q.question)  # retrieval sees the question alone
            for r, s in search.items():
                recall[r] += hit((i for i, _ in s.retrieve(query)), art.references)
            recall["bm25"] += hit(live[bm25.ranked(query, RECALL_K)], art.references)
            answers = {}
            for mode in MODES:
                text = answer(q.question, mode, max_tokens)
                r = model.last_result
                answers[mode] = text.strip()
                acc = per_mode[mode]
                acc["em"].append(exact_match(text, q.answer))
                acc["f1"].append(token_f1(text, q.answer))
                acc["ttft"].append(r.ttft_s * 1000)  # the first token is always sampled (max_tokens >= 1)
                if len(r.tokens) > 1:
                    acc["tps"].append(r.decode_tokens_per_s)
            if len(examples) < N_EXAMPLES:
                examples.append({"question": q.question, "answer": q.answer, "predictions": answers})
            done += 1
            say(done, total, "answering")

    memory = MemorySession(model, bank, mode="memory")
    nll = {"none": 0.0, "memory": 0.0}
    n_tokens = n_summaries = 0
    for art in articles:
        ids = tok.encode(art.extract, bos=True)[:cfg.max_seq_len]
        if len(ids) >= 2:
            nll["none"] += float(next_token_nll(_forward(model, ids), ids).sum())
            nll["memory"] += float(next_token_nll(_forward(model, ids, memory, exclude={art.doc_id}), ids).sum())
            n_tokens += len(ids) - 1
            n_summaries += 1
        done += 1
        say(done, total, "perplexity")

    def rnd(x, nd=4):
        return None if x is None else round(x, nd)

    modes = {}
    for mode in MODES:
        acc = per_mode[mode]
        modes[mode] = {"exact_match": rnd(float(np.mean(acc["em"]))), "f1": rnd(float(np.mean(acc["f1"]))),
                       "ttft_ms": rnd(_median(acc["ttft"]), 3), "decode_tokens_per_s": rnd(_median(acc["tps"]), 2)}
    return {
        "model": cfg.name, "fingerprint": model.fingerprint, "bank": str(bank.path), "lang": lang,
        "articles": len(articles), "questions": n_questions, "max_tokens": max_tokens,
        "modes": modes,
        "recall_at_5": {r: rnd(n / n_questions) for r, n in recall.items()},
        "perplexity": {"none": rnd(perplexity(nll["none"], n_tokens)),
                       "memory": rnd(perplexity(nll["memory"], n_tokens)),
                       "tokens": n_tokens, "summaries": n_summaries},
        "examples": examples,
        "seconds": round(time.perf_counter() - t_start, 2),
    }


# ------------------------------------------------------------------------------------------------ reporting


def _fmt(x, scale: float = 1.0, nd: int = 1) -> str:
    return "–" if x is None else f"{x * scale:.{nd}f}"


def markdown_table(res: dict) -> str:
    """The results as a markdown table, modes as rows (and BM25 as a retrieval-only row), with a caption."""
    m, rc, pp = res["modes"], res["recall_at_5"], res["perplexity"]
    used = _fmt(rc["lexical"], 100)
    rows = [
        ("none", m["none"], "–", pp["none"]),
        ("memory", m["memory"], used, pp["memory"]),
        ("rag", m["rag"], used, None),
    ]
    lines = [f"Held-out evaluation of {res['model']} (fingerprint {res['fingerprint']}) with bank {res['bank']}: "
             f"{res['articles']} articles, {res['questions']} questions, greedy, up to {res['max_tokens']} tokens, "
             f"stop at a newline. The modes retrieve with the bank's lexical search (BM25). Perplexity over {pp['tokens']} tokens of {pp['summaries']} summaries; memory "
             f"mode without the summary's own references.", "",
             "| mode | EM % | F1 % | recall@5 % | TTFT ms | decode tok/s | perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, d, r, p in rows:
        lines.append(f"| {name} | {_fmt(d['exact_match'], 100)} | {_fmt(d['f1'], 100)} | {r} | "
                     f"{_fmt(d['ttft_ms'])} | {_fmt(d['decode_tokens_per_s'])} | {_fmt(p, nd=2)} |")
    lines.append(f"| own dense embedder, HNSW (retrieval only) | – | – | {_fmt(rc['dense'], 100)} | – | – | – |")
    lines.append(f"| BM25 baseline (retrieval only) | – | – | {_fmt(rc['bm25'], 100)} | – | – | – |")
    return "\n".join(lines) + "\n"


def report_markdown(res: dict) -> str:
    out = ["# m3lite eval", "", markdown_table(res)]
    if res.get("examples"):
        out += ["## Examples", ""]
        for ex in res["examples"]:
            out.append(f"- **{ex['question']}** reference: {ex['answer']}")
            for mode, text in ex["predictions"].items():
                out.append(f"  - {mode}: {text or '(empty)'}")
        out.append("")
    return "\n".join(out)


def chart_png(res: dict) -> bytes:
    from .plot import bar_chart

    m, rc, pp = res["modes"], res["recall_at_5"], res["perplexity"]

    def pct(x):
        return None if x is None else 100 * x

    panels = [
        ("EM %", [(k, pct(m[k]["exact_match"])) for k in MODES]),
        ("F1 %", [(k, pct(m[k]["f1"])) for k in MODES]),
        ("top-5 recall %", [("bank (lexical)", pct(rc["lexical"])), ("dense", pct(rc["dense"])),
                            ("BM25", pct(rc["bm25"]))]),
        ("TTFT ms", [(k, m[k]["ttft_ms"]) for k in MODES]),
        ("decode tok/s", [(k, m[k]["decode_tokens_per_s"]) for k in MODES]),
        ("perplexity", [("none", pp["none"]), ("memory", pp["memory"])]),
    ]
    return bar_chart(panels)


def report_paths(path: str | Path) -> tuple[Path, Path]:
    """The markdown file and the chart next to it (same name, .png); checked before a run, not after it."""
    md = Path(path)
    png = md.with_suffix(".png")
    if png == md:
        raise BadArgument(f"--report names the markdown file (e.g. report.md), not {md}; the chart goes next to it")
    if not md.parent.is_dir():
        raise BadArgument(f"cannot write {md}: the folder {md.parent} does not exist")
    return md, png


def write_report(res: dict, path: str | Path) -> tuple[Path, Path]:
    """Write the markdown report to `path` and the bar chart next to it (same name, .png); returns both."""
    from .modelfile import atomic_write_bytes

    md, png = report_paths(path)
    atomic_write_bytes(md, report_markdown(res).encode("utf-8"))
    atomic_write_bytes(png, chart_png(res))
    return md, png
