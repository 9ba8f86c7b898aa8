"""Retrieval end to end: words (folding, names), the question as the only query, chat follow-ups, the hybrid
and dense retrievers with the real sentence embedder, and damaged banks refused or reported, never used."""
from __future__ import annotations

import json
import shutil

import pytest

import m3lite
from m3lite import lexical
from m3lite.bank import Bank, BankError
from m3lite.memory import MemorySession, build_or_add
from m3lite.retrieval import BM25, RRF_K, fuse
from clitools import one_line_error, run

NOTES = {
    "zorblax.md": "# Zorblax\n\nZorblax is a shield volcano on the island of Quenth. It last erupted in 1874, "
                  "covering the harbour town of Vell in grey ash.",
    "mona.md": "# Mona Lisa\n\nThe Mona Lisa is a half-length portrait painting by Leonardo da Vinci. The "
               "sitter's enigmatic smile has fascinated viewers for centuries.",
    "monaco.md": "# Monaco\n\nMonaco is a city-state on the Riviera. Monaco has a monarchy; Monaco's casino and "
                 "Monaco harbour draw visitors. A monastery near Monaco holds icons.",
    "people.md": "# Neighbours\n\nMona runs the bakery on Lisbon Street. Her cousin Lisa sells monastery honey "
                 "and Monaco postcards.",
    "cafe.md": "# Señor Café\n\nSeñor Café roasts its own beans in Zaragoza and opens at seven.",
    "bread.md": "# Bread\n\nBread is baked from a dough of flour and water; yeast makes the dough rise.",
    "fr.md": "# Château de Brévannes\n\nLe château de Brévannes est une forteresse médiévale bâtie en granit "
             "au bord de la rivière Ondaine.",
}


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("notes")
    for name, text in NOTES.items():
        (d / name).write_text(text)
    model = m3lite.load(tiny_model_dir())
    bank = tmp_path_factory.mktemp("b") / "bank"
    build_or_add(model, bank, [str(d)], warn=lambda s: None)
    return model, Bank.open(bank), d


def titles(model, bank, query, retriever, k=3):
    s = MemorySession(model, bank, mode="rag", top_k=k, retriever=retriever)
    return [bank.reference(i)["title"] for i, _ in s.retrieve(query)]


def test_words_fold_case_and_accents_and_drop_stop_words():
    assert lexical.words("Señor CAFÉ, the naïve Ærø!") == ["senor", "cafe", "naive", "ærø"]  # Æ/ø do not decompose
    assert lexical.words("What is a volcano?") == ["volcano"]
    assert list(lexical.term_ids("Zebra zebra")) == [lexical.term_id("zebra")] * 2


def test_term_index_matches_bm25_by_hand():
    ix = lexical.TermIndex.build(lexical.term_ids("a b b c") .tolist() + lexical.term_ids("c d").tolist(), [3, 2])
    ix.check()
    s = ix.scores(lexical.term_ids("b"))
    assert s[0] > 0 and s[1] == 0
    tok = BM25([[7, 8, 8], [8, 9]])
    assert list(tok.ranked([7], 5)) == [0] and list(tok.ranked([1, 2], 5)) == []  # specials weigh nothing
    k = RRF_K
    assert fuse([[1, 2, 3], [3, 1]], 2) == [(1, pytest.approx(1 / (k + 1) + 1 / (k + 2))),
                                           (3, pytest.approx(1 / (k + 3) + 1 / (k + 1)))]


def test_equal_fused_scores_are_ordered_by_the_searches_own_scores():
    from m3lite.retrieval import relevant

    # 7 is first by words and second by meaning, 9 the other way round: the same fused score
    lex, dense = [(7, 20.0), (9, 15.0)], [(9, 0.62), (7, 0.61)]
    fused = fuse([[7, 9], [9, 7]], 4)
    assert fused[0][1] == fused[1][1] and fused[0][0] == 7  # by lower id
    assert [i for i, _ in relevant(fused, lex, dense)] == [7, 9]  # 7: 0.61 + 1.0 against 9: 0.62 + 0.75
    fused = fuse([[9, 7], [7, 9]], 4)
    assert [i for i, _ in relevant(fused, [(9, 20.0), (7, 15.0)], [(7, 0.62), (9, 0.61)])] == [9, 7]


