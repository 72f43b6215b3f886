"""Schedules by name, and the checks that keep a schedule from hanging or failing mid-step.

Every schedule is torch.distributed.pipelining's own; this module only maps names, decides stage placement and
stages per rank, and rejects settings torch would hang on or fail late with (peers hang with fewer microbatches
than stages) — before any step, with the fix in the message.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    _Action,
    _add_send_recv,
    _add_unshard_reshard,
    _ComputationType,
    _PipelineSchedule,
    _PipelineScheduleRuntime,
)

from .errors import PipelineConfigError

SCHEDULES: dict[str, type[_PipelineSchedule]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved1f1b": ScheduleInterleaved1F1B,
    "loopedbfs": ScheduleLoopedBFS,
    "interleavedzerobubble": ScheduleInterleavedZeroBubble,
    "zbvzerobubble": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
# Schedules that place two stages per rank in a V: rank r holds stages r and 2·pp-1-r.
V_SCHEDULES = ("zbvzerobubble", "dualpipev")


def schedule_class(name: str) -> type[_PipelineSchedule]:
    """The torch schedule class for a case-insensitive name; an unknown name lists the valid ones."""
    try:
        return SCHEDULES[name.lower()]
    except KeyError:
        raise PipelineConfigError(
            f"pipeline_schedule={name!r} is not a schedule; valid options are {list(SCHEDULES)} (case-insensitive)."
        ) from None


def is_multi_stage(name: str) -> bool:
    return issubclass(schedule_class(name), PipelineScheduleMulti)


def placement(name: str) -> str:
    """`"v"` or `"loop"`: how stages are laid out over ranks for this schedule."""
    return "v" if name.lower() in V_SCHEDULES else "loop"


def divisors(n: int) -> list[int]:
    """Every divisor of `n`, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of `n` not above `limit`: how many equal microbatches a batch of `n` splits into."""
    return max(d for d in divisors(n) if d <= limit)


def default_stages_per_rank(name: str) -> int:
    return 2 if is_multi_stage(name) else 1


def forward_only_schedule(
    stages: list, stage_to_rank: dict[int, int], microbatches: int, loss_fn
) -> _PipelineSchedule:
    """Evaluation for several stages per rank: every stage runs forward for all microbatches, stage by stage.

    The multi-stage schedules' own action lists hold backward steps that `eval()` cannot skip (V schedules hand
    gradients between a rank's own stages); this is their forward half, lowered to send/receive actions by torch's
    own schedule runtime. Deadlock-free: stage s only waits for stage s-1, which its rank runs to the end first.
    """
    num_stages = len(stage_to_rank)
    order = {
        rank: [
            _Action(s, _ComputationType.FORWARD, mb)
            for s in range(num_stages)
            if stage_to_rank[s] == rank
            for mb in range(microbatches)
        ]
        for rank in sorted(set(stage_to_rank.values()))
    }
    schedule = _PipelineScheduleRuntime(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    # torch's loader insists on a backward per forward; set the placement and lower to send/recv directly
    schedule.stage_index_to_group_rank = dict(stage_to_rank)
    for stage in stages:
        stage.stage_index_to_group_rank = schedule.stage_index_to_group_rank
    with_unshard = {rank: _add_unshard_reshard(actions) for rank, actions in order.items()}  # FSDP2 stages
    schedule.pipeline_order_with_comms = _add_send_recv(
        with_unshard, stage_to_rank=lambda s: stage_to_rank[s], num_stages=num_stages
    )
    return schedule


def run_microbatches(
    schedule: _PipelineSchedule,
    microbatches: Any,
    targets: list | None,
    losses: list | None,
    backward: bool | None = None,
) -> list | None:
    """torch's `step()` (with `targets`) or `eval()` (without), on microbatches hf_pipe cut itself; `backward=False`
    with `targets`: forward only, the schedule's loss function scoring each microbatch as it leaves the last stage.

    torch's own `step` chunks the whole batch along dim 0, which cannot cut packed batches (see `microbatch.py`);
    what it does around `_step_microbatches` is repeated here. Returns the last stage's per-microbatch outputs in
    a forward-only run without targets (None on other ranks).
    """
    training = targets is not None if backward is None else backward
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    for stage in stages:
        stage.has_backward = training
        stage.clear_runtime_states()
    first = any(stage.is_first for stage in stages)  # only stage 0 reads the token ids; others receive activations
    args = [(ids,) if first else () for ids in microbatches.input_ids]
    keep = targets is None
    schedule._step_microbatches(args, microbatches.kwargs, targets, losses, return_outputs=keep)
    for stage in stages:
        if stage.is_last and keep:
            return list(stage.output_chunks)
    return None


def schedule_for_batch(
    name: str, *, pp_size: int, stages_per_rank: int, microbatches: int, batch_size: int
) -> tuple[str, int]:
    """(schedule, microbatches) for one batch: the configured ones, unless the batch is smaller or not divisible.

    An epoch's last batch is usually short, and Trainer trains on it: it is split into the largest count of
    equal microbatches not above the configured one, and when the schedule cannot run that count it runs on a
    schedule with the same stage placement that can (GPipe, LoopedBFS or ZBV) — the gradients are the same.
    """
    count = largest_divisor_at_most(batch_size, microbatches)
    if not check_schedule(name, pp_size=pp_size, stages_per_rank=stages_per_rank, microbatches=count):
        return name, count
    if not is_multi_stage(name):
        return "gpipe", count
    return ("zbvzerobubble" if placement(name) == "v" else "loopedbfs"), count


def check_schedule(
    name: str,
    *,
    pp_size: int,
    stages_per_rank: int,
    microbatches: int,
    batch_size: int | None = None,
) -> list[str]:
    """Every problem with this schedule setting, each a sentence naming the setting, the values and the fix."""
    if name.lower() not in SCHEDULES:
        return [f"pipeline_schedule={name!r} is not a schedule; valid options are {list(SCHEDULES)}."]
    name = name.lower()
    problems = []
    num_stages = pp_size * stages_per_rank
    if not is_multi_stage(name) and stages_per_rank != 1:
        problems.append(
            f"pipeline_stages_per_rank={stages_per_rank} with pipeline_schedule={name!r}: this schedule runs one "
            "stage per rank; use pipeline_stages_per_rank=1, or a multi-stage schedule "
            "(interleaved1f1b, loopedbfs, interleavedzerobubble, zbvzerobubble, dualpipev)."
        )
    elif name in V_SCHEDULES and stages_per_rank != 2:
        problems.append(
            f"pipeline_stages_per_rank={stages_per_rank} with pipeline_schedule={name!r}: V schedules place exactly "
            "2 stages on each rank; use pipeline_stages_per_rank=2."
        )
    elif is_multi_stage(name) and stages_per_rank < 2:
        problems.append(
            f"pipeline_stages_per_rank={stages_per_rank} with pipeline_schedule={name!r}: a multi-stage schedule "
            "needs at least 2 stages per rank; use 2, or pipeline_schedule='1f1b' for one stage per rank."
        )
    if microbatches < 1:
        problems.append(f"pipeline_microbatches={microbatches} must be at least 1.")
        return problems
    if batch_size is not None and batch_size % microbatches:
        problems.append(
            f"pipeline_microbatches={microbatches} does not divide per_device_train_batch_size={batch_size}; use "
            f"{', '.join(map(str, divisors(batch_size)))} microbatches, or a batch size divisible by {microbatches}."
        )
    # torch refuses these at the first step, after every rank has built its stages; say it up front instead.
    if name in ("1f1b", "dualpipev") and microbatches < num_stages:
        problems.append(
            f"pipeline_microbatches={microbatches} is fewer than the {num_stages} pipeline stages "
            f"(pipeline_parallel_size={pp_size} × pipeline_stages_per_rank={stages_per_rank}); {name} needs at least "
            f"one microbatch per stage: use pipeline_microbatches >= {num_stages}, or pipeline_schedule='gpipe'."
        )
    elif name in ("interleaved1f1b", "interleavedzerobubble") and microbatches % max(1, microbatches // pp_size):
        rounds = max(1, microbatches // pp_size)
        fits = [
            m
            for m in range(max(1, microbatches - pp_size), microbatches + 2 * pp_size)
            if m % max(1, m // pp_size) == 0
        ]
        problems.append(
            f"pipeline_microbatches={microbatches} with pipeline_schedule={name!r} on pipeline_parallel_size="
            f"{pp_size}: interleaved schedules run microbatches in {rounds} rounds, which must divide them; use one "
            f"of {', '.join(map(str, fits[:4]))} (any multiple of {pp_size} works)."
        )
    return problems


class NoSelfSendMixin:
    """A torch pipeline stage whose set-up messages skip its own rank: V placement (ZBV, DualPipeV) puts stages i and
    i+1 on one rank, and torch's warm-up then sends to this very rank, which gloo refuses ("Pair is not connected";
    torch 2.11 does so for module-split stages too)."""

    def _get_init_p2p_neighbors_ops(self) -> list:
        me = dist.get_rank(self.group)
        return [op for op in super()._get_init_p2p_neighbors_ops() if _peer(op) != me]


def _peer(op: dist.P2POp) -> int:
    if getattr(op, "group_peer", None) is not None:
        return op.group_peer
    return dist.get_group_rank(op.group, op.peer) if op.group is not None else op.peer
