"""`PipeTrainer`: `transformers.Trainer` whose model runs as a pipeline over the launched ranks.

Trainer keeps doing what it does (data order, optimizer, scheduler, logging, callbacks, evaluation loop,
checkpoint rotation); the overrides below, each short, put the pipeline engine where Trainer would run the whole
model, and undo what Trainer would do across processes that are stages of one pipeline rather than replicas:
no DDP wrap, no sharding of batches, no averaging or gathering of what every stage already shares.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
from typing import Any

import torch
import torch.distributed as dist
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import recursively_apply
from accelerate.utils.memory import clear_device_cache
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .batch_sync import broadcast_batches
from .checkpoint import canonical_state_names, read_tensors, save_pipeline_model
from .cpu_affinity import bind_local_rank
from .engine import DataParallel, PipelineEngine
from .errors import raise_if_any, raise_on_every_rank
from .estimate import bubble_fraction
from .families import CAUSAL_LM, task_of
from .frontends import FRONTENDS, frontend_name
from .integrations.peft import is_peft_model, read_adapter, save_adapter, saved_keys, stage_model
from .launch import PipelineTimeoutError, arm_watchdog, init_process_group, pipeline_mesh, report_failure, waiting
from .loading import model_and_weights
from .optimizer_state import (
    INDEX_NAME,
    has_named_state,
    load_named,
    read_named,
    read_trainer,
    save_named,
    trained_names,
    trainer_groups,
)
from .optimizer_state import TRAINER_NAME as TRAINER_OPTIMIZER_NAME
from .reporting import eval_steps_per_pipeline, model_card_per_pipeline
from .seq2seq_split import dataset_lengths
from .timeline import measured_bubble, write_timeline
from .trainer_options import frontend_option_problems, label_names_problems, trainer_argument_problems
from .training_args import PipeArgumentsMixin
from .validate import dataset_problems, label_column_problems, model_problems

logger = logging.getLogger(__name__)

SCHEDULER_NAME = "scheduler.pt"
#: how the replicas pool a metric of `loss.reduce_metrics`: means as (total, count) sums, extremes as such
_REDUCE_OPS = {"mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class PipelineSaveError(RuntimeError):
    """A rank could not write its part of a checkpoint; nothing was published."""


STAGING_DIR = ".hf_pipe-saving"


class PipelineModule(nn.Module):
    """What Trainer holds as `model_wrapped`: this rank's stages (for `.train()`, `.eval()`, the optimizer).

    Its forward is the whole pipeline, run by `PipeTrainer.training_step` / `prediction_step`; calling it directly is
    an error.
    """

    def __init__(self, engine: PipelineEngine, config: Any, model: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(engine.modules)
        self.config = config
        self.engine = engine
        object.__setattr__(self, "_model", model)  # not a submodule: its other stages' weights are on meta

    def train(self, mode: bool = True) -> PipelineModule:
        # the model's own flag follows, as it would under Trainer (TRL's trainers read `self.model.training`)
        self._model.training = mode
        return super().train(mode)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline stage set has no standalone forward; PipeTrainer runs it through its schedule")


class PipeTrainer(Trainer):
    """A drop-in `Trainer` that trains the model as a pipeline over every launched process.

    Takes exactly Trainer's arguments; `args` must be `PipeTrainingArguments` (or another config carrying
    `PipeArgumentsMixin`). `model` is what Trainer takes (every rank passes the same one, built with the same seed or
    loaded from the same checkpoint; each keeps only its own stages), or — so that no rank ever holds more than its
    stages — a checkpoint path or hub id (built with `args.model_init_kwargs`), or a model on the meta device (read
    from `args.pipeline_checkpoint`, or initialised from scratch): see `loading.py`.

    Example:
        >>> trainer = PipeTrainer(model=model, args=PipeTrainingArguments(output_dir="out", pipeline_schedule="1f1b"),
        ...                       train_dataset=train, eval_dataset=dev, data_collator=collator)
        >>> trainer.train(); trainer.evaluate(); trainer.save_model("out/final")
    """

    #: how weights a checkpoint lacks (a new head) are drawn: seeded per module, the same for every layout
    #: (`weights.Checkpoint`); TRL's trainers given a path draw them as TRL's from_pretrained does ("global")
    _init_missing = "seeded"

    def __init__(self, model: nn.Module | str | None = None, args: PipeArgumentsMixin | None = None, **kwargs: Any):
        raise_if_any(loss_override_problems(type(self)))
        if not isinstance(args, PipeArgumentsMixin):
            raise TypeError(
                f"PipeTrainer needs args=PipeTrainingArguments(...), got {type(args).__name__}; it is a "
                "TrainingArguments subclass with the pipeline settings, so the other fields stay as they are "
                "(for Seq2SeqTrainingArguments: PipeSeq2SeqTrainingArguments, with PipeSeq2SeqTrainer; for another "
                "TrainingArguments subclass: @dataclass class PipeMyConfig(hf_pipe.PipeArgumentsMixin, MyConfig))."
            )
        if model is None:
            missing = "PipeTrainer needs model=...: every rank passes the same model (same seed, or same checkpoint)."
            raise_if_any([missing] + trainer_argument_problems(kwargs))
        # the world group with ddp_timeout (on the CPU Trainer would leave gloo at torch's 30 minutes), then
        # Trainer's own set-up on it (NCCL on GPU) before the stages are built
        init_process_group(args.ddp_timeout, args.ddp_backend)
        _ = args.device
        if not dist.is_initialized():
            _init_single_process_group()
        _destroy_process_group_at_exit()
        self.watchdog = arm_watchdog(args.ddp_timeout, dist.get_rank())  # bounds every wait of the pipeline
        model, weights = model_and_weights(model, args, self._init_missing)
        #: what the stages are cut from (a PeftModel's wrapped model, its adapters injected; else the model)
        self._stage_model = staged = stage_model(model)
        world = dist.get_world_size()
        if world == 1:
            logger.warning(
                "PipeTrainer is running in ONE process, so the model is not split. To pipeline over N processes, "
                "launch with `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` "
                "(on a CPU-only machine `accelerate launch --cpu` starts a single process)."
            )
        pp = args.resolved_pipeline_size(world)
        microbatches = args.resolved_microbatches(world)
        eval_sets = kwargs.get("eval_dataset")
        eval_sets = eval_sets if isinstance(eval_sets, dict) else {"eval_dataset": eval_sets}
        frontend = frontend_name(args.pipeline_frontend, staged.config)
        raise_if_any(
            args.pipeline_problems(world)
            + model_problems(
                staged.config,
                pp_size=pp,
                stages_per_rank=args.resolved_stages_per_rank(),
                explicit_split=not isinstance(args.pipeline_split, str),
                frontend=frontend,
                data_parallel=args.pipeline_data_parallel if world > pp else None,
            )
            + (FRONTENDS[frontend](staged.config).trainer_problems(args, staged) if frontend in FRONTENDS else [])
            + frontend_option_problems(args, frontend)
            + label_names_problems(args.label_names, model, args.pipeline_task)
            + trainer_argument_problems(kwargs)
            + dataset_problems(kwargs.get("train_dataset"), "train_dataset", staged.config)
            + [p for name, ds in eval_sets.items() for p in dataset_problems(ds, name, staged.config)]
            + label_column_problems(
                kwargs.get("train_dataset"),
                {name: ds for name, ds in eval_sets.items() if ds is not None},
                args.pipeline_task or task_of(type(staged).__name__, staged.config),
                kwargs.get("data_collator"),
                # evaluate() runs the forward for its metrics; it scores the loss alone without compute_metrics
                forward_needs_labels=kwargs.get("compute_metrics") is not None
                and not args.prediction_loss_only
                and not getattr(args, "predict_with_generate", False),
            )
        )
        if args.pipeline_cpu_affinity:  # before the engine, whose `measured` split times the pieces
            logger.info("rank %d bound to CPUs %s", args.process_index, bind_local_rank())
        pp_group, self.data_parallel = _pipeline_mesh(world, pp, args.pipeline_data_parallel, args.ddp_timeout)
        self.engine = PipelineEngine(
            staged,
            schedule=args.pipeline_schedule,
            microbatches=microbatches,
            stages_per_rank=args.resolved_stages_per_rank(),
            split=args.pipeline_split,
            batch_size=args.per_device_train_batch_size,
            group=pp_group,
            data_parallel=self.data_parallel,
            frontend=frontend,
            weights=weights,
            sequence_lengths=dataset_lengths(kwargs.get("train_dataset")),
            task=args.pipeline_task,
        )
        self.pipeline = PipelineModule(self.engine, staged.config, model)
        self.watchdog.stages = list(self.engine.stage_indices)
        self._tied_reduced = False
        self._timeline_written = False
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(_WatchdogStep(self.watchdog))
        self._pipeline_metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        if self.compute_loss_func is not None or _overrides(type(self), "compute_microbatch_loss"):
            self.engine.loss.hook = self.compute_microbatch_loss
        logger.info(
            "pipeline plan on rank %d (stages %s):\n%s",
            args.process_index,
            self.engine.stage_indices,
            self.engine.plan,
        )

    # -- what Trainer would do across processes -----------------------------------------------------------------
    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        # Not `self.model`, so Trainer neither DDP-wraps it (the ranks hold different stages) nor moves it.
        return self.pipeline

    @property
    def _sharded(self) -> bool:
        return self.data_parallel is not None and self.data_parallel.mode == "fsdp"

    @property
    def _optimizer_file(self) -> str:
        name = f"optimizer-pp{self.engine.pp_rank:05d}"
        return f"{name}-dp{self._dp_rank:05d}.pt" if self._sharded else f"{name}.pt"

    @property
    def _dp_size(self) -> int:
        return self.data_parallel.size if self.data_parallel else 1

    @property
    def _dp_rank(self) -> int:
        return self.data_parallel.rank if self.data_parallel else 0

    def _get_dataloader(self, *args: Any, **kwargs: Any):
        # Trainer shards batches over all processes; the stages of one pipeline must all see the same batches, and
        # only the data-parallel replicas get different ones. Same accelerate preparation (seedable sampler, RNG
        # sync, device placement), sharded over the replicas.
        self.accelerator.prepare = self._prepare_unsharded
        try:
            return super()._get_dataloader(*args, **kwargs)
        finally:
            del self.accelerator.prepare

    def _prepare_unsharded(self, dataloader):
        acc = self.accelerator
        prepared = prepare_data_loader(
            dataloader,
            acc.device,
            num_processes=self._dp_size,
            process_index=self._dp_rank,
            split_batches=acc.split_batches,
            put_on_device=acc.device_placement,
            rng_types=acc.rng_types.copy(),
            dispatch_batches=False,
            even_batches=acc.even_batches,
            use_seedable_sampler=acc.use_seedable_sampler,
            data_seed=acc.dataloader_config.data_seed,
            non_blocking=acc.non_blocking,
            use_stateful_dataloader=acc.use_stateful_dataloader,
        )
        acc._dataloaders.append(prepared)
        return prepared

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device):
        # Trainer's own loop, then the batches of the pipeline's first rank on all of its ranks (`batch_sync.py`)
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        batch_samples = self._one_batch_per_pipeline(batch_samples)
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _one_batch_per_pipeline(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.engine.pp_size == 1:
            return batches
        with waiting("the batch broadcast from the first stage's rank", f"rank {self.engine._global(0)} (stage 0)"):
            return broadcast_batches(batches, src=0, group=self.engine.group, device=self.engine.device)

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        # Trainer first gathers the logged loss over every process; its evaluation and saving watch their own waits
        with waiting("Trainer's gather of the logged loss", _every_rank(), until_nested=True):
            return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        # Trainer sums label counts over processes; every stage holds the same batches, so count them once.
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        labels = [
            b["shift_labels"]
            if "shift_labels" in b
            else b["labels"][..., 1:]
            if self._loss_shifts_labels
            else b["labels"]
            for b in batch_samples
        ]
        count = torch.tensor(sum(int(label.ne(-100).sum()) for label in labels), device=self.engine.device)
        if self.args.average_tokens_across_devices and self._dp_size > 1:
            dist.all_reduce(count, group=self.data_parallel.group)  # over the replicas, as Trainer over processes
        return count

    def get_total_train_batch_size(self, args: PipeArgumentsMixin) -> int:
        # Samples per optimizer step: one batch per pipeline replica, not one per process.
        return self._train_batch_size * args.gradient_accumulation_steps * self._dp_size

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # Trainer sums each batch's token count over every process; the ranks of one pipeline hold the same batch.
        self.accelerator.gather = self._sum_over_replicas
        try:
            super()._track_num_input_tokens(inputs)
        finally:
            del self.accelerator.gather

    def store_flos(self) -> None:
        # Every rank counts the whole model's FLOPs for its pipeline's batches (Trainer sums over all processes).
        self.state.total_flos += float(self._sum_over_replicas(torch.tensor(self.current_flos, dtype=torch.float64)))
        self.current_flos = 0

    def _sum_over_replicas(self, count: torch.Tensor) -> torch.Tensor:
        if self._dp_size > 1:
            count = count.to(self.engine.device)
            dist.all_reduce(count, group=self.data_parallel.group)
        return count

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with eval_steps_per_pipeline(self.args.eval_batch_size * self._dp_size):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any):
        with eval_steps_per_pipeline(self.args.eval_batch_size * self._dp_size):
            return super().predict(*args, **kwargs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        engine = self.engine
        shape = {
            "pipeline_parallel_size": engine.pp_size,
            "pipeline_schedule": engine.schedule_name,
            "pipeline_microbatches": engine.microbatches,
        }
        with model_card_per_pipeline(self._dp_size, shape):
            super().create_model_card(*args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        # Every rank already holds the whole batch's predictions: gathering over processes would repeat them.
        self.gather_function = self._gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def _gather_for_metrics(self, data: Any) -> Any:
        """accelerate's `gather_for_metrics` for one pipeline: no gather, but the same cut of the last batch.

        Trainer repeats each batch's loss by the dataloader's batch size; accelerate trims the padding of the last
        batch back to the dataset's remainder, and so must we, or a short last batch would weigh as a full one.
        """
        if self._dp_size > 1:
            data = recursively_apply(self._gather_over_replicas, data)
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            return recursively_apply(lambda t: t[: state.remainder], data)
        return data

    def _gather_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self._dp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.data_parallel.group)
        return torch.cat(parts, dim=0)

    # -- the step ----------------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None):
        # Over this rank's parameters only, with Trainer's own weight-decay grouping.
        return super().create_optimizer(model=self.pipeline)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Trainer decides by module type (no decay inside LayerNorm) and by name; traced stages keep neither the
        # module types nor always the names, so decide on the whole model and map its FQNs to the stage names.
        decay = set(super().get_decay_parameter_names(self._stage_model))
        return [
            f"stages.{i}.{local}"
            for i, names in enumerate(self.engine.state_names)
            for local, fqn in names.items()
            if fqn in decay
        ]

    def _loss_normalizer(self, inputs: dict[str, Any], num_items_in_batch: Any, training: bool = True) -> float:
        """What Trainer would divide this batch's loss sum by, so the loss and gradients match Trainer's."""
        # Causal-LM heads divide by `num_items_in_batch` (Trainer's count over the whole accumulated step; note that
        # Trainer counts unshifted labels when `config.loss_type` is unset, and we follow it); the other heads of
        # our families take a per-batch mean and ignore it.
        # With `average_tokens_across_devices`, Trainer scales such a loss by the process count to undo DDP's
        # averaging (for every head, in training and evaluation alike); the replicas play the processes' part here.
        dp_scale = 1
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            dp_scale = self._dp_size
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs and self.engine.plan.task == CAUSAL_LM:
            return float(num_items_in_batch) / dp_scale
        normalizer = float(self.engine.loss.count(inputs)) / dp_scale
        if not training:
            return normalizer
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.19
        if scaled_for_ga is None:
            scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if not scaled_for_ga:
            normalizer *= self.current_gradient_accumulation_steps
        return normalizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        model.train()
        self._tied_reduced = False
        inputs = self._prepare_inputs(inputs)
        raise_if_any(self.engine.batch_problems(inputs))  # before anything runs, on every rank
        normalizer = self._loss_normalizer(inputs, num_items_in_batch)
        tracing = self.args.pipeline_trace_dir and self.state.global_step == 1 and not self.engine.timeline.armed
        if tracing and self.engine.recorded is None:
            self.engine.record_timeline(self.args.pipeline_trace_steps)  # after step 1, which infers shapes
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss = self.engine.train_step(inputs, num_items=normalizer, num_items_in_batch=num_items_in_batch)
        self._record_pipeline_metrics("train")
        if self.args.torch_empty_cache_steps and self.state.global_step % self.args.torch_empty_cache_steps == 0:
            clear_device_cache()  # where Trainer's training_step empties it
        if self.engine.recorded is not None and not self._timeline_written:
            self._write_timeline(self.engine.recorded)
        if normalizer == 0:
            logger.warning(
                "step %d: a batch with no label tokens (all -100): its loss is NaN (0/0) and it adds no gradient, "
                "as with Trainer (which leaves NaN out of the logged loss).", self.state.global_step + 1,
            )  # fmt: skip
        elif not torch.isfinite(loss):
            logger.warning("step %d: non-finite loss %s", self.state.global_step + 1, loss.item())
        # The engine returns the batch's share of the step loss, as Trainer's training_step does.
        return loss.to(self.args.device)

    # -- the loss ----------------------------------------------------------------------------------------------
    def compute_microbatch_loss(
        self, outputs: Any, labels: torch.Tensor, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one microbatch, on the last stage: the one place a subclass changes the loss (PipeTrainer
        never calls `compute_loss`: the pipeline has no whole-model forward).

        Called per microbatch in training, with the microbatch's `outputs` (the model's output class, `.logits`
        set), its `labels` and `inputs` (the batch keys, `shift_labels` included for a causal LM: shifted before
        the cut) and the step's `num_items_in_batch` (as Trainer passes it); the losses of a step's microbatches
        are added, so return this microbatch's share: a sum over its tokens divided by `num_items_in_batch`.
        In evaluation it is called once per batch, with the whole batch. Return `(loss, metrics)` to log
        metrics: `{name: value}` (averaged over the step's microbatches), `{name: (sum, count)}` (pooled over
        them, e.g. a token accuracy) or `{name: ("min", value)}` / `("max", value)` (the least or greatest over
        microbatches and replicas); they reach `log()` on every rank, averaged over the steps since the last log,
        `eval_`-prefixed in evaluation.

        Default: Trainer's `compute_loss_func` when one was given (scaled by the data-parallel replicas under
        `average_tokens_across_devices`, as Trainer scales it by the processes), else the model's own loss.

        Example:
            >>> class MyTrainer(PipeTrainer):
            ...     def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
            ...         loss = super().compute_microbatch_loss(outputs, labels, inputs, num_items_in_batch)
            ...         return loss, {"z": outputs.logits.logsumexp(-1).pow(2).mean().item()}
        """
        if self.compute_loss_func is None:
            return self.engine.loss.model_loss(outputs, inputs)
        loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self._dp_size
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError(
            "PipeTrainer runs the model as a pipeline, with no whole-model forward to compute a loss from: override "
            "compute_microbatch_loss (called on the last stage for each microbatch) instead of compute_loss."
        )

    def _record_pipeline_metrics(self, mode: str) -> None:
        """What compute_microbatch_loss reported for the step, pooled over the data-parallel replicas (means as
        (total, count), minima and maxima as such)."""
        metrics = self.engine.metrics
        values = {}
        for how, op in _REDUCE_OPS.items():
            names = sorted(n for n, (reduction, *_) in metrics.items() if reduction == how)
            if not names:
                continue
            pooled = torch.tensor([metrics[n][1:] for n in names], dtype=torch.float64, device=self.engine.device)
            if self._dp_size > 1:
                dist.all_reduce(pooled, op=op, group=self.data_parallel.group)
            values.update({n: total / count if count else 0.0 for n, (total, count) in zip(names, pooled.tolist())})
        for name in sorted(values):
            self.store_pipeline_metric(mode, name, values[name])

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        """Keep a step's metric until the next `log()` (averaged there); subclasses may keep them elsewhere."""
        self._pipeline_metrics[mode].setdefault(name, []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # what compute_microbatch_loss reported since the last log, averaged (as TRL's trainers log their metrics)
        mode = "train" if self.pipeline.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._pipeline_metrics[mode].items()})
        self._pipeline_metrics[mode] = {}
        super().log(logs, start_time)

    def _write_timeline(self, actions) -> None:
        self._timeline_written = True
        engine, args = self.engine, self.args
        predicted = bubble_fraction(engine.schedule_name, engine.pp_size, engine.stages_per_rank, engine.microbatches)
        title = (
            f"{engine.schedule_name}, {engine.num_stages} stages on {engine.pp_size} ranks, "
            f"{engine.microbatches} microbatches"
        )
        measured = measured_bubble(actions)
        if self.is_world_process_zero():
            write_timeline(actions, args.pipeline_trace_dir, f"{title}: bubble {100 * measured:.1f}% measured")
            logger.warning(
                "pipeline timeline written to %s: bubble %.1f%% measured, %.1f%% predicted by the bubble model",
                args.pipeline_trace_dir, 100 * measured, 100 * predicted,
            )  # fmt: skip
        self.log({"pipeline_bubble_measured": measured, "pipeline_bubble_predicted": predicted})

    def _reduce_tied_once(self) -> None:
        if not self._tied_reduced:
            self.engine.reduce_tied_gradients()
            self._tied_reduced = True

    def _clip_grad_norm(self, model: nn.Module):
        self._reduce_tied_once()
        return self.engine.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None):
        self._reduce_tied_once()
        return grad_norm if grad_norm is not None else self.engine.grad_norm()

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        [synced] = self._one_batch_per_pipeline([self._prepare_inputs(inputs)])
        # Trainer's evaluation loop reads this same dict again (`include_for_metrics=["inputs"]`): make it the batch
        if synced is not inputs and isinstance(inputs, dict):
            inputs.clear()
            inputs.update(synced)
        inputs = synced
        raise_if_any(self.engine.batch_problems(inputs, training=False))
        # Trainer's `has_labels`: every column of `label_names` (the head's label columns, `label_names_problems`)
        if not self.engine.has_labels(inputs):
            # Trainer runs the model without labels: no loss, the outputs as predictions, labels None
            if prediction_loss_only:
                return None, None, None
            with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
                _, logits = self.engine.eval_step(inputs)
            return None, self._predictions(self._broadcast_from_last_stage(logits), ignore_keys), None
        # as Trainer gathers them: the label_names columns, one tensor or a tuple (question answering's spans)
        labels = tuple(inputs.get(name) for name in self.label_names)
        labels = None if not labels or any(x is None for x in labels) else labels[0] if len(labels) == 1 else labels
        num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        normalizer = self._loss_normalizer(inputs, num_items_in_batch, False)
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
            loss, logits = self.engine.eval_step(inputs, num_items=normalizer, num_items_in_batch=num_items_in_batch)
        self._record_pipeline_metrics("eval")
        if prediction_loss_only:
            return loss, None, None
        return loss, self._predictions(self._broadcast_from_last_stage(logits), ignore_keys), labels

    def _predictions(self, logits: Any, ignore_keys: list[str] | None) -> Any:
        """The model's outputs (besides the loss) but `ignore_keys`, one tensor or a tuple, as Trainer's
        `prediction_step` makes them. The pipeline's outputs hold no cache, so the model's
        `keys_to_ignore_at_inference` (Trainer's default) leave them as they are."""
        outputs = self.engine.loss.outputs(logits)
        kept = tuple(v for k, v in outputs.items() if k not in (ignore_keys or ()))
        return kept[0] if len(kept) == 1 else kept

    def _broadcast_from_last_stage(self, logits: Any) -> Any:
        """The last stage's logits (a tensor, or a tuple: question answering's (start, end) pair, an
        encoder-decoder's logits and encoder output) on every rank, so `compute_metrics` runs (and agrees) everywhere."""
        engine = self.engine
        src = engine.stage_to_rank[engine.num_stages - 1]
        parts = None if logits is None else list(logits) if isinstance(logits, tuple) else [logits]
        meta = [None if parts is None else ([(tuple(t.shape), t.dtype) for t in parts], isinstance(logits, tuple))]
        dist.broadcast_object_list(meta, group_src=src, group=engine.group)
        shapes, is_tuple = meta[0]
        if parts is None:
            parts = [torch.empty(shape, dtype=dtype, device=engine.device) for shape, dtype in shapes]
        parts = [t.contiguous() for t in parts]  # gloo sends a tensor's storage: a strided view would arrive scrambled
        for tensor in parts:
            dist.broadcast(tensor, group_src=src, group=engine.group)
        return tuple(parts) if is_tuple else parts[0]

    # -- saving and loading ------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """One ordinary HF checkpoint (`from_pretrained` loads it on one device); every rank writes its stages."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = self.engine.local_state()  # collective over the replicas under FSDP2
        if self._dp_rank == 0 and is_peft_model(self.model):  # the adapter, as PeftModel.save_pretrained writes it
            save_adapter(self.model, state, output_dir, group=self.engine.group)
            if self.processing_class is not None and self.args.should_save:
                self.processing_class.save_pretrained(output_dir)
        elif self._dp_rank == 0:  # replicas hold the same weights: the first one writes
            save_pipeline_model(
                state, self.model, output_dir, group=self.engine.group, processing_class=self.processing_class
            )
        with waiting(f"the barrier after saving the model to {output_dir}", _every_rank()):
            dist.barrier()
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written where `get_last_checkpoint` cannot see it, then renamed into place.

        Every rank writes its part into `<output_dir>/.hf_pipe-saving/checkpoint-N`; once all have finished, rank 0
        renames it to `<output_dir>/checkpoint-N` (one atomic rename). A process killed during the save leaves only
        the staging folder, which no resume picks up and the next save clears.
        """
        run_dir = self._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        everyone = _every_rank() + ", each writing its part"
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        with waiting(f"the barrier before writing {name}", everyone):
            dist.barrier()
        self.args.output_dir = staging_root  # Trainer derives the checkpoint folder from it
        try:
            with waiting(f"writing {name} (the barriers between ranks' parts)", everyone):
                super()._save_checkpoint(model, trial)
        except PipelineTimeoutError:
            raise
        except Exception as error:
            # This rank could not write its part (disk full, permission denied): say so to every rank (peers waiting
            # at a barrier of this save lose their connection to this process and report it), publish nothing.
            message = (
                f"rank {self.args.process_index} could not write its part of {name} at step {self.state.global_step}"
                f" into {staging_root}: {type(error).__name__}: {error}. Nothing was published: the last complete "
                "checkpoint in output_dir is still the one to resume from (resume_from_checkpoint=True). Fix: free "
                "space or fix the permissions of output_dir on this rank's node, or point output_dir elsewhere."
            )
            report_failure(message)
            raise PipelineSaveError(message) from error
        finally:
            self.args.output_dir = run_dir
        with waiting(f"the barrier after writing {name} (every rank's files complete)", everyone):
            dist.barrier()
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            if os.path.isdir(final):  # saved again at the same step (e.g. at the end of training)
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
        with waiting(f"the barrier after publishing {name}", everyone):
            dist.barrier()
        # Trainer looked for the best checkpoint in the staging folder; point every rank at the real one.
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.isdir(best):
                self.state.best_model_checkpoint = best
        if self.args.should_save:
            self.state.save_to_json(os.path.join(final, TRAINER_STATE_NAME))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        with waiting(f"the barrier after saving {name}", everyone):
            dist.barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The optimizer state by parameter name, one file per pipeline rank (`optimizer_state.py`): any layout, or
        # plain Trainer, resumes from it. Replicas hold the same state (FSDP2: shards, gathered first); the scheduler
        # is the same on all.
        os.makedirs(output_dir, exist_ok=True)
        with waiting(f"writing the optimizer state into {output_dir}", self.engine._pipeline_ranks):
            save_named(
                self.optimizer, self._parameter_names, output_dir, group=self.engine.group, write=self._dp_rank == 0
            )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        with waiting(f"the barrier after writing the optimizer state into {output_dir}", _every_rank()):
            dist.barrier()

    @property
    def _parameter_names(self) -> dict[int, str]:
        """id of each of this rank's parameters -> the HF name it is saved under."""
        return {id(p): name for name, p in self.engine.named_parameters()}

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """This rank's optimizer state from a checkpoint of any layout, or of plain Trainer; no state is an error."""
        if checkpoint is None:
            return
        names = self._parameter_names
        problems: list[str] = []
        state = hyper = old = None
        old_file = os.path.join(checkpoint, self._optimizer_file)
        trainer_file = os.path.join(checkpoint, TRAINER_OPTIMIZER_NAME)
        try:
            if has_named_state(checkpoint):
                # the trained parameters' state: frozen weights (a PEFT model's base) have none
                state, hyper = read_named(checkpoint, trained_names(self.optimizer, names))
            elif os.path.isfile(old_file):  # hf_pipe's earlier per-rank files: the same layout only
                old = torch.load(old_file, map_location=self.engine.device, weights_only=True)
                mine = [len(g["params"]) for g in self.optimizer.param_groups]
                if [len(g["params"]) for g in old["param_groups"]] != mine:
                    problems.append(
                        f"{old_file} was saved on another pipeline layout (param groups of "
                        f"{[len(g['params']) for g in old['param_groups']]} parameters, this rank has {mine}): these "
                        "per-rank files resume only the layout that wrote them; resume with that pipeline_parallel_size, "
                        "split and schedule (checkpoints written since hold the state by name and resume on any layout)."
                    )
            elif os.path.isfile(trainer_file):  # plain Trainer's: positions in its param groups, mapped to names
                decay = set(Trainer.get_decay_parameter_names(self, self.model))
                groups = trainer_groups(self.model, decay, canonical_state_names(self.model))
                state, hyper = read_trainer(trainer_file, groups)
            else:
                problems.append(
                    f"resume_from_checkpoint={checkpoint} holds no optimizer state ({INDEX_NAME}, "
                    f"{self._optimizer_file} or Trainer's {TRAINER_OPTIMIZER_NAME}), so training would go on with fresh "
                    "AdamW moments and drift from the run it continues. Resume from a checkpoint saved with its "
                    "optimizer (save_only_model=False), or, to start a new optimizer on purpose, load only the weights "
                    f"(PipeTrainer(model={checkpoint!r}, ...)) and train without resume_from_checkpoint."
                )
            if not os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME)):
                problems.append(
                    f"resume_from_checkpoint={checkpoint} holds no {SCHEDULER_NAME}, so the learning-rate schedule "
                    "would restart from its first step; resume from a complete checkpoint, or load only the weights "
                    f"(PipeTrainer(model={checkpoint!r}, ...)) and train without resume_from_checkpoint."
                )
        except Exception as error:
            problems.append(
                f"resume_from_checkpoint={checkpoint}: its optimizer state cannot be read on rank "
                f"{self.args.process_index} ({type(error).__name__}: {error}); resume from another checkpoint."
            )
        raise_on_every_rank(problems)
        if old is not None:
            self.optimizer.load_state_dict(old)
        else:
            load_named(self.optimizer, names, state, hyper)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_stage_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(
            "Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric
        )
        self._load_stage_weights(self.state.best_model_checkpoint)

    def _load_stage_weights(self, checkpoint: str) -> None:
        local = self.engine.local_state()
        if is_peft_model(self.model):  # the adapter's tensors; the frozen base weights are as they were loaded
            keys = saved_keys(self.model, local)
            self.engine.load_local_state(read_adapter(checkpoint, keys), only_given=True)
        else:
            self.engine.load_local_state(read_tensors(checkpoint, sorted(local)))


