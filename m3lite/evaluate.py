"""`m3lite eval`: the modes side by side on the held-out Wikipedia articles.

For each held-out article that has a description (`m3lite.heldout`: the 10% no training stage sees) and that the
bank holds (documents "wiki:LANG/<title>", as `m3lite bank build wiki:en:heldout` makes them), two questions:
"What is {title}?" (answered by the description) and "Tell me about {title}." (the extract's first sentence).

- QA: each mode (none, memory, rag; the same retrieval, `MemorySession`) answers the question with `Model.ask`
  (the model's chat template, or the Question:/Answer: format; greedy, no repetition penalty), stopping at
  "\\n"; exact match and token F1 after SQuAD's normalisation.
  With `--qa FILE`, the questions of a QA file instead ({"question", "answer", optional "document"} per line),
  and "contains" (the normalised gold answer appears in the answer) beside EM and F1.
- Retrieval: recall@5, the share of questions whose article's own references are among the 5 found for the
  question (the question alone is the query, as in the modes), and the median query time, for each retriever
  (hybrid, lexical, dense: `m3lite.retrieval`).
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
from .params import EVAL_MAX_TOKENS

MODES = ("none", "memory", "rag")
RECALL_K = 5
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


def contains(prediction: str, truth: str) -> float:
    """1.0 when the normalised gold answer appears in the normalised prediction (on word boundaries)."""
    t = normalize_answer(truth)
    return float(bool(t) and f" {t} " in f" {normalize_answer(prediction)} ")


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
    with model.generation_lock():
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


@dataclass(frozen=True)
class EvalItem:
    question: str
    answer: str
    references: frozenset[int] | None  # the bank's live references of the gold document (None: not given)


def read_qa(path: str | Path, bank) -> list[EvalItem]:
    """A QA file: one JSON object per line, {"question", "answer"} and optionally "document" (a bank document
    id, or the "id" of a JSONL source line, for recall). A bad line is a one-line M3Error naming it."""
    import json

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise M3Error(f"cannot read the QA file {p}: {e}") from None
    docs = bank_documents(bank)
    for doc_id, refs in list(docs.items()):  # a JSONL line's own id ("path#id" -> "id") names it too
        if "#" in doc_id:
            docs.setdefault(doc_id.rsplit("#", 1)[1], refs)
    out: list[EvalItem] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise M3Error(f"{p} line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip()
                                                for k in ("question", "answer")):
            raise M3Error(f"{p} line {n}: needs \"question\" and \"answer\" strings")
        doc = obj.get("document")
        if doc is not None and not isinstance(doc, str):
            raise M3Error(f"{p} line {n}: \"document\" must be a document id string")
        out.append(EvalItem(obj["question"].strip(), obj["answer"].strip(),
                            frozenset(docs.get(doc, ())) if doc is not None else None))
    if not out:
        raise M3Error(f"{p} holds no questions")
    return out


def evaluate(model, bank, limit: int | None = None, max_tokens: int = EVAL_MAX_TOKENS, lang: str = "en",
             progress: Callable[[int, int, str], None] | None = None,
             warn: Callable[[str], None] | None = None, qa: str | Path | None = None,
             retriever: str = "hybrid", recall_only: bool = False, modes: Sequence[str] = MODES,
             refs: int | None = None, system: str | None = None) -> dict:
    """Run the evaluation (see the module's docstring) of `model` with `bank` (an open Bank built by this
    model): on the held-out articles, or on the questions of the QA file `qa`; the modes retrieve with
    `retriever`; `recall_only` measures retrieval alone; `modes` answers in those modes only; memory and rag
    use `refs` references per question (default the model's retrieval_top_k); answers have the system message
    `system` (None: `Model.ask`'s default). `progress(done, total, what)` is called after each
    question and each summary. Returns the results as a JSON-ready dict (fractions in [0, 1], times in ms; None
    where there is nothing to measure)."""
    from .memory import MemorySession
    from .retrieval import RETRIEVERS, check_retriever

    check_retriever(retriever)
    if not modes or any(m not in MODES for m in modes):
        raise BadArgument(f"--modes must be some of {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    modes = [m for m in MODES if m in set(modes)]
    bank.check_model(model.fingerprint)
    model.check_refs(refs)
    if max_tokens < 1:
        raise BadArgument(f"--max-tokens must be at least 1, got {max_tokens}")
    t_start = time.perf_counter()
    if qa is not None:
        articles: list[EvalArticle] = []
        if limit is not None and limit < 1:
            raise BadArgument(f"--limit must be at least 1, got {limit}")
        items = read_qa(qa, bank)[:limit]
    else:
        articles = heldout_articles(bank, lang, limit, warn)
        items = [EvalItem(q.question, q.answer, a.references) for a in articles for q in a.questions]
    cfg, tok = model.config, model.tokenizer
    n_questions = len(items)
    total = n_questions + (0 if recall_only else len(articles))
    done = 0
    say = progress or (lambda d, t, what: None)
    if bank.lazy_vectors and bank.embedded_count < bank.count:
        # dense search covers only the references that have a vector: measure the bank with all of them
        from .retrieval import bank_embedder

        bank.embed(bank_embedder(bank), progress=lambda st: say(st["embedded"], st["total"],
                                                                 "computing sentence vectors"))
    say(0, total, "preparing retrieval")

    search = {r: MemorySession(model, bank, mode="rag", top_k=RECALL_K, retriever=r) for r in RETRIEVERS}
    with_gold = [it for it in items if it.references is not None]
    recall = {r: 0 for r in RETRIEVERS}
    latency: dict[str, list[float]] = {r: [] for r in RETRIEVERS}

    def answer(question: str, mode: str, n: int) -> str:  # greedy, in the model's chat format, first line
        return model.ask(question, max_new_tokens=n, bank=bank, mode=mode, stop=[STOP],
                         retriever=search[retriever].search, refs=refs, system=system)

    if not recall_only:
        for mode in modes:  # untimed: the first call of a mode pays one-time costs (compiled code, page faults)
            answer(items[0].question, mode, 2)
    per_mode = {m: {"em": [], "f1": [], "contains": [], "ttft": [], "tps": []} for m in MODES}
    examples: list[dict] = []
    for it in items:
        if it.references is not None:
            for r, s in search.items():  # retrieval sees the question alone
                t0 = time.perf_counter()
                found = s.retrieve(it.question)
                latency[r].append((time.perf_counter() - t0) * 1000)
                recall[r] += hit((i for i, _ in found), it.references)
        if not recall_only:
            answers = {}
            for mode in modes:
                text = answer(it.question, mode, max_tokens)
                r = model.last_result
                answers[mode] = text.strip()
                acc = per_mode[mode]
                acc["em"].append(exact_match(text, it.answer))
                acc["f1"].append(token_f1(text, it.answer))
                acc["contains"].append(contains(text, it.answer))
                acc["ttft"].append(r.ttft_s * 1000)  # the first token is always sampled (max_tokens >= 1)
                if len(r.tokens) > 1:
                    acc["tps"].append(r.decode_tokens_per_s)
            if len(examples) < N_EXAMPLES:
                examples.append({"question": it.question, "answer": it.answer, "predictions": answers})
        done += 1
        say(done, total, "retrieving" if recall_only else "answering")

    nll = {"none": 0.0, "memory": 0.0}
    n_tokens = n_summaries = 0
    if not recall_only and articles and {"none", "memory"} <= set(modes):
        memory = MemorySession(model, bank, mode="memory", retriever=search[retriever].search)
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

    results = {}
    if not recall_only:
        for mode in modes:
            acc = per_mode[mode]
            results[mode] = {"exact_match": rnd(float(np.mean(acc["em"]))), "f1": rnd(float(np.mean(acc["f1"]))),
                           "contains": rnd(float(np.mean(acc["contains"]))),
                           "ttft_ms": rnd(_median(acc["ttft"]), 3), "decode_tokens_per_s": rnd(_median(acc["tps"]), 2)}
    return {
        "model": cfg.name, "fingerprint": model.fingerprint, "bank": str(bank.path),
        "questions_from": str(qa) if qa is not None else f"wiki:{lang}:heldout", "lang": lang,
        "articles": len(articles), "questions": n_questions, "max_tokens": max_tokens, "retriever": retriever,
        "refs": refs or cfg.retrieval_top_k, "system": model.system_message(system),
        "bank_references": bank.live_count,
        "modes": results,
        "recall_at_5": {r: rnd(n / len(with_gold)) if with_gold else None for r, n in recall.items()},
        "retrieval_ms_p50": {r: rnd(_median(v), 3) for r, v in latency.items()},
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
    """The results as markdown: the modes (when answered) and the retrievers, each as a table, with a caption."""
    m, rc, pp, lat = res["modes"], res["recall_at_5"], res["perplexity"], res.get("retrieval_ms_p50", {})
    lines = [f"Evaluation of {res['model']} (fingerprint {res['fingerprint']}) with bank {res['bank']} "
             f"({res.get('bank_references', '?')} references): {res['questions']} questions from "
             f"{res.get('questions_from', 'the held-out articles')}."]
    if m:
        system = res.get("system")
        lines += [f"Greedy, up to {res['max_tokens']} tokens, stop at a newline; the modes retrieve with "
                  f"{res.get('retriever', 'hybrid')}." + (f' System message: "{system}".' if system else "")
                  + (f" Perplexity over {pp['tokens']} tokens of "
                  f"{pp['summaries']} summaries; memory mode without the summary's own references."
                  if pp.get("tokens") else ""), "",
                  "| mode | EM % | F1 % | contains % | TTFT ms | decode tok/s | perplexity |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name in (x for x in MODES if x in m):
            d = m[name]
            lines.append(f"| {name} | {_fmt(d['exact_match'], 100)} | {_fmt(d['f1'], 100)} | "
                         f"{_fmt(d.get('contains'), 100)} | {_fmt(d['ttft_ms'])} | {_fmt(d['decode_tokens_per_s'])} "
                         f"| {_fmt(pp.get(name), nd=2)} |")
    lines += ["", "| retriever | recall@5 % | query ms (p50) |", "|---|---:|---:|"]
    for r, v in rc.items():
        lines.append(f"| {r} | {_fmt(v, 100)} | {_fmt(lat.get(r), nd=2)} |")
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

    panels = []
    if m:
        panels += [("EM %", [(k, pct(m[k]["exact_match"])) for k in m]),
                   ("F1 %", [(k, pct(m[k]["f1"])) for k in m]),
                   ("contains %", [(k, pct(m[k].get("contains"))) for k in m])]
    panels.append(("top-5 recall %", [(r, pct(v)) for r, v in rc.items()]))
    if m:
        panels += [("TTFT ms", [(k, m[k]["ttft_ms"]) for k in m]),
                   ("decode tok/s", [(k, m[k]["decode_tokens_per_s"]) for k in m])]
    if pp.get("tokens"):
        panels.append(("perplexity", [("none", pp["none"]), ("memory", pp["memory"])]))
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