def test_two_word_name_beats_its_common_pieces_and_accents_fold(built):
    model, bank, _ = built
    assert titles(model, bank, "Mona Lisa", "lexical")[0] == "Mona Lisa"
    assert titles(model, bank, "senor cafe", "lexical")[0] == "Señor Café"
    assert titles(model, bank, "SEÑOR", "lexical")[0] == "Señor Café"
    assert titles(model, bank, "Mona Lisa", "hybrid")[0] == "Mona Lisa"
    # other languages are searchable: the words fold the same way whatever the script or accents
    for r in ("lexical", "hybrid"):
        assert titles(model, bank, "chateau de brevannes forteresse", r)[0] == "Château de Brévannes"
        assert titles(model, bank, "Quelle forteresse médiévale est bâtie en granit ?", r)[0] == "Château de Brévannes"


def test_dense_finds_a_paraphrase_that_shares_no_word(built):
    model, bank, _ = built
    q = "Which famous artwork shows a woman with a mysterious expression?"
    assert not set(lexical.words(q)) & set(lexical.words(NOTES["mona.md"]))
    assert titles(model, bank, q, "lexical") == []  # nothing to match
    assert titles(model, bank, q, "dense", k=1) == ["Mona Lisa"]
    assert titles(model, bank, q, "hybrid", k=2)[0] == "Mona Lisa"


def test_hybrid_hands_on_only_what_one_search_found_relevant(built):
    """Rank fusion alone would return every note of a small bank; hybrid keeps those similar enough to the
    question (embedding) or scoring near the best BM25 match, so unrelated notes do not reach the model."""
    model, bank, _ = built
    q = "What is the boiling point of mercury?"
    assert len(titles(model, bank, q, "dense", k=5)) == 5  # the nearest vectors, related or not
    assert titles(model, bank, q, "hybrid", k=5) == []
    assert titles(model, bank, "When did Zorblax last erupt?", "hybrid", k=5) == ["Zorblax"]


@pytest.mark.parametrize("retriever", ["lexical", "hybrid"])
def test_the_template_and_system_prompt_cannot_change_what_is_retrieved(built, retriever):
    model, bank, _ = built
    q = "When did Zorblax last erupt?"
    want = [i for i, _ in MemorySession(model, bank, mode="rag", retriever=retriever).retrieve(q)]
    for system in (None, "Answer about bread, Monaco, Mona Lisa and Señor Café only."):
        model.ask(q, bank=bank, mode="rag", system=system, max_new_tokens=2, retriever=retriever)
        assert [r["id"] for r in model.last_result.references] == want
    assert bank.reference(want[0])["title"] == "Zorblax"


def test_a_follow_up_question_retrieves_the_conversation_subject(built):
    model, bank, _ = built
    chat = model.chat(bank=bank, mode="rag", max_new_tokens=4, retriever="lexical")
    follow_up = "When was its most recent eruption?"  # no word of it is in any note
    assert titles(model, bank, follow_up, "lexical") == []  # asked alone, it finds nothing
    chat.send("Tell me about the Zorblax volcano.")
    chat.send(follow_up)
    assert chat.last_result.references[0]["title"] == "Zorblax"


