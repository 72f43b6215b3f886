"""Run a function on N gloo ranks in fresh processes, with worker tracebacks relayed and a hard timeout."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


def _worker(rank: int, world_size: int, store_path: str, port: int | None, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0")
    try:
        if port is None:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        else:  # as torchrun leaves it: the code under test (accelerate, PipeTrainer) sets up the group itself
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        result = fn(*args)
        dist.barrier()  # gloo connects lazily: a rank that leaves early breaks its peers' set-up
        buffer = io.BytesIO()
        torch.save(result, buffer)  # plain bytes: tensors put on a Queue would be shared memory of a dying process
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # relay everything, the parent decides
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 240.0, launcher_env: bool = False, fork: bool = True
) -> list[Any]:
    """`fn(*args)` on every rank; returns the per-rank results, or fails with every failing rank's traceback.

    A hang (a rank waiting on a peer forever) fails after `timeout` seconds instead of blocking the suite.
    With `launcher_env`, ranks get torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and no process
    group, so the code under test sets it up as it would under a real launcher. Ranks are forked from this process,
    which has imported torch, transformers, TRL and hf_pipe already: a spawned rank imports them again, about 8 s of
    CPU (a minute of wall time on a busy 2-core machine), more than most tiny runs take. `fork=False` spawns fresh
    interpreters instead, for what a forked rank would inherit wrongly (the parent's heap, under a start-up memory
    measurement; DDP's reducer once crashed in forked ranks of the PP x DP prediction test).
    """
    port = free_port() if launcher_env else None
    ctx = mp.get_context("fork" if fork else "spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store_path, port, fn, args, queue), daemon=True)
            for r in range(world_size)
        ]
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            for p in procs:
                p.start()
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(results) - set(errors))
                    detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s (hang?){detail}")
                try:
                    rank, status, payload = queue.get(timeout=min(remaining, 1.0))
                except Exception:
                    if errors and all(not p.is_alive() for r, p in enumerate(procs) if r not in results):
                        break
                    continue
                (results if status == "ok" else errors)[rank] = payload
                if errors:
                    # one rank failed: peers usually block on it; give them a moment to report, then stop
                    deadline = min(deadline, time.monotonic() + 5.0)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
        if errors:
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RuntimeError(f"{len(errors)} rank(s) failed:{detail}")
        import torch

        return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world_size)]
