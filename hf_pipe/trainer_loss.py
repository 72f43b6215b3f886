"""Trainer's loss semantics, kept under the pipeline: the count Trainer divides a batch's loss by, the label tokens
it counts as `num_items_in_batch`, and the check that no `compute_loss` override is silently bypassed.

The engine's loss (`loss.py`) divides each microbatch's sum by one number for the whole step; these functions say
what Trainer would have divided by, for the `PipeTrainer` that asks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer

from .families import CAUSAL_LM


def label_items(trainer: Any, batch_samples: list[dict[str, Any]]) -> torch.Tensor | None:
    """Trainer's `num_items_in_batch` for one pipeline: the step's label tokens (shifted as the loss shifts them),
    summed over the replicas under `average_tokens_across_devices` as Trainer sums them over processes; None where
    Trainer passes none."""
    if not batch_samples or "labels" not in batch_samples[0]:
        return None
    if not (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None):
        return None
    labels = [
        b["shift_labels"]
        if "shift_labels" in b
        else b["labels"][..., 1:]
        if trainer._loss_shifts_labels
        else b["labels"]
        for b in batch_samples
    ]
    count = torch.tensor(sum(int(label.ne(-100).sum()) for label in labels), device=trainer.engine.device)
    if trainer.args.average_tokens_across_devices and trainer._dp_size > 1:
        dist.all_reduce(count, group=trainer.data_parallel.group)  # over the replicas, as Trainer over processes
    return count


def trainer_normalizer(trainer: Any, inputs: dict[str, Any], num_items_in_batch: Any, training: bool) -> float:
    """What Trainer would divide this batch's loss sum by, so the loss and gradients match Trainer's."""
    # Causal-LM heads divide by `num_items_in_batch` (Trainer's count over the whole accumulated step; note that
    # Trainer counts unshifted labels when `config.loss_type` is unset, and we follow it); the other heads of
    # our families take a per-batch mean and ignore it.
    # With `average_tokens_across_devices`, Trainer scales such a loss by the process count to undo DDP's
    # averaging (for every head, in training and evaluation alike); the replicas play the processes' part here.
    accepts = trainer.model_accepts_loss_kwargs
    dp_scale = (
        trainer._dp_size
        if trainer.args.average_tokens_across_devices and accepts and num_items_in_batch is not None
        else 1
    )
    if num_items_in_batch is not None and accepts and trainer.engine.plan.task == CAUSAL_LM:
        return float(num_items_in_batch) / dp_scale
    normalizer = float(trainer.engine.loss.count(inputs)) / dp_scale
    if not training:
        return normalizer
    scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)  # transformers >= 5.19
    if scaled_for_ga is None:
        scaled_for_ga = accepts and num_items_in_batch is not None
    if not scaled_for_ga:
        normalizer *= trainer.current_gradient_accumulation_steps
    return normalizer


def aux_weight(trainer: Any, num_items_in_batch: Any) -> tuple[float, bool]:
    """How Trainer weighs an MoE model's aux loss in one microbatch's loss, the microbatches being its gradient
    accumulation steps: (weight, divided by the step's microbatch count too). The model adds `coef · aux` to a loss
    normalised by `num_items_in_batch`, which Trainer then scales by the processes under
    `average_tokens_across_devices` (the replicas here) and divides by the accumulation steps only when it is not
    already normalised for them."""
    coef = trainer.engine.loss.router.coef
    accepts = trainer.model_accepts_loss_kwargs
    if trainer.args.average_tokens_across_devices and accepts and num_items_in_batch is not None:
        coef *= trainer._dp_size
    scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled_for_ga is None:
        scaled_for_ga = (accepts and num_items_in_batch is not None) or trainer.compute_loss_func is not None
    if scaled_for_ga:
        return coef, False
    return coef / trainer.current_gradient_accumulation_steps, True


def overrides(cls: type, base: type, name: str) -> bool:
    """Whether `cls` defines `name` below `base` (a subclass's own method, not `base`'s or Trainer's)."""
    return getattr(cls, name) is not getattr(base, name)


def compute_loss_problems(cls: type, base: type) -> list[str]:
    """A `compute_loss` override `base` (PipeTrainer) would silently bypass: it never runs a whole-model forward."""
    owner = next((k for k in cls.__mro__ if k not in (base, Trainer, object) and "compute_loss" in vars(k)), None)
    if owner is None or overrides(cls, base, "compute_microbatch_loss"):
        return []
    return [
        f"{cls.__name__} overrides compute_loss (in {owner.__module__}.{owner.__name__}), which PipeTrainer never "
        "calls: the pipeline computes the loss on its last stage, microbatch by microbatch, so this loss would be "
        "silently replaced by the model's. Move it to compute_microbatch_loss(self, outputs, labels, inputs, "
        "num_items_in_batch) (see PipeTrainer.compute_microbatch_loss)."
    ]
