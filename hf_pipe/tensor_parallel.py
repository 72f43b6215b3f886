"""Tensor parallelism inside each pipeline stage, with the model's own transformers TP plan.

Each rank's stage modules are sharded over its "tp" ranks (`launch.parallel_groups`: world = dp × pp × tp, TP
innermost) by transformers' `apply_tensor_parallelism`, given the model's plan (`model.tp_plan`: its config's
`base_model_tp_plan` and the head's) expanded to layer numbers and restricted to the tensors this rank's stages hold.
Stage inputs and outputs stay plain tensors (the plan's rowwise layers end in a replicated output), so torch's
pipeline stages send what they would without TP.

What transformers' plan leaves to the trainer, done here and in `runtime/gradients.py`:

- a tied weight whose copies sit on several stages (a tied `lm_head`) is kept whole (replicated), so that its copies'
  gradients can be summed across stages as without TP;
- `replicated_with_grad_allreduce` (Qwen3's per-head q/k norms: each TP rank's gradient covers its own heads) is
  summed over the TP ranks once per optimizer step, after the last microbatch: transformers' own hook all-reduces
  the accumulated `.grad` at every backward, which with several microbatches sums earlier microbatches' gradients
  again (measured: 0.82 relative error after two backwards);
- the global norm counts each gradient once: a DTensor's shards once each, a replicated gradient (every parameter
  the plan leaves whole, a DTensor replicated over TP) on TP rank 0 only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from .launch import TensorParallel

__all__ = ["TensorParallel", "shard_stages", "tensor_parallel_problems", "tp_plan_of"]

#: transformers TP styles a pipeline stage runs as transformers does (everything else is refused by name)
SUPPORTED_STYLES = frozenset(
    {"colwise", "rowwise", "embedding_rowwise", "colwise_gather_output", "replicated_with_grad_allreduce"}
)
#: the style whose gradients hf_pipe sums over the TP ranks itself (once per step, not at every backward)
GRAD_SUMMED = "replicated_with_grad_allreduce"


def tp_plan_of(config: Any) -> dict[str, str]:
    """The model family's TP plan (its config class's `base_model_tp_plan`), empty when it has none."""
    return dict(getattr(config, "base_model_tp_plan", None) or {})


def tensor_parallel_problems(
    config: Any, tp: int, *, frontend: str, data_parallel: str | None, peft: bool = False
) -> list[str]:
    """What keeps `pipeline_tensor_parallel_size=tp` from running this model, each with its fix (empty for tp ≤ 1)."""
    if tp <= 1:
        return []
    setting = f"pipeline_tensor_parallel_size={tp}"
    if config is None:
        return [f"{setting} needs a transformers model (its config's TP plan); use pipeline_tensor_parallel_size=1."]
    model_type = getattr(config, "model_type", "?")
    plan = tp_plan_of(config)
    if not plan:
        return [
            f"{setting} with model_type={model_type!r}: transformers has no tensor-parallel plan for it (its "
            "config's base_model_tp_plan is empty; so are GPT-2's, BERT's, T5's, mT5's, BART's, mBART's and "
            "PLBart's), so its stages cannot be sharded; use pipeline_tensor_parallel_size=1 (pipeline and data "
            "parallel only), or a family with a plan (Llama, Mistral, Qwen2, Qwen3)."
        ]
    problems = []
    if frontend != "module":
        problems.append(
            f"{setting} with pipeline_frontend={frontend!r}: tensor parallelism shards the modules a module-split "
            "stage holds (transformers' TP styles hook their forwards); a traced stage runs an exported graph "
            "instead. Use pipeline_frontend='auto' or 'module'."
        )
    if "sequence_parallel" in plan.values():
        problems.append(
            f"{setting}: {model_type}'s TP plan shards the sequence (sequence_parallel), which hf_pipe does not run "
            "between pipeline stages; use pipeline_tensor_parallel_size=1."
        )
    elif unsupported := sorted({s for s in plan.values() if s not in SUPPORTED_STYLES}):
        problems.append(
            f"{setting}: {model_type}'s TP plan uses {unsupported}, which hf_pipe does not run in pipeline stages "
            f"(it runs {sorted(SUPPORTED_STYLES)}); use pipeline_tensor_parallel_size=1."
        )
    sizes = {
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None)
        or getattr(config, "num_attention_heads", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
    }
    for name, size in sizes.items():
        if isinstance(size, int) and size % tp:
            fits = [d for d in range(1, size + 1) if size % d == 0]
            problems.append(
                f"{setting} does not divide {name}={size} of the {model_type} model: each TP rank holds a whole "
                f"share of it; use a TP size dividing it ({fits[:8]})."
            )
    if data_parallel == "fsdp":
        problems.append(
            f"{setting} with pipeline_data_parallel='fsdp': FSDP2 over TP-sharded stages is not run here; use "
            "pipeline_data_parallel='ddp' for the replicas."
        )
    if peft:
        problems.append(
            f"{setting} with a PEFT model: the TP plan's layers are wrapped by the adapter's; use "
            "pipeline_tensor_parallel_size=1 with PEFT."
        )
    return problems


def shard_stages(model: nn.Module, keep: Collection[str], tp: TensorParallel) -> list[nn.Parameter]:
    """Shard the modules of `model` that this rank's stages hold (`keep`: their parameter and buffer names) with the
    model's TP plan, in place (the stage modules hold the same modules). Tied weights stay whole. Returns the
    parameters whose gradients must be summed over the TP ranks once per step (`GRAD_SUMMED`)."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    tied = {name for group in _tied(model) for name in group}
    plan = model._expand_parallel_plan(model.tp_plan)
    params = dict(model.named_parameters(remove_duplicate=False))

    def held(name: str) -> bool:
        # a parameter this rank holds, or a module whose own parameters it holds (a half block holds some only)
        if name in params:
            return name in keep and name not in tied
        own = [f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters(recurse=False)]
        return bool(own) and all(p in keep and p not in tied for p in own)

    local = {name: style for name, style in plan.items() if held(name)}
    summed = [params[name] for name, style in local.items() if style == GRAD_SUMMED and name in params]
    local = {name: style for name, style in local.items() if style != GRAD_SUMMED}
    apply_tensor_parallelism(model, tp.mesh, local)
    return summed


def _tied(model: nn.Module) -> list[list[str]]:
    from .stage import tied_groups

    return tied_groups(model)


def counted_square(grad: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """This rank's share of `grad`'s squared L2 norm, so that the sum over the TP ranks counts every element once: a
    sharded DTensor's local shard, a replicated one (or a plain gradient of a parameter the plan leaves whole) on TP
    rank 0 only."""
    if isinstance(grad, DTensor):
        replicated = all(isinstance(p, Replicate) for p in grad.placements)
        local = grad.to_local()
    else:
        replicated, local = True, grad
    if replicated and tp is not None and tp.rank != 0:
        return torch.zeros((), device=local.device, dtype=torch.float32)
    return local.detach().float().pow(2).sum()
