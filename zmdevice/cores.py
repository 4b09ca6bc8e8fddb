"""The CPU cores this process may use: what thread pools (torch, onnxruntime) and process
counts are sized by, so that ``taskset``, a container's CPU set or ``OMP_NUM_THREADS`` is
respected rather than the machine's core count."""

from __future__ import annotations

import os


def affinity_cores() -> int:
    """The cores this process may run on (taskset, containers), not all of the machine's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def usable_cores() -> int:
    """``affinity_cores``, and no more than ``OMP_NUM_THREADS`` when that is set: a user who
    limits OpenMP threads (other jobs share the cores) would otherwise get one thread per
    core anyway."""
    cores = affinity_cores()
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return cores
