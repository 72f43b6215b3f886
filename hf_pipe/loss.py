"""The last stage's loss, with HF semantics, normalised by the label count of the whole batch.

torch's schedules default to `scale_grads=True`: a mean of per-microbatch means. With uneven padding that is not the
token mean HF computes over the full batch. Here each microbatch returns `sum of its losses / N`, where N counts the
loss terms of the *whole* batch (or of the whole accumulated step, like Trainer's `num_items_in_batch`), and the
schedule runs with `scale_grads=False`: the microbatch losses then add up to exactly the full-batch loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .families import CAUSAL_LM, MASKED_LM, SEQ_CLS

IGNORE_INDEX = -100


def seq_cls_problem_type(config: Any, labels: torch.Tensor) -> str:
    """HF's rule for sequence classification (BertForSequenceClassification and friends)."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


class PipelineLoss:
    """`loss_fn` for the last stage: `(logits, labels) -> sum of loss terms / normalizer`.

    Set `normalizer` (with `count`) once per step before the schedule runs.
    """

    def __init__(self, task: str, config: Any):
        if task not in (CAUSAL_LM, MASKED_LM, SEQ_CLS):
            raise ValueError(f"no loss for task {task!r}")
        self.task = task
        self.config = config
        self.normalizer: float = 1.0

    def count(self, labels: torch.Tensor) -> int:
        """Number of loss terms in `labels` (a whole batch): what HF's mean divides by."""
        if self.task == CAUSAL_LM:
            return int((labels[..., 1:] != IGNORE_INDEX).sum())
        if self.task == MASKED_LM:
            return int((labels != IGNORE_INDEX).sum())
        problem = seq_cls_problem_type(self.config, labels)
        # HF records the problem type it inferred on the config; do the same so checkpoints agree.
        self.config.problem_type = problem
        if problem == "single_label_classification":
            return int((labels != IGNORE_INDEX).sum())
        return labels.numel()

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.sum(logits, labels) / self.normalizer

    def sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the loss terms of one microbatch."""
        if self.task == CAUSAL_LM:
            # ForCausalLMLoss: upcast, shift by padding the labels, ignore -100.
            labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            return F.cross_entropy(
                logits.float().flatten(0, -2), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        if self.task == MASKED_LM:
            return F.cross_entropy(
                logits.float().flatten(0, -2), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        problem = seq_cls_problem_type(self.config, labels)
        if problem == "regression":
            if self.config.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype), reduction="sum")
            return F.mse_loss(logits, labels.to(logits.dtype), reduction="sum")
        if problem == "single_label_classification":
            return F.cross_entropy(
                logits.view(-1, self.config.num_labels), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum")
