"""TRL's CPO over the pipeline, with its SimPO and AlphaPO variants: `PipeCPOTrainer` with `PipeCPOConfig`
(`trl.experimental.cpo`).

`PipeCPOTrainer` takes exactly `CPOTrainer`'s arguments and keeps its dataset preparation (prompt extraction, chat
templates, `tokenize_row`), its collator, its pad token on the model's config and its concatenated chosen / rejected
batch (`_paired.py`); the last stage computes CPO's loss: the mean over pairs of the `loss_type`'s loss (`sigmoid`
with `label_smoothing`, `hinge`, `ipo`, `simpo` with `simpo_gamma`; `alphapo` is `simpo` with `cpo_alpha=0`, and
`alpha` reshapes the rewards for every loss type) on the completions' summed log-probabilities (averaged for `ipo`
and `simpo`), plus `cpo_alpha` times the chosen completions' NLL, a token mean over the batch; with CPO's metrics
(`rewards/*`, `logps/*`, `logits/*`, `nll_loss`) over the whole batch. Encoder-decoders, MoE router losses and
`generate_during_eval` are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.experimental.cpo import CPOConfig, CPOTrainer

from ..training_args import PipeArgumentsMixin
from ._paired import AfterTRL, BatchCounts, PairedLosses, paired_model


@dataclass
class PipeCPOConfig(PipeArgumentsMixin, CPOConfig):
    """`trl.experimental.cpo.CPOConfig` with the pipeline fields of `PipeArgumentsMixin` (every CPOConfig default
    kept)."""


class PipeCPOTrainer(PairedLosses, CPOTrainer, AfterTRL):
    """`trl.experimental.cpo.CPOTrainer` whose model runs as a pipeline over the launched ranks (see the module
    docstring).

    Example:
        >>> args = PipeCPOConfig(output_dir="out", loss_type="simpo", cpo_alpha=0.5, pipeline_schedule="1f1b")
        >>> trainer = PipeCPOTrainer(model=path, args=args, train_dataset=preferences, processing_class=tokenizer)
        >>> trainer.train()
    """

    _pad_attribute = "pad_token_id"

    def __init__(self, model: Any = None, args: PipeCPOConfig | None = None, *positional: Any, **kwargs: Any):
        built = paired_model(self, model, args, PipeCPOConfig, CPOConfig, "CPOTrainer")
        super().__init__(built, args, *positional, **kwargs)
        self.engine.rows_per_example = 2  # a pair's rows stay in one microbatch

    def _nll_labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        return inputs["labels"]  # CPO's NLL reads the chosen completion only

    def _average_log_prob(self) -> bool:
        return self.loss_type in ("ipo", "simpo")

    def _logits_span(self, length: int) -> int:
        return length  # CPO's logits metrics cover every position

    def _with_nll(self) -> bool:
        return self.cpo_alpha != 0

    def _pair_loss(self, chosen_logps, rejected_logps, nll_sum, counts: BatchCounts):
        losses, chosen_rewards, rejected_rewards = self.cpo_loss(chosen_logps, rejected_logps)
        loss = losses.sum() / counts.pairs
        if nll_sum is not None:
            loss = loss + self.cpo_alpha * nll_sum / counts.nll_tokens
        return loss, (chosen_rewards, rejected_rewards), {}
