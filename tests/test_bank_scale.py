"""The bank-scale benchmark's synthetic bank (m3bench.bank_scale): it builds, opens and searches; at 100,000
references (slow, in CI) the test prints the times it measured."""
import numpy as np
import pytest

from m3bench.bank_scale import ENCODED, REFS_PER_DOC, SHAPE, _Synthetic, markdown, run_bank_scale
from m3lite.bank import Bank


def _check(res, n, path):
    assert res["references"] == n and res["documents"] == -(-n // REFS_PER_DOC)
    assert res["memories"] == min(ENCODED, n) and res["memory_shape"] == list(SHAPE)
    for kind in ("lexical", "dense", "hybrid"):
        assert 0 < res[kind]["p50_ms"] <= res[kind]["p99_ms"]
    assert res["rss_after_open_mb"] >= res["rss_python_mb"] > 0 and res["disk_bytes"] > n * 250
    assert "hybrid search" in markdown(res)
    # what the searches find: a reference by its own vector, and by its words
    b = Bank.open(path)
    syn = _Synthetic(n)
    rng = np.random.default_rng(0)
    for i in rng.choice(n, 10, replace=False).tolist():
        assert b.search(b.vectors([i])[0], 3)[0][0] == i
        text = b.reference(i)["text"]
        assert i in b.lexical_search(text, 5)[0].tolist()
    k, v, pos, cnt = b.memories(np.flatnonzero(b._lazy.slot >= 0)[:5])
    assert k.shape == (5,) + SHAPE and np.all(cnt == SHAPE[2])
    assert len(syn.references(next(syn.documents()))) == REFS_PER_DOC


def test_small_synthetic_bank(tmp_path, monkeypatch):
    monkeypatch.setenv("M3LITE_CACHE", str(tmp_path))
    res = run_bank_scale(3000)
    _check(res, 3000, res["bank"])
    assert run_bank_scale(3000)["build_s_this_run"] < res["build_s_this_run"] + 1  # written once, then reused


@pytest.mark.slow
def test_a_100k_reference_bank_opens_and_searches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("M3LITE_CACHE", str(tmp_path))
    res = run_bank_scale(100_000)
    with capsys.disabled():
        print(f"\n100,000-reference synthetic bank: written in {res['build_s_this_run']} s\n" + markdown(res))
    _check(res, 100_000, res["bank"])
