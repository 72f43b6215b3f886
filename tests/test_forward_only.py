"""The engine's forward-only pass (`PipelineEngine.forward`) against one process: the last stage's outputs, a
per-microbatch function of them (per-row log-probabilities, as a preference trainer's reference pass computes
them), and a second, frozen set of stages with the same split run through the same pipeline — on one and two stages
per rank, between training steps (the stages switch between forward-only and training schedules)."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from tests._models import padded_batch, rel_err, tiny_model

TOL = 1e-5
CASES = [("1f1b", 1, "module"), ("interleaved1f1b", 2, "module"), ("1f1b", 1, "trace")]


def row_logps(outputs, inputs) -> torch.Tensor:
    """Per row, the summed log-probability of its (shifted) label tokens."""
    targets = inputs["shift_labels"]
    mask = targets != -100
    logps = outputs.logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def _worker(name: str) -> list[dict]:
    from hf_pipe.engine import PipelineEngine
    from hf_pipe.weights import Resident

    out = []
    for schedule, stages_per_rank, frontend in CASES:
        engine = PipelineEngine(
            tiny_model(name), schedule=schedule, microbatches=4, stages_per_rank=stages_per_rank, frontend=frontend
        )
        batch = padded_batch(name, seq_len=12, seed=3)
        record = {"case": (schedule, stages_per_rank, frontend)}
        logits, _, _ = engine.forward(batch)
        record["logits"] = logits
        per_mb, mbs, _ = engine.forward(batch, on_last=row_logps)
        record["row_logps"] = torch.cat(per_mb) if per_mb is not None else None
        record["microbatches"] = len(mbs)
        # a training step between forward-only passes: the stages switch schedules and back
        record["loss"] = engine.train_step(padded_batch(name, seq_len=12, seed=4)).item()
        if frontend == "module":  # a frozen copy with other weights, cut with the engine's own split
            other = tiny_model(name, seed=1)
            frozen = engine.frontend.build(other, engine.plan, engine.stage_indices, engine.device, Resident())
            for p in (p for m in frozen.modules for p in m.parameters()):
                p.requires_grad_(False)
            per_mb, _, _ = engine.forward(batch, on_last=row_logps, stages=(frozen, frozen.modules))
            record["frozen_row_logps"] = torch.cat(per_mb) if per_mb is not None else None
        out.append(record)
    return out


def _reference(name: str, seed: int) -> dict:
    from hf_pipe.microbatch import shifted_labels

    model = tiny_model(name, seed=seed)
    batch = padded_batch(name, seq_len=12, seed=3)
    with torch.no_grad():
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        loss = model(**padded_batch(name, seq_len=12, seed=4)).loss.item()
    shifted = {"shift_labels": shifted_labels(batch["labels"])}
    return {"logits": outputs.logits, "row_logps": row_logps(outputs, shifted), "loss": loss}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_forward_only_pass_equals_one_process(name):
    ranks = run_distributed(_worker, 2, name)
    ref, other = _reference(name, 0), _reference(name, 1)
    for c, case in enumerate(CASES):
        holders = [r[c] for r in ranks if r[c]["logits"] is not None]
        assert len(holders) == 1, f"{case}: the outputs are on the last stage's rank only"
        last = holders[0]
        assert last["microbatches"] == 4
        assert rel_err(last["logits"], ref["logits"]) < TOL, case
        assert rel_err(last["row_logps"], ref["row_logps"]) < TOL, case
        assert abs(ranks[0][c]["loss"] - ref["loss"]) / ref["loss"] < TOL, case
        if "frozen_row_logps" in last:
            assert rel_err(last["frozen_row_logps"], other["row_logps"]) < TOL, case
