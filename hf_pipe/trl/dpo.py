"""TRL's DPO over the pipeline: `PipeDPOTrainer` with `PipeDPOConfig`.

`PipeDPOTrainer` takes exactly `trl.DPOTrainer`'s arguments and keeps its dataset preparation (prompt extraction,
EOS, the prompt / chosen / rejected split at the common prefix, the `max_length` filter) and its collator. Each batch's
rows are interleaved so that a pair's chosen and rejected rows travel in one microbatch; the labels are the input ids
outside the completion masked (-100), as DPOTrainer scores them.

The reference model. DPOTrainer would load a whole second model on every rank: here it is a second, frozen set of
stages with the policy's split on the same ranks (weights only: no gradients, no optimizer state), read per stage
from the checkpoint DPOTrainer would load it from (`ref_model=None`: the policy's `config._name_or_path`) or cut from
the `ref_model` given. With PEFT (`peft_config`, or a `PeftModel` and its `"ref"` adapter copy) the reference is the
policy's own stages with the adapters off (or the `"ref"` adapter). Before each training (or evaluation) step a
forward-only pipelined pass of the same batch through those stages gives each row's reference log-probability, kept
on the last stage; never inside the training schedule.

Refused by name before the first step: `aot` / `aot_unpaired`, `padding_free`, `use_liger_kernel`, vision datasets,
`compute_metrics`, `activation_offloading`, `use_weighting` with `sft`; prompt-learning PEFT and LoRA on `lm_head` as
PipeTrainer and DPOTrainer refuse them. An MoE policy's load-balancing loss is added as DPOTrainer adds it (its
`router_aux_loss_coef`, per microbatch, divided by the accumulation steps as Trainer divides DPO's loss) and logged as
its `aux_loss`; the frozen reference returns none, as TRL's reference forward.

`precompute_ref_log_probs=True`: one forward-only pass over each dataset before training, its batches shared over the
pipeline replicas, the last stage's values gathered to every rank, stored as DPOTrainer stores them (the columns
`ref_chosen_logps` / `ref_rejected_logps`, its cache keyed by the dataset and a hash of the whole model); each batch's
values then travel with their pairs. `sync_ref_model=True` (TR-DPO): TRL's cadence and alpha, each rank mixing its
reference stages into its policy stages (`_reference.py`).

The loss. On the last stage, per microbatch: each row's summed completion log-probability from the logits (TRL's
fused LM head computes the same values tile by tile; they agree to float32 rounding), `ld_alpha`'s
shared / tail weighting, `f_divergence_type`'s scores, and every per-pair loss type of DPOTrainer (`sigmoid`,
`hinge`, `ipo`, `exo_pair`, `nca_pair`, `robust`, `bco_pair`, `sppo_hard`, `apo_zero`, `apo_down`, `discopop`,
`sigmoid_norm`), with `loss_weights`, `label_smoothing` and WPO's `use_weighting`, summed over the microbatch's pairs
and divided by the batch's pairs (times the accumulation steps in training); `sft`, DPOTrainer's token mean over the
batch's chosen completion tokens, divided by that count. The metrics DPOTrainer logs (`rewards/*`, `logps/*`,
`logits/*`, `entropy`, `mean_token_accuracy`) are pooled over the microbatches and data-parallel replicas as
DPOTrainer pools them over processes; `num_tokens` is counted once per pipeline replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from ..batch_sync import one_batch_per_pipeline
from ..errors import raise_if_any
from ..integrations.peft import is_peft_model
from ..trainer import PipeTrainer
from ..training_args import PipeArgumentsMixin
from ._config import config_problems
from ._metrics import count_train_tokens
from ._model import model_for, path_given, replay_adapter_draws, route_router_logits
from ._preference import (
    IGNORE_INDEX,
    deinterleave,
    interleave,
    reference_forward,
    reference_stages,
    reference_trainer_problems,
    token_stats,
)
from ._reference import SyncReferenceStages, precompute, reference_init

#: the loss types whose loss compares the whole batch (they sort its pairs): no microbatch holds what they need
_BATCH_LOSSES = ("aot", "aot_unpaired")


@dataclass
class PipeDPOConfig(PipeArgumentsMixin, DPOConfig):
    """`trl.DPOConfig` with the pipeline fields of `PipeArgumentsMixin` (every DPOConfig default kept)."""


def _dpo_problems(args: Any, model: Any, ref_model: Any, peft: bool, train_dataset: Any, kwargs: dict) -> list[str]:
    """What PipeDPOTrainer refuses before anything is built, each with why and the fix."""
    problems = config_problems(args, PipeDPOConfig, DPOConfig, "DPOTrainer")
    losses = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    if batch_losses := [t for t in losses if t in _BATCH_LOSSES]:
        problems.append(
            f"loss_type={batch_losses}: these losses sort the log-ratios of the whole batch, which no microbatch of "
            "the pipeline holds; use a per-pair loss type ('sigmoid', 'hinge', 'ipo', ...)."
        )
    if args.use_weighting and "sft" in losses:
        problems.append(
            "use_weighting=True with loss_type 'sft': DPOTrainer multiplies the batch's SFT token mean by each "
            "pair's WPO weight, a product of two whole-batch sums of the policy's own forward that no microbatch "
            "can split; drop 'sft' from loss_type or set use_weighting=False."
        )
    if args.padding_free:
        problems.append(
            "padding_free=True: DPOTrainer itself falls back to padding; set padding_free=False (the pipeline cuts "
            "padded rows, a pair per microbatch at least)."
        )
    loads_reference = ref_model is None and not args.precompute_ref_log_probs and not peft
    return problems + reference_trainer_problems("DPOTrainer", args, model, train_dataset, kwargs, loads_reference)


class PipeDPOTrainer(DPOTrainer, PipeTrainer):
    """`trl.DPOTrainer` whose policy and reference run as pipelines over the launched ranks (see the module
    docstring).

    Example:
        >>> args = PipeDPOConfig(output_dir="out", beta=0.1, pipeline_schedule="1f1b", pipeline_microbatches=4)
        >>> trainer = PipeDPOTrainer(model=path, args=args, train_dataset=preferences, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(self, model: Any, ref_model: Any = None, args: PipeDPOConfig | None = None, *positional, **kwargs):
        train_dataset = kwargs.get("train_dataset", positional[1] if len(positional) > 1 else None)
        peft_config = kwargs.get("peft_config", positional[-1] if len(positional) > 9 else None)
        config_problems(args, PipeDPOConfig, DPOConfig, "DPOTrainer")  # the config's type first (a TypeError)
        built = model_for(self, model, args)  # a path: the skeleton TRL would load, on the meta device
        peft = peft_config is not None or is_peft_model(built)
        raise_if_any(_dpo_problems(args, built, ref_model, peft, train_dataset, kwargs))
        self._total_train_tokens = 0
        #: the reference's stages (None: the policy's own, with PEFT's adapters off), built on first use: DPOTrainer's
        #: `__init__` may precompute the reference log-probabilities before it returns
        self._reference_built = False
        #: per row of the step's (interleaved) batch, the reference log-probability (on the last stage's rank)
        self._ref_logps: torch.Tensor | None = None
        #: the chosen completion tokens of the step's batch, times the accumulation steps: `sft`'s normaliser
        self._sft_normalizer = 1.0
        route_router_logits(built, args)  # DPO asks each forward for router logits: the stages must carry them
        with path_given(DPOTrainer, model), reference_init(self, args):
            super().__init__(built, ref_model, args, *positional, **kwargs)
        replay_adapter_draws(self)  # a path's LoRA adapters: TRL's draws
        if (router := self.engine.loss.router) is not None:
            router.coef = self.router_aux_loss_coef  # DPO weighs the aux loss with its own coefficient
        self._prepared_reference()
        SyncReferenceStages.install(self)  # TR-DPO: each rank mixes its own stages

    # DPOTrainer's compute_loss runs the whole model: the pipeline runs the loss on its last stage
    compute_loss = PipeTrainer.compute_loss

    # -- the reference ---------------------------------------------------------------------------------------------
    def _prepared_reference(self) -> Any:
        """The reference's stages on this rank (None: the policy's own), built once."""
        if not self._reference_built:
            self.engine.rows_per_example = 2  # a pair's rows stay in one microbatch
            self._reference = self._reference_stages()
            self._reference_built = True
        return self._reference

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        # DPOTrainer's cache, its log-probabilities from a forward-only pass through the pipeline (`_reference.py`)
        self._prepared_reference()
        return precompute(self, dataset, name, batch_size, self._reference_columns)

    def _reference_columns(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """One collator batch's precomputed columns, on the last stage's rank (None elsewhere): each pair's chosen
        and rejected reference log-probabilities, from a forward-only pass (collective over the pipeline)."""
        values = self._reference_logps(self._as_pipeline_batch(inputs)[0])
        if values is None:
            return None
        chosen, rejected = deinterleave(values).view(2, -1)  # the collator's rows: chosen, then rejected
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def _reference_stages(self) -> Any:
        """The reference's stages on this rank, cut like the policy's; frozen."""
        return reference_stages(self)

    def _reference_logps(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Each row's reference log-probability: a forward-only pass of `batch` through the reference stages, or
        (PEFT) through the policy's own stages with the adapters off (`_preference.reference_forward`)."""
        return reference_forward(self, self._reference, batch, self._row_logps)

    def _row_logps(self, outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
        return self._sequence_logps(token_stats(outputs.logits, inputs["shift_labels"]).log_probs, inputs)

    def _sequence_logps(self, per_token: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Per row, the summed completion log-probability; with `ld_alpha`, LD-DPO's: the tokens past the shorter
        completion of the pair weighted by `ld_alpha`."""
        if self.ld_alpha is None:
            return per_token.sum(-1)
        mask = inputs["shift_labels"] != IGNORE_INDEX
        position = mask.cumsum(-1)
        lengths = mask.sum(-1)
        shared = torch.minimum(lengths[0::2], lengths[1::2]).repeat_interleave(2).unsqueeze(-1)
        shared_logps = (per_token * ((position > 0) & (position <= shared))).sum(-1)
        tail_logps = (per_token * (position > shared)).sum(-1)
        return shared_logps + self.ld_alpha * tail_logps

    # -- the batch -------------------------------------------------------------------------------------------------
    def _as_pipeline_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The collator's batch as the pipeline runs it (pairs interleaved, the completion as labels), and its rows'
        precomputed reference log-probabilities in that order (None when the batch has none)."""
        batch = dict(inputs)
        completion = batch.pop("completion_mask")
        chosen, rejected = batch.pop("ref_chosen_logps", None), batch.pop("ref_rejected_logps", None)
        batch["labels"] = batch["input_ids"].masked_fill(completion == 0, IGNORE_INDEX)
        cached = torch.stack([chosen, rejected], dim=1).reshape(-1) if chosen is not None else None
        return interleave(batch), cached

    def _pipeline_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch as the pipeline runs it, its rows' reference log-probabilities kept for the loss: the cached
        ones, which follow their pair into its microbatch, or a forward-only pass (collective over the pipeline)."""
        batch, cached = self._as_pipeline_batch(inputs)
        self._ref_logps = cached if cached is not None else self._reference_logps(batch)
        return batch

    def _loss_normalizer(self, inputs: dict[str, Any], num_items_in_batch: Any, training: bool = True) -> float:
        # DPOTrainer's loss is a mean over the batch's pairs (its `sft` term a mean over the chosen completion tokens),
        # divided by the accumulation steps in training (DPOTrainer's loss_is_scaled_for_ga is False)
        steps = self.current_gradient_accumulation_steps if training else 1
        chosen_tokens = int((inputs["labels"][0::2, 1:] != IGNORE_INDEX).sum())
        self._sft_normalizer = float(chosen_tokens * steps)
        return float(inputs["input_ids"].shape[0] // 2 * steps)

    def _router_aux_weight(self, num_items_in_batch: Any) -> tuple[float, bool]:
        # DPO adds `coef · aux` to each forward's loss, which Trainer divides by the accumulation steps (the
        # microbatches being those steps here)
        return self.router_aux_loss_coef / self.current_gradient_accumulation_steps, True

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
        return loss, deinterleave(logits), inputs["input_ids"]  # DPOTrainer's labels: the input ids

    # -- the loss --------------------------------------------------------------------------------------------------
    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        """DPOTrainer's loss and metrics for the pairs of one microbatch (rows chosen, rejected, chosen, ...)."""
        stats = token_stats(outputs.logits, inputs["shift_labels"], log_sum_sq_probs=self.use_weighting)
        mask = stats.mask
        logps = self._sequence_logps(stats.log_probs, inputs)
        ref = self._ref_logps[self.engine.loss.rows()].to(logps.device)
        chosen_logps, rejected_logps = logps[0::2], logps[1::2]
        chosen_logratios = chosen_logps - ref[0::2]
        rejected_logratios = rejected_logps - ref[1::2]
        completion_lengths = (inputs["labels"] != IGNORE_INDEX).sum(-1)  # DPOTrainer's unshifted completion mask
        per_pair = self._pair_losses(chosen_logratios, rejected_logratios, completion_lengths)
        if self.use_weighting:  # WPO (eq. 2): each pair weighted by its rows' mean aligned log-probabilities
            with torch.no_grad():
                aligned = ((stats.log_probs - stats.log_sum_sq_probs) * mask).sum(-1) / mask.sum(-1).clamp_min(1)
                weights = aligned.exp()
            per_pair = per_pair * weights[0::2] * weights[1::2]
        loss = per_pair.sum() / self.engine.loss.normalizer
        if "sft" in self.loss_types:
            weight = self.loss_weights[self.loss_types.index("sft")]
            loss = loss - weight * stats.log_probs[0::2].sum() / self._sft_normalizer
        if getattr(outputs, "aux_loss", None) is not None:  # an MoE policy's load-balancing loss, as DPO adds it
            loss = loss + self.engine.loss.aux_weight * outputs.aux_loss
        with torch.no_grad():
            pairs = chosen_logps.numel()
            chosen, rejected = mask[0::2], mask[1::2]
            chosen_rewards, rejected_rewards = self.beta * chosen_logratios, self.beta * rejected_logratios
            metrics = {
                "entropy": (stats.entropy.sum(), mask.sum()),
                "logits/chosen": (stats.mean_logits[0::2].sum(), chosen.sum()),
                "logits/rejected": (stats.mean_logits[1::2].sum(), rejected.sum()),
                "mean_token_accuracy": (stats.is_top1[0::2].sum(), chosen.sum()),
                "rewards/chosen": (chosen_rewards.sum(), pairs),
                "rewards/rejected": (rejected_rewards.sum(), pairs),
                "rewards/accuracies": ((chosen_rewards > rejected_rewards).sum(), pairs),
                "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), pairs),
                "logps/chosen": (chosen_logps.sum(), pairs),
                "logps/rejected": (rejected_logps.sum(), pairs),
            }
        return loss, metrics

    def _pair_losses(
        self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, completion_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Per pair, DPOTrainer's weighted sum of its per-pair loss types (`sft` is added over tokens)."""
        chosen_scores, rejected_scores = self._scores(chosen_logratios), self._scores(rejected_logratios)
        delta = chosen_scores - rejected_scores
        beta, smoothing = self.beta, self.label_smoothing
        total = torch.zeros_like(delta)
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                loss = -F.logsigmoid(beta * delta)
            elif loss_type == "hinge":
                loss = torch.relu(1 - beta * delta)
            elif loss_type in ("ipo", "sigmoid_norm"):  # scores averaged over each completion's tokens
                lengths = completion_lengths.clamp(min=1)
                avg = chosen_scores / lengths[0::2] - rejected_scores / lengths[1::2]
                loss = (avg - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * avg)
            elif loss_type == "exo_pair":
                epsilon = torch.tensor(smoothing, device=delta.device)
                chosen_term = torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-epsilon))
                loss = chosen_term + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon))
            elif loss_type == "nca_pair":
                chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
                loss = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
            elif loss_type == "robust":
                clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
                flipped = -smoothing * F.logsigmoid(-beta * delta)
                loss = (clean - flipped) / (1 - 2 * smoothing)
            elif loss_type == "bco_pair":
                loss = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
            elif loss_type == "sppo_hard":
                loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
            elif loss_type == "apo_zero":
                loss = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
            elif loss_type == "apo_down":
                loss = torch.sigmoid(beta * chosen_logratios) + (
                    1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
                )
            elif loss_type == "discopop":
                logits = delta * beta
                modulation = torch.sigmoid(logits / self.args.discopop_tau)
                loss = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
            elif loss_type == "sft":
                continue
            else:  # DPOTrainer's own check names the valid ones
                raise ValueError(f"Unknown loss type: {loss_type}")
            total = total + loss * weight
        return total

    def _scores(self, logratios: torch.Tensor) -> torch.Tensor:
        """f-DPO's f'(π/π_ref) of the log-ratios, as DPOTrainer computes it per `f_divergence_type`."""
        kind = self.f_divergence_type
        if kind == "reverse_kl":
            return logratios
        if kind == "forward_kl":
            return 1 - torch.exp(-logratios)
        if kind == "js_divergence":
            return math.log(2) + F.logsigmoid(logratios)
        alpha = self.f_alpha_divergence_coef  # alpha_divergence
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        clamp = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}[t.dtype]
        return (torch.exp(torch.clamp(t.float(), max=clamp)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][name].append(value)  # DPOTrainer's own store, averaged by its log()
