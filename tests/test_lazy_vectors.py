"""Banks with lazy sentence vectors (`--vectors lazy`, the default bank): a vector is computed when a word search
first finds its reference, or by `bank encode`, kept crash-safely, and the same as a build's, bit for bit."""
import json
import random

import numpy as np
import pytest

from m3lite.bank import Bank, BankError
from m3lite.bank.lazy import LAZY_VEC
from m3lite.retrieval import Retriever
from clitools import run
from test_bank import fake_embed, fake_encode, make_docs, new_bank, tok  # noqa: F401
from test_lazy import kill_at_fsync, kill_rounds

N_DOCS = 60


def _filled(path, tok, lazy_vectors, docs=None):
    b = new_bank(path, lazy_vectors=lazy_vectors)
    b.add(docs or make_docs(N_DOCS, seed=3), fake_encode, fake_embed, tok, 32, batch=7)
    return b


class _Embedder:
    """fake_embed as a Retriever's embedder (called with exact=False for queries), counting the texts."""

    def __init__(self):
        self.texts = 0

    def __call__(self, texts, exact=True):
        self.texts += len(texts)
        return fake_embed(texts)


def test_lazy_vectors_are_computed_on_first_use_and_equal_a_builds(tok, tmp_path):
    eager, lazy = _filled(tmp_path / "eager", tok, False), _filled(tmp_path / "lazy", tok, True)
    n = eager.count
    assert lazy.count == n and lazy.embedded_count == 0 and lazy.lazy_vectors and not eager.lazy_vectors
    assert (tmp_path / "lazy" / "vectors.f32").stat().st_size == 0 and not lazy.manifest["index"]
    with pytest.raises(BankError) as e:
        lazy.vectors([3])
    assert "bank encode" in str(e.value)
    emb = _Embedder()
    got = lazy.vectors([5, 1, 5], embed_fn=emb)
    assert emb.texts == 2 and np.array_equal(got, eager.vectors([5, 1, 5]))  # each missing one once
    assert Bank.open(tmp_path / "lazy").embedded_count == 2  # kept for every later reader
    q = fake_embed(["a query"])[0]
    ids, sc = lazy.search(q, 5)  # dense search covers the references that have a vector
    assert sorted(ids.tolist()) == [1, 5] and np.allclose(sc, eager.vectors(ids) @ (q / np.linalg.norm(q)))
    st = lazy.embed(emb, batch=9)
    assert st["embedded"] == n - 2 and lazy.embedded_count == n and lazy.embed(emb)["embedded"] == 0
    assert np.array_equal(lazy.vectors(np.arange(n)), eager.vectors(np.arange(n)))
    for seed in range(5):  # with every vector, the same search results as a build's
        v = np.random.default_rng(seed).standard_normal(eager.embed_dim).astype(np.float32)
        a, b = lazy.search(v, 7), eager.search(v, 7)
        assert a[0].tolist() == b[0].tolist() and np.allclose(a[1], b[1])
    assert lazy.verify()["ok"] and lazy.info()["vectors"] == n and lazy.info()["lazy_vectors"]
    # adding stays lazy; removed references are not embedded
    lazy.add(make_docs(5, seed=4, prefix="more"), fake_encode, fake_embed, tok, 32)
    assert lazy.embedded_count == n and lazy.count > n
    lazy.remove("more0")
    assert lazy.embed(emb)["embedded"] == lazy.live_count - n
    with pytest.raises(BankError):
        eager.merge([lazy])  # parts are merged with their vectors


def test_hybrid_search_embeds_the_word_hits_first(tok, tmp_path):
    eager, lazy = _filled(tmp_path / "eager", tok, False), _filled(tmp_path / "lazy", tok, True)
    text = " ".join(lazy.reference(7)["text"].split()[:6])
    emb = _Embedder()
    got = Retriever(lazy, "hybrid", embedder=emb).search(text, 5)
    lex = [int(i) for i in lazy.lexical_search(text, 40)[0]]
    assert lex and np.all(lazy._lazyvec.has(np.array(lex)))  # the word search's candidates got their vectors
    assert lazy.embedded_count == len(lex) and emb.texts == len(lex) + 1  # and the query
    assert got and got[0][0] in lex
    # once every vector is there, hybrid search is the build's
    lazy.embed(emb)
    for q in (text, lazy.reference(20)["text"][:40], "nothing like any word here"):
        assert Retriever(lazy, "hybrid", embedder=emb).search(q, 5) == Retriever(eager, "hybrid", embedder=emb).search(q, 5)


