"""`PipeSeq2SeqTrainer`: `Seq2SeqTrainer` over the pipeline, `predict_with_generate` included.

Training, the evaluation loss and the logits `compute_metrics` gets are `PipeTrainer`'s (Trainer's numbers). With
`predict_with_generate=True`, evaluation and `predict()` generate with `generate()` on the *assembled* model: at the
first batch of an evaluation every rank sends its stages' weights to the pipeline's first rank, which builds the
whole model, generates each batch (greedy, beam search, sampling: whatever the generation config says) and sends the
tokens to the other ranks; the loss still runs through the pipeline. The first rank thus holds the whole model (one
more copy of its weights) during an evaluation that generates; for a model that does not fit one device, evaluate
with `predict_with_generate=False` and generate from the saved checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from .evaluation import gather_for_metrics
from .trainer import PipeTrainer
from .training_args import ModelInitKwargs, PipeArgumentsMixin
from .weights import _set, _tied_names


@dataclass
class PipeSeq2SeqTrainingArguments(PipeArgumentsMixin, ModelInitKwargs, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` (`predict_with_generate`, `generation_max_length`, `generation_num_beams`,
    `generation_config`) with the pipeline settings of `PipeTrainingArguments` (every Seq2Seq default kept).

    Example:
        >>> args = PipeSeq2SeqTrainingArguments(output_dir="out", predict_with_generate=True, generation_max_length=32,
        ...                                     pipeline_schedule="1f1b", pipeline_microbatches=4)
    """


class PipeSeq2SeqTrainer(PipeTrainer, Seq2SeqTrainer):
    """A drop-in `Seq2SeqTrainer` whose model runs as a pipeline (see the module docstring for generation).

    Example:
        >>> trainer = PipeSeq2SeqTrainer(model=t5, args=args, train_dataset=train, eval_dataset=dev,
        ...                              data_collator=DataCollatorForSeq2Seq(tokenizer), compute_metrics=metrics)
        >>> trainer.train(); trainer.evaluate(max_new_tokens=16)
    """

    def __init__(
        self, model: nn.Module | None = None, args: PipeSeq2SeqTrainingArguments | None = None, **kwargs: Any
    ):
        self._generator: nn.Module | bool | None = None
        super().__init__(model=model, args=args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._generator = None  # weights change in training: assemble again at the next evaluation

    def predict(self, *args: Any, **kwargs: Any):
        try:
            return super().predict(*args, **kwargs)
        finally:
            self._generator = None

    def _gather_for_metrics(self, data: Any) -> Any:
        # Seq2SeqTrainer gathers with accelerate's plain `gather` ("we don't want to drop samples"): the short last
        # batch of an evaluation is not cut back, so its loss weighs as a full batch's in eval_loss. So here.
        return gather_for_metrics(self, data, cut_last_batch=False)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ):
        if not getattr(self.args, "predict_with_generate", False) or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # the loss through the pipeline (None without labels); `inputs` becomes the batch of the first rank
        loss, _, _ = super().prediction_step(model, inputs, True, ignore_keys)
        if self.args.prediction_loss_only:
            return loss, None, None
        tokens, max_length, max_new_tokens = self._generate(inputs, gen_kwargs)
        labels = inputs.get("labels")
        if labels is None:  # as Seq2SeqTrainer: predictions without labels
            return loss, tokens, None
        if labels.shape[-1] < max_length:
            labels = self._pad_tensors_to_max_len(labels, max_length)
        elif max_new_tokens is not None and labels.shape[-1] < max_new_tokens + 1:
            labels = self._pad_tensors_to_max_len(labels, max_new_tokens + 1)
        return loss, tokens, labels

    # -- generation on the assembled model --------------------------------------------------------------------------
    def _generate(self, inputs: dict[str, Any], gen_kwargs: dict[str, Any]) -> tuple[torch.Tensor, int, int | None]:
        """Seq2SeqTrainer's generation, on the pipeline's first rank; the tokens (padded as Seq2SeqTrainer pads
        them) and the generation config's lengths on every rank of the pipeline."""
        engine = self.engine
        if self._generator is None:
            self._generator = self._assemble()
        result: list[Any] = [None]
        if engine.pp_rank == 0:
            if not gen_kwargs and hasattr(self, "_gen_kwargs"):
                gen_kwargs = self._gen_kwargs.copy()
            gen_kwargs = {k: v for k, v in gen_kwargs.items() if not (k in ("num_beams", "max_length") and v is None)}
            generation_inputs = inputs.copy()
            # decoder inputs made from the labels would have generate() continue them: leave them out (as
            # Seq2SeqTrainer does)
            labels, decoder = generation_inputs.get("labels"), generation_inputs.get("decoder_input_ids")
            if labels is not None and decoder is not None and labels.shape == decoder.shape:
                generation_inputs = {
                    k: v for k, v in inputs.items() if k not in ("decoder_input_ids", "decoder_attention_mask")
                }
            with torch.no_grad():
                tokens = self._generator.generate(**generation_inputs, **gen_kwargs)
            config = self._generator.generation_config
            if config._from_model_config:
                config._from_model_config = False
            config.update(**config._get_default_generation_params(), defaults_only=True)
            if tokens.shape[-1] < config.max_length:
                tokens = self._pad_tensors_to_max_len(tokens, config.max_length)
            elif config.max_new_tokens is not None and tokens.shape[-1] < config.max_new_tokens + 1:
                tokens = self._pad_tensors_to_max_len(tokens, config.max_new_tokens + 1)
            result = [(tuple(tokens.shape), tokens.dtype, config.max_length, config.max_new_tokens)]
        dist.broadcast_object_list(result, group_src=0, group=engine.group, device=engine.device)
        shape, dtype, max_length, max_new_tokens = result[0]
        if engine.pp_rank != 0:
            tokens = torch.empty(shape, dtype=dtype, device=engine.device)
        dist.broadcast(tokens.contiguous(), group_src=0, group=engine.group)
        return tokens, max_length, max_new_tokens

    def _assemble(self) -> nn.Module | bool:
        """The whole model on the pipeline's first rank (every rank's stage weights gathered there); True elsewhere.
        Collective over the pipeline."""
        engine = self.engine
        state = {k: v.detach().to("cpu", copy=True) for k, v in engine.local_state().items()}
        gathered: list[dict[str, torch.Tensor] | None] = [None] * engine.pp_size if engine.pp_rank == 0 else None
        dist.gather_object(state, gathered, group_dst=0, group=engine.group)
        if engine.pp_rank != 0:
            return True
        whole = {k: v for part in gathered for k, v in part.items()}
        groups = _tied_names(self.model)
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, tensor in whole.items():
                old = model.get_parameter(name) if _is_parameter(model, name) else None
                value = tensor.to(engine.device)
                _set(model, name, nn.Parameter(value, requires_grad=False) if old is not None else value)
            for group in groups:  # every name of a tied weight: the one parameter that was saved
                saved = next(name for name in group if name in whole)
                for name in group:
                    _set(model, name, model.get_parameter(saved))
        left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if left:
            raise RuntimeError(f"assembling the model for generation left {len(left)} weights unset: {left[:5]}")
        return model.to(engine.device).eval()


def _is_parameter(model: nn.Module, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(parent)._parameters
