"""Data for memory distillation: questions, the references the student reads as memory, and the teacher's answers.

    python -m converters.distill_data --model DIR --out DATA_DIR [--facts 1000] [--wiki 600] [--refs 3] [--brief]
                                      [--none 0]

Each item is one question with `refs` references: its gold note and the best-scoring others of the same pool
(BM25 over words, as a bank's lexical search finds them), so the student learns to answer among distractors.
- made-up facts: the "train" split of `converters.facts` (templates and invented words evaluation never sees);
- Wikipedia: held-in articles only (never `m3lite.heldout.is_held_out`), the questions `m3lite eval` asks of
  held-out ones ("What is X?", "Tell me about X."), the article's first reference as the gold one.

The teacher is the same model in RAG mode, run by m3lite's own engine: reference text inside the user turn
(`Model.prompt(messages, texts)`), greedy, up to --max-new tokens. By default (--teacher gold) it reads the gold
reference only: with the two distractors in its prompt SmolLM2-135M got 58% of the first 50 made-up facts of the
train split right, with the gold note alone 67% of all 1,400; the student, who reads all of them as memory,
should learn the better answer. At every answer position the teacher's top --top log-probabilities are kept;
the trainer's KL needs nothing else from it, so the teacher never runs again.
Teacher and student share the system message the runtime answers with (`Model.system_message`: for a model
with a chat template `chat_template.ANSWER_SYSTEM`, --system to change it), so the adapter learns the prompt it
will be asked in. A teacher answer that starts copying the numbered notes ("... loom. [1] In the Datairk ...") is
cut before the number: the student never sees numbers, and the adapter distilled without this cut writes
"[2] ..." after its answers.
With --brief (the recipe's setting) an answer is what `ask`'s system message asks for: an opening such as "The
answer to this question is:" is dropped and the answer ends after its first sentence (or line) with the
end-of-turn token; a made-up fact's answer ends after the sentence that holds the fact instead (the brief adapter
of 2026-12-01, cut after the first sentence, learned to stop before the fact: "The Agech bell is a tool for
warning boats of fog." where the question asked its weight). Where the teacher, forced through the edited answer,
would have said something else (the opening's first word, the next sentence instead of the end), that position's
target is the edited token alone; everywhere else it is the teacher's distribution. With --none N, N Wikipedia
questions are also asked without any reference (teacher and student the plain model, `ask --mode none`'s
prompt), so the adapter keeps the model's own answers while it learns to end them.
Made-up-facts items whose (cut) teacher answer misses the gold answer are dropped (the student should not learn a
wrong answer); Wikipedia answers are free text and all kept unless empty (nothing to learn).

DATA_DIR gets items.jsonl (per item: kind (facts, wiki, or none: no references), question, answer, teacher,
student ids = the prompt without references, answer ids = the teacher's answer tokens ending in its end-of-turn
token, refs = token lists starting with the model's reference marker), teacher.npz (top-k ids int32 and
log-probs float16, rows in item order, one per answer token) and meta.json (the model's fingerprint and these
settings). Written atomically at the end; a killed run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from m3lite.errors import BadArgument, M3Error
from m3lite.modelfile import atomic_write_bytes

ITEMS, TEACHER, META = "items.jsonl", "teacher.npz", "meta.json"
DATA_FORMAT, DATA_VERSION = "m3lite-distill-data", 1


def reference_ids(tok, text: str, max_tokens: int) -> list[int]:
    """A reference as the bank stores it: the marker, then the text's tokens (cut to max_tokens in all)."""
    return [tok.ref_id] + tok.encode(text)[:max_tokens - 1]


def _pool_index(texts: list[str]):
    from m3lite.lexical import TermIndex, term_ids

    terms = [term_ids(t) for t in texts]
    return TermIndex.build(np.concatenate(terms) if terms else np.zeros(0, np.uint64), [len(t) for t in terms])


def with_distractors(index, question: str, gold: int, k: int) -> list[int]:
    """The gold reference and the k-1 others BM25 ranks best for the question, in rank order (gold where it
    ranks, or last when it falls outside the first k)."""
    from m3lite.lexical import term_ids, top

    ids, _ = top(index.scores(term_ids(question)), k + 1)
    ranked = [int(i) for i in ids]
    if gold not in ranked[:k]:
        ranked = [i for i in ranked if i != gold][:k - 1] + [gold]
    return ranked[:k]


def fact_items(n_entities: int, seed: int | None) -> tuple[list[str], list[dict]]:
    from .facts import make_facts

    notes, qs = make_facts("train", seed=seed, n_entities=n_entities)
    where = {n["id"]: i for i, n in enumerate(notes)}
    texts = [n["text"] for n in notes]
    return texts, [{"kind": "facts", "question": q["question"], "answer": q["answer"], "gold": where[q["document"]]}
                   for q in qs]


