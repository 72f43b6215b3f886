"""TRL's KTO over the pipeline: `PipeKTOTrainer` with `PipeKTOConfig`.

`PipeKTOTrainer` takes exactly `trl.KTOTrainer`'s arguments and keeps its dataset preparation (prompt extraction,
unpairing of a paired dataset, EOS, the prompt / completion split at the common prefix, the `max_length` filter, the
KL completions: each batch's completions rotated by one within blocks of `per_device_train_batch_size`), its collator,
its sequential sampler and its batch-size requirement (KTOTrainer's own checks run). The pipeline runs the collator's
rows as they are (unpaired: any row may go to any microbatch); the labels are the input ids outside the completion
masked (-100), as KTOTrainer scores them, and each row's desirable / undesirable label follows its row.

The reference model, by DPO's three strategies (`_preference.py`, `_reference.py`): a second, frozen set of stages
read from the policy's checkpoint (`ref_model=None`), cut from the `ref_model` given, or (PEFT) the policy's own stages
with the adapters off (or the `"ref"` adapter copy). TR-DPO's `sync_ref_model` mixes each rank's reference stages into
its policy stages.

Before each training (or evaluation) step, forward-only pipelined passes: the reference over the batch (each row's
summed completion log-probability, kept on the last stage) and, for `loss_type="kto"`, the policy and the reference
over the batch's KL rows (the mismatched completions), whose mean log-ratio over the batch, averaged over the
data-parallel replicas as KTOTrainer averages it over processes, clamped at 0, is the step's KL term (detached). Then
on the last stage, per microbatch: KTO's (`kto`) or APO's unpaired (`apo_zero_unpaired`) loss per row, weighted by
`desirable_weight` / `undesirable_weight`, summed over the microbatch's rows and divided by the batch's rows (times
the accumulation steps in training): the microbatches add up to KTOTrainer's mean over the batch. Its metrics (`kl`,
`entropy`, `logits/*`, `rewards/*`, `logps/*`) are pooled over the microbatches and replicas as KTOTrainer gathers them
over processes, each logged only for the steps where KTOTrainer logs it (a batch without undesirable examples logs no
`rewards/rejected`, nor `rewards/margins`); `num_tokens` is counted once per pipeline replica.

`precompute_ref_log_probs=True`: as DPO's (`_reference.py`), one forward-only pass over each dataset before
training (through the reference stages, the policy's own before its first step for full fine-tuning, or with PEFT's
adapters off), its batches shared over the pipeline replicas, the last stage's values gathered to every rank and
stored as KTOTrainer stores them (the columns `ref_logps` and, for `kto`, `ref_KL_logps`, its cache keyed by the
dataset, a hash of the whole model and whether the KL term is computed); each row's value then travels with its row
into its microbatch, and the KL rows' values give the KL term's reference side.

Refused by name before the first step: vision datasets, the MoE router loss, `compute_metrics`,
`activation_offloading`, a frontend other than the module split; `use_liger_kernel`, prompt-learning PEFT and LoRA on
`lm_head` as PipeTrainer (and KTOTrainer) refuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import trl.trainer.kto_trainer as kto_module
from trl import KTOConfig, KTOTrainer

from ..batch_sync import one_batch_per_pipeline
from ..errors import raise_if_any
from ..integrations.peft import is_peft_model
from ..reporting import pool_metrics
from ..trainer import PipeTrainer
from ..training_args import PipeArgumentsMixin
from ._config import config_problems
from ._metrics import count_train_tokens
from ._model import model_for, path_given, replay_adapter_draws
from ._preference import IGNORE_INDEX, reference_forward, reference_stages, reference_trainer_problems, token_stats
from ._reference import SyncReferenceStages, precompute, reference_init

#: metrics KTOTrainer logs only for the steps whose batch (over every process) holds desirable rows, undesirable rows,
#: desirable completion tokens, undesirable completion tokens: each paired with a count reported beside it
_PRESENCE = {
    "_rows/chosen": ("rewards/chosen", "logps/chosen"),
    "_rows/rejected": ("rewards/rejected", "logps/rejected"),
    "_tokens/chosen": ("logits/chosen",),
    "_tokens/rejected": ("logits/rejected",),
}


@dataclass
class PipeKTOConfig(PipeArgumentsMixin, KTOConfig):
    """`trl.KTOConfig` with the pipeline fields of `PipeArgumentsMixin` (every KTOConfig default kept)."""


def _kto_problems(args: Any, model: Any, ref_model: Any, peft: bool, train_dataset: Any, kwargs: dict) -> list[str]:
    """What PipeKTOTrainer refuses before anything is built, each with why and the fix."""
    problems = config_problems(args, PipeKTOConfig, KTOConfig, "KTOTrainer")
    loads_reference = ref_model is None and not args.precompute_ref_log_probs and not peft
    return problems + reference_trainer_problems("KTOTrainer", args, model, train_dataset, kwargs, loads_reference)


def _completion_logps(outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Per row, the summed log-probability of the completion tokens (the labels that are not -100)."""
    return token_stats(outputs.logits, inputs["shift_labels"]).log_probs.sum(-1)


