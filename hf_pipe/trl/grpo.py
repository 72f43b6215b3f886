"""TRL's GRPO over the pipeline: `PipeGRPOTrainer` with `PipeGRPOConfig`.

`PipeGRPOTrainer` takes exactly `trl.GRPOTrainer`'s arguments and runs GRPOTrainer's own step; what it replaces is
what needs the whole model on one process. GRPOTrainer 1.16's step, part by part, and what runs here:

- Sampler and dataloader (`_get_train_sampler`, `get_train_dataloader`): TRL's `RepeatSampler` (each prompt
  `num_generations` times, a generation batch of `per_device_train_batch_size × steps_per_generation` rows, repeated
  `num_iterations × steps_per_generation` times), unchanged; sharded over the pipeline replicas, not the processes
  (`PipeGRPOConfig` sizes `generation_batch_size` by the replicas); the first stage's rank's batch is the pipeline's.
- `_prepare_inputs`: TRL's buffering (generate every `steps_per_generation × num_iterations` steps, shuffle, split),
  then the step's slice turned into the pipeline's batch: prompt and completion ids, the attention mask, the
  completion tokens as labels; per row (advantages, old and reference log-probs, the completion mask) kept for the
  loss on the last stage.
- `_generate_and_score_completions` / `_generate_single_turn`: TRL's own, tokenisation, `generation_config` and all;
  only `unwrapped_model.generate(...)` runs through the pipeline (`hf_pipe.generation.PipelineGenerator`, built once,
  lazily): the same sequences `generate` gives on one process, on every rank. The sampled tokens are drawn on the last
  stage's rank, whose random generator then moves where one process's does: it is shared with the pipeline's other
  ranks, so that TRL's shuffle of the generation batch draws the same permutation everywhere.
- Rewards (`_calculate_rewards`): TRL's own, on every rank (the same completions give the same rewards). A reward
  model is TRL's: a small model whole on every rank (reward models are classifiers far smaller than the policy, read
  once per generation batch; a pipeline of its own would add a schedule and a transfer per batch for no memory that
  matters). TRL's gathers over the processes (rewards, lengths, token counts) are taken over the pipeline replicas.
- Group-normalised advantages, metrics of the generation (`completions/*`, `rewards/*`, `reward`, `reward_std`,
  `frac_reward_zero_std`, `num_tokens`): TRL's own code.
- `_get_per_token_logps_and_entropies` (old-policy log-probs when generation and optimisation steps are misaligned;
  the reference's with `beta > 0`): a forward-only pass (`engine.forward`) with the completion tokens as labels; the
  last stage computes each token's log-probability from its logits divided by TRL's `temperature`, as TRL's fused LM
  head does (they agree to float32 rounding); kept on the last stage's rank. The reference is a second, frozen set of
  stages with the policy's split read from the checkpoint TRL would load (`_reference.py`), or with PEFT the policy's
  own stages with the adapters off (TRL's `use_adapter`, the `"ref"` adapter of a given `PeftModel`);
  `sync_ref_model` mixes each rank's reference stages into its policy stages at TRL's cadence.
- `compute_loss` / `_compute_loss`: per microbatch on the last stage (`compute_microbatch_loss`, `_grpo_loss.py`): the
  policy's per-token log-probs and entropies from the logits, TRL's importance weights (token or sequence level), KL
  term, off-policy mask and per-token loss of every loss type (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `cispo`, `sapo`,
  `luspo`, `vespo`), summed over the microbatch and divided by the normaliser of the whole step known before it (rows,
  tokens, `max_completion_length`, `num_items_in_batch` per loss type, times the accumulation steps as TRL scales
  them); the static entropy bonus likewise. Its metrics (`kl`, `entropy`, `clip_ratio/*`, `cispo_clip_ratio`,
  `vespo/phi_seq_mean`, `policy_loss`, `entropy_coef`) pooled over the microbatches as TRL pools them over processes:
  masked means as (sum, count), `low_min` / `high_max` as the least / greatest.

Refused by name before anything is built: `use_vllm=True` (the pipeline's weights would have to be streamed stage by
stage to the vLLM server: each rank sending its stages' tensors under their full-model names through TRL's
`VLLMClient.update_named_param`, with the tied and PEFT-merged weights resolved per stage, and the server's sampling
replacing the pipeline's), transformers' continuous batching, tools, `environment_factory` and `rollout_func`
(multi-turn rollouts and custom rollouts), `top_entropy_quantile < 1` (its quantile spans the entropies of the whole
batch under the current policy, known only once every microbatch has run), `use_adaptive_entropy`, the MoE router loss,
`cast_lm_head_to_fp32`, vision datasets and data-parallel replicas (TRL's reward gathers and process slices would have
to run over the replicas' group).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import set_seed
from trl import GRPOConfig, GRPOTrainer

from ..errors import raise_if_any
from ..integrations.peft import is_peft_model
from ..launch import waiting
from ..trainer import PipeTrainer
from ..training_args import PipeArgumentsMixin
from ._config import config_problems
from ._grpo_loss import loss_metrics, per_token_loss
from ._model import model_for, path_given, replay_adapter_draws
from ._preference import IGNORE_INDEX, reference_stages, reference_trainer_problems
from ._reference import SyncReferenceStages, reference_init

#: loss types whose loss is a mean over the batch's rows of each row's token mean (`grpo`, `sapo`) or sum (`luspo`)
_ROW_MEANS = ("grpo", "sapo", "luspo")
#: loss types divided by the generation batch's completion tokens (TRL's `num_items_in_batch`)
_TOKEN_SUMS = ("dapo", "cispo", "vespo")


@dataclass
class PipeGRPOConfig(PipeArgumentsMixin, GRPOConfig):
    """`trl.GRPOConfig` with the pipeline fields of `PipeArgumentsMixin` (every GRPOConfig default kept).

    GRPOConfig sizes `generation_batch_size` by the processes (`per_device_train_batch_size × world_size ×
    steps_per_generation`); the ranks of one pipeline share a batch, so here it counts the pipeline replicas."""

    def __post_init__(self):
        self._per_replica = True
        try:
            super().__post_init__()
        finally:
            self._per_replica = False

    @property
    def world_size(self) -> int:
        size = super().world_size
        if self.__dict__.get("_per_replica"):  # GRPOConfig's batch arithmetic: one batch per pipeline
            return max(1, size // max(1, self.resolved_pipeline_size(size)))
        return size


def _grpo_problems(args: Any, model: Any, peft: bool, train_dataset: Any, kwargs: dict) -> list[str]:
    """What PipeGRPOTrainer refuses before anything is built, each with why and the fix."""
    problems = config_problems(args, PipeGRPOConfig, GRPOConfig, "GRPOTrainer")
    if args.use_vllm:
        problems.append(
            "use_vllm=True: vLLM would need the policy's weights after every step, which the pipeline holds stage by "
            "stage on different ranks (streaming each rank's stages to the vLLM server under their full-model names "
            "is not implemented); set use_vllm=False: completions are generated through the pipeline."
        )
    if args.use_transformers_continuous_batching:
        problems.append(
            "use_transformers_continuous_batching=True: transformers' continuous batching runs the whole model in one "
            "process; set it to False: completions are generated through the pipeline (several groups in flight)."
        )
    for name in ("tools", "environment_factory", "rollout_func"):
        if kwargs.get(name):
            problems.append(
                f"{name}=...: multi-turn and custom rollouts are not run through the pipeline yet (a custom rollout "
                "reads the whole model, whose other stages live on other ranks); drop it."
            )
    if args.top_entropy_quantile < 1.0:
        problems.append(
            f"top_entropy_quantile={args.top_entropy_quantile}: its entropy threshold is a quantile over every token "
            "of the batch under the current policy, which the pipeline's last stage only has once every microbatch "
            "has run; set top_entropy_quantile=1.0."
        )
    if args.use_adaptive_entropy:
        problems.append(
            "use_adaptive_entropy=True: its controller is not run over the pipeline's microbatches yet; use a static "
            "entropy_coef (use_adaptive_entropy=False)."
        )
    if args.cast_lm_head_to_fp32:
        problems.append(
            "cast_lm_head_to_fp32=True: GRPOTrainer swaps in a float32 LM head after the pipeline's stages were cut, "
            "so the last stage would keep the old one; load the model in float32, or set cast_lm_head_to_fp32=False."
        )
    world = args.world_size
    pp = args.resolved_pipeline_size(world)
    if pp > 0 and world // pp > 1:
        problems.append(
            f"{world // pp} pipeline replicas ({world} processes, pipeline_parallel_size={pp}): GRPOTrainer gathers "
            "rewards and completion lengths over the processes and slices its share by process index, which would "
            "mix replicas with stages; use one pipeline (pipeline_parallel_size equal to the number of processes)."
        )
    loads_reference = args.beta != 0.0 and not peft
    return problems + reference_trainer_problems("GRPOTrainer", args, model, train_dataset, kwargs, loads_reference)


class PipeGRPOTrainer(GRPOTrainer, PipeTrainer):
    """`trl.GRPOTrainer` whose policy (and reference) run as pipelines over the launched ranks, its completions
    generated through the pipeline (see the module docstring).

    Example:
        >>> args = PipeGRPOConfig(output_dir="out", num_generations=4, max_completion_length=32,
        ...                       pipeline_schedule="1f1b", pipeline_microbatches=4)
        >>> trainer = PipeGRPOTrainer(model=path, reward_funcs=correct, args=args, train_dataset=prompts)
        >>> trainer.train()
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: PipeGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: Any = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Any = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
    ):
        config_problems(args, PipeGRPOConfig, GRPOConfig, "GRPOTrainer")  # the config's type first (a TypeError)
        built = model_for(self, model, args)  # a path: the skeleton TRL would load, on the meta device
        peft = peft_config is not None or is_peft_model(built)
        given = dict(tools=tools, environment_factory=environment_factory, rollout_func=rollout_func)
        raise_if_any(_grpo_problems(args, built, peft, train_dataset, given))
        #: per row of the step's batch: advantages, completion mask, old and reference log-probs (last stage's rank)
        self._rows: dict[str, torch.Tensor | None] = {}
        self._logits_to_keep = 0
        self._num_items: float = 1.0
        self._entropy_normalizer = 1.0
        self._policy_scale = 1.0
        import trl.trainer.grpo_trainer as trl_grpo

        with path_given(GRPOTrainer, model), reference_init(self, args, trl_grpo):
            super().__init__(
                built, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes,
                callbacks, optimizers, quantization_config, peft_config, tools, rollout_func, environment_factory,
            )  # fmt: skip
        replay_adapter_draws(self)  # a path's LoRA adapters: TRL's draws
        #: the reference's stages (None: no reference, or the policy's own with PEFT's adapters off)
        self._reference = reference_stages(self)
        SyncReferenceStages.install(self)  # TR-DPO's sync, each rank mixing its own stages
        # TRL seeds each process apart (`device_specific`) so that processes draw different completions; the ranks
        # of one pipeline are one process's worth: seeded as the replica it is
        set_seed(args.seed + self._dp_rank)

    # GRPOTrainer's compute_loss and prediction_step run the whole model: the pipeline runs them stage by stage
    compute_loss = PipeTrainer.compute_loss
    prediction_step = PipeTrainer.prediction_step

    # -- batches ---------------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device):
        # GRPO's batches are lists of examples (its collator is the identity): the first stage's rank's are the
        # pipeline's; no label count (Trainer finds no labels in them either)
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.engine.pp_size > 1:
            box = [batches]
            with waiting("the prompts' broadcast from the first stage's rank", "the first stage's rank"):
                dist.broadcast_object_list(box, group_src=0, group=self.engine.group, device=self.engine.device)
            batches = box[0]
        return batches, None

    def train(self, *args: Any, **kwargs: Any):
        # GRPO's dataset holds prompts, its labels are the completions it generates (PipeTrainer's label check would
        # ask the dataset for them)
        return super(PipeTrainer, self).train(*args, **kwargs)

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, torch.Tensor]:
        """GRPOTrainer's (generation every `steps_per_generation × num_iterations` steps, its buffer, this step's
        slice), as the pipeline's batch: the prompt and completion tokens, their mask, the completion tokens as
        labels; what the loss needs per row kept for the last stage."""
        with self._over_replicas():
            inputs = GRPOTrainer._prepare_inputs(self, generation_batch)
        completion_ids, completion = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion], dim=1)
        self._logits_to_keep = keep = completion_ids.size(1)
        self._rows = {
            "advantages": inputs["advantages"],
            "mask": completion,
            "old": inputs.get("old_per_token_logps"),
            "ref": inputs.get("ref_per_token_logps"),
        }
        self._num_items = float(inputs["num_items_in_batch"])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _labels(input_ids, attention_mask, keep),
        }

    def _loss_normalizer(self, inputs: dict[str, Any], num_items_in_batch: Any, training: bool = True) -> float:
        # what GRPOTrainer divides the batch's loss by, per loss type, and the accumulation steps in training
        rows = inputs["input_ids"].shape[0]
        steps = self.current_gradient_accumulation_steps if training else 1
        tokens = max(float(self._rows["mask"].sum()), 1.0)
        self._entropy_normalizer = tokens * steps
        self._policy_scale = 1.0 if self.loss_type in _TOKEN_SUMS else float(steps)
        if self.loss_type in _ROW_MEANS:
            return float(rows * steps)
        if self.loss_type == "bnpo":
            return tokens * steps
        if self.loss_type == "dr_grpo":
            return float(rows * self.max_completion_length * steps)
        # dapo, cispo, vespo: the generation batch's completion tokens, rescaled to one accumulation window
        normalizer = max(self._num_items, 1.0) / self._dp_size
        return normalizer * steps / self.args.steps_per_generation if training else normalizer

    @contextlib.contextmanager
    def _over_replicas(self) -> Iterator[None]:
        """While GRPOTrainer scores a generation batch: its gathers and its process slice over the pipeline replicas
        (one: the batch itself) rather than over the processes, which are stages of one pipeline."""
        import trl.trainer.grpo_trainer as trl_grpo

        accelerator = self.accelerator
        cls = type(accelerator)
        one = type(
            "OnePipeline", (cls,), {"process_index": property(lambda _: 0), "num_processes": property(lambda _: 1)}
        )
        saved = trl_grpo.gather, trl_grpo.gather_object
        trl_grpo.gather, trl_grpo.gather_object = (lambda tensor: tensor), (lambda obj: obj)
        accelerator.gather = lambda tensor: tensor
        accelerator.__class__ = one
        try:
            yield
        finally:
            accelerator.__class__ = cls
            del accelerator.gather
            trl_grpo.gather, trl_grpo.gather_object = saved

    # -- generation ------------------------------------------------------------------------------------------------
    def _generate_single_turn(self, *args: Any, **kwargs: Any):
        # GRPOTrainer's, its `unwrapped_model.generate` through the pipeline; then every rank's random generator where
        # the sampling rank's is (the last stage's rank drew the tokens)
        import trl.trainer.grpo_trainer as trl_grpo

        original = trl_grpo.unwrap_model_for_generation
        trl_grpo.unwrap_model_for_generation = self._unwrapped_for_generation
        try:
            out = super()._generate_single_turn(*args, **kwargs)
        finally:
            trl_grpo.unwrap_model_for_generation = original
        return out

    @contextlib.contextmanager
    def _unwrapped_for_generation(self, model: Any, accelerator: Any, **kwargs: Any) -> Iterator[Any]:
        """What GRPOTrainer generates with: an object whose `generate` is the pipeline's (`PipeTrainer.generator`,
        built at the first generation: collective over the world)."""
        yield self.generator

    # -- forward-only passes ---------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, None]:  # fmt: skip
        """GRPOTrainer's old-policy (`model` the policy, PEFT adapters as TRL set them) or reference (`model` its
        `ref_model`) per-token log-probs of the completions: a forward-only pass through the pipeline, the values on
        the last stage's rank (zeros elsewhere, never read there: the loss runs on the last stage)."""
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _labels(input_ids, attention_mask, logits_to_keep),
        }

        def on_last(outputs: Any, mb: dict[str, Any]) -> torch.Tensor:
            return self._token_stats(outputs.logits, mb["shift_labels"], logits_to_keep)[0]

        reference = self._reference if model is self.ref_model and self.ref_model is not None else None
        stages = (reference, reference.modules) if reference is not None else None
        per_mb, _, _ = self.engine.forward(batch, on_last=on_last, stages=stages)
        if per_mb is None:
            return input_ids.new_zeros(input_ids.shape[0], logits_to_keep, dtype=torch.float32), None, None
        return torch.cat(per_mb), None, None

    def _token_stats(
        self, logits: torch.Tensor, shift_labels: torch.Tensor, keep: int, entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per completion token (the last `keep` of each row): its log-probability and (`entropy`) the entropy of the
        logits divided by TRL's temperature, in float32, 0 where the token is padding — as TRL's fused LM head gives
        them (they agree to float32 rounding). Both differentiable, as the fused head's are: the entropy bonus trains
        through the entropy."""
        z = logits[:, -keep - 1 : -1].float() / self.temperature
        targets = shift_labels[:, -keep - 1 : -1]
        mask = targets != IGNORE_INDEX
        log_z = z.logsumexp(-1)
        log_probs = (z.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - log_z) * mask
        if not entropy:
            return log_probs, None
        log_p = z - log_z.unsqueeze(-1)
        return log_probs, -(log_p.exp() * log_p).sum(-1) * mask

    # -- the loss --------------------------------------------------------------------------------------------------
    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        """GRPOTrainer's `_compute_loss` for the rows of one microbatch, its share of the step's loss."""
        rows = self.engine.loss.rows()
        logps, entropies = self._token_stats(outputs.logits, inputs["shift_labels"], self._logits_to_keep, True)
        if not self._entropy_bonus_enabled:
            entropies = entropies.detach()  # a metric only
        device = logps.device
        mask = self._rows["mask"][rows].to(device)
        advantages = self._rows["advantages"][rows].to(device)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = self._rows["old"]
        old = logps.detach() if old is None else old[rows].to(device)
        ref = self._rows["ref"][rows].to(device) if self.beta != 0.0 else None
        token_loss, coef_1, kl, phi = per_token_loss(self, logps, old, ref, advantages, mask)
        masked = token_loss * mask
        if self.loss_type in ("grpo", "sapo"):
            total = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
        elif self.loss_type == "luspo":
            total = masked.sum(-1).sum()
        else:
            total = masked.sum()
        loss = total / self.engine.loss.normalizer
        training = self.model.training
        metrics: dict[str, Any] = {}
        with torch.no_grad():
            if self._entropy_bonus_enabled:
                batch_rows = self._rows["mask"].shape[0]
                metrics["policy_loss"] = (loss.detach() * self._policy_scale, mask.shape[0] / batch_rows)
                if training and self.accelerator.sync_gradients:
                    metrics["entropy_coef"] = self.entropy_coef
            metrics.update(loss_metrics(self, entropies.detach(), mask, advantages, coef_1, kl, phi))
        if self._entropy_bonus_enabled:  # TRL's static bonus: a token mean over the batch, scaled for accumulation
            loss = loss - self.entropy_coef * (entropies * mask).sum() / self._entropy_normalizer
        return loss, metrics

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][name].append(value)  # GRPOTrainer's own store, averaged by its log()


def _labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The labels GRPOTrainer scores: the last `keep` tokens (the completion) where the mask is set, -100 elsewhere."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :-keep] = IGNORE_INDEX
    return labels
