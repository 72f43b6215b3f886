"""The trace frontend: any model torch.export can capture, split as PiPPy splits it (see `trace.py`).

Stages are traced on a fake copy of the model, once per batch shape (their graphs are specialised to it), and point
at the model's own tensors; the weights this rank's graphs read are the ones it keeps.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PipelineConfigError
from ..families import (
    CAUSAL_LM,
    MASKED_LM,
    MULTIPLE_CHOICE,
    QUESTION_ANSWERING,
    SEQ_CLS,
    TASKS,
    TOKEN_CLS,
    get_family,
    registered_families,
    task_of,
    vision_language_families,
)
from ..families.base import ATTENTION_KWARGS, TASK_CLASSES, is_vision_language, last_non_pad_token
from ..families.vision import unadapted_vision_language
from ..router_loss import RouterLoss, router_loss_of
from ..split import plan_blocks, unsupported_head
from ..stage import tied_groups
from ..timeline import Timeline
from ..trace import TracedStage, TracedStages, masks_follow_positions, traced_batch_keys
from . import Frontend, LocalStages


class TraceFrontend(Frontend):
    name = "trace"
    wraps_data_parallel = False  # a DDP wrapper per traced shape would hook each weight once per shape
    accumulates_in_place = True  # the linear ops of each traced graph, at each new shape
    shape_specialised = True

    def problems(self, config, *, pp_size, stages_per_rank, explicit_split, data_parallel):
        if is_vision_language(config):
            return [unadapted_vision_language(config.model_type, vision_language_families(), self.name)]
        if getattr(config, "is_encoder_decoder", False):
            seq2seq = [t for t in registered_families() if get_family(t).frontend == "seq2seq"]
            fix = (
                "use pipeline_frontend='auto' (or 'seq2seq')"
                if get_family(config.model_type) is not None
                else f"the seq2seq frontend runs {', '.join(seq2seq)}: register a hf_pipe.families.seq2seq."
                "Seq2SeqAdapter for this family with hf_pipe.register_family"
            )
            return [
                f"pipeline_frontend='trace' with model_type={config.model_type!r}: the trace frontend does not "
                f"pipeline encoder-decoders (the encoder's output feeds every decoder stage); {fix}."
            ]
        if data_parallel == "fsdp":
            return [
                "pipeline_data_parallel='fsdp' shards the weights of module-split stages only; with "
                "pipeline_frontend='trace' use pipeline_data_parallel='ddp', or pipeline_frontend='module' for a "
                "family with an adapter."
            ]
        return []  # the block count is checked on the model itself (`split.plan_blocks`)

    def trainer_problems(self, args: Any, model: nn.Module) -> list[str]:
        """A model without a head hf_pipe has a loss for; Trainer options traced stages cannot honour."""
        problems = []
        if (args.pipeline_task or task_of(type(model).__name__, getattr(model, "config", None))) is None:
            model_type = getattr(getattr(model, "config", None), "model_type", "")
            problems.append(unsupported_head(type(model).__name__, model_type, TASKS, frontend="trace"))
        if args.gradient_checkpointing:
            problems.append(
                "gradient_checkpointing=True with pipeline_frontend='trace' (or 'auto' for a model without a family "
                "adapter): the graph is fixed when it is exported, so Trainer's checkpointing switch cannot reach "
                "it; use pipeline_frontend='module' with a family adapter, or set gradient_checkpointing=False."
            )
        return problems

    def plan(self, model, num_stages, split, *, task, context):
        return plan_blocks(model, num_stages, split, task=task)

    def build(self, model, plan, stage_indices, device, weights):
        self.router = router_loss_of(model) if plan.task == CAUSAL_LM else None
        if self.router is None and (problem := _unknown_router_loss(model)):
            raise PipelineConfigError(problem)
        self.traced = TracedStages(
            model, plan, list(stage_indices), device, tied_groups(model), announce=0 in stage_indices, weights=weights
        )
        expected = _ROUTER_OUTPUTS if self.router is not None else None
        if problem := _output_problem(type(model).__name__, plan.task, self.traced.outputs, expected):
            raise PipelineConfigError(problem)
        # the traced last stage returns every layer's router logits: as many as the model has routers
        self._routers = sum(isinstance(m, self.router.router_class) for m in model.modules()) if self.router else 0
        self.model_class = type(model).__name__
        self._keys = set(traced_batch_keys(model))
        self.packs_sequences = masks_follow_positions(model) and plan.task == CAUSAL_LM
        self._pools_at_pad = plan.task == SEQ_CLS and _pools_at_pad_token(model)
        return LocalStages(modules=self.traced.modules, tied=self.traced.tied, keep=self.traced.keep)

    def batch_keys(self, batch: Mapping[str, Any]) -> set[str]:
        if batch.get("position_ids") is None:
            return self._keys
        return self._keys | set(ATTENTION_KWARGS)  # left out: flash attention finds the same boundaries

    def keys_note(self) -> str:
        return f"traced stages feed only the named inputs of {self.model_class}.forward"

    def stage_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self._pools_at_pad:  # HF refuses a batch of several rows without a pad token; a microbatch of one would not
            last_non_pad_token(batch["input_ids"], self.config)
        # a traced graph is specialised to every input's shape: per-batch boundary tensors would retrace each step
        return {k: v for k, v in batch.items() if k not in ATTENTION_KWARGS}

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
        modules, info = self.traced.for_batch(*microbatch, training)
        if self.router is not None:  # the last stage's router logits become the module stages' router statistics
            modules = [
                RouterSumsHead(m, self.router, self._routers) if i == num_stages - 1 else m
                for m, i in zip(modules, stage_indices)
            ]
        return [
            TracedStage(module, index, info, device, group, timeline=timeline)
            for module, index in zip(modules, stage_indices)
        ]


class RouterSumsHead(nn.Module):
    """The traced last stage of an MoE causal LM, whose graph returns what HF's forward returns with router logits
    (`aux_loss`, `logits`, then every layer's router logits, threaded to it from the earlier stages): returns the
    logits and the router statistics of those logits (`router_loss.py`), as the module frontend's last stage does,
    so that training adds each microbatch's aux loss and evaluation the whole batch's."""

    def __init__(self, stage: nn.Module, router: RouterLoss, routers: int):
        super().__init__()
        self.stage = stage
        self.routers = routers
        object.__setattr__(self, "router", router)

    @property
    def graph(self) -> Any:
        """The stage's graph, where torch's traced stage reads what it receives."""
        return self.stage.graph

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.stage(*args, **kwargs)
        logits, router_logits = out[-self.routers - 1], out[-self.routers :]
        sums = self.router.add_layers(self.router.zeros(logits.device), router_logits, kwargs.get("attention_mask"))
        return logits, sums


#: what HF's MoE causal LMs return with router logits and no labels
_ROUTER_OUTPUTS = {"aux_loss": 0, "logits": 3, "router_logits": -1}


def _unknown_router_loss(model: nn.Module) -> str | None:
    """A model returning router logits whose forward adds a router loss other than HF's load-balancing one over
    recorded router logits (a z-loss, an encoder-decoder's): the pipeline would train without it."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "output_router_logits", False):
        return None
    return (
        f"output_router_logits=True with {type(model).__name__} and pipeline_frontend='trace': hf_pipe adds HF's "
        "load-balancing loss (load_balancing_loss_func over the router logits HF records) for causal LMs, and this "
        "model's forward adds another router loss (or none hf_pipe can find); set config.output_router_logits="
        "False to train without it."
    )


def _pools_at_pad_token(model: nn.Module) -> bool:
    """A sequence classifier that pools at the last token that is not `pad_token_id` (HF's decoder classifiers)."""
    try:
        return "pad_token_id" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False


#: the outputs each task's loss reads, and their dimensions (per token: rows, seq, logits; per row: rows, logits)
_EXPECTED = {
    CAUSAL_LM: {"logits": 3},
    MASKED_LM: {"logits": 3},
    TOKEN_CLS: {"logits": 3},
    SEQ_CLS: {"logits": 2},
    MULTIPLE_CHOICE: {"logits": 2},
    QUESTION_ANSWERING: {"start_logits": 2, "end_logits": 2},
}


def _output_problem(
    class_name: str, task: str, outputs: dict[str | int, int] | None, expected: dict[str, int] | None = None
) -> str | None:
    """A forward whose outputs are not what the task's loss reads (one logits tensor; question answering's start and
    end logits; `expected`, if given), by name and shape: the loss would read the wrong tensor. `outputs` as
    `trace.output_structure` gives them (a plain tensor or tuple has indices for names); None: not known, the trace
    reports what fails."""
    expected = expected or _EXPECTED[task]
    if outputs is None:
        return None
    named = all(isinstance(k, str) for k in outputs)
    if (list(outputs) if named else len(outputs)) == (list(expected) if named else len(expected)):
        if list(outputs.values()) == list(expected.values()):
            return None
    found = ", ".join(f"{k} ({v}-d)" if isinstance(k, str) else f"a {v}-d tensor" for k, v in outputs.items())
    wanted = ", ".join(f"{k} ({v}-d)" for k, v in expected.items())
    return (
        f"{class_name}'s forward returns {found} (without labels), but the {task} loss reads {wanted}: hf_pipe "
        f"trains a traced forward that returns the logits of a {TASK_CLASSES[task]} head. Fix: pipeline_task= the "
        "task whose logits the forward returns; or a forward that returns only those logits (a wrapper module), with "
        "your own loss if it is none of hf_pipe's (compute_loss_func=..., or a PipeTrainer subclass's "
        "compute_microbatch_loss, which receive outputs.logits)."
    )
