"""The encoder-decoder frontend: T5, BART and their kin, split over the encoder's blocks then the decoder's.

A stage may hold encoder blocks, decoder blocks or both (`seq2seq_split.py`). What crosses a stage boundary is what
Megatron-LM sends along an encoder-decoder pipeline:

- inside the encoder: the encoder's hidden states;
- from the stage that ends the encoder on: the decoder's hidden states *and* the encoder's output, which every
  decoder block attends to. Each decoder stage uses it and hands it on as a second output, so torch's stages send it
  forward and its gradient back, the gradient of the copy handed on and that of the stage's own cross-attention
  summed by autograd — the skip connection's gradients, summed back exactly to the stage that made it.

Everything else comes from the batch, which every rank of a pipeline holds: the source mask and `decoder_input_ids`
(derived from the labels by the model's own shift when the batch has none, as the model's forward does) and the
decoder mask reach every stage as keyword arguments; masks and position biases are rebuilt per stage (T5's from the
stack's `relative_attention_bias`, a weight shared by every stage of that stack). Stages run HF's own blocks, so
any batch shape runs (source and target lengths change from batch to batch) and nothing is traced.

In evaluation the last stage returns the logits and the encoder's output, as the model's forward does (Trainer's
predictions are that pair).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PipelineConfigError
from ..families import SEQ2SEQ_LM, get_family, task_of
from ..families.base import CACHE
from ..families.seq2seq import Seq2SeqAdapter
from ..seq2seq_split import Seq2SeqSplitPlan, plan_seq2seq, seq2seq_adapter, stage_roles
from ..split_backward import stage_backward_input
from ..stage import free_unowned_parameters, owner_stages, tied_groups
from ..timeline import Timeline
from . import Frontend, LocalStages
from .module import _ModuleStage


class _Seq2SeqTorchStage(_ModuleStage):
    """A module-split torch stage whose zero-bubble input pass gives the weights torch's split would mishandle their
    gradients at once (`split_backward.py`): T5's shared position bias, a tied embedding and head on one stage, the
    decoder's first blocks meeting the encoder's output. A stage built for evaluation makes its module return the
    encoder's output too (`Seq2SeqStage.evaluation_outputs`), for torch's shape inference as for every microbatch."""

    def __init__(self, *args: Any, training: bool = True, **kwargs: Any):
        self.for_training = training  # before torch's set-up, which may infer shapes
        super().__init__(*args, **kwargs)

    def _shape_inference(self, *args: Any, **kwargs: Any):
        with self._outputs_as_built():  # torch < 2.13 infers shapes under no_grad, whatever the schedule runs
            return super()._shape_inference(*args, **kwargs)

    def forward_one_chunk(self, *args: Any, **kwargs: Any):
        with self._outputs_as_built():
            return super().forward_one_chunk(*args, **kwargs)

    @contextlib.contextmanager
    def _outputs_as_built(self):
        self.submod.evaluation_outputs = not self.for_training
        try:
            yield
        finally:
            self.submod.evaluation_outputs = None

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=False):
        if backward_type != "input":
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        # encoder-decoder stages are never wrapped in DDP / FSDP (replicas are refused), so no sync to manage here
        return stage_backward_input(
            bwd_kwargs["stage_output"],
            bwd_kwargs["output_grads"],
            bwd_kwargs["input_values"],
            self.submod.parameters(),
        )


def _fresh(tensor: torch.Tensor, inputs: Sequence[Any]) -> torch.Tensor:
    """A stage output that is neither a view nor one of the stage's inputs (zero-bubble schedules detach outputs in
    place; a LayerDrop'd stage could hand on its input)."""
    if tensor._base is not None or any(tensor is x for x in inputs):
        return tensor.clone()
    return tensor


