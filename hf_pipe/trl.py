"""TRL's supervised fine-tuning under the pipeline: `PipeSFTTrainer` with `PipeSFTConfig`.

`PipeSFTTrainer` takes exactly `trl.SFTTrainer`'s arguments and keeps what SFT does — dataset preparation, chat
templates, `completion_only_loss` / `assistant_only_loss` masks, packing (BFD, padding-free: cut into microbatches at
sequence boundaries, see `microbatch.py`), PEFT configs — and runs SFT's loss on the pipeline's last stage: `loss_type`
`"nll"` or `"dft"`, normalised as SFT normalises it, with SFT's `entropy` and `mean_token_accuracy` computed there
over the whole batch and `num_tokens` counted once per pipeline, all reported on every rank as SFT logs them.

A model id or path is never built whole: every rank builds the skeleton on the meta device (PEFT applied to it) and
reads its stages' weights from the checkpoint.

    from hf_pipe.trl import PipeSFTConfig, PipeSFTTrainer
    trainer = PipeSFTTrainer(model="path/to/model", args=PipeSFTConfig(output_dir="out", packing=True),
                             train_dataset=dataset, peft_config=LoraConfig(...))

DPO-style trainers (DPO, KTO, ORPO, reward modelling) would also need each pair's chosen and rejected sequences to
travel as one batch (their loss compares the two), reference-model log-probabilities through a second, frozen
pipeline (or precomputed), and their metrics per pair: not provided yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - the extra is missing
    raise ImportError("hf_pipe.trl needs TRL: pip install 'hf_pipe[trl]' (trl>=1.16)") from err

from .errors import PipelineConfigError, raise_if_any
from .loading import skeleton
from .trainer import PipeTrainer
from .training_args import PipeTrainingArguments

__all__ = ["PipeSFTConfig", "PipeSFTTrainer"]


@dataclass
class PipeSFTConfig(PipeTrainingArguments, SFTConfig):
    """`trl.SFTConfig` with the pipeline fields of `PipeTrainingArguments` (every SFT default kept)."""


def _sft_problems(args: PipeSFTConfig) -> list[str]:
    problems = []
    if args.loss_type not in ("nll", "dft"):
        problems.append(
            f"loss_type={args.loss_type!r}: PipeSFTTrainer computes SFT's 'nll' and 'dft' losses on the last stage; "
            "use one of those."
        )
    if args.activation_offloading:
        problems.append(
            "activation_offloading=True: SFT offloads the activations of its one forward, which the pipeline's "
            "schedule replaces with a forward per microbatch and stage; set it to False (or use "
            "gradient_checkpointing)."
        )
    if args.use_liger_kernel:
        problems.append("use_liger_kernel=True: Liger patches the whole model's forward, which no rank runs.")
    return problems


class PipeSFTTrainer(SFTTrainer, PipeTrainer):
    """`trl.SFTTrainer` whose model runs as a pipeline over the launched ranks (see the module docstring).

    Example:
        >>> trainer = PipeSFTTrainer(model=path, args=PipeSFTConfig(output_dir="out", pipeline_schedule="1f1b"),
        ...                          train_dataset=dataset)
        >>> trainer.train()
    """

    def __init__(self, model: Any, args: PipeSFTConfig | None = None, *positional: Any, **kwargs: Any):
        if not isinstance(args, PipeSFTConfig):
            raise TypeError(
                f"PipeSFTTrainer needs args=PipeSFTConfig(...), got {type(args).__name__}: an SFTConfig with the "
                "pipeline settings."
            )
        raise_if_any(_sft_problems(args))
        if isinstance(model, str):  # SFT would build it whole on every rank: the skeleton, read per stage instead
            path, model = model, skeleton(model, dict(args.model_init_kwargs or {}))
            args.pipeline_checkpoint = args.pipeline_checkpoint or path
        if getattr(model.config, "router_aux_loss_coef", 0.0) and getattr(model.config, "output_router_logits", False):
            raise PipelineConfigError(
                "the model's MoE load-balancing loss (output_router_logits) needs every layer's router logits, which "
                "sit on every stage; set config.output_router_logits=False to train without it."
            )
        self._total_train_tokens = 0
        super().__init__(model, args, *positional, **kwargs)

    # SFT's evaluation runs its compute_loss on the whole model: the pipeline's own runs the last stage's loss
    prediction_step = PipeTrainer.prediction_step
    compute_loss = PipeTrainer.compute_loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        # SFT's num_tokens: every token of the batch (padding-free batches: the whole row), over the replicas
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["position_ids"].size(1)
        count = torch.as_tensor(tokens, device=self.engine.device, dtype=torch.long)
        if self._dp_size > 1:
            dist.all_reduce(count, group=self.data_parallel.group)
        self._total_train_tokens += int(count)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        """SFT's loss and metrics from the last stage's logits (the fused LM head's numbers, computed whole)."""
        targets = inputs["shift_labels"]
        mask = targets != -100
        log_probs = F.log_softmax(outputs.logits.float(), dim=-1)
        token = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        valid = mask.sum()
        if self.compute_loss_func is not None:  # SFT hands it the model's outputs; its metrics still come from here
            loss = PipeTrainer.compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch)
        else:
            per_token = -token
            if self.args.loss_type == "dft":  # https://huggingface.co/papers/2508.05629
                per_token = per_token * token.exp().detach()
            count = valid if num_items_in_batch is None else num_items_in_batch
            loss = per_token.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self._dp_size  # as SFT scales it by the processes, DDP averaging the gradients
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
            top1 = (outputs.logits.argmax(-1) == targets) & mask
        metrics = {"entropy": (entropy.sum(), valid), "mean_token_accuracy": (top1.sum(), valid)}
        return loss, metrics

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][name].append(value)  # SFT's own store, averaged by its log()