def test_a_damaged_vector_is_computed_again_never_served(tok, tmp_path):
    eager, b = _filled(tmp_path / "eager", tok, False), _filled(tmp_path / "lazy", tok, True)
    b.vectors([0, 1, 2], embed_fn=fake_embed)
    f = tmp_path / "lazy" / LAZY_VEC
    data = bytearray(f.read_bytes())
    data[4 * b.embed_dim + 8] ^= 0xFF  # reference 1's vector
    f.write_bytes(bytes(data))
    c = Bank.open(tmp_path / "lazy")
    rep = c.verify(strict=False)
    assert not rep["ok"] and "sentence vectors fail their checksum" in rep["problems"][0]
    ids, _ = c.search(eager.vectors([1])[0], 3)
    assert 1 not in ids.tolist()  # not searched while damaged
    assert np.array_equal(c.vectors([0, 1, 2], embed_fn=fake_embed), eager.vectors([0, 1, 2]))
    assert Bank.open(tmp_path / "lazy").verify()["ok"]


def kill_child(bank_path, kill_after):
    """Run in a subprocess: compute a bank's missing vectors (Bank.embed), killed as `kill_at_fsync` says."""
    kill_at_fsync(kill_after)
    Bank.open(bank_path).embed(fake_embed, batch=6)


def test_sigkill_while_vectors_are_kept_leaves_a_bank_that_opens_verifies_and_finishes(tok, tmp_path):
    docs = make_docs(90, seed=5)
    eager, path = _filled(tmp_path / "eager", tok, False, docs), tmp_path / "lazy"
    _filled(path, tok, True, docs)
    rnd = random.Random(79)

    def kept_right(b):  # what was kept is whole and right
        have = np.flatnonzero(b._lazyvec.slot >= 0)
        assert np.array_equal(b.vectors(have), eager.vectors(have))

    points = [rnd.randint(1, 10) for _ in range(2)] + [-rnd.randint(1, 5) * 2 - 1]
    assert kill_rounds(path, "test_lazy_vectors", f"kill_child({str(path)!r}, {{k}})", points, kept_right) == 3
    b = Bank.open(path)
    b.embed(fake_embed)
    assert b.embedded_count == b.count and np.array_equal(b.vectors(np.arange(b.count)),
                                                          eager.vectors(np.arange(b.count)))


def test_cli_lazy_vectors_answer_and_encode(tiny_model_dir, notes_dir, tmp_path):
    """`bank build --vectors lazy` is ready without the embedder's pass; ask retrieves from it at once (the
    word hits get their vectors); `bank encode` computes the rest, then ask answers as on a build with vectors."""
    model = tiny_model_dir()
    lazy, full = tmp_path / "lazy", tmp_path / "full"
    out = json.loads(run("bank", "build", notes_dir, "--out", lazy, "--model", model, "--vectors", "lazy",
                         "--json").stdout)
    assert out["lazy_vectors"] and out["vectors"] == 0
    run("bank", "build", notes_dir, "--out", full, "--model", model)
    q = "Where is the volcano Mount Etna?"
    p = run("ask", q, "--model", model, "--bank", lazy, "--max-tokens", "4")
    assert "Sources:" in p.stdout and "sentence vector so far" in p.stderr
    info = json.loads(run("bank", "info", lazy, "--json").stdout)
    assert info["lazy_vectors"] and 0 < info["vectors"] < info["references"]
    assert f"{info['vectors']} of {info['references']} computed" in run("bank", "info", lazy).stdout
    enc = json.loads(run("bank", "encode", lazy, "--model", model, "--json").stdout)
    assert enc["embedded"] == info["references"] - info["vectors"] and enc["vectors"] == info["references"]
    a_lazy = json.loads(run("ask", q, "--model", model, "--bank", lazy, "--json").stdout)
    a_full = json.loads(run("ask", q, "--model", model, "--bank", full, "--json").stdout)
    assert a_lazy["answer"] == a_full["answer"]
    assert [(r["id"], r["score"]) for r in a_lazy["references"]] == [(r["id"], r["score"]) for r in a_full["references"]]
    p = run("ask", q, "--model", model, "--bank", lazy, "--max-tokens", "2")
    assert "sentence vector so far" not in p.stderr
    assert json.loads(run("bank", "verify", lazy, "--json").stdout)["ok"]
    # eval measures a bank with every vector: it computes the missing ones first
    lazy2 = tmp_path / "lazy2"
    run("bank", "build", notes_dir, "--out", lazy2, "--model", model, "--vectors", "lazy")
    docs = Bank.open(full).docs
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What does the note {d['title']} say?", "answer": "x",
                                      "document": d["id"]}) + "\n" for d in docs))
    recall = [json.loads(run("eval", "--model", model, "--bank", b, "--qa", qa, "--recall-only", "--json").stdout)
              ["recall_at_5"] for b in (lazy2, full)]
    assert recall[0] == recall[1] and Bank.open(lazy2).embedded_count == Bank.open(lazy2).count
    for extra in (["--vectors", "later"], ["--vectors", "lazy", "--shards", "2"]):
        p = run("bank", "build", notes_dir, "--out", tmp_path / "x", "--model", model, *extra, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
