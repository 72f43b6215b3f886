"""Optimizer state keyed by parameter name, so a checkpoint resumes on any layout — and from or into plain Trainer.

torch's `optimizer.state_dict()` keys every parameter by its position in the param groups: a file written by one
pipeline rank only fits the optimizer of the same rank on the same layout (pipeline size, split, schedule, frontend).
Here each rank writes its state under the parameters' HF names (`model.layers.3.mlp.up_proj.weight`), with the param
group each name belongs to, one file per pipeline rank plus `optimizer.index.json` (name -> file), as the model's
shards are written; on resume every rank reads the names it owns, from whichever files hold them (as torch's
distributed checkpoint reshards). A tied weight is written once, by the lowest rank holding a copy.

Trainer's own `optimizer.pt` is read the same way: its positions follow Trainer's param groups (weight decay first,
then the rest, each in `model.named_parameters()` order), which map to names. `write_trainer_optimizer` goes the other
way, for resuming a PipeTrainer checkpoint under plain Trainer (one process holding the whole model, as Trainer does).

With FSDP2 replicas the state of a sharded weight is gathered whole before it is written (collective over the
replicas) and sharded again as it is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

INDEX_NAME = "optimizer.index.json"
TRAINER_NAME = "optimizer.pt"  # Trainer's OPTIMIZER_NAME
FORMAT = "hf_pipe optimizer state by parameter name"


def _shard_name(rank: int, world: int) -> str:
    return f"optimizer-{rank + 1:05d}-of-{world:05d}.pt"


def has_named_state(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, INDEX_NAME))


def _positions(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[list[str]]:
    """The parameter names of each param group, in the positions `state_dict()` numbers them."""
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def trained_names(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[str]:
    """The names of `optimizer`'s parameters, in the positions `state_dict()` numbers them (across its groups)."""
    return [name for group in _positions(optimizer, names) for name in group]


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def named_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> tuple[dict[str, dict], list[dict]]:
    """(state by parameter name, param groups with `params` as names) of `optimizer`; `names`: id(param) -> name."""
    sd = optimizer.state_dict()
    by_position = trained_names(optimizer, names)
    state = {by_position[i]: value for i, value in sd["state"].items()}
    groups = [{**_hyper(g), "params": [by_position[i] for i in g["params"]]} for g in sd["param_groups"]]
    return state, groups


def _whole(value: Any) -> Any:
    if isinstance(value, DTensor):
        return value.full_tensor()  # collective over the replicas sharding it
    return value.detach().to("cpu") if torch.is_tensor(value) else value


