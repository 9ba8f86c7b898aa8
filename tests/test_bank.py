import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from m3lite import bank as bank_mod
from m3lite.bank import Bank, BankBusyError, BankError, FingerprintError, HnswIndex
from m3lite.errors import BadArgument, M3Error
from m3lite.modelfile import json_checksum
from m3lite.sources import Document, chunk_document
from textgen import sentence, train_small_tokenizer

LM, H, T, HD, DIM = 2, 2, 8, 16, 24
SHAPE = (LM, H, T, HD)
REPO = Path(__file__).resolve().parents[1]


def _rng(ids):
    return np.random.default_rng(zlib.crc32(np.asarray(ids, np.int32).tobytes()))


def fake_encode(batch):
    """Deterministic stand-in for the model: memories depend only on the token ids."""
    B = len(batch)
    k = np.zeros((B, LM, H, T, HD), np.float32)
    v = np.zeros_like(k)
    pos = np.zeros((B, LM, H, T), np.int64)
    cnt = np.zeros((B, LM, H), np.int64)
    for b, ids in enumerate(batch):
        r = _rng(ids)
        k[b] = r.standard_normal((LM, H, T, HD))
        v[b] = r.standard_normal((LM, H, T, HD))
        n = min(T, len(ids))
        cnt[b] = n
        pos[b, ..., :n] = np.sort(r.choice(len(ids), n, replace=False))
    return k, v, pos, cnt


def fake_embed(texts):
    """Deterministic stand-in for the sentence embedder: a vector per text."""
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM).astype(np.float32)
                     for t in texts])


def sign(m):
    """A manifest edited by a test, with its checksum made right again (to reach the checks behind it)."""
    return dict(m, checksum=json_checksum(m))


def make_docs(n, seed=0, prefix="doc"):
    r = random.Random(seed)
    docs = []
    for i in range(n):
        paras = ["\n".join(sentence(r, 2, 14) for _ in range(r.randint(1, 4))) for _ in range(r.randint(1, 4))]
        docs.append(Document(f"{prefix}{i}", f"Title {i}", "\n\n".join(paras), "test"))
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from m3lite.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_small_tokenizer(path)
    return Tokenizer(path)


def new_bank(path, quant="int8", **kw):
    return Bank.create(path, "fp-model-a", SHAPE, quant=quant, embed_dim=DIM, meta={"n_layers": 4}, **kw)


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and isinstance(excinfo.value, M3Error)
    return msg


# ---------------------------------------------------------------------------------------------- round trips


