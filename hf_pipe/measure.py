"""Stage costs timed on this machine, for the `"measured"` split policy.

The `"auto"` policy balances forward FLOPs, which misjudges pieces whose speed per FLOP differs: on one CPU thread
the LM head's wide matrix product runs faster per FLOP than a block, and attention's softmax slower. `"measured"`
times, forward and backward on one microbatch, the embeddings, one block's attention and MLP halves (or the whole
block) and the head with its loss, on copies of those modules on the training device, and balances those times
with the same exact search.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .families import MULTIPLE_CHOICE, QUESTION_ANSWERING, SEQ_CLS, TOKEN_CLS, FamilyAdapter, FlopsPerToken
from .families.base import LABEL_KEYS, NUM_CHOICES
from .loss import PipelineLoss
from .stage import block_list, stage_parts

REPEATS = 5


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Median seconds of forward + backward of `fn` (which returns the tensor to backpropagate from)."""
    times = []
    for _ in range(REPEATS + 1):  # the first run warms up kernels and allocations
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn().float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure_costs(
    model: nn.Module,
    adapter: FamilyAdapter,
    task: str,
    config: Any,
    *,
    microbatch: int,
    seq_len: int,
    device: torch.device,
) -> FlopsPerToken:
    """Seconds per microbatch of each piece a stage runs (forward + backward), in `FlopsPerToken`'s shape."""
    parts = stage_parts(model, adapter, task, first=True, last=True)
    block = block_list(model, adapter, task)[0]
    # copies on the training device: the model itself stays where it is, untouched
    copies = copy.deepcopy(nn.ModuleDict({**parts, "_block": block})).to(device).train()
    block = copies.pop("_block")
    generator = torch.Generator().manual_seed(0)
    vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    input_ids = torch.randint(1, vocab, (microbatch, seq_len), generator=generator).to(device)
    with torch.no_grad():
        hidden = adapter.embed(copies, input_ids, {})
        context = adapter.context(config, copies, hidden, {})

    def leaf() -> torch.Tensor:
        return hidden.detach().requires_grad_()

    loss = PipelineLoss(task, config)
    rows = torch.zeros(microbatch, dtype=torch.long, device=device)
    # the head's inputs and labels: one class per row, per token or per (one-choice) example, or spans at 0
    inputs = {"labels": input_ids, "shift_labels": input_ids, NUM_CHOICES: 1}
    if task in (SEQ_CLS, MULTIPLE_CHOICE):
        inputs["labels"] = rows
    elif task == TOKEN_CLS:
        inputs["labels"] = torch.zeros_like(input_ids)
    elif task == QUESTION_ANSWERING:
        inputs.update(dict.fromkeys(LABEL_KEYS[task], rows))
        loss._spans = (seq_len, microbatch, microbatch)
    if task != MULTIPLE_CHOICE:
        inputs.update(adapter.head_inputs(config, task, {"input_ids": input_ids}))
    embeddings = _timed(lambda: adapter.embed(copies, input_ids, {}), device)
    head = _timed(lambda: loss.sum(adapter.head(copies, leaf(), task, inputs), inputs), device)
    if adapter.halves:
        first = _timed(lambda: adapter.half(block, 0, 0, leaf(), context), device)
        second = _timed(lambda: adapter.half(block, 1, 0, leaf(), context), device)
    else:
        first, second = 0.0, _timed(lambda: adapter.layer(block, 0, leaf(), context), device)
    # A vision tower is not timed (there are no images here): its FLOP estimate, at a block's measured time per FLOP.
    flops = adapter.flops_per_token(config, task, seq_len)
    vision = (first + second) * flops.vision / flops.layer if flops.vision else 0.0
    return FlopsPerToken(
        embeddings=embeddings + vision, layer=first + second, head=head, first_half=first, vision=vision
    )