def save_named(
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    output_dir: str,
    *,
    group: dist.ProcessGroup,
    write: bool = True,
) -> None:
    """Write this rank's optimizer state by name into `output_dir` (collective over the pipeline `group`; with
    `write=False` a replica only takes part in gathering FSDP2 shards). Rank 0 of the group writes the index."""
    state, groups = named_state(optimizer, names)
    state = {name: {k: _whole(v) for k, v in values.items()} for name, values in state.items()}
    if not write:
        return
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = [(g["params"], _hyper(g)) for g in groups]
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, mine, group=group)
    owner: dict[str, int] = {}
    for r, rank_groups in enumerate(per_rank):
        for params, _ in rank_groups:
            for name in params:
                owner.setdefault(name, r)
    kept = {name: values for name, values in state.items() if owner[name] == rank}
    torch.save({"format": FORMAT, "state": kept}, os.path.join(output_dir, _shard_name(rank, world)))
    if rank == 0:
        hyper: list[dict] = []
        group_of: dict[str, int] = {}
        for rank_groups in per_rank:
            for params, h in rank_groups:
                if h not in hyper:
                    hyper.append(h)
                for name in params:
                    group_of.setdefault(name, hyper.index(h))
        index = {
            "format": FORMAT,
            "optimizer": type(optimizer).__name__,
            "weight_map": {name: _shard_name(r, world) for name, r in sorted(owner.items())},
            "param_groups": hyper,
            "group_of": group_of,
        }
        with open(os.path.join(output_dir, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1, default=str)


def read_named(checkpoint: str, wanted: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(state by name, param-group hyperparameters by name) for `wanted`, from the files that hold them."""
    with open(os.path.join(checkpoint, INDEX_NAME)) as f:
        index = json.load(f)
    missing = [n for n in wanted if n not in index["weight_map"]]
    if missing:
        raise KeyError(
            f"{checkpoint}/{INDEX_NAME} has no optimizer state for {len(missing)} parameter(s) this rank trains, e.g. "
            f"{missing[:3]}: it was saved for another model"
        )
    files: dict[str, list[str]] = {}
    for name in wanted:
        files.setdefault(index["weight_map"][name], []).append(name)
    state: dict[str, dict] = {}
    for file, keys in files.items():
        # memory-mapped: only the tensors this rank takes are read
        shard = torch.load(os.path.join(checkpoint, file), map_location="cpu", weights_only=True, mmap=True)["state"]
        state.update({k: shard[k] for k in keys if k in shard})  # a weight with no state yet (never stepped)
    hyper = {name: index["param_groups"][index["group_of"][name]] for name in wanted}
    return state, hyper


def load_named(
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    state: Mapping[str, dict],
    hyper: Mapping[str, dict] | None,
) -> None:
    """Load state given by parameter name into `optimizer` (this rank's parameters, any layout); each group's
    hyperparameters (learning rate, ...) from the group its first parameter was saved in."""
    params = {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}
    sd = optimizer.state_dict()
    positions = trained_names(optimizer, names)
    new_state = {}
    for i, name in enumerate(positions):
        if name not in state:
            continue
        param = params[name]
        values = {}
        for key, value in state[name].items():
            if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            values[key] = value
        new_state[i] = values
    groups = []
    for saved_group, group in zip(sd["param_groups"], _positions(optimizer, names)):
        saved = dict(saved_group)
        if hyper is not None and group and group[0] in hyper:
            saved.update({k: v for k, v in hyper[group[0]].items() if k in saved})
        groups.append(saved)
    optimizer.load_state_dict({"state": new_state, "param_groups": groups})


# -- Trainer's optimizer.pt --------------------------------------------------------------------------------------
def trainer_groups(model: nn.Module, decay: set[str], canonical: Mapping[int, str]) -> list[list[str]]:
    """The names of Trainer's two param groups (weight decay, then the rest), in the order Trainer numbers them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        [canonical[id(p)] for n, p in named if n in decay],
        [canonical[id(p)] for n, p in named if n not in decay],
    ]


def read_trainer(path: str, groups: list[list[str]]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Trainer's `optimizer.pt` by name: (state by name, hyperparameters by name)."""
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved = sd["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g) for g in groups]:
        raise ValueError(
            f"{path} holds param groups of {[len(g['params']) for g in saved]} parameters, but Trainer's grouping of "
            f"this model gives {[len(g) for g in groups]}: it was saved for another model or another optimizer set-up"
        )
    state, hyper = {}, {}
    for saved_group, group in zip(saved, groups):
        for position, name in zip(saved_group["params"], group):
            hyper[name] = _hyper(saved_group)
            if position in sd["state"]:
                state[name] = sd["state"][position]
    return state, hyper


def write_trainer_optimizer(checkpoint: str, model: nn.Module | None = None) -> str:
    """Write Trainer's `optimizer.pt` into a PipeTrainer `checkpoint`, so plain `Trainer` resumes from it.

    One process, which holds the whole optimizer state as Trainer does. `model` gives the parameter order (default:
    the checkpoint's own architecture, built on the meta device). Example:
        >>> write_trainer_optimizer("out/checkpoint-500")
        >>> Trainer(model=model, args=args, ...).train(resume_from_checkpoint="out/checkpoint-500")
    """
    from transformers import AutoConfig, Trainer

    from .checkpoint import canonical_state_names

    if model is None:
        import transformers

        config = AutoConfig.from_pretrained(checkpoint)
        if not config.architectures:
            raise ValueError(f"{checkpoint}/config.json names no architecture: pass model= (the model Trainer trains)")
        with torch.device("meta"):
            model = getattr(transformers, config.architectures[0])(config)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = trainer_groups(model, decay, canonical_state_names(model))
    names = [n for g in groups for n in g]
    state, hyper = read_named(checkpoint, names)
    sd = {
        "state": {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in state[n].items()}
            for i, n in enumerate(names)
            if n in state
        },
        "param_groups": [],
    }
    start = 0
    for group in groups:
        h = dict(hyper[group[0]]) if group else {}
        sd["param_groups"].append({**h, "params": list(range(start, start + len(group)))})
        start += len(group)
    path = os.path.join(checkpoint, TRAINER_NAME)
    torch.save(sd, path)
    return path
