"""Linear weight gradients accumulated straight into `.grad`, once per microbatch (gradient-accumulation fusion).

A pipeline step runs a stage's backward once per microbatch. For each `nn.Linear`, plain autograd computes the
microbatch's weight gradient into a new tensor and then adds it to `.grad`: a gradient-sized write, two reads and a
write per weight per microbatch, where one batch pays them once. `_LinearAccumulate` computes it with a single
`addmm_` into `.grad` (Megatron-LM calls this gradient-accumulation fusion; torch.distributed.pipelining stages run
plain autograd). Measured on the benchmark's Llama stages, one CPU thread each: about 1% of step time.

The weight gradient then never passes through autograd's accumulation, so nothing that waits for it there may be
present: it is installed only on stages without DDP/FSDP (their hooks fire on that accumulation),
on schedules that run a microbatch's backward in one pass (zero-bubble schedules compute weight gradients in a
separate pass), on parameters without hooks of their own, and it steps aside under autocast. And it writes into
`.grad` only inside a stage's microbatch backward (`InPlaceAccumulationMixin`): any other backward through those
modules — torch's set-up run of `autograd.grad` on uninitialised inputs that infers gradient shapes, a user's own —
gets the weight gradient returned the usual way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_passes import graph_attr

#: schedules (and their short-batch fallbacks) whose backward is one pass per microbatch
ONE_PASS_SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "loopedbfs")


#: > 0 while a stage runs a microbatch's backward; a counter, not thread-local: autograd may run it on its own thread
_in_stage_backward = 0


class InPlaceAccumulationMixin:
    """A torch pipeline stage whose microbatch backward lets `_LinearAccumulate` write into `.grad`."""

    def backward_one_chunk(self, *args: Any, **kwargs: Any):
        global _in_stage_backward
        _in_stage_backward += 1
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            _in_stage_backward -= 1


class _LinearAccumulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        # the parameters themselves, not saved tensors: under activation checkpointing those come back as other
        # tensor objects (recomputed, detached), and a gradient set on them would be lost
        ctx.weight, ctx.bias = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        rows, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        if not _in_stage_backward:  # not a microbatch of the schedule: autograd's own semantics
            return grad_x, rows.t().mm(inputs), None if bias is None else rows.sum(0)
        if weight.grad is None:
            weight.grad = rows.t().mm(inputs)
        else:
            weight.grad.addmm_(rows.t(), inputs)
        if bias is not None:
            bias.grad = rows.sum(0) if bias.grad is None else bias.grad.add_(rows.sum(0))
        return grad_x, None, None


def _hooked(param: nn.Parameter) -> bool:
    return bool(getattr(param, "_post_accumulate_grad_hooks", None) or getattr(param, "_backward_hooks", None))


def linear_accumulating(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` whose weight gradient goes straight into `.grad` (see the module docstring)."""
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        return _LinearAccumulate.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear_accumulating(x, module.weight, module.bias)


def _eligible(weight: Any, bias: Any) -> bool:
    params = [weight] + ([bias] if bias is not None else [])
    return all(isinstance(p, nn.Parameter) and p.requires_grad and not _hooked(p) for p in params)


def _accumulate_in_graph(module: nn.Module) -> int:
    """Traced stages: each `aten.linear` of a trainable weight in `module`'s own graph (torch.export's modules run
    their graph's generated code, recompiled here)."""
    graph, code = getattr(module, "graph", None), module.__dict__.get("graph_module")
    if not isinstance(graph, fx.Graph) or code is None:
        return 0
    count = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None and graph_attr(module, bias) is None:
            continue
        if _eligible(graph_attr(module, node.args[1]), None if bias is None else graph_attr(module, bias)):
            node.target = linear_accumulating
            count += 1
    if count:
        code.recompile()
    return count


def accumulate_linear_grads_in_place(modules: Sequence[nn.Module]) -> int:
    """Route the weight gradients of every trainable `nn.Linear` in `modules` (and of every `aten.linear` of a
    trainable weight in their traced graphs) through `_LinearAccumulate`; returns how many. The modules keep their
    parameters and state dict; only their forward is replaced. Calling it again on the same modules does nothing."""
    count = 0
    for module in {id(m): m for root in modules for m in root.modules()}.values():
        count += _accumulate_in_graph(module)
        if type(module) is not nn.Linear or "forward" in vars(module):
            continue
        if _eligible(module.weight, module.bias):
            module.forward = _forward.__get__(module)
            count += 1
    return count