def wiki_items(tok, n_articles: int, max_tokens: int) -> tuple[list[str], list[dict]]:
    from m3lite.heldout import article_questions, is_held_out
    from m3lite.sources import Document, chunk_document, wiki_articles

    texts, items = [], []
    for title, art in wiki_articles("en").items():
        if len(texts) >= n_articles:
            break
        if is_held_out(title) or not art["description"]:
            continue
        doc = Document(id=f"wiki:en/{title}", title=title, text=art["extract"], source="wiki:en")
        refs = chunk_document(doc, tok, max_tokens)
        if not refs:
            continue
        for qa in article_questions(title, art):
            items.append({"kind": "wiki", "question": qa.question, "answer": qa.answer, "gold": len(texts)})
        texts.append(refs[0].text)
    return texts, items


_NOTE_NUMBER = re.compile(r"\[\d")


def cut_at_note_number(tok, answer: list[int]) -> int:
    """How many of `answer`'s tokens come before it starts a note number ("[1]", the RAG prompt's numbering):
    all of them when it never does. The token holding the "[" is the first one cut."""
    m = _NOTE_NUMBER.search(tok.decode(answer, skip_special=True))
    if m is None:
        return len(answer)
    for i in range(len(answer)):
        if len(tok.decode(answer[:i + 1], skip_special=True)) > m.start():
            return i
    return len(answer)


# "The answer to this question is:", "Answer:", "The correct answer is" ... and an opening quote after it
_ANSWER = r"(?:the\s+)?(?:correct\s+|short\s+|final\s+)?answer(?:\s+to\s+(?:this|the|your)\s+question)?"
_OPENING = re.compile(rf"""^\s*(?:{_ANSWER}(?:\s+is)?\s*:|{_ANSWER}\s+is\s+)\s*["\u201c]?""", re.I)
# a sentence ends at . ! ? (and a closing quote) after two lowercase letters or digits (not "Dr." or "U.S.")
# when another sentence follows; a line ends at its newline
_SENTENCE_END = re.compile(r"[a-z0-9)\]\"'%]{2}[.!?][\"\u201d]?(?=\s+[A-Z0-9\"'(\[])|\n")
HARD_LOGP = -60.0  # the log-prob every other token gets in a one-token target (float16 holds it)


def brief_span(text: str, fact: str | None = None) -> tuple[int, int | None]:
    """(start, end) of the brief answer in `text`: start after an opening such as "The answer to this question
    is:" (0 when there is none, or nothing follows it), end after the first sentence or before the first line
    break (None when `text` holds neither: it is one sentence, or it was cut short). With `fact` (a made-up
    fact's gold answer) the answer ends after the sentence that holds it, not before it (end None while `text`
    does not hold it yet): the student must not learn to stop one sentence short of the fact."""
    m = _OPENING.match(text)
    start = m.end() if m and text[m.end():].strip() else 0
    pos = start
    if fact:
        at = text.lower().find(fact.lower().strip(), start)
        if at < 0:
            return start, None
        pos = max(start, at + len(fact.strip()) - 2)  # the end pattern reads two characters before a period
    e = _SENTENCE_END.search(text, pos)
    if e is None:
        return start, None
    return start, (e.end() if e.group() != "\n" else e.start())


