"""What ORPO and CPO share under the pipeline (`orpo.py`, `cpo.py`): TRL's older preference-trainer code path, with
no reference model, its loss a function of per-row completion log-probabilities, the chosen rows' NLL and logits
statistics.

TRL's trainers tokenise the dataset (`tokenize_row`), collate with `DPODataCollatorWithPadding` and concatenate each
batch's chosen rows, then its rejected rows (`concatenated_inputs`), all kept as they are. Here each pair's rows are
put next to each other (`engine.rows_per_example = 2`: a pair never straddles two microbatches) and the labels the
log-probabilities read travel as the pipeline's `labels`; the last stage computes TRL's loss per microbatch with the
batch's own normalisers (a token mean over the batch's chosen tokens: the microbatch's token sum over the batch's
count; a mean over pairs: the microbatch's pair sum over the batch's pair count), so that the microbatch losses add
up to TRL's batch loss, and every TRL metric pooled over the microbatches and replicas as TRL averages it over the
batch. Evaluation runs the same loss on the whole batch and returns TRL's two "predictions" (the mean chosen and
rejected logits).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PipelineConfigError
from ..loading import skeleton
from ..microbatch import IGNORE_INDEX
from ..trainer import PipeTrainer
from ._config import config_problems
from ._model import replay_adapter_draws

#: what TRL's `concatenated_inputs` makes of a decoder's batch, and the pipeline batch key each becomes
_CONCATENATED = {
    "concatenated_input_ids": "input_ids",
    "concatenated_attention_mask": "attention_mask",
    "concatenated_labels": "labels",
}


@dataclass(frozen=True)
class BatchCounts:
    """What TRL's batch-level means divide by, counted once on the whole batch (before the microbatch cut)."""

    pairs: int
    #: the chosen rows' tokens the NLL averages over (after the shift)
    nll_tokens: int
    #: the batch's sequence length (the logits means cover its positions, not padding added for the replicas)
    length: int


def paired_model(trainer: Any, model: Any, args: Any, config_cls: type, trl_config: type, name: str) -> Any:
    """`model` as `trainer` (an ORPO or CPO trainer over the pipeline, before its `__init__`) runs it — a path built
    on the meta device as TRL's `from_pretrained` would build it, each rank later reading its stages — once every
    problem is refused by name (`PipelineConfigError`, on every rank, before anything is built)."""
    problems = config_problems(args, config_cls, trl_config, name)  # a TypeError for a config of another type
    if isinstance(model, str):
        # TRL: from_pretrained(path, **model_init_kwargs) with its checkpoint's dtype ("auto") and trust_remote_code,
        # right after set_seed(args.seed): missing weights drawn from the global generator
        kwargs = dict(args.model_init_kwargs or {})
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        args.pipeline_checkpoint = args.pipeline_checkpoint or model
        trainer._init_missing = "global"
        if args.model_init_kwargs is not None:
            # TRL refuses model_init_kwargs beside a built model (the skeleton): hidden while its __init__ runs,
            # restored for PipeTrainer's (`AfterTRL`), which reads the stages with them
            trainer._hidden_init_kwargs = kwargs
            args.model_init_kwargs = None
        model = skeleton(model, kwargs)
        trainer._path_skeleton = copy.deepcopy(model)  # on the meta device: no weights copied
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        problems.append(
            f"{type(model).__name__} is an encoder-decoder: {name}'s encoder-decoder path (prompt to the encoder, "
            "completions to the decoder) does not run under the pipeline; use a decoder-only model."
        )
    if getattr(config, "output_router_logits", False):
        problems.append(
            f"output_router_logits=True on the model's config: {name} adds the router's auxiliary loss from the "
            "model's output, which the pipeline's last stage does not return; set it to False."
        )
    if args.generate_during_eval:
        problems.append(
            f"generate_during_eval=True: {name} generates with the whole model, which no rank holds; set it to False."
        )
    if problems:
        raise PipelineConfigError(problems)
    return model


class AfterTRL(PipeTrainer):
    """PipeTrainer as the base of TRL's trainer (it follows TRL's classes in the MRO): `model_init_kwargs`, hidden
    from TRL's `__init__` (`paired_model`), are back when PipeTrainer's reads them."""

    def __init__(self, *args: Any, **kwargs: Any):
        hidden = self.__dict__.pop("_hidden_init_kwargs", None)
        if hidden is not None:
            kwargs["args"].model_init_kwargs = hidden
        super().__init__(*args, **kwargs)
        replay_adapter_draws(self)


