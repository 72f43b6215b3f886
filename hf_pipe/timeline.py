"""A measured schedule timeline: what every stage computed, when, for a few steps.

Stages record their forward (F), backward (B, or I and W on zero-bubble schedules) per microbatch; the records of
all ranks are gathered and written as a Chrome trace (Perfetto, chrome://tracing) and a PNG picture with one row
per stage, coloured by microbatch. The measured bubble — the share of each rank's step spent waiting — goes to the
logs next to the bubble model's prediction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from .estimate import bubble_fraction
from .launch import computing, note_message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    step: int
    rank: int
    stage: int
    kind: str  # F, B (full backward), I (input gradients), W (weight gradients)
    microbatch: int
    start: float  # seconds, wall clock (comparable across the ranks of one machine)
    end: float


class Timeline:
    """Records stage actions while armed; `arm(n)` records the next `n` training steps."""

    def __init__(self, rank: int):
        self.rank = rank
        self.actions: list[Action] = []
        self.recording = False
        self._steps_left = 0
        self._step = 0

    def arm(self, steps: int) -> None:
        self._steps_left = steps

    @property
    def armed(self) -> bool:
        return self._steps_left > 0

    def begin_step(self) -> None:
        self._step += 1
        self.recording = self._steps_left > 0

    def end_step(self) -> bool:
        """True when the last armed step has just ended (time to gather and write)."""
        if not self.recording:
            return False
        self.recording = False
        self._steps_left -= 1
        return self._steps_left == 0

    def record(self, stage: int, kind: str, microbatch: int, start: float, end: float) -> None:
        self.actions.append(Action(self._step, self.rank, stage, kind, microbatch, start, end))

    def gather(self, group: dist.ProcessGroup | None = None) -> list[Action]:
        """Every rank's actions, on every rank (collective)."""
        per_rank: list[list[Action]] = [[] for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(per_rank, self.actions, group=group)
        self.actions = []
        return [a for actions in per_rank for a in actions]


class TimedStageMixin:
    """Times each compute action of a torch pipeline stage into a `Timeline` while it records."""

    def __init__(self, *args: Any, timeline: Timeline | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeline = timeline

    def _timed(self, kind: str, microbatch: int, fn, *args, **kwargs):
        with computing():  # compute is progress, not waiting (the watchdog in `launch.py` counts only waits)
            if self.timeline is None or not self.timeline.recording:
                return fn(*args, **kwargs)
            start = time.time()
            out = fn(*args, **kwargs)
            self.timeline.record(self.stage_index, kind, microbatch, start, time.time())
            return out

    # What a schedule step waits for, for the watchdog's message: the receives this stage posts.
    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        ops = super().get_fwd_recv_ops(fwd_chunk_id)
        if ops:
            note_message(self._message("activations", fwd_chunk_id, self.stage_index - 1, ops))
        return ops

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        if ops:
            note_message(self._message("gradients", bwd_chunk_id, self.stage_index + 1, ops))
        return ops

    def _message(self, what: str, microbatch: int, peer_stage: int, ops: list) -> str:
        peer = getattr(ops[0], "peer", None)
        return f"stage {self.stage_index} receiving microbatch {microbatch}'s {what} from stage {peer_stage}" + (
            f" on rank {peer}" if peer is not None else ""
        )

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any):
        return self._timed("F", fwd_chunk_id, super().forward_one_chunk, fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        kind = "B" if full_backward else "I"
        return self._timed(
            kind, bwd_chunk_id, super().backward_one_chunk, bwd_chunk_id, loss, full_backward, last_backward
        )

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False):
        return self._timed("W", bwd_chunk_id, super().backward_weight_one_chunk, bwd_chunk_id, last_backward)


class TimedPipelineStage(TimedStageMixin, PipelineStage):
    """torch's `PipelineStage` (module-split stages), timed."""


def measured_bubble(actions: list[Action]) -> float:
    """Mean over steps and ranks of the share of the step a rank spent not computing."""
    fractions = []
    for step in sorted({a.step for a in actions}):
        in_step = [a for a in actions if a.step == step]
        window = max(a.end for a in in_step) - min(a.start for a in in_step)
        for rank in sorted({a.rank for a in in_step}):
            busy = sum(a.end - a.start for a in in_step if a.rank == rank)
            fractions.append(1.0 - busy / window if window > 0 else 0.0)
    return sum(fractions) / len(fractions) if fractions else 0.0


def write_chrome_trace(actions: list[Action], path: str) -> None:
    """Chrome trace events: one process per rank, one thread (row) per stage."""
    origin = min(a.start for a in actions)
    events: list[dict[str, Any]] = []
    for stage in sorted({a.stage for a in actions}):
        rank = next(a.rank for a in actions if a.stage == stage)
        events.append(
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": stage, "args": {"name": f"stage {stage}"}}
        )
    for rank in sorted({a.rank for a in actions}):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
    for a in actions:
        events.append(
            {
                "name": f"{a.kind}{a.microbatch}",
                "cat": a.kind,
                "ph": "X",
                "ts": (a.start - origin) * 1e6,
                "dur": (a.end - a.start) * 1e6,
                "pid": a.rank,
                "tid": a.stage,
                "args": {"step": a.step, "microbatch": a.microbatch},
            }
        )
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


def draw_timeline(actions: list[Action], path: str, title: str = "") -> None:
    """PNG: one row per stage, bars coloured by microbatch; backward darker, weight-gradient hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = min(a.start for a in actions)
    stages = sorted({a.stage for a in actions})
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(stages) + 1.2))
    for a in actions:
        y = stages.index(a.stage)
        shade = colours((2 * a.microbatch) % 20 + (1 if a.kind != "F" else 0))
        ax.broken_barh(
            [((a.start - origin) * 1e3, (a.end - a.start) * 1e3)],
            (y - 0.4, 0.8),
            facecolors=shade,
            edgecolors="black",
            linewidth=0.3,
            hatch="//" if a.kind == "W" else None,
        )
        width_ms = (a.end - a.start) * 1e3
        if width_ms > 0:
            ax.text((a.start - origin) * 1e3 + width_ms / 2, y, f"{a.kind}{a.microbatch}", ha="center", va="center",
                    fontsize=6, clip_on=True)  # fmt: skip
    ax.set_yticks(range(len(stages)))
    ax.set_yticklabels([f"stage {s} (rank {next(a.rank for a in actions if a.stage == s)})" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_timeline(actions: list[Action], out_dir: str, title: str) -> dict[str, Any]:
    """Chrome trace, PNG and a summary JSON into `out_dir`; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    write_chrome_trace(actions, os.path.join(out_dir, "pipeline_trace.json"))
    draw_timeline(actions, os.path.join(out_dir, "pipeline_timeline.png"), title)
    summary = {"measured_bubble_fraction": measured_bubble(actions), "actions": [asdict(a) for a in actions]}
    with open(os.path.join(out_dir, "pipeline_actions.json"), "w") as f:
        json.dump(summary, f)
    return summary


def report_timeline(engine: Any, out_dir: str, write: bool) -> dict[str, float]:
    """The bubble of `engine`'s recorded steps, measured and as the bubble model predicts it, for the training log;
    with `write` (one rank), the timeline is written to `out_dir` too."""
    predicted = bubble_fraction(engine.schedule_name, engine.pp_size, engine.stages_per_rank, engine.microbatches)
    measured = measured_bubble(engine.recorded)
    if write:
        title = (
            f"{engine.schedule_name}, {engine.num_stages} stages on {engine.pp_size} ranks, "
            f"{engine.microbatches} microbatches: bubble {100 * measured:.1f}% measured"
        )
        write_timeline(engine.recorded, out_dir, title)
        logger.warning(
            "pipeline timeline written to %s: bubble %.1f%% measured, %.1f%% predicted by the bubble model",
            out_dir, 100 * measured, 100 * predicted,
        )  # fmt: skip
    return {"pipeline_bubble_measured": measured, "pipeline_bubble_predicted": predicted}
