"""TRL's supervised fine-tuning and reward modelling under the pipeline: `PipeSFTTrainer` with `PipeSFTConfig`,
`PipeRewardTrainer` with `PipeRewardConfig`.

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

`PipeRewardTrainer` takes exactly `trl.RewardTrainer`'s arguments and keeps its dataset preparation (chat templates,
EOS, `max_length` filter), its pad token on the model's config (the classifier pools each row's last non-padding
token) and its collator. Each batch's rows are reordered so that every pair (chosen, rejected) travels in one
microbatch; the last stage computes the pairwise loss `-logsigmoid(chosen - rejected - margin)` (with the dataset's
`margin` column when it has one) plus `center_rewards_coefficient * (chosen + rejected)**2`, averaged over the
batch's pairs as RewardTrainer averages them, and its `min_reward` / `mean_reward` / `max_reward` / `accuracy` /
`margin` over the whole batch and the replicas; `num_tokens` is counted once per pipeline. A model id or path is
built as `AutoModelForSequenceClassification` with `num_labels=1` on the meta device, each rank reading its stages;
the new score head is then initialised seeded per module as hf_pipe initialises from scratch (RewardTrainer draws it
from the global generator instead): pass a built model for RewardTrainer's very head.

DPO-style trainers (DPO, KTO, ORPO) would also need reference-model log-probabilities through a second, frozen
pipeline (or precomputed): not provided yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - the extra is missing
    raise ImportError("hf_pipe.trl needs TRL: pip install 'hf_pipe[trl]' (trl>=1.16)") from err

from .errors import PipelineConfigError, raise_if_any
from .loading import skeleton
from .trainer import PipeTrainer
from .training_args import PipeTrainingArguments

__all__ = ["PipeRewardConfig", "PipeRewardTrainer", "PipeSFTConfig", "PipeSFTTrainer"]


@dataclass
class PipeSFTConfig(PipeTrainingArguments, SFTConfig):
    """`trl.SFTConfig` with the pipeline fields of `PipeTrainingArguments` (every SFT default kept)."""


def _check_config(args: Any, config_cls: type, trl_config: type, trainer: str) -> list[str]:
    """The config type a TRL trainer under the pipeline needs (a TypeError), and what every one of them refuses."""
    if not isinstance(args, config_cls):
        raise TypeError(
            f"Pipe{trainer} needs args={config_cls.__name__}(...), got {type(args).__name__}: a "
            f"{trl_config.__name__} with the pipeline settings."
        )
    if not args.activation_offloading:
        return []
    return [
        f"activation_offloading=True: {trainer} offloads the activations of its one forward, which the pipeline's "
        "schedule replaces with a forward per microbatch and stage; set it to False (or use gradient_checkpointing)."
    ]


def _skeleton(model: Any, args: Any, *build: Any, **config_kwargs: Any) -> Any:
    """A model id or path as its trainer would build it (`loading.skeleton`), on the meta device, each rank then
    reading its stages from the checkpoint; a built model as it is."""
    if not isinstance(model, str):
        return model
    args.pipeline_checkpoint = args.pipeline_checkpoint or model
    return skeleton(model, dict(args.model_init_kwargs or {}), *build, **config_kwargs)


def _sft_problems(args: PipeSFTConfig) -> list[str]:
    problems = _check_config(args, PipeSFTConfig, SFTConfig, "SFTTrainer")
    if args.loss_type not in ("nll", "dft"):
        problems.append(
            f"loss_type={args.loss_type!r}: PipeSFTTrainer computes SFT's 'nll' and 'dft' losses on the last stage; "
            "use one of those."
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
        raise_if_any(_sft_problems(args))
        model = _skeleton(model, args)  # SFT would build it whole on every rank
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
        # SFT's num_tokens: every token of the batch (padding-free batches: the whole row)
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["position_ids"].size(1)
        _count_train_tokens(self, tokens)
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


def _count_train_tokens(trainer: PipeTrainer, tokens: Any) -> None:
    """TRL's `num_tokens`: the batch's tokens summed over the pipeline replicas (a pipeline's ranks share a batch)."""
    count = torch.as_tensor(tokens, device=trainer.engine.device, dtype=torch.long)
    if trainer._dp_size > 1:
        dist.all_reduce(count, group=trainer.data_parallel.group)
    trainer._total_train_tokens += int(count)
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]


