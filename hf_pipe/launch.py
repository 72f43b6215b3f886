"""Process groups and their time limit: every group hf_pipe creates or uses carries `ddp_timeout`, and every wait the
pipeline makes is watched, so a rank that stops without dying ends the job with one clear error instead of a hang.

Trainer sets `ddp_timeout` on the process group only on GPUs: on the CPU (gloo) transformers leaves torch's default of
30 minutes, and subgroups (`new_group`, `init_device_mesh`) get that default too, whatever the world has. So:

- `init_process_group` sets the world up with `ddp_timeout` where Trainer would not (gloo), before Trainer's own set-up;
- `new_group` / `pipeline_mesh` create the tied-weight and ("dp", "pp") mesh groups with it;
- `Watchdog` (one per process, `arm_watchdog`) bounds every wait the pipeline makes: the schedule's sends and
  receives, the loss and batch broadcasts, the norm and tied-gradient all-reduces, the barriers around saves
  (`waiting(...)` around each). Past `ddp_timeout` with no progress it logs one error — the operation, the stage or
  peer rank it waited for, the step, what to check — and exits the process (status 124), for waits torch's own
  timeouts do not end (a P2P on a group without a timeout, NCCL work a GPU never finishes). A wait torch does end
  (gloo's timeout, a peer's closed connection) is raised as `PipelineTimeoutError` with the same description.

A stage's compute (`computing()`) and every stage action (`progress()`) restart the clock: only waiting counts.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

#: exit status of a process the watchdog ends (as `timeout(1)`)
TIMEOUT_EXIT_CODE = 124

# what torch's process groups say when a wait fails because of a peer: a timeout, or a peer that went away
_PEER_FAILURES = (
    "Timed out waiting",
    "timed out",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL",
    "Socket Timeout",
)


class PipelineTimeoutError(RuntimeError):
    """A wait of the pipeline on another rank failed: it timed out, or the rank went away. Names the operation, the
    peer, the step and what to check."""


# -- process groups ----------------------------------------------------------------------------------------------
def init_process_group(timeout_s: float, backend: str | None = None) -> bool:
    """The world group with `timeout_s`, for a launched job on the CPU, where Trainer's set-up would give gloo torch's
    30-minute default; `ddp_timeout` then bounds every collective, as Trainer users expect. Returns whether it did.

    On CUDA Trainer (accelerate) passes `ddp_timeout` itself; a group already set up is left as it is (the watchdog
    still bounds the pipeline's waits).
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
        return False
    dist.init_process_group(backend or "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def new_group(ranks: list[int], timeout_s: float | None) -> dist.ProcessGroup:
    """`dist.new_group(ranks)` with `ddp_timeout` (torch gives a new group 30 minutes, not the world's timeout)."""
    return dist.new_group(ranks, timeout=timedelta(seconds=timeout_s) if timeout_s else None)


def twin_group(group: dist.ProcessGroup, timeout_s: float | None) -> dist.ProcessGroup:
    """A second process group over the same ranks as `group` (a pipeline's), for messages that must not queue behind
    the first group's. Collective over the world: every replica's pipeline gets its twin."""
    if group is dist.group.WORLD:
        return new_group(list(range(dist.get_world_size())), timeout_s)
    mine = dist.get_process_group_ranks(group)
    everyone: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    twin = None
    for ranks in sorted({tuple(r) for r in everyone}):
        created = new_group(list(ranks), timeout_s)
        if list(ranks) == mine:
            twin = created
    return twin


@contextlib.contextmanager
def _groups_created_with(timeout_s: float | None) -> Iterator[None]:
    """Groups torch creates inside (init_device_mesh's, which takes no timeout) get `timeout_s`."""
    c10d = dist.distributed_c10d
    original = c10d._get_default_timeout
    if timeout_s:
        c10d._get_default_timeout = lambda backend: timedelta(seconds=timeout_s)
    try:
        yield
    finally:
        c10d._get_default_timeout = original


def pipeline_mesh(world: int, pp: int, timeout_s: float | None):
    """A ("dp", "pp") `DeviceMesh` over the world (replicas × pipeline ranks), its groups created with `timeout_s`."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with _groups_created_with(timeout_s):
        mesh = init_device_mesh(device_type, (world // pp, pp), mesh_dim_names=("dp", "pp"))
    return mesh


@dataclass(frozen=True)
class DataParallel:
    """Data-parallel replicas of the pipeline: the replicas of this rank's stages, and every replica's pipeline."""

    group: dist.ProcessGroup
    mesh: Any  # the 1-D "dp" DeviceMesh (FSDP2 shards over it)
    size: int
    rank: int
    mode: str  # "ddp" or "fsdp"
    pipelines: list[list[int]]  # global ranks of each replica's pipeline, stage-rank order


def pipeline_groups(world: int, pp: int, mode: str, timeout_s: float) -> tuple[dist.ProcessGroup, DataParallel | None]:
    """This rank's pipeline group and, with several replicas, its data-parallel side, from a ("dp", "pp") mesh whose
    groups carry `timeout_s`."""
    if world == pp:
        return dist.group.WORLD, None
    mesh = pipeline_mesh(world, pp, timeout_s)
    data_parallel = DataParallel(
        group=mesh.get_group("dp"),
        mesh=mesh["dp"],
        size=world // pp,
        rank=mesh.get_local_rank("dp"),
        mode=mode,
        pipelines=mesh.mesh.tolist(),
    )
    return mesh.get_group("pp"), data_parallel


def every_rank() -> str:
    """The peers of a wait every launched rank takes part in (for its message)."""
    return f"every launched rank (ranks 0-{dist.get_world_size() - 1})"


def start(args: Any) -> Watchdog:
    """The process group a PipeTrainer runs on, and this process's watchdog.

    The world group gets ddp_timeout (on the CPU Trainer would leave gloo at torch's 30 minutes), then Trainer's own
    set-up runs on it (`args.device`: NCCL on GPU); `python train.py` gets a one-rank group, since the schedule code
    always talks to one. The group is destroyed when the script ends normally.
    """
    init_process_group(args.ddp_timeout, args.ddp_backend)
    _ = args.device
    if not dist.is_initialized():
        _init_single_process_group()
    atexit.unregister(_destroy_if_clean_exit)  # once per process, however many trainers are built
    atexit.register(_destroy_if_clean_exit)
    return arm_watchdog(args.ddp_timeout, dist.get_rank())


def start_for_inference(timeout_s: float) -> None:
    """The process group and watchdog of a script that only runs a pipeline (generation), under torchrun or
    `accelerate launch` (NCCL on GPUs, each rank on its `LOCAL_RANK` device; gloo on CPUs), or one process alone."""
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        else:
            _init_single_process_group()
        atexit.unregister(_destroy_if_clean_exit)
        atexit.register(_destroy_if_clean_exit)
    arm_watchdog(timeout_s, dist.get_rank())


def _init_single_process_group() -> None:
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="hf_pipe-"), "store"), 1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=0, world_size=1)


def _destroy_if_clean_exit() -> None:
    """Destroy the process group when the script ends normally, as torch asks every training script to do.

    Trainer scripts rarely call `destroy_process_group()`, and on gloo that is a crash at exit: a worker thread can
    still hold the last collective's tensors while the interpreter is torn down, and the rank dies of SIGABRT
    ("terminate called without an active exception") after training succeeded, measured here in 9 of 40 runs of
    a two-rank all-reduce. After an uncaught exception the group is left alone: destroying it while other ranks
    still wait in a collective can hang (NCCL), and the launcher stops those ranks anyway.
    """
    if dist.is_initialized() and getattr(sys, "last_value", None) is None:
        dist.destroy_process_group()


# -- the watchdog ------------------------------------------------------------------------------------------------
@dataclass
class _Wait:
    operation: str
    peers: str
    #: watched only until a wait nested in it ends (a span of Trainer's own code that starts with a collective)
    until_nested: bool = False
    since: float = field(default_factory=time.monotonic)
    armed: bool = True


class Watchdog:
    """Ends the process when a watched wait makes no progress for `timeout_s` (see the module docstring)."""

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        #: this rank's pipeline stages and the training step, for the message
        self.stages: list[int] = []
        self.step: int | None = None
        #: the last point-to-point message a stage posted (what a schedule step waits for)
        self.last_message: str | None = None
        self._waits: list[_Wait] = []
        self._computing = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="hf_pipe-watchdog", daemon=True)
        self._thread.start()

    # what the pipeline calls
    def push(self, operation: str, peers: str, until_nested: bool = False) -> _Wait:
        wait = _Wait(operation, peers, until_nested)
        with self._lock:
            self._waits.append(wait)
        return wait

    def pop(self, wait: _Wait) -> None:
        with self._lock:
            if wait in self._waits:
                self._waits.remove(wait)
            if self._waits:
                self._waits[-1].since = time.monotonic()
                self._waits[-1].armed &= not self._waits[-1].until_nested

    def progress(self) -> None:
        with self._lock:
            if self._waits:
                self._waits[-1].since = time.monotonic()

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        with self._lock:
            self._computing += 1
        try:
            yield
        finally:
            with self._lock:
                self._computing -= 1
                if self._waits:
                    self._waits[-1].since = time.monotonic()

    # the message
    def describe(self, wait: _Wait, what: str, lost: bool = False) -> str:
        stages = f" (stage{'s' if len(self.stages) != 1 else ''} {', '.join(map(str, self.stages))})"
        step = f" at step {self.step}" if self.step is not None else ""
        last = (
            f"; the last message it posted: {self.last_message}"
            if self.last_message and "step" in wait.operation
            else ""
        )
        head = f"hf_pipe: rank {self.rank}{stages if self.stages else ''} {what} in {wait.operation}{step}, waiting for {wait.peers}"
        if lost:
            return (
                f"{head}: a peer's connection closed, so that rank failed or was killed, and its own error says why. "
                "A save that did not complete publishes no checkpoint: resume from the last one."
            )
        return (
            f"{head}{last}. A rank that stops without dying (a stopped or suspended process, a wedged GPU driver, a "
            "deadlocked data-loader worker, a hung or full disk during a save) leaves its peers waiting like this: "
            f"check {wait.peers}: its own log and error, where it is (`py-spy dump --pid PID`), the node's health and "
            f"disk. If the wait is legitimate (a slow first step, saves to a slow file system), raise ddp_timeout "
            f"(now {self.timeout_s:g} s). A save that did not complete publishes no checkpoint: resume from the last "
            "one."
        )

    def _watch(self) -> None:
        poll = min(1.0, max(0.05, self.timeout_s / 20))
        while True:
            time.sleep(poll)
            with self._lock:
                wait = self._waits[-1] if self._waits and not self._computing and self._waits[-1].armed else None
                waited = time.monotonic() - wait.since if wait else 0.0
            if wait is not None and waited > self.timeout_s:
                message = self.describe(wait, f"timed out after {waited:.0f} s (ddp_timeout={self.timeout_s:g})")
                print(message, file=sys.stderr, flush=True)  # not through logging: its handlers may be gone
                os._exit(TIMEOUT_EXIT_CODE)


_watchdog: Watchdog | None = None


def arm_watchdog(timeout_s: float, rank: int) -> Watchdog:
    """This process's watchdog (one per process: it ends the process), with `timeout_s`."""
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog(timeout_s, rank)
    _watchdog.timeout_s, _watchdog.rank = float(timeout_s), rank
    return _watchdog


class WatchdogStep(TrainerCallback):
    """The step the watchdog names in its message: the one running, or the one whose save or evaluation follows."""

    def __init__(self, dog: Watchdog):
        self.dog = dog

    def on_step_begin(self, args, state, control, **kwargs):
        self.dog.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        self.dog.step = state.global_step


def timeout_s() -> float | None:
    """The watched time limit (`ddp_timeout`), for the groups the pipeline creates; None before `arm_watchdog`."""
    return _watchdog.timeout_s if _watchdog is not None else None


_FAILURE_KEY = "hf_pipe/failure"


def report_failure(message: str) -> None:
    """Leave this rank's error in the job's store, so that peers that lose their connection to it can say why."""
    with contextlib.suppress(Exception):
        dist.distributed_c10d._get_default_store().set(_FAILURE_KEY, message)


def _reported_failure() -> str | None:
    with contextlib.suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
        if store.check([_FAILURE_KEY]):
            return store.get(_FAILURE_KEY).decode()
    return None


def _is_peer_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in _PEER_FAILURES)


@contextlib.contextmanager
def waiting(operation: str, peers: str, until_nested: bool = False) -> Iterator[None]:
    """Watch a wait of this rank on `peers` (e.g. "stage 1 on rank 1"): bounded by the watchdog, and a timeout or a
    peer that went away raised as one `PipelineTimeoutError` that says what, where and what to check. With
    `until_nested`, the watchdog stops counting once a wait nested in this one has ended."""
    dog = _watchdog
    wait = dog.push(operation, peers, until_nested) if dog is not None else None
    try:
        yield
    except PipelineTimeoutError:
        raise
    except RuntimeError as error:
        if not _is_peer_failure(error):
            raise
        lost = "imed out" not in str(error)
        what = "lost a peer" if lost else "timed out"
        described = dog.describe(wait, what, lost) if dog is not None else f"hf_pipe: {operation} {what}"
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        reported = _reported_failure()
        cause = f"\nThe failed rank reported: {reported}" if reported else ""
        raise PipelineTimeoutError(f"{described}{cause}\ntorch said: {first}") from error
    finally:
        if dog is not None:
            dog.pop(wait)


def progress() -> None:
    """A stage did something: the current wait's clock restarts."""
    if _watchdog is not None:
        _watchdog.progress()


def computing():
    """Time inside this block is compute, never counted as waiting."""
    return _watchdog.computing() if _watchdog is not None else contextlib.nullcontext()


def note_message(text: str) -> None:
    if _watchdog is not None:
        _watchdog.last_message = text
