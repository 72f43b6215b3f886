"""TRL's ORPO over the pipeline: `PipeORPOTrainer` with `PipeORPOConfig` (`trl.experimental.orpo`).

`PipeORPOTrainer` takes exactly `ORPOTrainer`'s arguments and keeps its dataset preparation (prompt extraction, chat
templates, `tokenize_row`), its collator and its concatenated chosen / rejected batch (`_paired.py`); the last stage
computes ORPO's loss: the chosen rows' NLL over their whole sequence (prompt included), a token mean over the batch,
minus `beta` times the mean over pairs of `logsigmoid` of the log-odds of the chosen and rejected completions' mean
log-probabilities, with ORPO's metrics (`rewards/*`, `logps/*`, `logits/*`, `nll_loss`, `log_odds_ratio`,
`log_odds_chosen`) over the whole batch. Encoder-decoders, MoE router losses and `generate_during_eval` are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from ..training_args import PipeArgumentsMixin
from ._paired import AfterTRL, BatchCounts, PairedLosses, paired_model


@dataclass
class PipeORPOConfig(PipeArgumentsMixin, ORPOConfig):
    """`trl.experimental.orpo.ORPOConfig` with the pipeline fields of `PipeArgumentsMixin` (every ORPOConfig default
    kept)."""


class PipeORPOTrainer(PairedLosses, ORPOTrainer, AfterTRL):
    """`trl.experimental.orpo.ORPOTrainer` whose model runs as a pipeline over the launched ranks (see the module
    docstring).

    Example:
        >>> args = PipeORPOConfig(output_dir="out", beta=0.1, pipeline_schedule="1f1b")
        >>> trainer = PipeORPOTrainer(model=path, args=args, train_dataset=preferences, processing_class=tokenizer)
        >>> trainer.train()
    """

    _pad_attribute = "padding_value"

    def __init__(self, model: Any = None, args: PipeORPOConfig | None = None, *positional: Any, **kwargs: Any):
        built = paired_model(self, model, args, PipeORPOConfig, ORPOConfig, "ORPOTrainer")
        super().__init__(built, args, *positional, **kwargs)
        self.engine.rows_per_example = 2  # a pair's rows stay in one microbatch

    def _nll_labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        # ORPO's NLL reads every token of the chosen sequence, prompt included (the attention mask's)
        return torch.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)

    def _average_log_prob(self) -> bool:
        return True

    def _logits_span(self, length: int) -> int:
        return length - 1  # ORPO's logits metrics leave out the last position

    def _pair_loss(self, chosen_logps, rejected_logps, nll_sum, counts: BatchCounts):
        losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = self.odds_ratio_loss(
            chosen_logps, rejected_logps
        )
        loss = nll_sum / counts.nll_tokens - losses.sum() / counts.pairs
        pairs = losses.numel()
        metrics = {
            "log_odds_ratio": (log_odds_ratio.detach() * pairs, pairs),
            "log_odds_chosen": (log_odds_chosen.detach() * pairs, pairs),
        }
        return loss, (chosen_rewards, rejected_rewards), metrics
