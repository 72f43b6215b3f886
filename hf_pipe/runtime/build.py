"""This rank's stages, built through the frontend with their weights real on the device, and what the schedule runs:
the stages themselves, or their DDP / FSDP2 wrappers over the data-parallel replicas."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import PipelineConfigError, raise_on_every_rank
from ..frontends import Frontend, LocalStages
from ..split import SplitPlan
from ..tensor_parallel import shard_stages, sliced_source
from ..weights import meta_names


def build_stages(
    frontend: Frontend,
    model: nn.Module,
    plan: SplitPlan,
    stage_indices: list[int],
    device: torch.device,
    weights: Any,
    tp: Any = None,
) -> LocalStages:
    """This rank's stages through the frontend, their tensors real on the device; a problem on any rank (a
    checkpoint that does not fit, a weight left on meta) is one error on every rank, before any step. With `tp`
    (`launch.TensorParallel`) the stages are sharded with the model's TP plan, a local checkpoint's sharded tensors
    read as this rank's slices only (`tensor_parallel.py`)."""
    problems: list[str] = []
    local = None
    sliced = sliced_source(weights, model) if tp is not None else None
    try:
        local = frontend.build(model, plan, stage_indices, device, sliced or weights)
        if local is not None and tp is not None:
            # the modules sharded in place (the stages hold them), then the TP slices read on their own
            local.tp_summed = shard_stages(model, local.keep, tp)
            local.tp_sliced = sliced.load_slices(model, device) if sliced is not None else []
    except PipelineConfigError as err:
        problems = err.problems
    if local is not None and (left := meta_names(model, local.keep)):
        problems.append(
            f"{len(left)} tensor(s) of this rank's stages are still on the meta device after loading: "
            f"{left[:8]}; give the model a checkpoint holding them (pipeline_checkpoint) or build it whole."
        )
    raise_on_every_rank(problems)
    return local


def wrap_data_parallel(
    module: nn.Module, dp: Any, frontend: Frontend, device: torch.device, tensor_parallel: bool = False
) -> nn.Module:
    """DDP or FSDP2 over the data-parallel replicas `dp` of this stage; torch's stages drive both (no_sync,
    reshard). Without replicas, for traced stages, or for tensor-parallel ones (DDP takes no DTensor parameters), the
    module itself: the engine averages their gradients over the replicas once per step."""
    if dp is None or dp.size <= 1 or not frontend.wraps_data_parallel or tensor_parallel:
        return module
    if dp.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module, mesh=dp.mesh)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    # No buffer broadcast: it is a collective in every forward, and torch also runs the forward on metadata
    # while inferring stage shapes; the buffers here (rotary tables, position ids) never change anyway.
    return DistributedDataParallel(module, process_group=dp.group, device_ids=device_ids, broadcast_buffers=False)
