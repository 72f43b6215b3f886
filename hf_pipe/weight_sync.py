"""Every rank's stages start from global rank 0's weights when each rank built the whole model itself.

A model passed whole (`weights.Resident`) was built by every rank's own script. Built before any seed (TRL's reward
script adds its score head before `set_seed`; a model made from a config, unseeded), each rank holds other initial
weights: each stage would train its own rank's copy, the copies of a tied weight on different ranks (GPT-2's `wte`
and `lm_head`) would start and stay different, data-parallel replicas too, and the saved model would mix them, no
longer the model whose loss was logged. Trainer + DDP broadcasts rank 0's parameters and buffers when it wraps the
model; this does the same for the pipeline, each rank receiving from rank 0 only the tensors its stages hold
(rank 0 holds the whole model until it frees the other stages), point to point, in flat buckets per dtype.

Skeletons on the meta device (`Checkpoint`, `Initialise`) are the same on every rank by construction and skip this.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import PipelineConfigError
from .launch import waiting

#: bytes per flat message: bounds the extra memory rank 0 holds while it sends
_BUCKET_BYTES = 64 * 2**20
_SOURCE = 0


def sends_weights() -> bool:
    """Whether this rank is the one whose weights every rank starts from (it must send before freeing any)."""
    return _world() == 1 or dist.get_rank() == _SOURCE


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _wanted(model: nn.Module, keep: Collection[str]) -> list[tuple[str, torch.Tensor]]:
    """This rank's stage tensors (parameters and buffers), each once under its first kept name (a tied weight
    is one tensor), in the model's order."""
    seen: set[int] = set()
    out = []
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in keep and id(tensor) not in seen and tensor.device.type != "meta":
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def _describe(tensor: torch.Tensor) -> tuple[tuple[int, ...], str]:
    return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def _problem(rank: int, wanted: list[tuple[str, tuple, str]], source: dict[str, torch.Tensor]) -> str | None:
    """The first tensor `rank` holds that rank 0's model cannot give it, said with both sides."""
    for name, shape, dtype in wanted:
        theirs = source.get(name)
        if theirs is None or theirs.device.type == "meta":
            found = "does not have it" if theirs is None else "holds it on the meta device"
        elif _describe(theirs) != (shape, dtype):
            found = "has {} {}".format(*reversed(_describe(theirs)))  # dtype, then shape, as said of this rank's
        else:
            continue
        return (
            f"every rank starts from rank 0's weights (the model was passed built, and each rank built its own), but "
            f"rank {rank}'s stage tensor {name} ({dtype} {shape}) cannot come from rank 0, whose model {found}: build "
            "the same model (class, config, dtype, adapters) on every rank, or pass PipeTrainer a checkpoint path to "
            "read each rank's stages from."
        )
    return None


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[int]]:
    """Indices of `tensors` in runs of one dtype, at most `_BUCKET_BYTES` each (a larger tensor alone)."""
    run: list[int] = []
    size = 0
    for i, tensor in enumerate(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if run and (tensor.dtype != tensors[run[0]].dtype or size + nbytes > _BUCKET_BYTES):
            yield run
            run, size = [], 0
        run.append(i)
        size += nbytes
    if run:
        yield run


def _flat(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(device) for t in tensors])


@torch.no_grad()
def start_from_first_rank(model: nn.Module, keep: Collection[str], device: torch.device) -> None:
    """Give this rank's stage tensors (the names in `keep`) rank 0's values: rank 0 sends from its whole `model`
    (call it there before the other stages are freed), every other rank receives into its own tensors (after
    they moved to `device`). Collective over the world; a tensor rank 0 cannot give (another shape, dtype, or
    name) is one `PipelineConfigError` on every rank, before anything is sent."""
    if _world() == 1:
        return
    peers = "rank 0 (it sends each rank its stages' weights)" if dist.get_rank() else "every launched rank"
    with waiting("the start-up copy of rank 0's weights to every rank's stages", peers):
        _start_from_first_rank(model, keep, device)


def _start_from_first_rank(model: nn.Module, keep: Collection[str], device: torch.device) -> None:
    world = _world()
    rank = dist.get_rank()
    mine = _wanted(model, keep)
    described = [(name, *_describe(t)) for name, t in mine]
    gathered: list[list | None] | None = [None] * world if rank == _SOURCE else None
    dist.gather_object(described, gathered, dst=_SOURCE)
    verdict: list[list[str] | None] = [None]
    if rank == _SOURCE:
        source = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])
        verdict[0] = [p for r in range(world) if r != _SOURCE and (p := _problem(r, gathered[r], source))]
    dist.broadcast_object_list(verdict, src=_SOURCE)
    if verdict[0]:
        raise PipelineConfigError(verdict[0])
    # gloo moves CPU tensors; NCCL moves CUDA tensors (a stage on the GPU receives there directly)
    wire = device if device.type == "cuda" and "nccl" in str(dist.get_backend()) else torch.device("cpu")
    if rank == _SOURCE:
        for dst in range(world):
            if dst != _SOURCE:
                _send(source, [name for name, *_ in gathered[dst]], dst, wire)
    else:
        _receive([t for _, t in mine], wire)


def _send(source: dict[str, torch.Tensor], names: list[str], dst: int, wire: torch.device) -> None:
    tensors = [source[name] for name in names]
    pending: list = []  # (works, buffer): two messages in flight at most, one sent while the next is packed
    for tag, bucket in enumerate(_buckets(tensors)):
        flat = _flat([tensors[i] for i in bucket], wire)
        pending.append((dist.batch_isend_irecv([dist.P2POp(dist.isend, flat, dst, tag=tag)]), flat))
        if len(pending) > 1:
            for w in pending.pop(0)[0]:
                w.wait()
    for works, _ in pending:
        for w in works:
            w.wait()


def _receive(tensors: list[torch.Tensor], wire: torch.device) -> None:
    for tag, bucket in enumerate(_buckets(tensors)):
        parts = [tensors[i] for i in bucket]
        flat = torch.empty(sum(t.numel() for t in parts), dtype=parts[0].dtype, device=wire)
        for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, flat, _SOURCE, tag=tag)]):
            w.wait()
        offset = 0
        for t in parts:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
