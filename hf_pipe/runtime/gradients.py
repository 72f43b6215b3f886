"""The gradients of this rank's stages as one model's: tied weights whose copies sit on several ranks summed over
their owners (so the copies stay one parameter), traced stages' replicas averaged (they have no DDP wrapper), and the
global L2 norm and clipping over every stage, a tied weight counted once — as `clip_grad_norm_` on one device."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..launch import new_group, timeout_s, waiting
from ..tensor_parallel import counted_square


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 (DTensor) tensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Gradients:
    """Gradient sync, norm and clipping of `engine`'s parameters (this rank's, each once).

    `tied` lists every tied weight of the model as (FQNs, stages using it). The groups of the ranks owning a tied
    weight are created here: collective over the world, every rank walking the same weights in the same order.
    """

    def __init__(self, engine: Any, tied: list[tuple[list[str], list[int]]]):
        self.engine = engine  # its parameters and placement (stage_to_rank, group, pp_rank, dp, device)
        #: traced or tensor-parallel stages with replicas: gradients averaged over the replicas here (DDP would do it
        #: for modules; it takes no DTensor parameters)
        self.average_replicas = engine._replicated and (
            not engine.frontend.wraps_data_parallel or engine.tp is not None
        )
        #: (local parameter, group of its owner ranks, whether this rank counts it in the norm)
        self.tied: list[tuple[nn.Parameter, dist.ProcessGroup | None, bool]] = []
        #: (FQNs, group, global ranks), for errors
        self.tied_owners: list[tuple[list[str], Any, list[int]]] = []
        self._setup_tied(dict(engine.named_parameters()), tied)

    def _setup_tied(self, local: dict[str, nn.Parameter], groups: list[tuple[list[str], list[int]]]) -> None:
        engine = self.engine
        # every replica's pipeline, as global ranks (one pipeline when there is no data parallelism)
        if engine.tp is not None:
            pipelines = engine.tp.pipelines
        elif engine.dp:
            pipelines = engine.dp.pipelines
        else:
            pipelines = [[dist.get_global_rank(engine.group, r) for r in range(engine.pp_size)]]
        for fqns, stages in groups:
            ranks = sorted({engine.stage_to_rank[s] for s in stages})
            if len(ranks) < 2 or not engine._trainable(fqns):
                continue  # a frozen tied weight (a PEFT base embedding) gets no gradient to sum
            mine = None
            for pipeline in pipelines:
                pg = new_group([pipeline[r] for r in ranks], timeout_s())
                if dist.get_rank() in pipeline:
                    mine = pg
            param = next((local[f] for f in fqns if f in local), None)
            if param is not None:
                self.tied_owners.append((fqns, mine, [engine.global_rank(r) for r in ranks]))
                self.tied.append((param, mine, engine.pp_rank == ranks[0]))

    def reduce(self) -> None:
        """Sum the gradients of tied weights over the ranks holding a copy (and average traced stages' replicas)."""
        ranks = sorted({r for _, _, owners in self.tied_owners for r in owners})
        with waiting(
            "the tied-weight gradient all-reduce",
            f"the ranks holding a copy of a tied weight (ranks {', '.join(map(str, ranks))})",
        ):
            self._reduce()

    def _reduce(self) -> None:
        if self.average_replicas:
            dp = self.engine.dp
            grads = [local_tensor(p.grad) for p in self.engine.parameters() if p.grad is not None]
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads).div_(dp.size)
                dist.all_reduce(flat, group=dp.group)
                for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    grad.copy_(reduced)
        for param, pg, _ in self.tied:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            # under FSDP2 each copy is sharded alike over the replicas: the local shards line up
            dist.all_reduce(local_tensor(param.grad), group=pg)
        tp = self.engine.tp
        for param in self.engine.tp_summed:  # each TP rank's gradient covers its own heads: summed once per step
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=tp.group)

    def norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients over all stages, each tied weight counted once."""
        engine = self.engine
        counted_elsewhere = {id(p) for p, _, counts in self.tied if not counts}
        if engine.tp is not None:
            return self._norm_tensor_parallel(counted_elsewhere)
        grads = [
            local_tensor(p.grad)
            for p in self.engine.parameters()
            if p.grad is not None and id(p) not in counted_elsewhere
        ]
        # torch's own fused (foreach) norm over this rank's gradients, then the sum of squares over ranks
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True) if grads else None
        squares = local.float().pow(2) if local is not None else torch.zeros((), device=engine.device)
        with waiting("the gradient-norm all-reduce", engine.pipeline_ranks):
            if engine.dp is not None and engine.dp.mode == "fsdp" and engine.dp.size > 1:
                dist.all_reduce(squares, group=engine.dp.group)  # each replica holds a shard of every gradient
            dist.all_reduce(squares, group=engine.group)
        return squares.sqrt()

    def _norm_tensor_parallel(self, counted_elsewhere: set[int]) -> torch.Tensor:
        """The global norm over stages holding DTensor (sharded over TP) and plain gradients, every element counted
        once: torch's foreach norm refuses lists mixing the two, and a replicated gradient summed over the TP ranks
        would count `tp` times."""
        engine = self.engine
        squares = torch.zeros((), device=engine.device)
        for p in engine.parameters():
            if p.grad is not None and id(p) not in counted_elsewhere:
                squares += counted_square(p.grad, engine.tp)
        with waiting("the gradient-norm all-reduce", engine.pipeline_ranks):
            dist.all_reduce(squares, group=engine.tp.group)
            dist.all_reduce(squares, group=engine.group)
        return squares.sqrt()

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients by the global norm, as `torch.nn.utils.clip_grad_norm_` does on one device."""
        norm = self.norm()
        if max_norm and max_norm > 0:
            params = [p for p in self.engine.parameters() if p.grad is not None]
            if any(isinstance(p.grad, DTensor) for p in params):  # FSDP2, TP: scale each local shard
                coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                for p in params:
                    local_tensor(p.grad).mul_(coef.to(p.grad.dtype))
            else:  # torch's own clipping with the global norm (fused foreach kernels)
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm
