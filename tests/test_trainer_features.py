"""Trainer features through PipeTrainer, each against plain Trainer on one process: bf16 autocast and gradient
checkpointing per stage, periodic evaluation with load_best_model_at_end, callbacks."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from tests.test_trainer_equivalence import compare


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_gradient_checkpointing(tmp_path):
    # also with a stage boundary inside block 1: its halves are checkpointed one by one
    pipelines = [{"pipeline_schedule": "1f1b"}, {"pipeline_schedule": "1f1b", "pipeline_split": "0,1.5"}]
    print(compare("llama", tmp_path, 2, pipelines, gradient_checkpointing=True))


@pytest.mark.parametrize("frontend", ["module", "trace"])
def test_bf16(tmp_path, frontend):
    """bf16 autocast in the same regions as Trainer, on module-split and on traced stages (traced in fp32: the
    autocast applies when the stages run).

    A bf16 matmul over a 2-row microbatch rounds differently from one over the whole 8-row batch (the same happens
    in one process: 4 microbatches vs 1 give gradients 2e-3 apart at the largest element), so the bound is bf16's.
    SGD, not AdamW: AdamW's first steps move every weight by ±lr whatever the size of its gradient, so a near-zero
    gradient whose sign rounding flips moves a weight by 2·lr — true of any two bf16 runs, pipelined or not.
    """
    print(
        compare(
            "llama", tmp_path, 2, [{"pipeline_schedule": "1f1b", "pipeline_frontend": frontend}], loss_tol=1e-3,
            weight_tol=1e-3, bf16=True, gradient_checkpointing=frontend == "module", optim="sgd", learning_rate=0.3,
        )
    )  # fmt: skip


def test_periodic_eval_and_best_model(tmp_path):
    worst = compare(
        "gpt2",
        tmp_path,
        2,
        [{"pipeline_schedule": "interleaved1f1b"}],
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        save_total_limit=1,
    )
    print(worst)