def _pipeline_mesh(world: int, pp: int, mode: str, timeout_s: float) -> tuple[dist.ProcessGroup, DataParallel | None]:
    """This rank's pipeline group and, with several replicas, its data-parallel side, from a ("dp", "pp") mesh whose
    groups carry ddp_timeout."""
    if world == pp:
        return dist.group.WORLD, None
    mesh = pipeline_mesh(world, pp, timeout_s)
    data_parallel = DataParallel(
        group=mesh.get_group("dp"),
        mesh=mesh["dp"],
        size=world // pp,
        rank=mesh.get_local_rank("dp"),
        mode=mode,
        pipelines=mesh.mesh.tolist(),
    )
    return mesh.get_group("pp"), data_parallel


def _every_rank() -> str:
    return f"every launched rank (ranks 0-{dist.get_world_size() - 1})"


class _WatchdogStep(TrainerCallback):
    """The step the watchdog names in its message: the one running, or the one whose save or evaluation follows."""

    def __init__(self, dog):
        self.dog = dog

    def on_step_begin(self, args, state, control, **kwargs):
        self.dog.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        self.dog.step = state.global_step


def _init_single_process_group() -> None:
    """A one-rank group for `python train.py`: the schedule code always talks to a process group."""
    import tempfile

    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="hf_pipe-"), "store"), 1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=0, world_size=1)