def test_add_open_search_memories_info(tok, tmp_path):
    docs = make_docs(40) + [Document("short", "Short", "Hi.", "test")]
    b = new_bank(tmp_path / "bank")
    assert b.count == 0 and b.search(np.ones(DIM), 3)[0].size == 0
    seen = []
    st = b.add(docs, fake_encode, fake_embed, tok, max_tokens=32, batch=16, commit_every=16,
               progress=lambda s: seen.append(s["committed"]))
    expect = [r for d in docs for r in chunk_document(d, tok, 32)]
    assert st["added"] == len(expect) == b.count and st["documents_added"] == len(docs) and st["skipped"] == 0
    assert seen == sorted(seen) and seen[-1] == b.count and len(seen) > 2
    assert b.verify()["ok"]

    b2 = Bank.open(tmp_path / "bank", fingerprint="fp-model-a")
    assert b2.count == len(expect)
    for i in (0, 5, len(expect) - 1):
        ref = b2.reference(i)
        e = expect[i]
        assert (ref["text"], ref["doc_id"], ref["char_start"], ref["char_end"], ref["n_tokens"]) == \
               (e.text, e.doc_id, e.char_start, e.char_end, len(e.ids))
        assert ref["title"] == dict((d.id, d.title) for d in docs)[e.doc_id] and ref["source"] == "test"
    ids = [0, 3, len(expect) - 1]
    k, v, pos, cnt = b2.memories(ids)
    assert k.shape == v.shape == (3, LM, H, T, HD) and k.dtype == np.float32
    assert pos.shape == (3, LM, H, T) and cnt.shape == (3, LM, H)
    K, V, P, C = fake_encode([expect[i].ids for i in ids])
    valid = (np.arange(T) < C[..., None])[..., None]
    for want, got in ((K, k), (V, v)):
        scale = np.abs(want * valid).max(-1, keepdims=True) / 127
        assert np.all(np.abs(want * valid - got) <= scale * 0.5 * 1.001 + 1e-6)
    assert np.array_equal(cnt, C) and np.array_equal(pos, np.where(valid[..., 0], P, 0))
    # the short reference keeps what it has; the rest is masked
    ks, _, ps, cs = b2.memories([len(expect) - 1])
    n = len(expect[-1].ids)
    assert n < T and np.all(cs == n) and np.all(ks[..., n:, :] == 0) and np.all(ps[..., n:] == 0)

    # search: a stored reference's own embedding finds it first, exact and through the index alike
    q = fake_embed([bank_mod.index_text(expect[7])])[0]
    ids_e, sc_e = b2.search(q, 5, exact=True)
    ids_h, sc_h = b2.search(q, 5, exact=False)
    assert ids_e[0] == 7 and abs(sc_e[0] - 1) < 1e-5 and np.all(np.diff(sc_e) <= 0)
    assert list(ids_h) == list(ids_e) and np.allclose(sc_h, sc_e, atol=1e-5)

    info = b2.info()
    tokens = sum(len(r.ids) for r in expect)
    rec = b2.rec_dtype.itemsize
    assert info["references"] == len(expect) and info["quantization"] == "int8" and info["tokens"] == tokens
    assert info["fp32_kv_bytes_memory_layers"] == tokens * LM * 2 * H * HD * 4
    assert info["fp32_kv_bytes_all_layers"] == tokens * 4 * 2 * H * HD * 4
    assert info["compression_vs_fp32_kv_all_layers"] == pytest.approx(tokens * 4 * 2 * H * HD * 4 / (rec * len(expect)))
    assert info["disk_bytes"] > info["memory_bytes"] == rec * len(expect)
    assert info["fingerprint"] == "fp-model-a"
    json.dumps(info)


def test_resume_replace_remove(tok, tmp_path):
    docs = make_docs(20, seed=1)
    b = new_bank(tmp_path / "bank")
    first = b.add(docs[:10], fake_encode, fake_embed, tok, 32)
    st = b.add(docs, fake_encode, fake_embed, tok, 32)
    assert st["skipped"] == 10 and st["documents_added"] == 10
    n_all = b.count
    assert n_all == first["added"] + st["added"]
    gen = b.generation
    assert b.add(docs, fake_encode, fake_embed, tok, 32)["skipped"] == 20 and b.generation == gen  # no-op
    # changed content under the same id replaces the old version
    changed = Document(docs[3].id, docs[3].title, "Entirely new text about a river.", "test")
    st = b.add([changed], fake_encode, fake_embed, tok, 32)
    assert st["replaced"] == 1 and st["added"] == 1
    old_refs = [i for i in range(b.count) if b.reference(i)["doc_id"] == docs[3].id]
    assert len(old_refs) >= 2 and [b.reference(i)["deleted"] for i in old_refs].count(False) == 1
    # remove by document id: gone from search, still readable, committed
    victim = [i for i in range(b.count) if b.reference(i)["doc_id"] == docs[5].id]
    q = b.vectors([victim[0]])[0]
    assert b.search(q, 1, exact=True)[0][0] == victim[0]
    assert b.remove(docs[5].id) == {"documents": 1, "references": len(victim)}
    for exact in (True, False):
        ids, _ = b.search(q, 10, exact=exact)
        assert not set(ids) & set(victim)
    assert b.reference(victim[0])["deleted"] and b.memories(victim)[0].shape[0] == len(victim)
    assert b.remove(docs[5].id) == {"documents": 0, "references": 0}
    b2 = Bank.open(tmp_path / "bank")
    assert b2.live_count == b.live_count and not set(b2.search(q, 10, exact=False)[0]) & set(victim)
    assert b2.verify()["ok"]
    # remove by source; then re-adding brings the documents back
    assert b2.remove("test")["documents"] == 19  # doc 5 is already gone
    assert b2.live_count == 0 and b2.search(q, 3)[0].size == 0
    st = b2.add(docs, fake_encode, fake_embed, tok, 32)
    assert st["documents_added"] == 20 and b2.live_count == n_all
    assert b2.verify()["ok"] and b2.info()["stats"]["documents_removed"] == 20


