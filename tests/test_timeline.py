"""The measured schedule timeline: every stage's actions of the recorded steps, as a Chrome trace and a PNG."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import tiny_model
from tests.test_trainer_equivalence import _common_args


def _train_with_trace(output_dir: str, schedule: str) -> list[dict]:
    from hf_pipe import PipeTrainer, PipeTrainingArguments

    args = PipeTrainingArguments(
        **_common_args(output_dir),
        pipeline_schedule=schedule,
        pipeline_microbatches=4,
        pipeline_trace_dir=os.path.join(output_dir, "trace"),
        pipeline_trace_steps=2,
    )
    trainer = PipeTrainer(
        model=tiny_model("gpt2"), args=args, train_dataset=lm_dataset(48), data_collator=PadCollator("causal_lm")
    )
    trainer.train()
    return [e for e in trainer.state.log_history if "pipeline_bubble_measured" in e]


@pytest.mark.parametrize("schedule, backward_kinds", [("1f1b", {"B"}), ("zbvzerobubble", {"I", "W"})])
def test_timeline_records_every_action(tmp_path, schedule, backward_kinds):
    logged = run_distributed(_train_with_trace, 2, str(tmp_path), schedule, launcher_env=True)
    for rank_logs in logged:  # the bubble is logged on every rank, once
        assert len(rank_logs) == 1 and 0 <= rank_logs[0]["pipeline_bubble_measured"] < 1
        assert 0 < rank_logs[0]["pipeline_bubble_predicted"] < 1
    trace_dir = tmp_path / "trace"
    with open(trace_dir / "pipeline_actions.json") as f:
        actions = json.load(f)["actions"]
    stages = 2 if schedule == "1f1b" else 4
    assert sorted({a["step"] for a in actions}) == [2, 3]  # the steps after the first
    counts = Counter((a["step"], a["stage"], a["kind"]) for a in actions)
    for step in (2, 3):
        for stage in range(stages):
            assert counts[(step, stage, "F")] == 4
            for kind in backward_kinds:
                assert counts[(step, stage, kind)] == 4, (step, stage, kind, counts)
    assert all(a["end"] >= a["start"] for a in actions)
    with open(trace_dir / "pipeline_trace.json") as f:
        events = json.load(f)["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == len(actions)
    with open(trace_dir / "pipeline_timeline.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