class PipeKTOTrainer(KTOTrainer, PipeTrainer):
    """`trl.KTOTrainer` whose policy and reference run as pipelines over the launched ranks (see the module
    docstring).

    Example:
        >>> args = PipeKTOConfig(output_dir="out", beta=0.1, pipeline_schedule="1f1b", pipeline_microbatches=4)
        >>> trainer = PipeKTOTrainer(model=path, args=args, train_dataset=unpaired, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(self, model: Any, ref_model: Any = None, args: PipeKTOConfig | None = None, *positional, **kwargs):
        train_dataset = kwargs.get("train_dataset", positional[1] if len(positional) > 1 else None)
        peft_config = kwargs.get("peft_config", positional[8] if len(positional) > 8 else None)
        config_problems(args, PipeKTOConfig, KTOConfig, "KTOTrainer")  # the config's type first (a TypeError)
        built = model_for(self, model, args)  # a path: the skeleton TRL would load, on the meta device
        peft = peft_config is not None or is_peft_model(built)
        raise_if_any(_kto_problems(args, built, ref_model, peft, train_dataset, kwargs))
        self._total_train_tokens = 0
        #: the reference's stages (None: the policy's own, with PEFT's adapters off), built on first use:
        #: KTOTrainer's `__init__` may precompute the reference log-probabilities before it returns
        self._reference = None
        self._reference_built = False
        #: per row of the step's batch: the reference log-probability (on the last stage's rank), the label
        self._ref_logps: torch.Tensor | None = None
        self._desirable: torch.Tensor | None = None
        #: the step's KL term (on the last stage's rank): detached, over the batch and the replicas, clamped at 0
        self._kl: torch.Tensor | None = None
        with path_given(KTOTrainer, model), reference_init(self, args, kto_module):
            super().__init__(built, ref_model, args, *positional, **kwargs)
        replay_adapter_draws(self)  # a path's LoRA adapters: TRL's draws
        self._prepared_reference()
        SyncReferenceStages.install(self)  # TR-DPO: each rank mixes its own stages

    # KTOTrainer's compute_loss runs the whole model: the pipeline runs the loss on its last stage
    compute_loss = PipeTrainer.compute_loss

    # -- the reference ---------------------------------------------------------------------------------------------
    def _prepared_reference(self) -> Any:
        """The reference's stages on this rank (None: the policy's own), built once."""
        if not self._reference_built:
            self._reference = reference_stages(self)
            self._reference_built = True
        return self._reference

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        # KTOTrainer's cache (keyed also by whether the KL term is computed), its log-probabilities from forward-only
        # passes through the pipeline (`_reference.py`)
        self._prepared_reference()
        return precompute(self, dataset, name, batch_size, self._reference_columns, key=(self.calculate_KL,))

    def _reference_columns(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """One collator batch's precomputed columns, on the last stage's rank (None elsewhere): each row's reference
        log-probability and, when the KL term is computed, its KL completion's (forward-only passes, collective over
        the pipeline)."""
        reference = self._prepared_reference()
        columns = {"ref_logps": reference_forward(self, reference, self._rows(inputs), _completion_logps)}
        if self.calculate_KL:
            kl_rows = self._rows(inputs, "KL_")
            columns["ref_KL_logps"] = reference_forward(self, reference, kl_rows, _completion_logps)
        return columns if columns["ref_logps"] is not None else None

    # -- the batch -------------------------------------------------------------------------------------------------
    @staticmethod
    def _rows(inputs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """The collator's sequences (`prefix="KL_"`: its KL sequences) as the pipeline runs them, the completion
        as labels."""
        ids = inputs[f"{prefix}input_ids"]
        labels = ids.masked_fill(inputs[f"{prefix}completion_mask"] == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": inputs[f"{prefix}attention_mask"], "labels": labels}

    def _pipeline_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch as the pipeline runs it; before the step, the forward-only passes its loss needs (collective
        over the pipeline): each row's reference log-probability (precomputed: the batch's column, which follows its
        rows into their microbatches) and, for `kto`, the batch's KL term (the policy's pass over the KL rows, the
        reference's from its pass or its precomputed column)."""
        batch = self._rows(inputs)
        self._desirable = inputs["label"].bool()
        self._ref_logps = inputs.get("ref_logps")
        if self._ref_logps is None:
            self._ref_logps = reference_forward(self, self._reference, batch, _completion_logps)
        self._kl = None
        if self.calculate_KL:
            kl_batch = self._rows(inputs, "KL_")
            policy = self.engine.forward(kl_batch, on_last=_completion_logps)[0]  # no gradients
            reference = inputs.get("ref_KL_logps")
            if reference is None:
                reference = reference_forward(self, self._reference, kl_batch, _completion_logps)
            if policy is not None:  # the last stage's rank
                policy = torch.cat(policy)
                kl = (policy - reference.to(policy.device)).mean().detach()
                if self._dp_size > 1:  # KTOTrainer's mean over processes of each one's batch mean
                    dist.all_reduce(kl, group=self.data_parallel.group)
                    kl = kl / self._dp_size
                self._kl = kl.clamp(min=0)
        return batch

    def _loss_normalizer(self, inputs: dict[str, Any], num_items_in_batch: Any, training: bool = True) -> float:
        # KTOTrainer's loss is a mean over the batch's rows, divided by the accumulation steps in training
        # (KTOTrainer's loss_is_scaled_for_ga is False)
        steps = self.current_gradient_accumulation_steps if training else 1
        return float(inputs["input_ids"].shape[0] * steps)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        count_train_tokens(self, inputs["attention_mask"].sum())
        return super().training_step(model, self._pipeline_batch(inputs), num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None):
        self._metrics["eval"]["num_tokens"] = [self._total_train_tokens]
        [inputs] = one_batch_per_pipeline(self.engine, [self._prepare_inputs(inputs)])
        batch = self._pipeline_batch(inputs)
        loss, logits, _ = PipeTrainer.prediction_step(self, model, batch, prediction_loss_only, ignore_keys)
        if logits is None:
            return loss, None, None
        return loss, logits, inputs["input_ids"]  # KTOTrainer's labels: the input ids

    # -- the loss --------------------------------------------------------------------------------------------------
    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        """KTOTrainer's loss and metrics for the rows of one microbatch."""
        stats = token_stats(outputs.logits, inputs["shift_labels"])
        logps = stats.log_probs.sum(-1)
        rows = self.engine.loss.rows()
        logratios = logps - self._ref_logps[rows].to(logps.device)
        desirable = self._desirable[rows].to(logps.device)
        kl = self._kl.to(logps.device) if self._kl is not None else torch.zeros((), device=logps.device)
        beta = self.beta
        if self.loss_type == "kto":  # eq. (7) of the KTO paper
            chosen_losses = 1 - F.sigmoid(beta * (logratios - kl))
            rejected_losses = 1 - F.sigmoid(beta * (kl - logratios))
        elif self.loss_type == "apo_zero_unpaired":
            chosen_losses = 1 - F.sigmoid(beta * logratios)
            rejected_losses = F.sigmoid(beta * logratios)
        else:  # KTOConfig's choices name the valid ones
            raise ValueError(f"Unknown loss type: {self.loss_type}")
        losses = torch.where(
            desirable, self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses
        )
        loss = losses.sum() / self.engine.loss.normalizer
        with torch.no_grad():
            rejected, mask = ~desirable, stats.mask
            rewards = beta * logratios.detach()
            chosen_tokens, rejected_tokens = mask[desirable].sum(), mask[rejected].sum()
            metrics = {
                "kl": kl.detach().float(),  # the same in every microbatch: their mean
                "entropy": (stats.entropy.sum(), mask.sum()),
                "logits/chosen": (stats.mean_logits[desirable].sum(), chosen_tokens),
                "logits/rejected": (stats.mean_logits[rejected].sum(), rejected_tokens),
                "rewards/chosen": (rewards[desirable].sum(), desirable.sum()),
                "rewards/rejected": (rewards[rejected].sum(), rejected.sum()),
                "logps/chosen": (logps.detach()[desirable].sum(), desirable.sum()),
                "logps/rejected": (logps.detach()[rejected].sum(), rejected.sum()),
                # a positive mean over the microbatches and replicas where the batch has any
                "_rows/chosen": (desirable.sum(), 1),
                "_rows/rejected": (rejected.sum(), 1),
                "_tokens/chosen": (chosen_tokens, 1),
                "_tokens/rejected": (rejected_tokens, 1),
            }
        return loss, metrics

    def _record_pipeline_metrics(self, mode: str) -> None:
        # KTOTrainer appends a chosen / rejected metric only when the batch (over every process) has such rows, and
        # the margins only when it has both
        values = pool_metrics(self.engine.metrics, self.data_parallel, self.engine.device)
        present = {name: values.pop(name, 0.0) > 0 for name in _PRESENCE}
        for count, names in _PRESENCE.items():
            if not present[count]:
                for name in names:
                    values.pop(name, None)
        if present["_rows/chosen"] and present["_rows/rejected"]:
            values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        for name in sorted(values):
            self.store_pipeline_metric(mode, name, values[name])

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][name].append(value)  # KTOTrainer's own store, averaged by its log()
