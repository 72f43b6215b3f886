"""Save and load a pipelined model as one ordinary HF checkpoint, each rank writing only its own stages.

The result is HF's sharded safetensors layout — `model-0000k-of-0000n.safetensors` (one shard per pipeline rank) plus
`model.safetensors.index.json`, `config.json` and the processing class — so `AutoModel*.from_pretrained(dir)` loads it
on one device, and no rank ever gathers the whole model. Tied weights are written once, under the name HF keeps.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def canonical_state_names(model: nn.Module) -> dict[int, str]:
    """id of every state-dict tensor -> the one name HF saves it under (a tied weight: its source, not its target)."""
    tied_targets = set(
        getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ()
    )
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    return {i: next((n for n in ns if n not in tied_targets), ns[0]) for i, ns in names.items()}


def _shard_name(rank: int, world: int) -> str:
    return f"model-{rank + 1:05d}-of-{world:05d}.safetensors"


def save_pipeline_model(
    local_state: Mapping[str, torch.Tensor],
    model: Any,
    output_dir: str,
    *,
    group: dist.ProcessGroup | None = None,
    processing_class: Any = None,
) -> None:
    """Write one HF checkpoint from every rank's `local_state` (canonical name -> tensor). Collective over `group`.

    Files are written to a staging folder first; rank 0 moves them into `output_dir` once every rank has written,
    the index last, so a reader never finds an index pointing at missing or stale shards.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    output_dir = os.path.abspath(output_dir)
    staging = output_dir.rstrip(os.sep) + ".hf_pipe-staging"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    sizes = {k: t.numel() * t.element_size() for k, t in local_state.items()}
    sizes_per_rank: list[dict[str, int]] = [{} for _ in range(world)]
    dist.all_gather_object(sizes_per_rank, sizes, group=group)  # also orders rank 0's makedirs before any write
    # a tied weight held by several ranks is written by the lowest one
    owner: dict[str, int] = {}
    for r, rank_sizes in enumerate(sizes_per_rank):
        for key in rank_sizes:
            owner.setdefault(key, r)
    mine = {k: t.detach().to("cpu").contiguous() for k, t in local_state.items() if owner[k] == rank}
    save_file(mine, os.path.join(staging, _shard_name(rank, world)), metadata={"format": "pt"})
    dist.barrier(group=group)
    if rank == 0:
        if hasattr(model, "config"):
            model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(staging)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
        total = sum(sizes_per_rank[r][k] for k, r in owner.items())
        weight_map = {k: _shard_name(r, world) for k, r in sorted(owner.items())}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(staging, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
        _publish(staging, output_dir)
    dist.barrier(group=group)


def _publish(staging: str, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    # stale weights of an earlier save (another shard count, or a single file) would be loaded instead
    for name in os.listdir(output_dir):
        if name == INDEX_NAME or (name.startswith("model") and name.endswith(".safetensors")):
            os.remove(os.path.join(output_dir, name))
    names = sorted(os.listdir(staging), key=lambda n: n == INDEX_NAME)  # the index last
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    os.rmdir(staging)


def read_tensors(checkpoint_dir: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of an HF safetensors checkpoint (sharded or single file), and only those."""
    index_path = os.path.join(checkpoint_dir, INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.isfile(os.path.join(checkpoint_dir, SINGLE_NAME)):
        with safe_open(os.path.join(checkpoint_dir, SINGLE_NAME), "pt") as f:
            weight_map = {k: SINGLE_NAME for k in f.keys()}
    else:
        raise FileNotFoundError(
            f"no {INDEX_NAME} or {SINGLE_NAME} in {checkpoint_dir}: not an HF safetensors checkpoint"
        )
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise KeyError(f"checkpoint {checkpoint_dir} lacks {len(missing)} tensor(s) this rank needs: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(weight_map[n], []).append(n)
    for file, keys in by_file.items():
        with safe_open(os.path.join(checkpoint_dir, file), "pt") as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    return out