@dataclass
class PipeRewardConfig(PipeTrainingArguments, RewardConfig):
    """`trl.RewardConfig` with the pipeline fields of `PipeTrainingArguments` (every RewardConfig default kept)."""


class PipeRewardTrainer(RewardTrainer, PipeTrainer):
    """`trl.RewardTrainer` whose reward model runs as a pipeline over the launched ranks (see the module docstring).

    Example:
        >>> args = PipeRewardConfig(output_dir="out", center_rewards_coefficient=0.01, pipeline_schedule="1f1b")
        >>> trainer = PipeRewardTrainer(model=path, args=args, train_dataset=preferences, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(self, model: Any, args: PipeRewardConfig | None = None, *positional: Any, **kwargs: Any):
        from transformers import AutoModelForSequenceClassification

        raise_if_any(_check_config(args, PipeRewardConfig, RewardConfig, "RewardTrainer"))
        model = _skeleton(model, args, AutoModelForSequenceClassification, num_labels=1)  # a one-score classifier
        super().__init__(model, args, *positional, **kwargs)
        self.engine.rows_per_example = 2  # a pair's rows stay in one microbatch

    # RewardTrainer's compute_loss runs the whole model: the pipeline runs the pairwise loss on its last stage
    compute_loss = PipeTrainer.compute_loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        _count_train_tokens(self, inputs["attention_mask"].sum())
        return super().training_step(model, _pairs(inputs), num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None):
        self._metrics["eval"]["num_tokens"] = [self._total_train_tokens]
        loss, logits, labels = super().prediction_step(model, _pairs(inputs), prediction_loss_only, ignore_keys)
        if logits is not None:  # back in the collator's order: the chosen rows, then the rejected ones
            logits = torch.cat([logits[0::2], logits[1::2]])
        return loss, logits, labels

    def _loss_normalizer(self, inputs: dict[str, Any], num_items_in_batch: Any, training: bool = True) -> float:
        # RewardTrainer's loss is a mean over the batch's pairs, divided by the accumulation steps in training
        pairs = inputs["input_ids"].shape[0] // 2
        return float(pairs * (self.current_gradient_accumulation_steps if training else 1))

    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        """RewardTrainer's pairwise loss and metrics for the pairs of one microbatch (rows chosen, rejected, ...;
        `labels` holds each row's pair margin)."""
        rewards = outputs.logits.squeeze(-1)
        chosen, rejected = rewards[0::2], rewards[1::2]
        per_pair = -F.logsigmoid(chosen - rejected - labels[0::2].to(rewards.dtype))
        if self.args.center_rewards_coefficient is not None:
            per_pair = per_pair + self.args.center_rewards_coefficient * (chosen + rejected) ** 2
        loss = per_pair.sum() / self.engine.loss.normalizer
        with torch.no_grad():
            pairs = chosen.numel()
            metrics = {
                "min_reward": ("min", rewards.min()),
                "mean_reward": (rewards.sum(), rewards.numel()),
                "max_reward": ("max", rewards.max()),
                "accuracy": ((chosen > rejected).sum(), pairs),
                "margin": ((chosen - rejected).sum(), pairs),
            }
        return loss, metrics

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][name].append(value)  # RewardTrainer's own store, averaged by its log()


def _pairs(inputs: dict[str, Any]) -> dict[str, Any]:
    """A preference batch (the chosen rows, then the rejected ones, `margin` per pair) with each pair's rows next to
    each other and the margins (zero without a `margin` column) in `labels`, one per row: the pipeline's loss
    target."""
    rows = inputs["input_ids"].shape[0]
    order = torch.arange(rows, device=inputs["input_ids"].device).view(2, rows // 2).t().reshape(-1)
    batch = {
        k: v[order] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v for k, v in inputs.items()
    }
    margin = batch.pop("margin", None)
    if margin is None:
        margin = torch.zeros(rows // 2, device=order.device)
    batch["labels"] = margin.float().repeat_interleave(2)
    return batch
