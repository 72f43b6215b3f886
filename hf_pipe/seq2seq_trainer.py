"""`PipeSeq2SeqTrainer`: `Seq2SeqTrainer` over the pipeline, `predict_with_generate` included.

Training, the evaluation loss and the logits `compute_metrics` gets are `PipeTrainer`'s (Trainer's numbers). With
`predict_with_generate=True`, evaluation and `predict()` generate through the pipeline (`generation.PipelineGenerator`:
each rank runs only its own stages, with a KV cache per stage), for encoder-decoders and for causal LMs alike, with
what `Seq2SeqTrainer.prediction_step` passes `generate` — the batch without decoder inputs made from the labels, the
`gen_kwargs` of `evaluate` / `predict` or else `generation_max_length` / `generation_num_beams`, the model's generation
config (`args.generation_config` loaded into it) — and the tokens and labels padded as it pads them. No rank holds
more than its own stages' weights. The generator is built at the first evaluation that generates (collective: every
rank of the world reaches it) and kept for the trainer's life: the stages it runs are the trained ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from .evaluation import gather_for_metrics
from .trainer import PipeTrainer
from .training_args import ModelInitKwargs, PipeArgumentsMixin


@dataclass
class PipeSeq2SeqTrainingArguments(PipeArgumentsMixin, ModelInitKwargs, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` (`predict_with_generate`, `generation_max_length`, `generation_num_beams`,
    `generation_config`) with the pipeline settings of `PipeTrainingArguments` (every Seq2Seq default kept).

    Example:
        >>> args = PipeSeq2SeqTrainingArguments(output_dir="out", predict_with_generate=True, generation_max_length=32,
        ...                                     pipeline_schedule="1f1b", pipeline_microbatches=4)
    """


class PipeSeq2SeqTrainer(PipeTrainer, Seq2SeqTrainer):
    """A drop-in `Seq2SeqTrainer` whose model runs as a pipeline, generating through it (see the module docstring).

    Example:
        >>> trainer = PipeSeq2SeqTrainer(model=t5, args=args, train_dataset=train, eval_dataset=dev,
        ...                              data_collator=DataCollatorForSeq2Seq(tokenizer), compute_metrics=metrics)
        >>> trainer.train(); trainer.evaluate(max_new_tokens=16)
    """

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

    # -- generation through the pipeline ------------------------------------------------------------------------------
    def _generate(self, inputs: dict[str, Any], gen_kwargs: dict[str, Any]) -> tuple[torch.Tensor, int, int | None]:
        """`Seq2SeqTrainer.prediction_step`'s generation, line by line, through the pipeline: the tokens (padded as it
        pads them) and the generation config's lengths, on every rank of the pipeline."""
        # Priority (handled in generate): non-`None` gen_kwargs > model.generation_config > default GenerationConfig()
        if len(gen_kwargs) == 0 and hasattr(self, "_gen_kwargs"):
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
        tokens = self.generator.generate(**generation_inputs, **gen_kwargs)  # built at the first call: collective
        # as Seq2SeqTrainer: the model's generation config, with the defaults filled in, says how far to pad
        config = self.model.generation_config
        if config._from_model_config:
            config._from_model_config = False
        config.update(**config._get_default_generation_params(), defaults_only=True)
        if tokens.shape[-1] < config.max_length:
            tokens = self._pad_tensors_to_max_len(tokens, config.max_length)
        elif config.max_new_tokens is not None and tokens.shape[-1] < config.max_new_tokens + 1:
            tokens = self._pad_tensors_to_max_len(tokens, config.max_new_tokens + 1)
        return tokens, config.max_length, config.max_new_tokens
