"""Evaluation and prediction under the pipeline: what the last stage computed, on every rank.

Trainer's evaluation loop runs as it is; what differs is where the numbers are. The logits exist only on the rank
holding the last stage: `broadcast_from_last_stage` sends them to the pipeline's other ranks, so `compute_metrics`
runs (and agrees) everywhere. Every rank of a pipeline already holds the whole batch's predictions, so Trainer's
gather over processes would repeat them: `gather_for_metrics` gathers over the data-parallel replicas only, and cuts
the last batch's padding back to the dataset's remainder as accelerate does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import recursively_apply


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