@pytest.mark.parametrize("quant", ["f32", "f16", "int4"])
def test_other_quantizations(tok, tmp_path, quant):
    docs = make_docs(5, seed=2)
    b = new_bank(tmp_path / "bank", quant=quant)
    b.add(docs, fake_encode, fake_embed, tok, 32)
    expect = [r for d in docs for r in chunk_document(d, tok, 32)]
    k, v, _, c = Bank.open(tmp_path / "bank").memories(range(len(expect)))
    K, V, _, C = fake_encode([r.ids for r in expect])
    valid = (np.arange(T) < C[..., None])[..., None]
    err = np.abs(K * valid - k).max()
    tol = {"f32": 0, "f16": 2e-3 * np.abs(K).max(), "int4": np.abs(K).max() / 7 / 2 * 1.001}[quant]
    assert err <= tol
    assert Bank.open(tmp_path / "bank").verify()["ok"]


def test_named_arrays(tok, tmp_path):
    b = new_bank(tmp_path / "bank")
    assert b.get_array("idf") is None
    idf = np.linspace(0, 3, 400).astype(np.float32)
    b.put_array("idf", idf)
    reader = Bank.open(tmp_path / "bank")
    assert np.array_equal(reader.get_array("idf"), idf) and reader.array_names() == ["idf"]
    b.put_array("idf", idf * 2)  # replaced atomically; the old file goes
    assert np.array_equal(Bank.open(tmp_path / "bank").get_array("idf"), idf * 2)
    assert len(list((tmp_path / "bank").glob("array.idf.*.npy"))) == 1
    assert np.array_equal(reader.get_array("idf"), idf * 2)  # a reader whose file went moves to the newest state
    for bad in ("IDF", "../x", ""):
        with pytest.raises(BadArgument):
            b.put_array(bad, idf)
    with pytest.raises(BadArgument):
        b.put_array("obj", np.array([object()]))
    f = next((tmp_path / "bank").glob("array.idf.*.npy"))
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BankError) as e:
        Bank.open(tmp_path / "bank").verify()
    one_line_error(e)


