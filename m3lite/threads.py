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
