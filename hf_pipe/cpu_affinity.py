"""Each local rank on cores of its own (`PipeTrainingArguments.pipeline_cpu_affinity`).

Pipeline ranks on one host compute at the same time and hand each other activations every microbatch. Left to the
OS scheduler, a rank's compute thread and its gloo threads wander between cores, and every move leaves that core's
cache behind; on CPU training that costs a few percent of step time (measured in `benchmarks/bench.py`). Neither
torchrun nor accelerate binds CPU ranks (accelerate's CPU-affinity option binds a GPU rank to its GPU's NUMA node),
so hf_pipe does: the CPUs this process may use are split into equal contiguous shares, one per local rank.
"""

from __future__ import annotations

import os

SETTING = "pipeline_cpu_affinity"


def local_world() -> tuple[int, int]:
    """(local rank, processes on this host), as torchrun and `accelerate launch` export them."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


_allowed: list[int] | None = None


def allowed_cpus() -> list[int]:
    """The CPUs this process could use before hf_pipe bound it (so a second trainer in a process splits the same)."""
    global _allowed
    if _allowed is None:
        _allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return _allowed


def core_share(cpus: list[int], local_rank: int, local_world_size: int) -> list[int]:
    """The CPUs of `local_rank`: the `local_rank`-th of `local_world_size` equal contiguous shares of `cpus`."""
    share = len(cpus) // local_world_size
    return cpus[local_rank * share : (local_rank + 1) * share]


def affinity_problems(local_world_size: int, cpus: list[int]) -> list[str]:
    if not hasattr(os, "sched_setaffinity"):
        return [f"{SETTING}=True needs Linux (os.sched_setaffinity); set it to False on this platform."]
    if len(cpus) < local_world_size:
        return [
            f"{SETTING}=True: {local_world_size} processes on this host but this process may use only "
            f"{len(cpus)} CPU(s) {cpus}, so they cannot have one each; launch at most {len(cpus)} processes per "
            f"host, or set {SETTING}=False."
        ]
    return []


def bind_local_rank() -> list[int]:
    """Bind every thread of this process (compute, gloo, OpenMP) to this local rank's share; returns the share.

    Threads started later inherit it from the thread that starts them.
    """
    local_rank, local_world_size = local_world()
    cpus = core_share(allowed_cpus(), local_rank, local_world_size)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile, or one not ours to move
            pass
    return cpus
