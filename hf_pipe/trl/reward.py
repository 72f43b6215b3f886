"""TRL's reward modelling over the pipeline: `PipeRewardTrainer` with `PipeRewardConfig`.

`PipeRewardTrainer` takes exactly `trl.RewardTrainer`'s arguments and keeps its dataset preparation (chat templates,
EOS, `max_length` filter), its pad token on the model's config (the classifier pools each row's last non-padding
token) and its collator. Each batch's rows are reordered so that every pair (chosen, rejected) travels in one
microbatch; the last stage computes the pairwise loss `-logsigmoid(chosen - rejected - margin)` (with the dataset's
`margin` column when it has one) plus `center_rewards_coefficient * (chosen + rejected)**2`, averaged over the
batch's pairs as RewardTrainer averages them, and its `min_reward` / `mean_reward` / `max_reward` / `accuracy` /
`margin` over the whole batch and the replicas; `num_tokens` is counted once per pipeline. A model id or path is
built as `AutoModelForSequenceClassification` with `num_labels=1` on the meta device, each rank reading its stages;
a new score head (from a causal LM's checkpoint) is drawn as RewardTrainer draws it, on the rank that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from trl import RewardConfig, RewardTrainer

from ..errors import raise_if_any
from ..trainer import PipeTrainer
from ..training_args import PipeArgumentsMixin
from ._config import config_problems
from ._metrics import count_train_tokens
from ._model import model_for, path_given, replay_adapter_draws


@dataclass
class PipeRewardConfig(PipeArgumentsMixin, RewardConfig):
    """`trl.RewardConfig` with the pipeline fields of `PipeArgumentsMixin` (every RewardConfig default kept)."""


class PipeRewardTrainer(RewardTrainer, PipeTrainer):
    """`trl.RewardTrainer` whose reward model runs as a pipeline over the launched ranks (see the module docstring).

    Example:
        >>> args = PipeRewardConfig(output_dir="out", center_rewards_coefficient=0.01, pipeline_schedule="1f1b")
        >>> trainer = PipeRewardTrainer(model=path, args=args, train_dataset=preferences, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(self, model: Any, args: PipeRewardConfig | None = None, *positional: Any, **kwargs: Any):
        from transformers import AutoModelForSequenceClassification

        raise_if_any(config_problems(args, PipeRewardConfig, RewardConfig, "RewardTrainer"))
        built = model_for(self, model, args, AutoModelForSequenceClassification, num_labels=1)  # one-score classifier
        with path_given(RewardTrainer, model):
            super().__init__(built, args, *positional, **kwargs)
        replay_adapter_draws(self)  # a path's LoRA adapters: TRL's draws (after the score head's)
        self.engine.rows_per_example = 2  # a pair's rows stay in one microbatch

    # RewardTrainer's compute_loss runs the whole model: the pipeline runs the pairwise loss on its last stage
    compute_loss = PipeTrainer.compute_loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        count_train_tokens(self, inputs["attention_mask"].sum())
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
