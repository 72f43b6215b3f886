"""Each rank holds only its stages' weights, gradients and AdamW state: ≤ 1/PP of one process's, + 5%."""

from __future__ import annotations

import torch

from tests._dist import run_distributed
from tests._models import padded_batch, tiny_model

LLAMA_8 = dict(
    num_hidden_layers=8, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2
)


def _state_bytes(params, optimizer) -> int:
    total = 0
    for p in params:
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total


def _one_step(pp: int | None) -> int:
    """Bytes of parameters + gradients + AdamW moments after one step: the whole model, or this rank's stages."""
    model = tiny_model("llama", vocab_size=512, **LLAMA_8)
    batch = padded_batch("llama", seq_len=16)
    if pp is None:
        params = list(model.parameters())
        opt = torch.optim.AdamW(params)
        model(**batch).loss.backward()
    else:
        from hf_pipe import PipelineEngine

        engine = PipelineEngine(model, schedule="1f1b", microbatches=4, device="cpu")
        params = list(engine.parameters())
        opt = torch.optim.AdamW(params)
        engine.train_step(batch)
        # what stays allocated on this rank: the model object's other weights are meta tensors
        assert all(p.device.type in ("cpu", "meta") for p in model.parameters())
        params += [p for p in model.parameters() if p.device.type == "cpu" and all(p is not q for q in params)]
    opt.step()
    return _state_bytes(params, opt)


def test_memory_per_rank_is_one_over_pp():
    single = _one_step(None)
    report = {1: [single]}
    for pp in (2, 4):
        report[pp] = run_distributed(_one_step, pp, pp)
        assert max(report[pp]) <= single / pp * 1.05, (pp, report[pp], single / pp)
    print({pp: [f"{b / 2**20:.2f} MiB" for b in per_rank] for pp, per_rank in report.items()})
