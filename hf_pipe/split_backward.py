"""The zero-bubble backward split (input gradients now, weight gradients later) for stages whose weights reach the
stage's computation at several points.

torch's `stage_backward_input` groups a stage's weights by the first nodes, depending on the stage's inputs, that
their computation reaches ("intermediates"), and later computes each group's weight gradients from those nodes,
freeing the graph as it goes. When a group has several intermediates one after the other — a weight used by several
blocks of the stage (T5's relative position bias), a tied embedding that embeds the decoder's input and is the head
of the same stage, a decoder embedding whose output meets the encoder's output in every cross-attention — the
gradient pass of that group runs from the later intermediate through the stage's whole graph to the earlier one, and
frees what the other groups still need: "Trying to backward through the graph a second time" (measured on T5 and
BART stages, torch 2.13). torch's pairwise merge of groups can also leave two overlapping groups.

Here the groups are merged properly, and the weights of every group with more than one intermediate (or none: a
weight the inputs never meet) get their gradients in the input pass itself, one autograd pass that sums every use of
them; the other groups are left to the weight pass, exactly as torch runs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.pipelining._backward import (
    _get_grad_fn_or_grad_acc,
    construct_reverse_graph,
    get_param_groups,
)


def _merged(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups sharing a weight or an intermediate, merged into one (torch merges pairwise and may leave overlaps)."""
    merged: list[dict[str, Any]] = []
    for group in groups:
        new = {"params": set(group["params"]), "intermediates": set(group["intermediates"])}
        for other in [m for m in merged if m["params"] & new["params"] or m["intermediates"] & new["intermediates"]]:
            new["params"] |= other["params"]
            new["intermediates"] |= other["intermediates"]
            merged.remove(other)
        merged.append(new)
    return merged


def stage_backward_input(
    stage_outputs_or_loss: list[torch.Tensor],
    output_grads: list[torch.Tensor] | None,
    input_values: list[Any],
    weights: Iterable[torch.nn.Parameter],
) -> tuple[tuple[torch.Tensor | None, ...], list[dict[str, Any]]]:
    """torch's `stage_backward_input`, with the weights it would mishandle given their gradients now (see above)."""
    weights = [w for w in weights if w.requires_grad]
    outputs, grads = [], []
    for i, output in enumerate(stage_outputs_or_loss):
        if output.requires_grad or output.grad_fn is not None:
            outputs.append(output)
            grads.append(torch.ones_like(output) if output_grads is None else output_grads[i])
    output_fns = [fn for fn in map(_get_grad_fn_or_grad_acc, outputs) if fn is not None]
    input_fns = [
        fn
        for fn in (_get_grad_fn_or_grad_acc(x) for x in input_values if isinstance(x, torch.Tensor))
        if fn is not None
    ]
    weight_of = {_get_grad_fn_or_grad_acc(w): w for w in weights}
    groups = _merged(get_param_groups(input_fns, list(weight_of), construct_reverse_graph(output_fns)))
    later = [g for g in groups if len(g["intermediates"]) == 1]
    deferred = {p for g in later for p in g["params"]}
    now = [w for fn, w in weight_of.items() if fn not in deferred]

    handles = []
    for group in later:
        group["intermediates"] = list(group["intermediates"])
        group["grads"] = [None] * len(group["intermediates"])
        for i, node in enumerate(group["intermediates"]):

            def hook(grad_inputs, group=group, i=i):
                group["grads"][i] = grad_inputs

            handles.append(node.register_prehook(hook))
    try:
        wanted = [x for x in input_values if isinstance(x, torch.Tensor) and x.requires_grad]
        result = (
            torch.autograd.grad(outputs, [*wanted, *now], grads, retain_graph=True, allow_unused=True)
            if outputs and (wanted or now)
            else (None,) * (len(wanted) + len(now))
        )
    finally:
        for handle in handles:
            handle.remove()
    input_grads = iter(result[: len(wanted)])
    dinputs = tuple(
        next(input_grads) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in input_values
    )
    for x, grad in zip(input_values, dinputs):
        if grad is not None:
            x.grad = grad if x.grad is None else x.grad + grad
    for weight, grad in zip(now, result[len(wanted) :]):
        if grad is not None:
            weight.grad = grad if weight.grad is None else weight.grad.add_(grad)
    for output in stage_outputs_or_loss:
        output.detach_()
    # a group whose intermediate no gradient reached has nothing to compute later
    return dinputs, [g for g in later if all(grad is not None for grad in g["grads"])]
