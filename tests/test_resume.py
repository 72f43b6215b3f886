"""Checkpoints during training and resume_from_checkpoint: a run stopped after k steps and resumed reaches the same
losses and final weights as an uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import tiny_model
from tests.test_trainer_equivalence import _common_args


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _run(output_dir: str, stop_at: int | None, resume: str | None, frontend: str = "module", path=None) -> dict:
    from hf_pipe import PipeTrainer, PipeTrainingArguments

    args = PipeTrainingArguments(
        **_common_args(output_dir, save_strategy="steps", save_steps=2, save_total_limit=2),
        pipeline_schedule="interleaved1f1b",
        pipeline_microbatches=4,
        pipeline_frontend=frontend,
    )
    trainer = PipeTrainer(
        model=path or tiny_model("gpt2"),
        args=args,
        train_dataset=lm_dataset(48, seed=0),
        data_collator=PadCollator("causal_lm"),
        callbacks=[_StopAt(stop_at)] if stop_at else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(os.path.join(output_dir, "final"))
    logs = [e for e in trainer.state.log_history if "loss" in e and "train_loss" not in e]
    return {"logs": logs, "files": sorted(os.listdir(output_dir))}


@pytest.mark.parametrize("frontend", ["module", "trace", "module-from-path"])
def test_stop_and_resume_matches_uninterrupted(tmp_path, frontend):
    """Also from a checkpoint path (each rank reads its stages; resuming reads them from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    path = None
    if frontend.endswith("from-path"):
        frontend, path = "module", str(tmp_path / "base")
        tiny_model("gpt2").save_pretrained(path)
    full = run_distributed(_run, 2, str(tmp_path / "full"), None, None, frontend, path, launcher_env=True)[0]
    stopped = run_distributed(_run, 2, str(tmp_path / "run"), 3, None, frontend, path, launcher_env=True)[0]
    assert [e["step"] for e in stopped["logs"]] == [1, 2, 3]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    expected = {"config.json", "model.safetensors.index.json", "scheduler.pt", "trainer_state.json"}
    expected |= {"optimizer.index.json", "optimizer-00001-of-00002.pt", "optimizer-00002-of-00002.pt"}
    expected |= {"rng_state_0.pth", "rng_state_1.pth"}
    assert expected <= set(os.listdir(checkpoint))
    assert torch.load(checkpoint / "scheduler.pt", weights_only=True)["last_epoch"] == 2
    resumed = run_distributed(
        _run, 2, str(tmp_path / "run"), None, str(checkpoint), frontend, path, launcher_env=True
    )[0]
    # the log history comes back from the checkpoint (steps 1-2), then the resumed steps follow
    assert [e["step"] for e in resumed["logs"]] == [1, 2, 3, 4, 5, 6]
    for mine, theirs in zip(resumed["logs"][2:], full["logs"][2:]):
        assert abs(mine["loss"] - theirs["loss"]) <= 1e-6 * abs(theirs["loss"]), (mine, theirs)
        assert abs(mine["grad_norm"] - theirs["grad_norm"]) <= 1e-6 * theirs["grad_norm"], (mine, theirs)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print("resume: worst final-weight difference", worst)
    assert worst <= 1e-6
    # save_total_limit=2 rotated the oldest checkpoints away
    assert [f for f in full["files"] if f.startswith("checkpoint-")] == ["checkpoint-4", "checkpoint-6"]
