"""How many threads to use: physical cores (hyper-threads slow down bandwidth-bound decode)."""
from __future__ import annotations

import os

from .errors import BadArgument


def physical_cores() -> int:
    """Physical cores this process may run on, read from /sys (all CPUs allowed if it cannot be read)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "core_id") as f1, open(base + "physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def default_threads(n_threads: int | None = None) -> int:
    """n_threads, else $M3LITE_THREADS, else the number of physical cores; capped by numba's pool size."""
    if n_threads is None:
        env = os.environ.get("M3LITE_THREADS", "").strip()
        if env:
            try:
                n_threads = int(env)
            except ValueError:
                raise BadArgument(f"M3LITE_THREADS must be a positive integer, got {env!r}") from None
        else:
            n_threads = physical_cores()
    if int(n_threads) < 1:
        raise BadArgument(f"the number of threads must be >= 1, got {n_threads}")
    return min(int(n_threads), _numba_pool())


def _numba_pool() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


def threads_fixed(n_threads: int | None = None) -> bool:
    """True when the caller or $M3LITE_THREADS chose the thread count: it is then used as it is."""
    return n_threads is not None or bool(os.environ.get("M3LITE_THREADS", "").strip())


def other_runnable() -> int | None:
    """Threads of other processes that are runnable right now: /proc/stat's procs_running less this process's
    own running threads (the reading one, and numba's or BLAS's workers still spinning after the last
    generation), or None where that cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith(b"procs_running "))
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                    own += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
            except (OSError, IndexError):
                continue  # a thread that just ended
        return max(0, running - max(own, 1))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def threads_now(n_threads: int, samples: int = 3, gap_s: float = 0.001) -> int:
    """The threads a generation should run with now: `n_threads`, less one for each core that other processes
    keep busy, at least 1. A decode step's threads wait for each other at every phase, so a thread that shares
    its core with a busy program holds all of them up; one thread fewer runs at the speed of the free cores.
    The least busy of `samples` readings `gap_s` apart counts (a task that runs for a moment is not a load)."""
    import time

    busy = None
    for i in range(samples):
        n = other_runnable()
        if n is None:
            return n_threads
        busy = n if busy is None else min(busy, n)
        if busy == 0:
            break
        if i + 1 < samples:
            time.sleep(gap_s)
    return max(1, min(n_threads, physical_cores() - busy))


_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                 "openblas_set_num_threads", "MKL_Set_Num_Threads")
_blas: list | None = None
_blas_threads = 0  # what the last call set (0: never set; the BLAS runs its own default)


def set_blas_threads(n: int) -> bool:
    """Set the thread count of the BLAS numpy loaded (OpenBLAS or MKL, found among the libraries this process
    has mapped; a prefill's matrix products run there), once per change: the setting is the process's, shared
    by every engine. False where none can be found (nothing changes)."""
    global _blas, _blas_threads
    if _blas is None:
        import ctypes

        import numpy  # noqa: F401  (its BLAS must be loaded to be found)

        _blas = []
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "blas" in line.lower() or "mkl_rt" in line})
        except OSError:
            paths = []
        for p in paths:
            try:
                lib = ctypes.CDLL(p)
            except OSError:
                continue
            for name in _BLAS_SETTERS:
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int], None
                    _blas.append(fn)
                    break
    if int(n) != _blas_threads:
        for fn in _blas:
            fn(int(n))
        _blas_threads = int(n)
    return bool(_blas)
