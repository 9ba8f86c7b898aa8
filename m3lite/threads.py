"""How many threads to use: physical cores (hyper-threads slow down bandwidth-bound decode)."""
from __future__ import annotations

import os


def physical_cores() -> int:
    env = os.environ.get("M3LITE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count() or 1
    cores = set()
    try:
        for cpu in os.sched_getaffinity(0):
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                pkg = f.read().strip()
            cores.add((pkg, core))
    except (OSError, AttributeError):
        return max(1, avail)
    return max(1, min(avail, len(cores) or avail))