def _top_row(logits: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    lp = np.asarray(logits, np.float64).reshape(-1)
    lp = lp - lp.max()
    lp = lp - np.log(np.exp(lp).sum())
    best = np.argpartition(-lp, top)[:top]
    best = best[np.argsort(-lp[best], kind="stable")]
    return best.astype(np.int32), lp[best].astype(np.float16)


def teacher_answer(model, eng, ids: list[int], max_new: int, top: int, forced: list[int] | None = None,
                   until=None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Greedy answer of the engine to `ids` (or the tokens `forced`, teacher-forced) and, per answer token, the
    top `top` token ids and log-probs. `until(answer_ids)`: stop early once it returns True."""
    eos = set(model.tokenizer.eos_ids)
    eng.reset()
    logits = eng.prefill(np.asarray(ids, np.int64))
    out, tops, logps = [], [], []
    for i in range(max_new if forced is None else len(forced)):
        best, lp = _top_row(logits, top)
        tops.append(best)
        logps.append(lp)
        t = int(best[0]) if forced is None else int(forced[i])
        out.append(t)
        if t in eos or (until is not None and until(out)):
            break
        logits = eng.decode(t)
    return out, np.stack(tops), np.stack(logps)


def hard_targets(answer: list[int], tops: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows whose best token is not the answer's become one-token targets (the answer's token at log-prob 0, the
    rest at HARD_LOGP; it replaces the last of the row when it is not among the top). Returns the rows and how
    many changed."""
    tops, lps = tops.copy(), lps.copy()
    changed = 0
    for i, t in enumerate(answer):
        if int(tops[i, 0]) == t:
            continue
        changed += 1
        where = np.flatnonzero(tops[i] == t)
        j = int(where[0]) if len(where) else tops.shape[1] - 1
        tops[i, j] = t
        lps[i] = HARD_LOGP
        lps[i, j] = 0.0
    return tops, lps, changed


def brief_answer(model, eng, ids: list[int], answer: list[int], tops: np.ndarray, lps: np.ndarray, top: int,
                 fact: str | None = None) -> tuple[list[int], np.ndarray, np.ndarray, int]:
    """The teacher's answer made brief (`brief_span`), ending in the end-of-turn token when it ends (a first
    sentence, a line, or the teacher's own end): its tokens, their targets (the teacher's, forced through the
    edited answer where it changed, one-token targets where the teacher would have said otherwise) and the
    number of one-token targets. `fact`: up to the sentence that holds it (`brief_span`)."""
    tok = model.tokenizer
    eos = tok.eos_ids[0]
    ended = bool(answer) and answer[-1] in tok.eos_ids
    text = tok.decode(answer, skip_special=True)
    if fact and fact.lower().strip() not in text.lower():
        fact = None  # the teacher never said it (the item is dropped unless a looser match finds it)
    start, end = brief_span(text, fact)
    if start == 0 and end is None:
        return answer, tops, lps, 0
    body = text[start:end].strip()
    if start and text[start - 1] in "\"\u201c":  # the opening quoted the answer: its closing quote goes too
        body = body.rstrip("\"\u201d").rstrip()
    new = tok.encode(body) + ([eos] if end is not None or ended else [])
    n = len(new) - (1 if new[-1:] == [eos] else 0)
    if new[:n] == answer[:n] and len(answer) >= len(new):  # a prefix: the teacher's rows stand
        tops, lps = tops[:len(new)], lps[:len(new)]
    else:
        _, tops, lps = teacher_answer(model, eng, ids, 0, top, forced=new)
    tops, lps, changed = hard_targets(new, tops, lps)
    return new, tops, lps, changed


def first_sentence_done(tok, fact: str | None = None):
    """until() for teacher_answer: True once the decoded answer holds a whole first sentence or line (with
    `fact`: the whole sentence that holds it)."""
    return lambda ids: brief_span(tok.decode(ids, skip_special=True), fact)[1] is not None


def prepare(model_dir: str, out: str | Path, n_facts: int = 1000, n_wiki: int = 600, refs: int = 3,
            max_new: int = 40, top: int = 64, seed: int | None = None, teacher: str = "gold", keep_wrong: bool = False,
            system: str | None = None, brief: bool = False, n_none: int = 0, progress=print) -> dict:
    import m3lite
    from m3lite.evaluate import contains

    model = m3lite.load(model_dir)
    tok, cfg = model.tokenizer, model.config
    if tok.ref_id < 0:
        raise BadArgument(f"{model_dir}: the tokenizer has no reference marker")
    pools = []  # (reference texts, items); an item with "gold" None is asked without references
    if n_facts:
        pools.append(fact_items(n_facts, seed))
    if n_wiki:
        pools.append(wiki_items(tok, n_wiki, cfg.reference_max_tokens))
    if n_none:
        texts, items = wiki_items(tok, -(-n_none // 2), cfg.reference_max_tokens)
        pools.append((texts, [dict(it, kind="none", gold=None) for it in items[:n_none]]))
    eng = model.engine("numba")
    eng.pos_offset = 0
    rows, all_top, all_lp = [], [], []
    n_total = sum(len(p[1]) for p in pools)
    t0, done, dropped, cut, hard = time.perf_counter(), 0, 0, 0, 0
    for texts, items in pools:
        index = _pool_index(texts)
        for it in items:
            chosen = [] if it["gold"] is None else with_distractors(index, it["question"], it["gold"], refs)
            msgs = model.answer_messages(it["question"], system)
            shown = [] if it["gold"] is None else [texts[it["gold"]]] if teacher == "gold" else \
                [texts[i] for i in chosen]
            ids = model.prompt(msgs, shown) if shown else model.prompt(msgs)
            fact = it["answer"] if it["kind"] == "facts" else None
            until = first_sentence_done(tok, fact) if brief else None
            answer, tops, lps = teacher_answer(model, eng, ids, max_new, top, until=until)
            done += 1
            if brief:
                answer, tops, lps, h = brief_answer(model, eng, ids, answer, tops, lps, top, fact)
                hard += h
            n = cut_at_note_number(tok, answer)
            if n < len(answer):
                cut += 1
                answer, tops, lps = answer[:n], tops[:n], lps[:n]
            text = tok.decode(answer, skip_special=True).strip()
            if not text or (it["kind"] == "facts" and not keep_wrong and not contains(text, it["answer"])):
                dropped += 1
            else:
                rows.append({"kind": it["kind"], "question": it["question"], "answer": it["answer"],
                             "teacher": text, "gold": None if it["gold"] is None else chosen.index(it["gold"]),
                             "student": model.prompt(msgs), "answer_ids": answer,
                             "refs": [reference_ids(tok, texts[i], cfg.reference_max_tokens) for i in chosen]})
                all_top.append(tops)
                all_lp.append(lps)
            if done % 50 == 0 or done == n_total:
                rate = done / (time.perf_counter() - t0)
                progress(f"teacher answers {done}/{n_total} ({rate:.1f}/s, kept {len(rows)}, "
                         f"{dropped} wrong or empty dropped, {cut} cut at a note number"
                         f"{f', {hard} one-token targets' if brief else ''})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, top=np.concatenate(all_top), logp=np.concatenate(all_lp))
    meta = {"format": DATA_FORMAT, "version": DATA_VERSION, "model": str(model_dir),
            "fingerprint": model.fingerprint, "weights_sha256": model.files.manifest["weights"]["sha256"],
            "teacher": teacher, "items": len(rows), "facts_entities": n_facts, "wiki_articles": n_wiki,
            "none_questions": n_none, "brief": brief, "one_token_targets": hard,
            "refs": refs, "max_new": max_new, "top": top, "dropped": dropped, "cut": cut, "seed": seed,
            "system": model.system_message(system),
            "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(out / TEACHER, buf.getvalue())
    atomic_write_bytes(out / ITEMS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    atomic_write_bytes(out / META, json.dumps(meta, indent=1).encode())
    return meta


def load(data_dir: str | Path) -> tuple[dict, list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """(meta, items, offsets [n+1] into the teacher rows, top ids, log-probs) of a prepared folder."""
    d = Path(data_dir)
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
        items = [json.loads(line) for line in (d / ITEMS).read_text(encoding="utf-8").splitlines()]
        with np.load(d / TEACHER, allow_pickle=False) as z:
            top, logp = z["top"], z["logp"]
    except (OSError, ValueError, KeyError) as e:
        raise M3Error(f"{d}: not a prepared distillation folder ({type(e).__name__}: {e}); run "
                      f"python -m converters.distill_data") from None
    if meta.get("format") != DATA_FORMAT or meta.get("version") != DATA_VERSION:
        raise M3Error(f"{d}: not distillation data of version {DATA_VERSION}")
    offsets = np.concatenate([[0], np.cumsum([len(it["answer_ids"]) for it in items])]).astype(np.int64)
    if offsets[-1] != len(top) or top.shape != logp.shape or len(items) != meta.get("items"):
        raise M3Error(f"{d}: items.jsonl and teacher.npz do not match; prepare the folder again")
    return meta, items, offsets, top, logp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.distill_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model directory (student and teacher)")
    p.add_argument("--out", required=True, help="the data folder to write")
    p.add_argument("--facts", type=int, default=1000, help="made-up entities (train split; ~2 questions each)")
    p.add_argument("--wiki", type=int, default=600, help="held-in Wikipedia articles (2 questions each)")
    p.add_argument("--refs", type=int, default=3, help="references per question, the gold one included")
    p.add_argument("--max-new", type=int, default=40, help="teacher answer tokens at most")
    p.add_argument("--top", type=int, default=64, help="teacher log-probs kept per answer token")
    p.add_argument("--seed", type=int, help="made-up-facts seed (default the train split's)")
    p.add_argument("--teacher", choices=("gold", "all"), default="gold",
                   help="what the RAG teacher reads: the gold reference (default) or all the student's references")
    p.add_argument("--brief", action="store_true", help="answers without an opening such as 'The answer to this "
                   "question is:', ending after their first sentence or line with the end-of-turn token")
    p.add_argument("--none", type=int, default=0, metavar="N", help="Wikipedia questions also asked without "
                   "references (the plain model's own answers, made brief with --brief)")
    p.add_argument("--system", help="the system message of teacher and student (default the one the runtime answers "
                   "with, chat_template.ANSWER_SYSTEM, for a model with a chat template; '' the template's own)")
    a = p.parse_args(argv)
    try:
        if a.refs < 1 or a.top < 1 or a.max_new < 1 or min(a.facts, a.wiki, a.none) < 0 or not (a.facts or a.wiki):
            raise BadArgument("--refs, --top, --max-new must be positive, --none not negative and --facts or --wiki "
                              "nonzero")
        meta = prepare(a.model, a.out, a.facts, a.wiki, a.refs, a.max_new, a.top, a.seed, a.teacher,
                       system=a.system, brief=a.brief, n_none=a.none,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
    except M3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
