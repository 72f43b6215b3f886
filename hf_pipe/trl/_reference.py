"""The reference model of DPO and KTO under the pipeline, beyond the per-step pass: the skeleton the TRL trainer's
`__init__` builds instead of a second whole model, the whole-model key of the precomputed cache, the precompute pass
itself (reference log-probabilities of the whole dataset, gathered to every rank) and TR-DPO's stage-by-stage
reference update.

A precomputed cache is keyed as the TRL trainer keys it (the dataset's fingerprint and a hash of the reference
model) so that a second run finds it; here the hash covers the whole model although each rank holds only its stages:
every rank digests the tensors it holds and the digests are gathered over the pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from trl.trainer.callbacks import SyncRefModelCallback

from ..launch import every_rank, waiting
from ..loading import skeleton
from ..weights import Checkpoint


@contextlib.contextmanager
def reference_init(trainer: Any, args: Any, trl_module: Any = None) -> Iterator[None]:
    """While DPOTrainer's (or `trl_module`'s trainer's, e.g. `trl.trainer.kto_trainer`) `__init__` runs: its whole
    reference model (`ref_model=None`, loaded from the policy's checkpoint) built as a skeleton on the meta device
    instead, which the trainer then reads stage by stage; and its hash of the reference model (the precomputed cache's
    key) taken over the whole pipeline."""
    import trl.trainer.dpo_trainer

    dpo_module = trl_module or trl.trainer.dpo_trainer
    originals = dpo_module.create_model_from_path, getattr(dpo_module, "hash_module", None)

    def reference_skeleton(path: str, **kwargs: Any) -> Any:
        model = skeleton(path, kwargs)
        model._pipe_weights = Checkpoint(path, seed=args.seed, **kwargs)
        model._is_accelerate_prepared = True  # nothing to place: the stages are read onto their device
        return model

    dpo_module.create_model_from_path = reference_skeleton
    if originals[1] is not None:  # a trainer that caches reference log-probabilities (GRPO's has no such cache)
        dpo_module.hash_module = lambda module: whole_model_hash(module, trainer.engine)
    try:
        yield
    finally:
        dpo_module.create_model_from_path = originals[0]
        if originals[1] is not None:
            dpo_module.hash_module = originals[1]


def whole_model_hash(module: torch.nn.Module, engine: Any) -> str:
    """A hash of every tensor of `module`'s state dict, as `trl.trainer.utils.hash_module` takes over a whole model,
    where each rank of the pipeline holds only its stages' tensors (the others on meta): each rank digests the
    tensors it holds, the digests are gathered over the pipeline and hashed in name order. Collective over the
    pipeline; the same on every rank (a given reference model, whole on every rank, gives the same value)."""
    digests: dict[str, str] = {}
    for name, tensor in module.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if tensor.device.type == "meta":
            continue
        tensor = tensor.detach().cpu()
        digest = hashlib.sha256(str(tensor.dtype).encode())
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        digest.update(tensor.numpy().tobytes())
        digests[name] = digest.hexdigest()
    gathered: list[Any] = [None] * engine.pp_size
    with waiting("the gather of the model's hash", engine.pipeline_ranks):
        dist.all_gather_object(gathered, digests, group=engine.group)
    whole = hashlib.sha256()
    merged = {name: digest for part in gathered for name, digest in part.items()}
    for name in sorted(merged):
        whole.update(f"{name}:{merged[name]}".encode())
    return whole.hexdigest()


def precompute(
    trainer: Any,
    dataset: Any,
    name: str,
    batch_size: int,
    columns_of: Callable[[dict[str, Any]], dict[str, torch.Tensor] | None],
    key: tuple = (),
) -> Any:
    """A TRL trainer's `_precompute_ref_logps` over the pipeline: `dataset` with the reference columns `columns_of`
    gives per batch (DPOTrainer's `ref_chosen_logps` / `ref_rejected_logps`, KTOTrainer's `ref_logps` and
    `ref_KL_logps`), the same on every rank, from the trainer's cache file when one exists (keyed as the trainer keys
    it: the dataset's fingerprint, the whole reference model's hash, then `key`, e.g. KTOTrainer's `calculate_KL`),
    else from one forward-only pass over the dataset (`reference_columns`)."""
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset, IterableDataset, concatenate_datasets

    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
            "Dataset or set `precompute_ref_log_probs=False`."
        )
    from datasets.fingerprint import Hasher

    fingerprint = [Hasher.hash((dataset._fingerprint, trainer._precompute_model_hash, *key))]
    broadcast_object_list(fingerprint, from_process=0)
    fingerprint = fingerprint[0]
    # a dataset held in memory has no cache directory the ranks share (each process has its own temporary one)
    cache_file = dataset._get_cache_file_path(fingerprint) if dataset.cache_files else None
    if cache_file is not None and os.path.exists(cache_file):
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)
    values = reference_columns(trainer, dataset, batch_size, columns_of)

    def add_ref_logps(batch: Any, indices: list[int]) -> dict[str, torch.Tensor]:
        return {column: per_row[indices] for column, per_row in values.items()}

    columns = dict(with_indices=True, batched=True, remove_columns=dataset.column_names, new_fingerprint=fingerprint)
    if cache_file is None:  # every rank adds the same columns
        return concatenate_datasets([dataset, dataset.map(add_ref_logps, keep_in_memory=True, **columns)], axis=1)
    if trainer.accelerator.is_main_process:
        dataset.map(
            add_ref_logps, cache_file_name=cache_file, desc=f"Caching reference log probs for {name}", **columns
        )
    with waiting("the cache file of the reference log-probabilities", every_rank()):
        trainer.accelerator.wait_for_everyone()
    return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)


def reference_columns(
    trainer: Any,
    dataset: Any,
    batch_size: int,
    columns_of: Callable[[dict[str, Any]], dict[str, torch.Tensor] | None],
) -> dict[str, torch.Tensor]:
    """Every row's reference values, per column, on every rank: the dataset's batches (the trainer's collator,
    unshuffled) shared round-robin over the pipeline replicas, `columns_of` running each (forward-only passes through
    the reference, collective over the pipeline) and giving its columns in the collator's row order on the last
    stage's rank (None elsewhere), then gathered from those ranks to every rank."""
    from torch.utils.data import DataLoader

    args = trainer.args
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False,
        num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
    )  # fmt: skip
    dp, replica, total = trainer._dp_size, trainer._dp_rank, len(loader)
    mine: dict[int, dict[str, torch.Tensor]] = {}
    first = None
    for index, inputs in enumerate(loader):
        first = inputs if first is None else first
        if index % dp == replica:
            values = columns_of(inputs)
            if values is not None:  # the last stage's rank
                mine[index] = {column: per_row.cpu() for column, per_row in values.items()}
    # replicas meet at every forward (DDP's buffers, padded shapes): one with fewer batches repeats its first one
    for _ in range(math.ceil(total / dp) - len(range(replica, total, dp))):
        columns_of(first)
    gathered: list[Any] = [None] * dist.get_world_size()
    with waiting("the gather of the reference log-probabilities", every_rank()):
        dist.all_gather_object(gathered, mine)
    per_batch = {index: values for part in gathered for index, values in part.items()}
    return {column: torch.cat([per_batch[index][column] for index in range(total)]) for column in per_batch[0]}


class SyncReferenceStages(SyncRefModelCallback):
    """TR-DPO's reference update (`trl.trainer.callbacks.SyncRefModelCallback`) at its cadence and with its alpha,
    stage by stage: each rank mixes its reference stages into its policy stages' values, the same split, so no
    rank needs another's weights."""

    def __init__(self, trainer: Any):
        super().__init__(ref_model=None, accelerator=None)
        self.trainer = trainer

    @classmethod
    def install(cls, trainer: Any) -> None:
        """In place of TRL's callback, which mixes a whole reference model: with `sync_ref_model`, each rank mixes
        its own stages."""
        if trainer.args.sync_ref_model:
            trainer.callback_handler.remove_callback(SyncRefModelCallback)
            trainer.add_callback(cls(trainer))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.ref_model_sync_steps == 0:
            reference, policy = self.trainer._reference.modules, self.trainer.engine.modules
            for ref_stage, policy_stage in zip(reference, policy, strict=True):
                self._sync_target_model(policy_stage, ref_stage, args.ref_model_mixup_alpha)
