"""Evaluation and prediction under the pipeline: what the last stage computed, on every rank.

Trainer's evaluation loop runs as it is; what differs is where the numbers are. `prediction_step` is Trainer's, its
batch the first stage's (`batch_sync.py`), its loss the last stage's: a batch without the head's labels (SQuAD-style
evaluation features, new data to predict) runs forward only, with no loss and labels None, as under Trainer. The
outputs exist only on the rank holding the last stage: `broadcast_from_last_stage` sends them to the pipeline's
other ranks, so `compute_metrics` runs (and agrees) everywhere. Every rank of a pipeline already holds the whole batch's predictions, so Trainer's
gather over processes would repeat them: `gather_for_metrics` gathers over the data-parallel replicas only, and cuts
the last batch's padding back to the dataset's remainder as accelerate does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import recursively_apply

from .batch_sync import one_batch_per_pipeline
from .errors import raise_if_any


def prediction_step(
    trainer: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None
) -> tuple[torch.Tensor | None, Any, Any]:
    """Trainer's `prediction_step` for `trainer` (a PipeTrainer): (loss, predictions, labels) on every rank."""
    engine = trainer.engine
    [synced] = one_batch_per_pipeline(engine, [trainer._prepare_inputs(inputs)])
    # Trainer's evaluation loop reads this same dict again (`include_for_metrics=["inputs"]`): make it the batch
    if synced is not inputs and isinstance(inputs, dict):
        inputs.clear()
        inputs.update(synced)
    inputs = synced
    raise_if_any(engine.batch_problems(inputs, training=False))
    # Trainer's `has_labels`: every column of `label_names` (the head's label columns, `label_names_problems`)
    if not engine.has_labels(inputs):
        # Trainer runs the model without labels: no loss, the outputs as predictions, labels None
        if prediction_loss_only:
            return None, None, None
        with _no_grad(trainer):
            _, logits = engine.eval_step(inputs)
        return None, _predictions(engine, broadcast_from_last_stage(engine, logits), ignore_keys), None
    # as Trainer gathers them: the label_names columns, one tensor or a tuple (question answering's spans)
    labels = tuple(inputs.get(name) for name in trainer.label_names)
    labels = None if not labels or any(x is None for x in labels) else labels[0] if len(labels) == 1 else labels
    num_items_in_batch = trainer._get_num_items_in_batch([inputs], trainer.args.device)
    normalizer = trainer._loss_normalizer(inputs, num_items_in_batch, False)
    with _no_grad(trainer):
        loss, logits = engine.eval_step(inputs, num_items=normalizer, num_items_in_batch=num_items_in_batch)
    trainer._record_pipeline_metrics("eval")
    if prediction_loss_only:
        return loss, None, None
    return loss, _predictions(engine, broadcast_from_last_stage(engine, logits), ignore_keys), labels


def _no_grad(trainer: Any) -> contextlib.ExitStack:
    """No gradients, in Trainer's loss context and autocast, as Trainer's prediction_step runs the model."""
    stack = contextlib.ExitStack()
    for context in (torch.no_grad(), trainer.compute_loss_context_manager(), trainer.accelerator.autocast()):
        stack.enter_context(context)
    return stack


def _predictions(engine: Any, logits: Any, ignore_keys: list[str] | None) -> Any:
    """The model's outputs (besides the loss) but `ignore_keys`, one tensor or a tuple, as Trainer's
    `prediction_step` makes them. The pipeline's outputs hold no cache, so the model's
    `keys_to_ignore_at_inference` (Trainer's default) leave them as they are."""
    outputs = engine.loss.outputs(logits)
    kept = tuple(v for k, v in outputs.items() if k not in (ignore_keys or ()))
    return kept[0] if len(kept) == 1 else kept


def broadcast_from_last_stage(engine: Any, logits: Any) -> Any:
    """The last stage's logits (a tensor, or a tuple: question answering's (start, end) pair, an encoder-decoder's
    logits and encoder output) on every rank of `engine`'s pipeline; `logits` is None on the other ranks."""
    src = engine.stage_to_rank[engine.num_stages - 1]
    parts = None if logits is None else list(logits) if isinstance(logits, tuple) else [logits]
    meta = [None if parts is None else ([(tuple(t.shape), t.dtype) for t in parts], isinstance(logits, tuple))]
    dist.broadcast_object_list(meta, group_src=src, group=engine.group)
    shapes, is_tuple = meta[0]
    if parts is None:
        parts = [torch.empty(shape, dtype=dtype, device=engine.device) for shape, dtype in shapes]
    parts = [t.contiguous() for t in parts]  # gloo sends a tensor's storage: a strided view would arrive scrambled
    for tensor in parts:
        dist.broadcast(tensor, group_src=src, group=engine.group)
    return tuple(parts) if is_tuple else parts[0]


def gather_for_metrics(trainer: Any, data: Any, cut_last_batch: bool = True) -> Any:
    """accelerate's `gather_for_metrics` for one pipeline: gathered over the replicas only, and the same cut of the
    last batch.

    Trainer repeats each batch's loss by the dataloader's batch size; accelerate trims the padding of the last batch
    back to the dataset's remainder, and so must we, or a short last batch would weigh as a full one. Without
    `cut_last_batch`, accelerate's plain `gather` (Seq2SeqTrainer's).
    """
    data_parallel = trainer.data_parallel
    if data_parallel is not None and data_parallel.size > 1:
        data = recursively_apply(lambda tensor: _gather_over_replicas(data_parallel, tensor), data)
    state = trainer.accelerator.gradient_state
    if cut_last_batch and state.end_of_dataloader and state.remainder > 0:
        return recursively_apply(lambda t: t[: state.remainder], data)
    return data


def _gather_over_replicas(data_parallel: Any, tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(data_parallel.size)]
    dist.all_gather(parts, tensor.contiguous(), group=data_parallel.group)
    return torch.cat(parts, dim=0)
