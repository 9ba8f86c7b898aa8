"""The spin barrier that makes a decode step one parallel region, and decoding with 1 or 2 threads."""
import numba
import numpy as np
import pytest
from numba import njit, prange

from m3lite.config import ModelConfig
from m3lite.engine import Engine
from m3lite.kernels.sync import STATE_SIZE, barrier, part


@njit(parallel=True, cache=True)
def _rounds(state, seen, n_rounds):
    """Each of the T threads publishes the round number, waits, then checks that it sees everyone's."""
    T = seen.shape[0]
    for t in prange(T):
        for r in range(n_rounds):
            seen[t, 0] = r
            barrier(state, T)
            for u in range(T):
                if seen[u, 0] != r:
                    seen[t, 1] += 1
            barrier(state, T)


@pytest.mark.parametrize("threads", [1, 2])
def test_barrier_orders_every_round(threads):
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has fewer threads")
    numba.set_num_threads(threads)
    seen = np.zeros((threads, 8), np.int64)  # one cache line per thread
    _rounds(np.zeros(STATE_SIZE, np.int64), seen, 2000)
    assert (seen[:, 1] == 0).all() and (seen[:, 0] == 1999).all()


def test_part_covers_the_range():
    for n in (0, 1, 7, 256):
        for T in (1, 2, 3, 16):
            shares = [part(n, t, T) for t in range(T)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))


def test_one_and_two_threads_decode_alike():
    """Rows and heads split between threads compute the same numbers as one thread (each row's dot product is
    the same code), so the logits agree to the last bits."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread")
    from converters.init import random_weights

    cfg = ModelConfig.preset("tiny", n_kv_heads=1)  # attention on one thread, the projections on two
    w = random_weights(cfg, seed=2)
    ids = np.arange(5, 25)
    out = []
    for threads in (1, 2):
        e = Engine(cfg, w, max_ctx=64, n_threads=threads)
        e.prefill(ids[:4])
        out.append(np.array([e.decode(t) for t in ids[4:]]))
    assert np.abs(out[0] - out[1]).max() <= 1e-6 * np.abs(out[0]).max()


def test_a_busy_machine_runs_fewer_decode_threads(monkeypatch):
    """Each core another program keeps busy costs the decode step one thread (at least one stays); the count
    the caller or $M3LITE_THREADS fixed is kept; the logits do not depend on it."""
    from converters.init import random_weights
    from m3lite import threads as TH

    monkeypatch.delenv("M3LITE_THREADS", raising=False)
    monkeypatch.setattr(TH, "physical_cores", lambda: 2)
    for busy, want in ((0, 2), (1, 1), (5, 1), (None, 2)):
        monkeypatch.setattr(TH, "other_runnable", lambda b=busy: b)
        assert TH.threads_now(2, gap_s=0) == want, busy
    readings = iter([1, 0, 1])  # a task that ran for a moment is not a load
    monkeypatch.setattr(TH, "other_runnable", lambda: next(readings))
    assert TH.threads_now(2, gap_s=0) == 2

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread")
    cfg = ModelConfig.preset("tiny", n_kv_heads=1)
    w = random_weights(cfg, seed=2)
    ids = np.arange(5, 25)
    e = Engine(cfg, w, max_ctx=64, n_threads=None)
    assert e.adaptive and e.n_threads == min(2, numba.config.NUMBA_NUM_THREADS)
    out = []
    for busy in (0, 1):
        monkeypatch.setattr(TH, "other_runnable", lambda b=busy: b)
        monkeypatch.setattr("m3lite.engine.threads_now", TH.threads_now)
        e.reset()
        assert e.fit_threads() == 2 - busy
        e.prefill(ids[:4])
        out.append(np.array([e.decode(t) for t in ids[4:]]))
    assert np.abs(out[0] - out[1]).max() <= 1e-6 * np.abs(out[0]).max()
    assert not Engine(cfg, w, max_ctx=64, n_threads=2).adaptive
    monkeypatch.setenv("M3LITE_THREADS", "2")
    assert not Engine(cfg, w, max_ctx=64).adaptive
    # a fixed count holds for the BLAS too: M3LITE_THREADS=1 runs the prefill's matrix products on one thread
    monkeypatch.setattr(TH, "_blas_threads", 0)
    fixed = Engine(cfg, w, max_ctx=64, n_threads=1)
    assert fixed.fit_threads() == 1 and TH._blas_threads == 1
    TH.set_blas_threads(TH.physical_cores())


def test_other_runnable_reads_this_machine():
    from m3lite.threads import other_runnable

    n = other_runnable()
    assert n is None or n >= 0


def test_blas_threads_can_be_set_and_prefill_does_not_depend_on_them():
    from converters.init import random_weights
    from m3lite.threads import physical_cores, set_blas_threads

    assert set_blas_threads(1)  # numpy's wheels bring OpenBLAS: found among the mapped libraries
    cfg = ModelConfig.preset("tiny")
    w = random_weights(cfg, seed=3)
    ids = np.arange(5, 60)
    one = Engine(cfg, w, max_ctx=64).prefill(ids, all_logits=True).copy()
    set_blas_threads(physical_cores())
    two = Engine(cfg, w, max_ctx=64).prefill(ids, all_logits=True)
    assert np.abs(one - two).max() <= 1e-5 * np.abs(one).max()
