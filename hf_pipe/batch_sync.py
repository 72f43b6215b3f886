"""One batch per pipeline: the first stage's rank collates, the other ranks of its pipeline receive that batch.

Trainer shards batches over all processes; the stages of one pipeline must all see the same batches, and only the
data-parallel replicas get different ones: `prepare_unsharded` is accelerate's dataloader preparation sharded over
the replicas, `one_batch_per_pipeline` sends the first stage's batches to its pipeline.

Every rank of a pipeline iterates the same dataloader, but a collator or sampler that draws random numbers
(`DataCollatorForLanguageModeling`'s masks, whole-word masking, random crops) draws them from each rank's global
RNG, which each rank's dropout has advanced differently: from the first step with dropout, the rank that embeds a
batch and the rank that scores it would hold different maskings of it. So the batch of the rank holding stage 0 is
the batch, sent to its pipeline peers once per step (token ids and masks: small next to the activations); the
others' own collation is discarded. Data-parallel replicas keep their own batches, each sent within its pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from accelerate.data_loader import prepare_data_loader

from .launch import waiting

# dtypes gloo cannot send, and what they travel as
_WIRE = {torch.bool: torch.uint8}


def broadcast_batches(
    batches: list[Mapping[str, Any]], *, src: int, group: dist.ProcessGroup, device: torch.device
) -> list[dict[str, Any]]:
    """Rank `src`'s `batches` (its pipeline-group rank) on every rank of `group`; collective.

    Tensors go by `broadcast` on `device`; other values (and the layout) in one object broadcast.
    """
    me = dist.get_rank(group)
    layout: list[Any] = [None]
    if me == src:
        layout[0] = [
            {k: (("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("value", v)) for k, v in b.items()}
            for b in batches
        ]
    dist.broadcast_object_list(layout, group_src=src, group=group, device=device)
    out = []
    for i, spec in enumerate(layout[0]):
        batch = {}
        for key, (kind, *info) in spec.items():
            if kind == "value":
                batch[key] = info[0]
                continue
            shape, dtype = info
            wire = _WIRE.get(dtype, dtype)
            if me == src:
                tensor = batches[i][key].to(device=device, dtype=wire).contiguous()
            else:
                tensor = torch.empty(shape, dtype=wire, device=device)
            dist.broadcast(tensor, group_src=src, group=group)
            batch[key] = tensor.to(dtype)
        out.append(batch)
    return out


def one_batch_per_pipeline(engine: Any, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batches of `engine`'s pipeline's first rank, on all of its ranks (collective over the pipeline); with
    tensor parallelism, those of TP rank 0's pipeline on every TP rank (the TP ranks of a stage compute one batch)."""
    if engine.pp_size > 1:
        with waiting("the batch broadcast from the first stage's rank", f"rank {engine.global_rank(0)} (stage 0)"):
            batches = broadcast_batches(batches, src=0, group=engine.group, device=engine.device)
    tp = getattr(engine, "tp", None)
    if tp is not None:
        with waiting("the batch broadcast from TP rank 0", "the tensor-parallel ranks of this stage"):
            batches = broadcast_batches(batches, src=0, group=tp.group, device=engine.device)
    return batches


def prepare_unsharded(accelerator: Any, dataloader: Any, num_processes: int, process_index: int) -> Any:
    """`accelerator.prepare(dataloader)` (seedable sampler, RNG sync, device placement) sharded over
    `num_processes` data-parallel replicas instead of every process."""
    prepared = prepare_data_loader(
        dataloader,
        accelerator.device,
        num_processes=num_processes,
        process_index=process_index,
        split_batches=accelerator.split_batches,
        put_on_device=accelerator.device_placement,
        rng_types=accelerator.rng_types.copy(),
        dispatch_batches=False,
        even_batches=accelerator.even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler,
        data_seed=accelerator.dataloader_config.data_seed,
        non_blocking=accelerator.non_blocking,
        use_stateful_dataloader=accelerator.use_stateful_dataloader,
    )
    accelerator._dataloaders.append(prepared)
    return prepared
