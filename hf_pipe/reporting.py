"""Numbers Trainer reports as if every process read its own batches, counted per pipeline instead: the ranks of one
pipeline share each batch, and only the data-parallel replicas read different ones. Sums Trainer takes over every
process (tokens, FLOPs, a user loss's metrics) are taken over the replicas only."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from transformers import modelcard
from transformers import trainer as hf_trainer

#: how the replicas pool a metric of `loss.reduce_metrics`: means as (total, count) sums, extremes as such
_REDUCE_OPS = {"mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def sum_over_replicas(value: torch.Tensor, data_parallel: Any, device: torch.device) -> torch.Tensor:
    """`value` summed over the data-parallel replicas (collective over them); itself without replicas."""
    if data_parallel is not None and data_parallel.size > 1:
        value = value.to(device)
        dist.all_reduce(value, group=data_parallel.group)
    return value


def pool_metrics(
    metrics: dict[str, tuple[str, float, float]], data_parallel: Any, device: torch.device
) -> dict[str, float]:
    """A step's user-loss metrics (`PipelineEngine.metrics`: (reduction, total, count) per name) over the replicas:
    means as total / count of the pooled sums, minima and maxima as such."""
    values = {}
    for how, op in _REDUCE_OPS.items():
        names = sorted(n for n, (reduction, *_) in metrics.items() if reduction == how)
        if not names:
            continue
        pooled = torch.tensor([metrics[n][1:] for n in names], dtype=torch.float64, device=device)
        if data_parallel is not None and data_parallel.size > 1:
            dist.all_reduce(pooled, op=op, group=data_parallel.group)
        values.update({n: total / count if count else 0.0 for n, (total, count) in zip(names, pooled.tolist())})
    return values


@contextlib.contextmanager
def eval_steps_per_pipeline(samples_per_step: int) -> Iterator[None]:
    """`{eval,test}_steps_per_second` from the steps the pipelines ran, `samples_per_step` samples each.

    Trainer's evaluate and predict count one step per `eval_batch_size × world_size` samples; they compute it in
    place, so the count is corrected where they pass it to `speed_metrics`.
    """
    speed_metrics = hf_trainer.speed_metrics

    def pipeline_speed_metrics(split, start_time, num_samples=None, num_steps=None, num_tokens=None):
        if num_samples is not None and num_steps is not None:
            num_steps = math.ceil(num_samples / samples_per_step)
        return speed_metrics(split, start_time, num_samples=num_samples, num_steps=num_steps, num_tokens=num_tokens)

    hf_trainer.speed_metrics = pipeline_speed_metrics
    try:
        yield
    finally:
        hf_trainer.speed_metrics = speed_metrics


@contextlib.contextmanager
def model_card_per_pipeline(replicas: int, pipeline: dict[str, Any]) -> Iterator[None]:
    """The model card's hyperparameters while Trainer writes it: `card_hyperparameters` over Trainer's own."""
    extract = modelcard.extract_hyperparameters_from_trainer
    modelcard.extract_hyperparameters_from_trainer = lambda trainer: card_hyperparameters(
        extract(trainer), trainer.args, replicas, pipeline
    )
    try:
        yield
    finally:
        modelcard.extract_hyperparameters_from_trainer = extract


def card_hyperparameters(
    hyperparameters: dict[str, Any], args: Any, replicas: int, pipeline: dict[str, Any]
) -> dict[str, Any]:
    """The batch sizes one step of all the pipelines consumed (one batch per replica, not per process), followed by
    the pipeline's shape. `num_devices` stays Trainer's, the launched world: every process trained.

    Example: 2 pipeline ranks × 2 replicas, batch 8, 2 accumulation steps: total_train_batch_size 32 (Trainer would
    say 64), total_eval_batch_size 16, num_devices 4, pipeline_parallel_size 2, data_parallel_size 2.
    """
    totals = {
        "total_train_batch_size": args.train_batch_size * args.gradient_accumulation_steps * replicas,
        "total_eval_batch_size": args.eval_batch_size * replicas,
    }
    card = {k: v for k, v in hyperparameters.items() if k not in totals}
    for key, total in totals.items():
        if total != hyperparameters[key.removeprefix("total_")]:  # Trainer's rule: only when it differs
            card[key] = total
    if replicas > 1:
        card["data_parallel_size"] = replicas
    return {**card, **pipeline}
