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
            f"{setting} with pipeline_data_parallel='fsdp': FSDP2 over TP-sharded stages is not run here (the TP "
            "stages' replicas average their gradients once per step, as DDP would); use pipeline_data_parallel='ddp'."
        )
    if peft:
        problems.append(
            f"{setting} with a PEFT model: the TP plan's layers are wrapped by the adapter's; use "
            "pipeline_tensor_parallel_size=1 with PEFT."
        )
    return problems


def _local_plan(model: nn.Module, keep: Collection[str]) -> dict[str, str]:
    """The model's TP plan, expanded to layer numbers, restricted to what this rank's stages hold (`keep`: their
    parameter and buffer names); tied weights left out (they stay whole)."""
    tied = {name for group in _tied(model) for name in group}
    plan = model._expand_parallel_plan(model.tp_plan)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    def held(name: str) -> bool:
        # a parameter this rank holds, or a module whose own parameters it holds (a half block holds some only)
        if name in params:
            return name in keep and name not in tied
        own = [f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters(recurse=False)]
        return bool(own) and all(p in keep and p not in tied for p in own)

    return {name: style for name, style in plan.items() if held(name)}


def sharded_names(model: nn.Module, keep: Collection[str]) -> set[str]:
    """The parameters of this rank's stages the plan shards over the TP ranks (a rowwise bias stays whole)."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {
        name
        for name, style in _local_plan(model, keep).items()
        if name in params and style != GRAD_SUMMED and not (style == "rowwise" and name.endswith(".bias"))
    }


def shard_stages(model: nn.Module, keep: Collection[str], tp: TensorParallel) -> list[str]:
    """Shard the modules of `model` that this rank's stages hold (`keep`: their parameter and buffer names) with the
    model's TP plan, in place (the stage modules hold the same modules). Tied weights stay whole. Returns the names
    of the parameters whose gradients must be summed over the TP ranks once per step (`GRAD_SUMMED`)."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    params = dict(model.named_parameters(remove_duplicate=False))
    local = _local_plan(model, keep)
    summed = [name for name, style in local.items() if style == GRAD_SUMMED and name in params]
    apply_tensor_parallelism(model, tp.mesh, {name: style for name, style in local.items() if style != GRAD_SUMMED})
    return summed


class SlicedCheckpoint:
    """A weight source (`weights.Checkpoint` of a local safetensors folder) whose TP-sharded tensors are read as
    this rank's slices only: `materialize` loads the stage's other tensors through the checkpoint, leaving the
    sharded ones on the meta device; once the stages are sharded, `load_slices` reads each rank's part of each."""

    def __init__(self, checkpoint: Any, files: dict[str, str]):
        self.checkpoint = checkpoint
        self.files = files  # checkpoint key -> file
        #: the parameters left for `load_slices`
        self.skipped: set[str] = set()

    def materialize(self, model: nn.Module, keep: Collection[str], device: torch.device) -> None:
        self.skipped = sharded_names(model, keep)
        self.checkpoint.materialize(model, set(keep) - self.skipped, device)

    def load_slices(self, model: nn.Module, device: torch.device) -> list[str]:
        """Read this rank's slice of every skipped parameter (a meta DTensor after sharding) from the checkpoint
        files; returns the names read."""
        import os

        from safetensors import safe_open
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        from .weights import _model_name

        base = getattr(model, "base_model_prefix", "")
        key_of = {_model_name(k, self.skipped, base): k for k in self.files}
        handles: dict[str, Any] = {}
        for name in sorted(self.skipped):
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            param = module._parameters[attr]
            key = key_of[name]
            file = self.files[key]
            if file not in handles:
                handles[file] = safe_open(os.path.join(self.checkpoint.path, file), framework="pt")
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            local = handles[file].get_slice(key)[index].to(device=device, dtype=param.dtype).contiguous()
            value = DTensor.from_local(
                local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
            module._parameters[attr] = nn.Parameter(value, requires_grad=param.requires_grad)
        return sorted(self.skipped)


def sliced_source(weights: Any, model: nn.Module) -> SlicedCheckpoint | None:
    """`weights` as a `SlicedCheckpoint` where the TP slices can be read on their own: a local safetensors folder
    whose keys are the model's names. Other sources (a hub id, legacy names, a whole model) load whole tensors,
    sharded once loaded."""
    import os

    from .weights import Checkpoint, _maps_by_name, checkpoint_files

    if not isinstance(weights, Checkpoint) or not os.path.isdir(weights.path) or weights.init_missing != "seeded":
        return None
    files = checkpoint_files(weights.path)
    if files is None or not _maps_by_name(files, model, getattr(model, "base_model_prefix", "")):
        return None
    return SlicedCheckpoint(weights, files)


def _tied(model: nn.Module) -> list[list[str]]:
    from .stage import tied_groups

    return tied_groups(model)


def counted_square(grad: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """This rank's share of `grad`'s squared L2 norm, so that the sum over the TP ranks counts every element once: a
    gradient sharded over "tp" by its local shard, one replicated over the TP ranks (a parameter the plan leaves
    whole, a replicated DTensor such as a rowwise bias) on TP rank 0 only."""
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    if tp is not None and tp.rank != 0 and not _sharded_over_tp(grad):
        return torch.zeros((), device=local.device, dtype=torch.float32)
    return local.detach().float().pow(2).sum()


def _sharded_over_tp(tensor: torch.Tensor) -> bool:
    if not isinstance(tensor, DTensor):
        return False
    names = tensor.device_mesh.mesh_dim_names or ()
    if "tp" not in names:
        return False
    return not isinstance(tensor.placements[names.index("tp")], Replicate)
