"""Linear weight gradients accumulated in place (`hf_pipe/grad_accumulation.py`) against plain autograd.

The pipeline tests (engine and PipeTrainer against one process) run it on every one-pass schedule; these pin down,
in one process, the cases that once went wrong: activation checkpointing (saved tensors come back as other tensor
objects) and a backward outside a stage's microbatch backward (torch's `autograd.grad` run that infers gradient
shapes must leave `.grad` alone).
"""

from __future__ import annotations

import pytest
import torch

from hf_pipe import grad_accumulation
from hf_pipe.grad_accumulation import accumulate_linear_grads_in_place
from tests._models import padded_batch, tiny_model


class _StageBackward:
    """What `InPlaceAccumulationMixin.backward_one_chunk` does around a microbatch's backward."""

    def __enter__(self):
        grad_accumulation._in_stage_backward += 1

    def __exit__(self, *exc):
        grad_accumulation._in_stage_backward -= 1


def _grads(name: str, fused: bool, checkpointing: dict | None) -> dict[str, torch.Tensor]:
    model = tiny_model(name).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if fused:
        assert accumulate_linear_grads_in_place([model]) > 0
    batch = padded_batch(name, seq_len=16, seed=0)
    for i in range(4):  # four microbatches of two rows, accumulated
        out = model(**{k: v[2 * i : 2 * i + 2] for k, v in batch.items()})
        with _StageBackward():
            out.loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "name, checkpointing",
    [("llama", None), ("bert-mlm", None), ("llama", {"use_reentrant": True}), ("llama", {"use_reentrant": False})],
)
def test_same_gradients_as_autograd(name, checkpointing):
    plain, fused = _grads(name, False, checkpointing), _grads(name, True, checkpointing)
    assert plain.keys() == fused.keys()
    for fqn, grad in plain.items():
        assert fused[fqn] is not None, fqn
        torch.testing.assert_close(fused[fqn], grad, rtol=1e-5, atol=1e-7, msg=fqn)


def test_other_backwards_keep_autograd_semantics():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    accumulate_linear_grads_in_place([linear])
    x = torch.randn(5, 4, requires_grad=True)
    # outside a stage's backward: autograd.grad returns the weight gradient and leaves .grad untouched
    (dw,) = torch.autograd.grad(linear(x).sum(), [linear.weight])
    assert linear.weight.grad is None
    torch.testing.assert_close(dw, torch.ones(5, 3).t() @ x.detach())
    # inside one: accumulated in place, over two calls
    for _ in range(2):
        with _StageBackward():
            linear(x).sum().backward()
    torch.testing.assert_close(linear.weight.grad, 2 * dw)
    torch.testing.assert_close(linear.bias.grad, torch.full((3,), 10.0))


def test_traced_graphs_accumulate_in_place():
    """A traced stage's `aten.linear` ops of trainable weights: the same gradients as autograd over four
    microbatches, installed once (calling again finds nothing left to route)."""
    from hf_pipe.trace import trace_stages

    model = tiny_model("llama").train()
    batch = padded_batch("llama", seq_len=16, seed=0)
    ids, labels = batch["input_ids"], batch["labels"]

    def grads(fused: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        stage = trace_stages(model, {}, (ids[:2],)).get_stage_module(0)  # one stage: the whole model, traced
        if fused:
            assert accumulate_linear_grads_in_place([stage]) == 4 * 7 + 1  # 7 per block, and the LM head
            assert accumulate_linear_grads_in_place([stage]) == 0
        for i in range(4):
            logits = stage(ids[2 * i : 2 * i + 2])
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[2 * i : 2 * i + 2, 1:].flatten()
            )
            with _StageBackward():
                loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, fused = grads(False), grads(True)
    for fqn, grad in plain.items():
        torch.testing.assert_close(fused[fqn], grad, rtol=1e-5, atol=1e-7, msg=fqn)
