"""converters.facts: made-up notes and the questions only they answer, in disjoint train and eval template pools."""
from __future__ import annotations

import json
import random
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from converters.facts import (COMPANY_SUFFIXES, DEFAULT_SEEDS, FACTS, MAX_NOTE_WORDS, NOTE_TEMPLATES,
                              QUESTION_TEMPLATES, RELATION_TEMPLATES, STOP_WORDS, NameMaker, main, make_facts,
                              make_world)
from m3lite.errors import BadArgument
from m3lite.sources import iter_documents

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sets() -> dict[str, tuple[list[dict], list[dict]]]:
    return {split: make_facts(split) for split in ("train", "eval")}


def _pattern(template: str) -> str:
    """A regex of the texts `template` renders to: literal text, any text per field, whitespace normalized."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(" ".join(template.split())):
        out.append(re.escape(literal))
        if name is not None:
            out.append(".+?")
    return "".join(out)


def _note_patterns(split: str, kind: str) -> list[re.Pattern]:
    pats = []
    for t in NOTE_TEMPLATES[split][kind]:
        if "{relation}" not in t:
            pats.append(re.compile(_pattern(t)))
            continue
        body = _pattern(t.replace("{relation}", "").rstrip())
        rels = [_pattern(r) for rs in RELATION_TEMPLATES[split].values() for r in rs]
        pats.append(re.compile(f"{body}(?: (?:{'|'.join(rels)}))?"))
    return pats


def _question_shape(q: dict, title: str) -> str:
    """The question with its entity's name as X and digits as 0: what a template looks like rendered."""
    return re.sub(r"\d", "0", q["question"].replace(title, "X"))


def _kind(note_id: str) -> str:
    """The entity kind of a note id ("eval2-person-0007" -> "person")."""
    return note_id.split("-")[-2]


def _invented(title: str, kind: str) -> list[str]:
    """The invented words of an entity's name ("Qorvane Works" -> ["Qorvane"], "Velquor loom" -> ["Velquor"])."""
    words = title.split()
    if kind == "company":
        assert words[-1] in COMPANY_SUFFIXES
        return words[:-1]
    if kind == "object":
        return words[:1]
    return words


# ---------------------------------------------------------------------------------------------- the sets


def test_deterministic_and_seeded(sets):
    assert make_facts("eval") == sets["eval"]
    assert make_facts("eval", seed=DEFAULT_SEEDS["eval"]) == sets["eval"]
    assert make_facts("eval", seed=DEFAULT_SEEDS["eval"] + 10) != sets["eval"]
    assert DEFAULT_SEEDS["train"] != DEFAULT_SEEDS["eval"]
    small = make_facts("train", seed=5, n_entities=20)
    assert small == make_facts("train", seed=5, n_entities=20)


def test_counts_and_fields(sets):
    notes, questions = sets["eval"]
    assert len(notes) == 200 and len(questions) >= 300
    assert len({n["id"] for n in notes}) == len(notes)
    by_id = {n["id"]: n for n in notes}
    per_note = Counter(q["document"] for q in questions)
    assert set(per_note) == set(by_id) and max(per_note.values()) == 2
    assert all(re.fullmatch(rf"eval{DEFAULT_SEEDS['eval']}-[a-z]+-\d{{4}}", i) for i in by_id)
    other = {n["id"] for n in make_facts("eval", seed=DEFAULT_SEEDS["eval"] + 1, n_entities=20)[0]}
    assert not other & set(by_id) and not {n["id"] for n in sets["train"][0]} & set(by_id)  # one bank can hold all
    kinds = Counter(q["kind"].split(".")[0] for q in questions)
    assert set(kinds) == set(FACTS)
    for split, (notes, questions) in sets.items():
        assert all(set(n) == {"id", "title", "text"} for n in notes)
        assert all(set(q) == {"question", "answer", "document", "kind", "split"} for q in questions)
        assert all(q["split"] == split for q in questions)
        for q in questions:
            kind, fact = q["kind"].split(".")
            assert fact in FACTS[kind] and _kind(q["document"]) == kind
    notes, questions = make_facts("eval", n_entities=4)  # the smallest set: one of each kind
    assert sorted(_kind(n["id"]) for n in notes) == sorted(FACTS)
    assert len(make_facts("eval", n_entities=30, per_entity=5)[1]) > 120


