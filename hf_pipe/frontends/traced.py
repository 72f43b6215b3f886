"""The trace frontend: any model torch.export can capture, split as PiPPy splits it (see `trace.py`).

Stages are traced on a fake copy of the model, once per batch shape (their graphs are specialised to it), and point
at the model's own tensors; the weights this rank's graphs read are the ones it keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..families import CAUSAL_LM, get_family, registered_families, task_of
from ..families.base import ATTENTION_KWARGS
from ..split import plan_blocks
from ..stage import tied_groups
from ..timeline import Timeline
from ..trace import TracedStage, TracedStages, masks_follow_positions, traced_batch_keys
from . import Frontend, LocalStages


class TraceFrontend(Frontend):
    name = "trace"
    wraps_data_parallel = False  # a DDP wrapper per traced shape would hook each weight once per shape
    shape_specialised = True

    def problems(self, config, *, pp_size, stages_per_rank, explicit_split, data_parallel):
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
        if task_of(type(model).__name__) is None:
            problems.append(
                f"{type(model).__name__} has no head PipeTrainer can train (a ...ForCausalLM / LMHeadModel, "
                "...ForMaskedLM or ...ForSequenceClassification): its loss runs on the last stage with HF's "
                "semantics. Load the model with one of those heads."
            )
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
        self.traced = TracedStages(
            model, plan, list(stage_indices), device, tied_groups(model), announce=0 in stage_indices, weights=weights
        )
        self.model_class = type(model).__name__
        self._keys = set(traced_batch_keys(model))
        self.packs_sequences = masks_follow_positions(model) and plan.task == CAUSAL_LM
        return LocalStages(modules=self.traced.modules, tied=self.traced.tied, keep=self.traced.keep)

    def batch_keys(self, batch: Mapping[str, Any]) -> set[str]:
        if batch.get("position_ids") is None:
            return self._keys
        return self._keys | set(ATTENTION_KWARGS)  # left out: flash attention finds the same boundaries

    def keys_note(self) -> str:
        return f"traced stages feed only the named inputs of {self.model_class}.forward"

    def stage_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
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
        return [
            TracedStage(module, index, info, device, group, timeline=timeline)
            for module, index in zip(modules, stage_indices)
        ]