def test_hnsw_recall_10k():
    rng = np.random.default_rng(0)
    n, dim = 10_000, 32
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ix = HnswIndex.create(dim, n)
    ix.add(x, np.arange(n))
    qs = rng.standard_normal((100, dim)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    exact = np.argsort(-(qs @ x.T), axis=1)[:, :5]
    hits = sum(len(set(ix.search(q, 5)[0]) & set(e)) for q, e in zip(qs, exact))
    assert hits / (5 * len(qs)) >= 0.95


def test_index_tail_and_readers_during_writes(tok, tmp_path):
    docs = make_docs(30, seed=3)
    b = new_bank(tmp_path / "bank")
    b.add(docs[:10], fake_encode, fake_embed, tok, 32)
    reader = Bank.open(tmp_path / "bank")
    n1 = reader.count

    class Stop(Exception):
        pass

    def stop_after_commit(s):
        # while the writer works, a reader sees exactly the last committed state
        r = Bank.open(tmp_path / "bank")
        assert r.count == s["committed"] == s["count"]  # batch == commit_every: every group commits
        if s["committed"] > n1 + 20:
            raise Stop

    with pytest.raises(Stop):
        b.add(docs[10:], fake_encode, fake_embed, tok, 32, batch=8, commit_every=8, progress=stop_after_commit)
    b3 = Bank.open(tmp_path / "bank")
    assert b3.count > n1 and b3.manifest["index"]["count"] == n1  # index lags: the tail is searched exactly
    for i in (0, n1 + 2, b3.count - 1):
        q = b3.vectors([i])[0]
        assert list(b3.search(q, 5, exact=False)[0]) == list(b3.search(q, 5, exact=True)[0])
    # the first reader still has its own state and index
    assert reader.count == n1 and reader.search(reader.vectors([1])[0], 1, exact=False)[0][0] == 1
    # finish; the old index file is replaced: a reader that had not loaded it moves to the newest state
    late = Bank.open(tmp_path / "bank")
    b.add(docs, fake_encode, fake_embed, tok, 32)
    assert not (tmp_path / "bank" / b3.manifest["index"]["file"]).exists()
    assert late.search(late.vectors([0])[0], 1, exact=False)[0][0] == 0 and late.count == b.count
    assert b.verify()["ok"]


def test_second_writer_is_refused(tok, tmp_path):
    b = new_bank(tmp_path / "bank")
    other = Bank.open(tmp_path / "bank")
    errors = []

    def try_second(s):
        with pytest.raises(BankBusyError) as e:
            other.add(make_docs(1, seed=78, prefix="x"), fake_encode, fake_embed, tok, 32)
        errors.append(one_line_error(e))
        with pytest.raises(BankBusyError):
            other.remove("doc0")

    b.add(make_docs(3), fake_encode, fake_embed, tok, 32, progress=try_second)
    assert errors and "another process" in errors[0] and str(os.getpid()) in errors[0]
    n = b.count
    st = other.add(make_docs(1, seed=78, prefix="x"), fake_encode, fake_embed, tok, 32)  # free again
    assert st["added"] > 0 and other.count == n + st["added"]


# ---------------------------------------------------------------------------------------------- bad input


def test_refuses_damaged_and_foreign(tok, tmp_path):
    p = tmp_path / "bank"
    b = new_bank(p)
    b.add(make_docs(6), fake_encode, fake_embed, tok, 32)
    good = {x.name: x.read_bytes() for x in p.iterdir() if x.is_file()}

    def restore():
        for name, data in good.items():
            (p / name).write_bytes(data)

    def refused(match=None, fp=None, check=None):
        with pytest.raises(BankError) as e:
            (check or (lambda: Bank.open(p, fingerprint=fp)))()
        msg = one_line_error(e)
        if match:
            assert match in msg, msg
        restore()
        return msg

    # foreign model: both fingerprints named
    msg = refused(fp="fp-model-b")
    assert "fp-model-a" in msg and "fp-model-b" in msg and "rebuild" in msg
    assert isinstance(pytest.raises(FingerprintError, Bank.open, p, "x").value, FingerprintError)
    # truncated record file
    with open(p / "memories.bin", "r+b") as f:
        f.truncate(len(good["memories.bin"]) - 10)
    refused("truncated")
    # manifest: bad JSON, wrong fields, wrong counts, not ours
    (p / "manifest.json").write_text("{not json")
    refused("corrupt")
    m = json.loads(good["manifest.json"])
    for edit in (lambda m: m.update(count="7"), lambda m: m.update(count=m["count"] + 1),
                 lambda m: m["memory"].update(head_dim=9), lambda m: m["memory"].update(quant="int3"),
                 lambda m: m["files"].pop("refs.bin"), lambda m: m["index"].update(file="../../etc/passwd"),
                 lambda m: m["index"].update(count=10 ** 6),
                 lambda m: m["files"]["checks.bin"].update(sha256="0" * 64), lambda m: m.update(version=99),
                 lambda m: m.update(format="something-else"), lambda m: m.pop("fingerprint"),
                 lambda m: m["lexical"].update(file="../lexical.1.bin"), lambda m: m["lexical"].update(count=10 ** 6)):
        mm = json.loads(json.dumps(m))
        edit(mm)
        (p / "manifest.json").write_text(json.dumps(sign(mm)))
        refused()
    # the manifest checks itself: one changed value (still valid JSON) is refused
    (p / "manifest.json").write_text(good["manifest.json"].decode().replace('"generation": ', '"generation": 1', 1))
    refused("checksum")
    # a missing index file: the bank opens (the index is derived data) but verify and HNSW search refuse
    mm = json.loads(good["manifest.json"])
    mm["index"]["file"] = "index.999.hnsw"
    (p / "manifest.json").write_text(json.dumps(sign(mm)))
    refused("index", check=lambda: Bank.open(p).verify())
    (p / "manifest.json").write_text("[1, 2]")
    refused("not an m3lite bank")
    # a flipped byte: the tables at open, a record at verify (and when it is read)
    for name, at_open in (("checks.bin", True), ("memories.bin", False), ("texts.bin", False),
                          ("vectors.f32", False), ("refs.bin", True), ("terms.u64", False), ("tokens.u32", False)):
        data = bytearray(good[name])
        data[len(data) // 2] ^= 0x40
        (p / name).write_bytes(bytes(data))
        refused(check=(lambda: Bank.open(p)) if at_open else (lambda: Bank.open(p).verify()))
    # the index file is derived data: a damaged one is reported, and rebuilt
    ixf = p / Bank.open(p).manifest["index"]["file"]
    for damage in (lambda d: d[:len(d) // 2], lambda d: bytes([d[0] ^ 0xFF]) + d[1:], lambda d: b"garbage"):
        ixf.write_bytes(damage(good[ixf.name]))  # a damaged header could crash hnswlib: refused before loading
        refused("index", check=lambda: Bank.open(p).search(np.ones(DIM), 2, exact=False))
    ixf.write_bytes(b"garbage")
    bb = Bank.open(p)
    assert bb.rebuild_index() == bb.count and bb.verify()["ok"]
    restore()
    # not a bank at all
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    for q, match in ((tmp_path / "plain", "not an m3lite bank"), (tmp_path / "plain" / "notes.txt", "not a folder"),
                     (tmp_path / "missing", "does not exist")):
        with pytest.raises(BankError) as e:
            Bank.open(q)
        assert match in one_line_error(e)
    with pytest.raises(BankError) as e:
        new_bank(tmp_path / "plain")
    assert "not empty" in one_line_error(e)
    with pytest.raises(BankError) as e:
        new_bank(p)
    assert "already exists" in one_line_error(e)
    assert new_bank(p, exist_ok=True).count == b.count
    # a wrong encoder is refused with one line too
    with pytest.raises(BankError) as e:
        b.add(make_docs(1, seed=77, prefix="w"), lambda ids: fake_encode(ids)[:2] + (np.zeros((len(ids), 1)),) * 2,
              fake_embed, tok, 32)
    one_line_error(e)
    assert Bank.open(p).verify()["ok"]


def test_bad_arguments(tok, tmp_path):
    with pytest.raises(BadArgument):
        Bank.create(tmp_path / "a", "fp", (2, 2, 8), embed_dim=4)
    with pytest.raises(BadArgument):
        Bank.create(tmp_path / "b", "fp", SHAPE, quant="int3", embed_dim=4)
    with pytest.raises(BadArgument):
        Bank.create(tmp_path / "c", "fp", (2, 2, 8, 15), quant="int4", embed_dim=4)
    b = new_bank(tmp_path / "d")
    with pytest.raises(BadArgument):
        b.search(np.ones(DIM + 1), 3)
    with pytest.raises(BadArgument):
        b.memories([0])


# ---------------------------------------------------------------------------------------------- crash safety

CRASH_DOCS = 160


def crash_child(bank_path, tok_path, log_path):
    """Run in a subprocess: add CRASH_DOCS documents with frequent commits and index saves, logging each commit."""
    from m3lite.tokenizer import Tokenizer

    from m3lite.bank import writer

    writer.INDEX_SAVE_MIN_TAIL = 40  # save the index often: kills land inside index saves too
    tok = Tokenizer(tok_path)
    b = Bank.create(bank_path, "fp-model-a", SHAPE, "int8", embed_dim=DIM, exist_ok=True)
    with open(log_path, "a") as log:
        def progress(s):
            log.write(f"{s['committed']}\n")
            log.flush()

        b.add(make_docs(CRASH_DOCS, seed=9), fake_encode, fake_embed, tok, 32, batch=6, commit_every=6,
              progress=progress)
    with open(log_path, "a") as log:
        log.write("done\n")


def test_sigkill_at_random_points(tok, tmp_path):
    tok_path = tmp_path / "t.model"
    train_small_tokenizer(tok_path)
    bank_path, log_path = tmp_path / "bank", tmp_path / "log"
    docs = make_docs(CRASH_DOCS, seed=9)
    sizes = [len(chunk_document(d, tok, 32)) for d in docs]
    boundaries = set(np.cumsum([0] + sizes).tolist())
    total = sum(sizes)
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_bank; "
            f"test_bank.crash_child({str(bank_path)!r}, {str(tok_path)!r}, {str(log_path)!r})")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rnd = random.Random(1234)

    def logged():
        return log_path.read_text().split() if log_path.exists() else []

    last_committed = 0
    kills = 0
    for trial in range(5):
        before = len(logged())
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        want = before + rnd.randint(0, 8)  # 0: during start-up or the first group
        deadline = time.monotonic() + 60
        while len(logged()) < want and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rnd.uniform(0, 0.05))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        lines = logged()
        if lines and lines[-1] == "done":
            break
        b = Bank.open(bank_path, fingerprint="fp-model-a")
        counts = [int(x) for x in lines if x != "done"]
        last_committed = max(counts, default=0)
        assert b.count in boundaries and b.count >= last_committed
        assert [d["id"] for d in b.docs] == [d.id for d in docs[:len(b.docs)]]
        assert b.verify()["ok"]
    assert kills >= 3
    # a rerun resumes and completes
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    b = Bank.open(bank_path, fingerprint="fp-model-a")
    assert b.count == total and logged()[-1] == "done" and b.verify()["ok"]
    assert [d["id"] for d in b.docs] == [d.id for d in docs]
    expect = [r for d in docs for r in chunk_document(d, tok, 32)]
    for i in rnd.sample(range(total), 20):
        assert b.reference(i)["text"] == expect[i].text
        k, _, pos, cnt = b.memories([i])
        K, _, P, C = fake_encode([expect[i].ids])
        assert np.array_equal(cnt, C) and np.abs(k - K * (np.arange(T) < C[..., None])[..., None]).max() < 0.05
        q = fake_embed([bank_mod.index_text(expect[i])])[0]
        assert b.search(q, 1, exact=False)[0][0] == i
    leftovers = [x.name for x in bank_path.iterdir() if x.name.endswith(".tmp")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------- lexical search


def test_lexical_search_finds_by_words_skips_removed_and_survives_reopen(tok, tmp_path):
    """BM25 over the references' words: a document's rare words find it first; removed references and `skip`ped
    ones are never returned; the tokens are checked by verify(); a version-2 bank is refused with 'rebuild'."""
    docs = make_docs(30, seed=3)
    special = Document("zz", "Zebra", "The quick zebra jumps over seven lazy volcanoes.\n\nZebras eat grass.", "test")
    b = new_bank(tmp_path / "bank")
    b.add(docs + [special], fake_encode, fake_embed, tok, 32)
    mine = [i for i in range(b.count) if b.reference(i)["doc_id"] == "zz"]
    q = "ZEBRA volcanoes"
    ids, sc = b.lexical_search(q, 3)
    assert ids[0] in mine and len(ids) <= 3 and np.all(np.diff(sc) <= 0) and sc[0] > 0
    # the stored tokens are the reference's own (with <ref> first)
    ref = b.reference(int(ids[0]))
    assert ref["n_tokens"] == len(chunk_document(special, tok, 32)[mine.index(int(ids[0]))].ids)
    # skip and removal
    assert not set(b.lexical_search(q, 5, skip=mine)[0]) & set(mine)
    assert len(b.lexical_search("", 5)[0]) == 0  # nothing matches an empty query
    b.remove("zz")
    b2 = Bank.open(tmp_path / "bank")
    assert not set(b2.lexical_search(q, 5)[0]) & set(mine)
    assert b2.verify()["ok"]
    # the tokens are checked record by record: verify names the reference's document
    data = (tmp_path / "bank" / "tokens.u32").read_bytes()
    (tmp_path / "bank" / "tokens.u32").write_bytes(data[:4] + b"\xff\xff\xff\xff" + data[8:])
    with pytest.raises(BankError) as e:
        Bank.open(tmp_path / "bank").verify()
    assert "doc0" in one_line_error(e)
    with pytest.raises(BankError) as e:
        Bank.open(tmp_path / "bank").tokens(0)
    assert "reference 0" in one_line_error(e)
    (tmp_path / "bank" / "tokens.u32").write_bytes(data)
    man = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    man["version"] = 2
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BankError) as e:
        Bank.open(tmp_path / "bank")
    assert "rebuild" in one_line_error(e)