def _destroy_process_group_at_exit() -> None:
    """Destroy the process group when the script ends normally, as torch asks every training script to do.

    Trainer scripts rarely call `destroy_process_group()`, and on gloo that is a crash at exit: a worker thread can
    still hold the last collective's tensors while the interpreter is torn down, and the rank dies of SIGABRT
    ("terminate called without an active exception") after training succeeded, measured here in 9 of 40 runs of
    a two-rank all-reduce. After an uncaught exception the group is left alone: destroying it while other ranks
    still wait in a collective can hang (NCCL), and the launcher stops those ranks anyway.
    """
    atexit.unregister(_destroy_if_clean_exit)  # once per process, however many trainers are built
    atexit.register(_destroy_if_clean_exit)


def _destroy_if_clean_exit() -> None:
    if dist.is_initialized() and getattr(sys, "last_value", None) is None:
        dist.destroy_process_group()


def _overrides(cls: type, name: str) -> bool:
    """Whether `cls` defines `name` below PipeTrainer (a subclass's own method, not PipeTrainer's or Trainer's)."""
    return getattr(cls, name) is not getattr(PipeTrainer, name)


def loss_override_problems(cls: type) -> list[str]:
    """A `compute_loss` override PipeTrainer would silently bypass: it never runs a whole-model forward."""
    owner = next(
        (k for k in cls.__mro__ if k not in (PipeTrainer, Trainer, object) and "compute_loss" in vars(k)), None
    )
    if owner is None or _overrides(cls, "compute_microbatch_loss"):
        return []
    return [
        f"{cls.__name__} overrides compute_loss (in {owner.__module__}.{owner.__name__}), which PipeTrainer never "
        "calls: the pipeline computes the loss on its last stage, microbatch by microbatch, so this loss would be "
        "silently replaced by the model's. Move it to compute_microbatch_loss(self, outputs, labels, inputs, "
        "num_items_in_batch) (see PipeTrainer.compute_microbatch_loss)."
    ]
