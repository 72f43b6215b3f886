"""Build this rank's stage modules from a whole model (module-split frontend) and free everything else.

Every rank builds or loads the same model; a stage keeps references to the modules its plan names, and parameters
no local stage owns are swapped for meta tensors, so a rank holds only its share of the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .families import MULTIPLE_CHOICE, FamilyAdapter
from .families.base import CACHE, NUM_CHOICES, flatten_choices
from .router_loss import RouterLoss, RouterRecorder
from .split import SplitPlan, body_prefix


class StageModule(nn.Module):
    """One pipeline stage of a HF model: `input_ids` (first stage) or hidden states in, hidden states or logits out.

    The extra batch tensors (attention mask, token type ids) arrive as keyword arguments on every stage: every rank
    of a pipeline holds the whole batch, so they never travel between ranks. With an MoE load-balancing loss
    (`router`), every stage also takes (but the first) and returns the partial sums of its routers' statistics
    (`router_loss.py`), next to its hidden states or logits.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        plan: SplitPlan,
        index: int,
        router: RouterLoss | None = None,
    ):
        super().__init__()
        stage = plan.stages[index]
        self.index = index
        self.is_first = index == 0
        self.is_last = index == plan.num_stages - 1
        self.task = plan.task
        self.adapter = adapter
        self.config = model.config
        self.layer_ids = list(stage.layers)
        self.parts = nn.ModuleDict(stage_parts(model, adapter, plan.task, self.is_first, self.is_last))
        blocks = block_list(model, adapter, plan.task)
        half_of = dict(stage.halves)
        self.blocks = nn.ModuleList(
            [BlockHalf(blocks[i], half_of[i], adapter) if i in half_of else blocks[i] for i in self.layer_ids]
        )
        object.__setattr__(self, "router", router)  # plain data, not a submodule
        self._recorder = RouterRecorder(list(self.blocks), router.router_class) if router is not None else None

    def forward(self, x: torch.Tensor, *carried: torch.Tensor, **batch: Any) -> Any:
        if self._recorder is None or CACHE in batch:  # generation takes no router loss
            return self._forward(x, batch)
        with self._recorder.recording() as router_logits:
            out = self._forward(x, batch)
        sums = carried[0] if carried else self.router.zeros(out.device if torch.is_tensor(out) else x.device)
        return out, self.router.add_layers(sums, router_logits, batch.get("attention_mask"))

    def _forward(self, x: torch.Tensor, batch: dict[str, Any]) -> Any:
        if self.task == MULTIPLE_CHOICE:  # each (example, choice) is one sequence of the body, as HF flattens them
            batch = flatten_choices(batch, batch[NUM_CHOICES])
            x = x.flatten(0, 1) if self.is_first else x
        hidden = self.adapter.embed_inputs(self.config, self.parts, x, batch) if self.is_first else x
        context = self.adapter.context(self.config, self.parts, hidden, batch)
        for index, block in zip(self.layer_ids, self.blocks):
            if isinstance(block, BlockHalf):
                hidden = block(index, hidden, context)
            else:
                hidden = self.adapter.layer(block, index, hidden, context)
        if self.is_last and self.task is not None:
            if CACHE in batch:  # generation reads the last position's logits only (HF's `logits_to_keep=1`)
                hidden = hidden[:, -1:]
            return self.adapter.head(self.parts, hidden, self.task, batch)
        # A fresh tensor, not a view: zero-bubble schedules detach stage outputs in place.
        return hidden if hidden._base is None else hidden.clone()


def _body(model: nn.Module, adapter: FamilyAdapter, task: str | None) -> nn.Module:
    return model.get_submodule(body_prefix(model, adapter)) if task is not None else model


def block_list(model: nn.Module, adapter: FamilyAdapter, task: str | None) -> nn.ModuleList:
    """The model's blocks (`model.layers`); `task` None: `model` is the bare body."""
    return _body(model, adapter, task).get_submodule(adapter.layers)


def stage_parts(
    model: nn.Module, adapter: FamilyAdapter, task: str | None, first: bool, last: bool
) -> dict[str, nn.Module]:
    """The modules other than blocks a stage runs, by role: embeddings on the first stage, the shared ones (rotary
    tables) on every stage, the final norm and the head on the last."""
    body = _body(model, adapter, task)
    roles = {**(adapter.embeddings if first else {}), **adapter.shared, **(adapter.final if last else {})}
    parts = {role: body.get_submodule(path) for role, path in roles.items()}
    if last and task is not None:
        parts.update({role: model.get_submodule(path) for role, path in adapter.heads[task].items()})
    return parts


class BlockHalf(nn.Module):
    """One half of a block (attention or MLP) on a stage that begins or ends mid-block.

    Registers only that half's sub-modules, so the stage owns, saves and optimizes only those weights; the block
    itself is kept unregistered to run the half as the block would (with its gradient checkpointing, if enabled).
    """

    def __init__(self, block: nn.Module, part: int, adapter: FamilyAdapter):
        super().__init__()
        self.part = part
        self.adapter = adapter
        self.owned = nn.ModuleDict({name: block.get_submodule(name) for name in adapter.halves[part]})
        object.__setattr__(self, "block", block)

    def forward(self, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        def run(h: torch.Tensor) -> torch.Tensor:
            return self.adapter.half(self.block, self.part, index, h, context)

        if getattr(self.block, "gradient_checkpointing", False) and self.block.training:
            return self.block._gradient_checkpointing_func(run, hidden)
        return run(hidden)


def build_stage_modules(
    model: nn.Module,
    adapter: FamilyAdapter,
    plan: SplitPlan,
    stage_indices: Sequence[int],
    router: RouterLoss | None = None,
) -> list[StageModule]:
    """This rank's stages, built from `model`; every parameter no local stage owns becomes a meta tensor. With
    `router`, the stages carry its statistics (`StageModule`)."""
    stages = [StageModule(model, adapter, plan, i, router) for i in stage_indices]
    free_unowned_parameters(model, stages)
    return stages


def free_unowned_parameters(model: nn.Module, keep: Sequence[nn.Module]) -> None:
    """Replace every parameter of `model` that no module in `keep` uses by a meta tensor of the same shape.

    Per parameter, not per module: a tied weight (GPT-2 `wte` is `lm_head`) shared with a kept module must stay.
    """
    owned = {id(p) for m in keep for p in m.parameters()}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) not in owned and param.device.type != "meta":
                module._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )


def parameter_fqns(model: nn.Module) -> dict[int, list[str]]:
    """Every FQN of each parameter of `model`, keyed by the parameter's id (tied weights have several FQNs)."""
    names: dict[int, list[str]] = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(fqn)
    return names


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of FQNs that name one shared parameter (tied embeddings), in a deterministic order."""
    return sorted(sorted(fqns) for fqns in parameter_fqns(model).values() if len(fqns) > 1)


def owner_stages(plan: SplitPlan, fqns: Sequence[str]) -> list[int]:
    """Stages whose modules contain any of `fqns`."""
    return [s.index for s in plan.stages if any(_under(f, m) for f in fqns for m in s.modules)]


def _under(fqn: str, module: str) -> bool:
    return fqn == module or fqn.startswith(module + ".")