def test_bank_search_json_and_empty_question(built):
    model, bank, _ = built
    out = json.loads(run("bank", "search", bank.path, "Mona Lisa painting", "--model", model.files.path,
                         "--json", "-k", "2").stdout)
    assert out[0]["title"] == "Mona Lisa" and out[0]["retriever"] == "hybrid"
    assert {"title", "document", "text", "score", "retriever"} <= set(out[0])
    for bad in ("", "   "):
        p = run("bank", "search", bank.path, bad, "--model", model.files.path, check=False)
        assert p.returncode == 2 and "empty" in one_line_error(p)
        p = run("ask", bad, "--model", model.files.path, "--bank", bank.path, check=False)
        assert p.returncode == 2 and "empty" in one_line_error(p)
    p = run("bank", "search", bank.path, "x", "--model", model.files.path, "--retriever", "psychic", check=False)
    assert p.returncode == 2 and "retriever" in one_line_error(p)


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_records_are_refused_and_verify_names_them(built, tmp_path):
    model, bank, _ = built
    p = tmp_path / "bank"
    shutil.copytree(bank.path, p)
    mdir = model.files.path
    assert run("bank", "verify", p).returncode == 0
    b = Bank.open(p)
    zorb = [i for i in range(b.count) if b.reference(i)["title"] == "Zorblax"][0]
    rec = b.rec_dtype.itemsize
    # a memory record: memory mode refuses it, naming the reference; rag (which does not read memories) answers
    _flip(p / "memories.bin", zorb * rec + rec // 2)
    q = "When did Zorblax last erupt?"
    r = run("ask", q, "--model", mdir, "--bank", p, "--mode", "memory", "-n", "2", check=False)
    assert r.returncode == 2 and f"reference {zorb}" in one_line_error(r)
    v = run("bank", "verify", p, "--json", check=False)
    assert v.returncode == 2
    rep = json.loads(v.stdout)
    assert rep["damaged"] == [{"reference": zorb, "document": b.reference(zorb)["doc_id"], "what": "memory"}]
    assert rep["damaged_documents"] == [b.reference(zorb)["doc_id"]]
    assert run("ask", q, "--model", mdir, "--bank", p, "--mode", "rag", "-n", "2", check=False).returncode == 0
    # remove the damaged document: the bank verifies again, and adding it back restores it
    run("bank", "remove", p, "--source", b.reference(zorb)["doc_id"])
    assert run("bank", "verify", p).returncode == 0
    run("bank", "add", p, str(built[2] / "zorblax.md"), "--model", mdir)
    assert run("ask", q, "--model", mdir, "--bank", p, "--mode", "memory", "-n", "2").returncode == 0
    # a text record: rag refuses it
    b = Bank.open(p)
    zorb = [i for i in range(b.count) if not b.is_deleted(i) and b.reference(i)["title"] == "Zorblax"][0]
    _flip(p / "texts.bin", int(b._refs[zorb]["text_offset"]) + 3)
    r = run("ask", q, "--model", mdir, "--bank", p, "--mode", "rag", "-n", "2", check=False)
    assert r.returncode == 2 and "text" in one_line_error(r) and f"reference {zorb}" in one_line_error(r)


def test_damaged_index_is_refused_and_repaired(built, tmp_path):
    model, bank, _ = built
    p = tmp_path / "bank"
    shutil.copytree(bank.path, p)
    lx = p / Bank.open(p).manifest["lexical"]["file"]
    _flip(lx, lx.stat().st_size // 2)
    r = run("bank", "search", p, "Zorblax", "--model", model.files.path, "--retriever", "lexical", check=False)
    assert r.returncode == 2 and "lexical index" in one_line_error(r) and "--repair" in one_line_error(r)
    v = run("bank", "verify", p, check=False)
    assert v.returncode == 2 and "lexical index" in v.stderr
    assert run("bank", "verify", p, "--repair").returncode == 0
    hits = json.loads(run("bank", "search", p, "Zorblax", "--model", model.files.path, "--json").stdout)
    assert hits[0]["title"] == "Zorblax"
    with pytest.raises(BankError):
        (p / "manifest.json").write_text((p / "manifest.json").read_text().replace('"count": ', '"count": 1', 1))
        Bank.open(p)