def test_answers_are_in_the_note_and_not_in_the_question(sets):
    for notes, questions in sets.values():
        by_id = {n["id"]: n for n in notes}
        for q in questions:
            note = by_id[q["document"]]
            assert q["answer"] in note["text"], q
            assert note["text"].count(q["answer"]) == 1, q  # one span: no second reading of the note
            assert q["answer"].casefold() not in q["question"].casefold(), q
            assert note["title"] in q["question"], q  # asks about the note's own entity, not a reverse lookup
            assert q["question"].endswith("?") and q["question"][0].isupper()
            assert len(q["answer"].split()) <= 5


def test_notes_are_short(sets):
    small = [make_facts(split, seed=s, n_entities=12)[0] for s in range(8) for split in ("train", "eval")]
    for notes in [notes for notes, _ in sets.values()] + small:  # small sets: people without a relation too
        for n in notes:
            sentences = re.split(r"(?<=[.?!])\s+", n["text"])
            assert 2 <= len(sentences) <= 4, n
            assert len(n["text"].split()) <= MAX_NOTE_WORDS, n
            assert n["text"] == " ".join(n["text"].split()) and "  " not in n["text"]
            assert n["title"] in n["text"]


# ---------------------------------------------------------------------------------------------- the templates


def test_template_pools_are_disjoint():
    for pools in (NOTE_TEMPLATES, RELATION_TEMPLATES):
        for kind in pools["train"]:
            assert pools["train"][kind] and pools["eval"][kind]
        train = {t for ts in pools["train"].values() for t in ts}
        evals = {t for ts in pools["eval"].values() for t in ts}
        assert not train & evals
    shapes = {}
    for split, kinds in QUESTION_TEMPLATES.items():
        assert set(kinds) == set(FACTS) and all(set(kinds[k]) == set(FACTS[k]) for k in FACTS)
        shapes[split] = {t.format(name="X") for facts in kinds.values() for ts in facts.values() for t in ts}
        assert all(len(ts) >= 2 for facts in kinds.values() for ts in facts.values())
    assert not shapes["train"] & shapes["eval"]


def test_rendered_texts_come_from_their_own_pool(sets):
    shapes = {}
    for split, (notes, questions) in sets.items():
        other = "eval" if split == "train" else "train"
        for n in notes:
            kind = _kind(n["id"])
            assert any(p.fullmatch(n["text"]) for p in _note_patterns(split, kind)), n
            assert not any(p.fullmatch(n["text"]) for k in FACTS for p in _note_patterns(other, k)), n
        titles = {n["id"]: n["title"] for n in notes}
        shapes[split] = {_question_shape(q, titles[q["document"]]) for q in questions}
        allowed = {t.format(name="X") for facts in QUESTION_TEMPLATES[split].values() for ts in facts.values()
                   for t in ts}
        assert shapes[split] <= {a[0].upper() + a[1:] for a in allowed}
    assert not shapes["train"] & shapes["eval"]
    assert len(shapes["eval"]) > 40  # the phrasings are all in use


# ---------------------------------------------------------------------------------------------- names


def test_name_maker():
    maker = NameMaker(random.Random(0), "eval")
    words = [maker.word((2, 3)) for _ in range(1500)] + [maker.town() for _ in range(300)]
    assert len(set(words)) == len(words)
    for w in words:
        assert re.fullmatch(r"[A-Z][a-z]{4,10}", w), w
        assert w.lower() not in STOP_WORDS
    assert len(STOP_WORDS) < 1000  # a small list