class Seq2SeqStage(nn.Module):
    """One stage of an encoder-decoder: source ids, encoder states, or (decoder states, encoder output) in; encoder
    states, (decoder states, encoder output), or the logits out."""

    def __init__(self, model: nn.Module, adapter: Seq2SeqAdapter, plan: Seq2SeqSplitPlan, index: int):
        super().__init__()
        stage = plan.stages[index]
        encoder_layers = plan.encoder_layers
        self.index = index
        self.adapter = adapter
        self.is_first = index == 0
        self.is_last = index == plan.num_stages - 1
        self.encoder_ids = [i for i in stage.layers if i < encoder_layers]
        self.decoder_ids = [i - encoder_layers for i in stage.layers if i >= encoder_layers]
        self.ends_encoder = encoder_layers - 1 in self.encoder_ids
        self.starts_decoder = 0 in self.decoder_ids
        roles = stage_roles(adapter, stage.layers, encoder_layers, self.is_first, self.is_last)
        self.parts = nn.ModuleDict({role: model.get_submodule(path) for role, path in roles.items()})
        encoder_blocks = model.get_submodule(adapter.encoder_layers)
        decoder_blocks = model.get_submodule(adapter.decoder_layers)
        self.encoder_blocks = nn.ModuleList([encoder_blocks[i] for i in self.encoder_ids])
        self.decoder_blocks = nn.ModuleList([decoder_blocks[j] for j in self.decoder_ids])
        self.buffer_names = list(adapter.head_buffers) if self.is_last else []
        for name in self.buffer_names:
            self.register_buffer(name.replace(".", "_"), model.get_buffer(name))
        # the stacks and the config, unregistered: their attributes (configs, dropout rates, block 0's bias
        # computation) without owning their weights
        object.__setattr__(self, "encoder", model.get_submodule(adapter.encoder))
        object.__setattr__(self, "decoder", model.get_submodule(adapter.decoder))
        object.__setattr__(self, "model_config", model.config)
        #: set by the torch stage running this module: whether it runs for evaluation (None: by the grad mode)
        self.evaluation_outputs: bool | None = None

    def encode(self, x: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The stage's encoder blocks over the source (its ids on the first stage): the encoder's hidden states, or
        its output (final norm applied) on the stage that ends the encoder."""
        adapter, parts = self.adapter, self.parts
        hidden = adapter.encoder_embed(self.encoder, parts, x, self.training) if self.is_first else x
        context = adapter.encoder_context(self.encoder, parts, hidden, batch)
        for block in self.encoder_blocks:
            hidden = adapter.encoder_layer(self.encoder, block, hidden, context)
        return adapter.encoder_end(self.encoder, parts, hidden) if self.ends_encoder else hidden

    def decode(self, x: torch.Tensor, encoder_output: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Generation: the stage's decoder blocks with its KV cache (`batch[CACHE]`, an `EncoderDecoderCache`) over
        the new target tokens (their ids on the stage with decoder block 0): hidden states, or on the last stage the
        last position's logits (HF's `logits_to_keep=1`)."""
        adapter, parts = self.adapter, self.parts
        if self.starts_decoder:
            past = batch[CACHE].get_seq_length()
            hidden = adapter.decoder_embed(self.decoder, parts, x, self.training, past)
        else:
            hidden = x
        context = adapter.decoder_context(self.decoder, parts, hidden, encoder_output, batch)
        for block in self.decoder_blocks:
            hidden = adapter.decoder_layer(self.decoder, block, hidden, encoder_output, context)
        if not self.is_last:
            return hidden
        buffers = {name: getattr(self, name.replace(".", "_")) for name in self.buffer_names}
        return adapter.seq2seq_head(self.model_config, self.decoder, parts, hidden[:, -1:], buffers)

    def forward(self, *inputs: torch.Tensor, **batch: Any):
        adapter, parts = self.adapter, self.parts
        if self.encoder_ids:
            hidden = self.encode(inputs[0], batch)
            if not self.ends_encoder:
                return _fresh(hidden, inputs)
            encoder_output = hidden
            if not self.decoder_ids:
                return _fresh(encoder_output, inputs)
        elif self.starts_decoder:
            (encoder_output,) = inputs
        else:
            hidden, encoder_output = inputs
        if self.starts_decoder:
            hidden = adapter.decoder_embed(self.decoder, parts, batch["decoder_input_ids"], self.training)
        context = adapter.decoder_context(self.decoder, parts, hidden, encoder_output, batch)
        for block in self.decoder_blocks:
            hidden = adapter.decoder_layer(self.decoder, block, hidden, encoder_output, context)
        if not self.is_last:
            # the encoder's output goes on to the next decoder stage; its gradient comes back the same way
            return _fresh(hidden, inputs), encoder_output.clone()
        buffers = {name: getattr(self, name.replace(".", "_")) for name in self.buffer_names}
        logits = adapter.seq2seq_head(self.model_config, self.decoder, parts, hidden, buffers)
        # evaluation returns what the model's forward returns besides the loss (Trainer's predictions); training
        # returns the logits, for the loss. Called outside a schedule: evaluation is a run without autograd.
        evaluation = self.evaluation_outputs if self.evaluation_outputs is not None else not torch.is_grad_enabled()
        return (logits, encoder_output) if evaluation else logits


class Seq2SeqFrontend(Frontend):
    name = "seq2seq"
    wraps_data_parallel = True
    accumulates_in_place = True

    def __init__(self, config: Any):
        super().__init__(config)
        adapter = get_family(config.model_type) if config is not None else None
        self.adapter = adapter if isinstance(adapter, Seq2SeqAdapter) else None

    def problems(self, config, *, pp_size, stages_per_rank, explicit_split, data_parallel):
        if self.adapter is None:
            try:
                seq2seq_adapter(getattr(config, "model_type", ""))
            except PipelineConfigError as err:  # its message names the families
                return [f"pipeline_frontend='seq2seq': {err.problems[0]}"]
        problems = []
        if data_parallel is not None:
            problems.append(
                f"pipeline_data_parallel={data_parallel!r}: replicas of an encoder-decoder pipeline are not supported "
                "yet (replicas must pad source and target alike at every step); launch pipeline_parallel_size "
                "processes (one pipeline)."
            )
        num_stages = pp_size * stages_per_rank
        num_layers = self.adapter.num_layers(config)
        if num_stages > num_layers:
            problems.append(
                f"pipeline_parallel_size={pp_size} × pipeline_stages_per_rank={stages_per_rank} = {num_stages} "
                f"stages, but the model has {num_layers} blocks (encoder and decoder) and every stage needs at least "
                f"one: use at most {num_layers} stages."
            )
        return problems

    def trainer_problems(self, args: Any, model: nn.Module) -> list[str]:
        if task_of(type(model).__name__, model.config) == SEQ2SEQ_LM:
            return []
        return [
            f"{type(model).__name__} has no head PipeTrainer can train on an encoder-decoder: it trains the language-"
            "model head; load the model with AutoModelForSeq2SeqLM (…ForConditionalGeneration)."
        ]

    def plan(self, model, num_stages, split, *, task, context):
        source, target = getattr(context, "sequence_lengths", None) or (None, None)
        return plan_seq2seq(model, num_stages, split, source_len=source, target_len=target)

    def build(self, model, plan, stage_indices, device, weights):
        tied = [(fqns, owner_stages(plan, fqns)) for fqns in tied_groups(model)]
        # a stack's shared modules (T5's relative_attention_bias of block 0): one weight on every stage of that stack
        for path in {**self.adapter.encoder_shared, **self.adapter.decoder_shared}.values():
            for name, _ in model.get_submodule(path).named_parameters():
                fqn = f"{path}.{name}"
                tied.append(([fqn], owner_stages(plan, [fqn])))
        owned = [m for i in stage_indices for m in plan.stages[i].modules]
        keep = {
            name
            for name, _ in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
            if any(name == m or name.startswith(m + ".") for m in owned)
        }
        weights.materialize(model, keep, device)
        modules = [Seq2SeqStage(model, self.adapter, plan, i) for i in stage_indices]
        free_unowned_parameters(model, modules)
        self._shift = lambda labels: self.adapter.decoder_input_ids(model, labels)
        return LocalStages(modules=modules, tied=tied, keep=keep)

    def batch_keys(self, batch: Mapping[str, Any]) -> set[str]:
        return set(self.adapter.batch_keys)

    def keys_note(self) -> str:
        keys = ", ".join(sorted({"input_ids", "labels", *self.adapter.batch_keys}))
        return f"the {self.config.model_type} encoder-decoder stages consume {keys}"

    def unlabelled_problems(self, batch: Mapping[str, Any]) -> list[str]:
        if batch.get("decoder_input_ids") is not None:
            return []  # the decoder reads them, as the model's forward does without labels
        return [
            "an evaluation batch with neither 'labels' nor 'decoder_input_ids': the decoder's input is made from one "
            f"of them, so the {self.config.model_type} forward cannot run (HF's own forward fails too, its decoder "
            'given no input: "You must specify exactly one of input_ids or inputs_embeds"). Give the collator '
            "labels (DataCollatorForSeq2Seq pads them), or decoder_input_ids to score given targets, or generate "
            "instead (PipeSeq2SeqTrainer with predict_with_generate=True, which needs no labels)."
        ]

    def stage_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # the model's forward derives the decoder's input from the labels when none is given: so do the stages
        if batch.get("decoder_input_ids") is None:
            batch = {**batch, "decoder_input_ids": self._shift(batch["labels"])}
        return batch

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
            _Seq2SeqTorchStage(module, index, num_stages, device, group=group, timeline=timeline, training=training)
            for module, index in zip(runnable, stage_indices)
        ]
