"""Sharded bank builds (m3lite.shards): split, parts built in worker processes or Ray tasks, merged in order into
the bank one process builds, byte for byte."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from m3lite.bank import Bank
from m3lite.bank.format import DATA_FILES
from m3lite.memory import build_or_add
from m3lite.shards import build_part, build_sharded, parts_dir, split
from m3lite.sources import Document
from clitools import run

REPO = Path(__file__).resolve().parents[1]
WORDS = ("river mountain bread volcano city music garden planet winter harbour forest library engine lantern "
         "market island school bridge castle desert").split()


def _docs(n):
    r = np.random.default_rng(11)
    return [Document(f"note{i}", f"Note {i}", " ".join(r.choice(WORDS, int(r.integers(20, 160)))) + ".", "test")
            for i in range(n)]


def test_split_is_contiguous_balanced_and_deterministic():
    docs = _docs(50)
    for n in (1, 2, 3, 7, 60):
        parts = split(docs, n)
        assert len(parts) == n and [d for p in parts for d in p] == docs and split(docs, n) == parts
        if n <= 3:
            sizes = [sum(len(d.text) for d in p) for p in parts]
            assert max(sizes) - min(sizes) <= 2 * max(len(d.text) for d in docs)
    with pytest.raises(Exception):
        split(docs, 0)


def _same_bank(a: Path, b: Path):
    """Two banks hold the same bytes in every data file, and search alike."""
    for name in DATA_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    A, B = Bank.open(a), Bank.open(b)
    assert A.count == B.count and [d["id"] for d in A.docs] == [d["id"] for d in B.docs]
    for i in range(0, A.count, 3):
        v = A.vectors([i])[0]
        assert [x.tolist() for x in A.search(v, 4)] == [x.tolist() for x in B.search(v, 4)]
        words = A.reference(i)["text"][:40]
        assert [x.tolist() for x in A.lexical_search(words, 4)] == [x.tolist() for x in B.lexical_search(words, 4)]
    assert B.verify()["ok"]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The same documents built by one process, memories encoded."""
    import m3lite

    model_dir = tiny_model_dir()
    out = tmp_path_factory.mktemp("single") / "bank"
    build_or_add(m3lite.load(model_dir), out, _docs(24), encode="all", warn=lambda s: None)
    return model_dir, out


def test_sharded_build_in_processes_equals_the_single_build(single, tmp_path):
    import m3lite

    model_dir, one = single
    out = tmp_path / "bank"
    seen = []
    st = build_sharded(m3lite.load(model_dir), model_dir, out, _docs(24), 3, encode="all",
                       progress=lambda d, t, w: seen.append((d, t, w)))
    assert st["count"] == Bank.open(one).count and st["shards"] == 3 and not parts_dir(out).exists()
    assert ("building parts" in {w for _, _, w in seen}) and seen[-1][0] == seen[-1][1]
    _same_bank(one, out)


def test_a_stopped_sharded_build_resumes_and_never_merges_a_half_part(single, tmp_path):
    """Part 1 of 3 is left half-built (as by a killed worker) with no done marker: the rerun finishes it and
    merges; the result is the single build's."""
    import m3lite

    model_dir, one = single
    out = tmp_path / "bank"
    docs = _docs(24)
    pd = parts_dir(out)
    parts = split(docs, 3)
    pd.mkdir()
    (pd / "plan.json").write_text(json.dumps({"shards": 3, "parts": [[d.sha256 for d in p] for p in parts]}))
    half = [dict(id=d.id, title=d.title, text=d.text, source=d.source) for d in parts[1][:3]]
    build_part(str(model_dir), str(pd / "001-of-003"), half, "int8", "all")
    os.unlink(str(pd / "001-of-003") + ".done")  # killed before its marker
    assert not out.exists()
    build_sharded(m3lite.load(model_dir), model_dir, out, docs, 3, encode="all")
    _same_bank(one, out)


def test_cli_shards_and_lazy_parts(single, tmp_path):
    model_dir, one = single
    src = tmp_path / "notes"
    src.mkdir()
    for d in _docs(9):
        (src / f"{d.id}.txt").write_text(d.text)
    a, b = tmp_path / "a", tmp_path / "b"
    run("bank", "build", src, "--out", a, "--model", model_dir)
    st = json.loads(run("bank", "build", src, "--out", b, "--model", model_dir, "--shards", "2", "--json").stdout)
    assert st["lazy"] and st["memories"] == 0 and st["count"] == Bank.open(a).count
    _same_bank(a, b)
    p = run("bank", "build", src, "--out", tmp_path / "c", "--model", model_dir, "--shards", "0", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- Ray

def dying_runner(model_dir, part, docs, quant, encode, threads=None):
    """A shard runner whose first attempt at part 1 builds half the part, then dies (SIGKILL): Ray retries it."""
    mark = Path(part + ".attempted")
    if part.endswith("001-of-002") and not mark.exists():
        mark.write_text("1")
        build_part(model_dir, part, docs[:len(docs) // 2], quant, encode, threads)
        os.unlink(part + ".done")
        os.kill(os.getpid(), signal.SIGKILL)
    return build_part(model_dir, part, docs, quant, encode, threads)


@pytest.mark.slow
def test_ray_build_equals_the_single_build_and_retries_a_killed_worker(single, tmp_path):
    ray = pytest.importorskip("ray")
    import m3lite

    model_dir, one = single
    env = {k: os.environ[k] for k in ("M3LITE_EMBEDDER", "M3LITE_CACHE") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        out = tmp_path / "bank"
        st = build_sharded(m3lite.load(model_dir), model_dir, out, _docs(24), 2, encode="all",
                           ray_address="local", runner=dying_runner)
        assert (parts_dir(out).exists() is False) and st["shards"] == 2
        _same_bank(one, out)
        assert (tmp_path / "bank.parts").exists() is False
    finally:
        ray.shutdown()


def test_a_changed_source_list_is_split_again(tmp_path):
    """A plan is reused only for the same documents in the same order: a new document, or another shard count,
    starts the parts again (a stale part would mix two splits)."""
    from m3lite.shards import _plan

    out = tmp_path / "bank"
    docs = _docs(10)
    first = _plan(out, docs, 3)
    (parts_dir(out) / "000-of-003").mkdir()
    assert _plan(out, docs, 3) == first and (parts_dir(out) / "000-of-003").exists()
    more = docs + _docs(11)[10:]
    assert [d for p in _plan(out, more, 3) for d in p] == more
    assert not (parts_dir(out) / "000-of-003").exists()
    assert len(_plan(out, more, 2)) == 2


def test_merge_refuses_a_pq_bank(tmp_path):
    from m3lite.bank import BankError

    a = Bank.create(tmp_path / "a", "fp", (1, 1, 4, 8), quant="pq", embed_dim=4)
    b = Bank.create(tmp_path / "b", "fp", (1, 1, 4, 8), quant="pq", embed_dim=4)
    with pytest.raises(BankError, match="pq"):
        a.merge([b])
