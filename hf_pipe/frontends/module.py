"""The module-split frontend: a family with an adapter (`families/`) cut at its modules, torchtitan-style.

Each stage keeps references to the modules its plan names and runs them with the adapter's small forward
(`stage.py`); nothing is traced, so any batch shape runs, and stage outputs are the only tensors that travel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..families import (
    CAUSAL_LM,
    FlopsPerToken,
    get_family,
    registered_families,
    task_of,
    vision_language_families,
)
from ..families.base import LABEL_KEYS, is_bare_body, is_vision_language
from ..families.vision import unadapted_vision_language
from ..grad_accumulation import InPlaceAccumulationMixin
from ..measure import measure_costs
from ..router_loss import router_loss_of
from ..schedule import NoSelfSendMixin
from ..split import plan_split, resolve_family, unsupported_head
from ..stage import build_stage_modules, owner_stages, tied_groups
from ..timeline import TimedPipelineStage, Timeline
from . import Frontend, LocalStages


class _ModuleStage(NoSelfSendMixin, InPlaceAccumulationMixin, TimedPipelineStage):
    """A module-split stage: torch's `PipelineStage`, timed, Linear weight gradients accumulated in place."""


class ModuleFrontend(Frontend):
    name = "module"
    wraps_data_parallel = True
    accumulates_in_place = True

    def __init__(self, config: Any):
        super().__init__(config)
        self.adapter = get_family(config.model_type) if config is not None else None

    def problems(self, config, *, pp_size, stages_per_rank, explicit_split, data_parallel):
        if self.adapter is None and is_vision_language(config):
            return [unadapted_vision_language(config.model_type, vision_language_families(), self.name)]
        if self.adapter is None:
            how = "an explicit pipeline_split still needs one to run stages" if explicit_split else "no split policy"
            return [
                f"model_type={config.model_type!r} has no family adapter ({how}); hf_pipe knows "
                f"{', '.join(registered_families())}. Register one with hf_pipe.register_family (a Llama-shaped "
                "decoder can reuse hf_pipe.families.LlamaAdapter), or use the trace frontend (pipeline_frontend="
                "'trace')."
            ]
        if self.adapter.frontend != self.name:
            return [
                f"pipeline_frontend='module' with model_type={config.model_type!r}: its stages are made by the "
                f"{self.adapter.frontend!r} frontend (an encoder-decoder); use pipeline_frontend='auto' or "
                f"{self.adapter.frontend!r}."
            ]
        family = self.adapter.config_problems(config)
        if data_parallel is not None and self.adapter.first_stage_may_skip:
            family.append(
                f"pipeline_data_parallel={data_parallel!r} (replicas of the pipeline) with the vision-language "
                f"model_type={config.model_type!r}: its first stage runs the vision tower only for microbatches with "
                "images, and DDP under the pipeline schedules fails on the parameters a microbatch left unused "
                "(measured: 'Expected to have finished reduction' without find_unused_parameters, a hang with it; "
                "FSDP2 is not supported for these stages either); run one pipeline (world size = "
                "pipeline_parallel_size)."
            )
        num_stages = pp_size * stages_per_rank
        num_layers = self.adapter.num_layers(config)
        if num_stages <= num_layers:
            return family
        fits = [s for s in range(1, num_layers + 1) if s % stages_per_rank == 0]
        return family + [
            f"pipeline_parallel_size={pp_size} × pipeline_stages_per_rank={stages_per_rank} = {num_stages} stages, "
            f"but the model has {num_layers} blocks and every stage needs at least one: use at most {num_layers} "
            f"stages (pipeline_parallel_size ≤ {max(fits) // stages_per_rank if fits else 1} at "
            f"{stages_per_rank} stage(s) per rank)."
        ]

    def trainer_problems(self, args: Any, model: nn.Module) -> list[str]:
        """A head the family's adapter cannot run (a custom head, another task named by pipeline_task)."""
        if self.adapter is None:
            return []  # reported by `problems`
        name, task = type(model).__name__, task_of(type(model).__name__, model.config)
        if args.pipeline_task is not None and args.pipeline_task != task:
            return [
                f"pipeline_task={args.pipeline_task!r} for {name} with pipeline_frontend='module' (or 'auto' for a "
                f"family with an adapter): the module frontend runs the class's own head ({task or 'none'}) with "
                f"the {model.config.model_type} adapter's forward; unset pipeline_task, or set "
                "pipeline_frontend='trace' to train the class's own forward with that loss."
            ]
        if task in self.adapter.heads or (task is None and is_bare_body(model)):
            return []  # a bare body: the engine says it has no head to train
        return [unsupported_head(name, model.config.model_type, list(self.adapter.heads))]

    def plan(self, model, num_stages, split, *, task, context):
        costs = self._measured(model, task, context) if split == "measured" else None
        return plan_split(model, num_stages, split, task=task, costs=costs)

    def _measured(self, model: nn.Module, task: str | None, context: Any) -> FlopsPerToken | None:
        """The pieces' times on this machine (`measure.py`), averaged over every rank so that all plan alike.

        Collective over the world (replicas must split alike). Timed at the microbatch size and at the model's
        positions, at most 512.
        """
        adapter = resolve_family(model.config.model_type)
        task = task or task_of(type(model).__name__, model.config)
        if task is None:
            return None
        seq_len = min(getattr(model.config, "max_position_embeddings", None) or 512, 512)
        microbatch = max(1, (context.batch_size or context.microbatches) // context.microbatches)
        costs = measure_costs(
            model, adapter, task, model.config, microbatch=microbatch, seq_len=seq_len, device=context.device
        )
        times = [costs.embeddings, costs.layer, costs.head, costs.first_half, costs.vision]
        times = torch.tensor(times, device=context.device)
        dist.all_reduce(times)
        times /= dist.get_world_size()
        return FlopsPerToken(*times.tolist())

    def build(self, model, plan, stage_indices, device, weights):
        tied = [(fqns, owner_stages(plan, fqns)) for fqns in tied_groups(model)]
        owned = [m for i in stage_indices for m in plan.stages[i].modules]
        keep = {
            name
            for name, _ in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
            if any(name.startswith(m + ".") for m in owned)
        }
        weights.materialize(model, keep, device)
        self.router = router_loss_of(model) if getattr(self.adapter, "router_loss", False) else None
        modules = build_stage_modules(model, self.adapter, plan, stage_indices, self.router)
        self.packs_sequences = self.adapter.packed_sequences and plan.task == CAUSAL_LM
        self.task = plan.task
        return LocalStages(modules=list(modules), tied=tied, keep=keep)

    def batch_keys(self, batch: Mapping[str, Any]) -> set[str]:
        return set(self.adapter.batch_keys)

    def batch_problems(self, batch: Mapping[str, Any]) -> list[str]:
        return self.adapter.batch_problems(self.config, batch)

    def keys_note(self) -> str:
        keys = ", ".join(sorted({"input_ids", *LABEL_KEYS[self.task], *self.adapter.batch_keys}))
        return f"the {self.config.model_type} stages consume {keys}"

    def stage_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # what the head needs from the whole batch (the last stage never sees the token ids), before any cut
        # (a vision-language adapter also lays each row's images out along the rows, see `FamilyAdapter.stage_inputs`)
        return self.adapter.stage_inputs(self.config, self.task, batch)

    def torch_stages(
        self,
        local: LocalStages,
        runnable: list[nn.Module],
        stage_indices: Sequence[int],
        num_stages: int,
        microbatch: tuple[torch.Tensor, Mapping[str, Any]],
        training: bool,
        *,
        device: torch.device,
        group: dist.ProcessGroup,
        timeline: Timeline,
    ) -> list[Any]:
        return [
            _ModuleStage(module, index, num_stages, device, group=group, timeline=timeline)
            for module, index in zip(runnable, stage_indices)
        ]