class PairedLosses:
    """The pipeline side of an ORPO or CPO trainer (first in its MRO; see the module docstring). A trainer defines
    `_pad_attribute` (its padding value's attribute), `_nll_labels`, `_average_log_prob`, `_logits_span` and
    `_pair_loss`."""

    _pad_attribute: str

    # TRL's compute_loss runs the whole model: the pipeline runs the loss on its last stage
    compute_loss = PipeTrainer.compute_loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        return super().training_step(model, self._paired_batch(inputs), num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None):
        loss, _, _ = PipeTrainer.prediction_step(self, model, self._paired_batch(inputs), True, ignore_keys)
        if prediction_loss_only:
            return loss, None, None
        # TRL's predictions: the batch's mean chosen and rejected logits, its labels zeros
        if ignore_keys is None:
            ignore_keys = getattr(self.model.config, "keys_to_ignore_at_inference", None) or []
        stored = self._stored_metrics["eval"]
        keys = [k for k in ("eval_logits/chosen", "eval_logits/rejected") if k not in ignore_keys]
        logits = torch.tensor([stored[k][-1] for k in keys], device=self.accelerator.device)
        return loss, logits, torch.zeros(logits.shape[0], device=self.accelerator.device)

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        # TRL's own store, averaged by its log(); its evaluation metrics carry the prefix
        self._stored_metrics[mode][("eval_" if mode == "eval" else "") + name].append(value)

    def _paired_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """TRL's concatenated batch (chosen rows, then rejected ones) with each pair's rows next to each other."""
        concatenated = self.concatenated_inputs(
            inputs, is_encoder_decoder=False, padding_value=getattr(self, self._pad_attribute)
        )
        if unknown := sorted(concatenated.keys() - _CONCATENATED.keys()):
            raise PipelineConfigError(
                [
                    f"batch keys {unknown} (from the collator's chosen_* / rejected_* columns): the pipeline runs the "
                    "model on input_ids and attention_mask only, so the model would train without them; remove "
                    "them from the dataset or the collator."
                ]
            )
        rows = concatenated["concatenated_input_ids"].shape[0]
        order = torch.arange(rows).view(2, rows // 2).t().reshape(-1)
        return {_CONCATENATED[k]: v[order.to(v.device)] for k, v in concatenated.items()}

    def _loss_normalizer(self, inputs: dict[str, Any], num_items_in_batch: Any, training: bool = True) -> float:
        # TRL's loss mixes two batch means (tokens, pairs): counted here, applied in compute_microbatch_loss; a
        # training batch's loss is divided by the accumulation steps (loss_is_scaled_for_ga = False)
        labels = inputs["labels"]
        nll = self._nll_labels(inputs)[0::2, 1:]
        self._batch_counts = BatchCounts(labels.shape[0] // 2, int((nll != IGNORE_INDEX).sum()), labels.shape[1])
        return float(self.current_gradient_accumulation_steps if training else 1)

    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        """TRL's loss and metrics for the pairs of one microbatch (rows chosen, rejected, chosen, ...)."""
        counts = self._batch_counts
        logits = outputs.logits
        logps = self.get_batch_logps(
            logits, labels, average_log_prob=self._average_log_prob(), is_encoder_decoder=False
        )
        chosen_logps, rejected_logps = logps[0::2], logps[1::2]
        nll_sum = nll_count = None
        if self._with_nll():
            # nn.CrossEntropyLoss's mean over the batch's chosen tokens, as a sum over this microbatch's
            targets = self._nll_labels(inputs)[0::2, 1:]
            nll_sum = F.cross_entropy(
                logits[0::2, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            nll_count = (targets != IGNORE_INDEX).sum()
        loss, rewards, metrics = self._pair_loss(chosen_logps, rejected_logps, nll_sum, counts)
        with torch.no_grad():
            pairs = chosen_logps.numel()
            chosen_rewards, rejected_rewards = rewards
            span = self._logits_span(counts.length)
            per_row = span * logits.shape[-1]  # TRL's logits means cover every position of the batch's length
            metrics.update(
                {
                    "rewards/chosen": (chosen_rewards.sum(), pairs),
                    "rewards/rejected": (rejected_rewards.sum(), pairs),
                    "rewards/accuracies": ((chosen_rewards > rejected_rewards).sum(), pairs),
                    "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), pairs),
                    "logps/rejected": (rejected_logps.sum(), pairs),
                    "logps/chosen": (chosen_logps.sum(), pairs),
                    "logits/rejected": (logits[1::2, :span].double().sum(), pairs * per_row),
                    "logits/chosen": (logits[0::2, :span].double().sum(), pairs * per_row),
                    "nll_loss": (0.0, 1) if nll_sum is None else (nll_sum.detach(), nll_count),
                }
            )
        return loss / self.engine.loss.normalizer, metrics

    def _with_nll(self) -> bool:
        return True