def test_names_are_unique_and_invented(sets):
    invented = {}
    for split, (notes, _) in sets.items():
        assert len({n["title"] for n in notes}) == len(notes)
        words = [w for n in notes for w in _invented(n["title"], _kind(n["id"]))]
        assert len(set(words)) == len(words)  # a surname is never a town's name too
        assert not {w.lower() for w in words} & STOP_WORDS
        invented[split] = set(words)
    assert not invented["train"] & invented["eval"]  # disjoint halves of the word space


# ---------------------------------------------------------------------------------------------- the world


def test_world_is_consistent():
    ents = make_world("eval", DEFAULT_SEEDS["eval"], 200)
    by_name = {e.name: e for e in ents}
    assert Counter(e.kind for e in ents) == {"person": 80, "company": 40, "town": 40, "object": 40}
    for e in ents:
        f = e.fields
        if e.kind == "company":
            founder = by_name[f["founder"]]
            assert founder.kind == "person" and 25 <= e.year - founder.born <= 50
            assert founder.fields["employer"] == e.name  # so "which company employed X?" has one answer
            assert by_name[f["hq"]].kind == "town" and by_name[f["product"]].kind == "object"
        elif e.kind == "object":
            assert 22 <= e.year - by_name[f["inventor"]].born <= 60
        elif e.kind == "town":
            assert by_name[f["landmark"]].kind == "object"
        else:
            assert by_name[f["birthplace"]].year < e.born
            employer = by_name[f["employer"]]
            assert employer.kind == "company"
            assert employer.fields["founder"] == e.name or employer.year <= e.born + 40  # there in their career
            assert not ("mentor" in f and "spouse" in f)
            if "mentor" in f:
                assert by_name[f["mentor"]].born <= e.born - 10
            if "spouse" in f:
                other = by_name[f["spouse"]].fields
                assert "spouse" not in other and other.get("mentor") != e.name  # stated in one note only
    spouses = [e.fields["spouse"] for e in ents if "spouse" in e.fields]
    assert spouses and len(set(spouses)) == len(spouses)


def test_bad_arguments():
    with pytest.raises(BadArgument, match="split"):
        make_facts("test")
    for n in (3, 0, 10**7):
        with pytest.raises(BadArgument, match="entities"):
            make_facts("eval", n_entities=n)
    with pytest.raises(BadArgument, match="per entity"):
        make_facts("eval", per_entity=0)


# ---------------------------------------------------------------------------------------------- the CLI


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_writes_what_reads_back(tmp_path, capsys):
    out = tmp_path / "facts"
    assert main(["--out", str(out), "--split", "train", "--seed", "3", "--entities", "40"]) == 0
    notes, questions = make_facts("train", seed=3, n_entities=40)
    assert _read_jsonl(out / "notes.jsonl") == notes
    assert _read_jsonl(out / "qa.jsonl") == questions
    assert sorted(p.name for p in out.iterdir()) == ["notes.jsonl", "qa.jsonl"]  # no temp files left
    said = capsys.readouterr().out
    assert "40 notes" in said and f"{len(questions)} questions" in said

    source = str(out / "notes.jsonl")
    docs = list(iter_documents(source, on_warning=lambda m: pytest.fail(m)))
    assert len(docs) == len(notes)
    for doc, note in zip(docs, notes):
        assert doc.id.endswith("#" + note["id"]) and doc.id == f"{Path(source).as_posix()}#{note['id']}"
        assert (doc.title, doc.text) == (note["title"], note["text"])
    ids = {d.id.rsplit("#", 1)[1] for d in docs}
    assert {q["document"] for q in questions} <= ids


def test_cli_errors_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "x.txt"
    a_file.write_text("x")
    for argv in (["--out", str(a_file)], ["--out", str(tmp_path / "o"), "--entities", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--split", "test"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_module_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "converters.facts", "--out", str(tmp_path), "--entities", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(_read_jsonl(tmp_path / "notes.jsonl")) == 8
