"""`PipeTrainer`: `transformers.Trainer` whose model runs as a pipeline over the launched ranks.

Trainer keeps doing what it does (data order, optimizer, scheduler, logging, callbacks, evaluation loop,
checkpoint rotation); the overrides below, each short, put the pipeline engine where Trainer would run the whole
model, and undo what Trainer would do across processes that are stages of one pipeline rather than replicas:
no DDP wrap, no sharding of batches, no averaging or gathering of what every stage already shares. What they call
lives where its concern does: `launch.py` (process groups, mesh, watchdog), `batch_sync.py` (one batch per
pipeline), `evaluation.py` (the last stage's outputs on every rank), `checkpointing.py` (saves, resume),
`reporting.py` (numbers counted per pipeline), `engine.py` (the step itself).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils.memory import clear_device_cache
from torch import nn
from transformers import Trainer

from . import checkpointing
from .batch_sync import one_batch_per_pipeline, prepare_unsharded
from .checkpointing import PipelineSaveError
from .cpu_affinity import bind_local_rank
from .engine import PipelineEngine, PipelineModule
from .errors import raise_if_any
from .evaluation import gather_for_metrics, prediction_step
from .frontends import frontend_name
from .generation import PipelineGenerator
from .integrations.peft import stage_model
from .launch import WatchdogStep, every_rank, parallel_groups, start, waiting
from .loading import model_and_weights
from .reporting import eval_steps_per_pipeline, model_card_per_pipeline, pool_metrics, sum_over_replicas
from .seq2seq_split import dataset_lengths
from .timeline import report_timeline
from .trainer_loss import aux_weight, compute_loss_problems, label_items, overrides, trainer_normalizer
from .trainer_options import trainer_argument_problems
from .training_args import PipeArgumentsMixin
from .validate import label_column_problems, trainer_problems

logger = logging.getLogger(__name__)

__all__ = ["PipeTrainer", "PipelineModule", "PipelineSaveError", "loss_override_problems"]


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
        self.watchdog = start(args)  # the process group, and the watchdog that bounds every wait of the pipeline
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
        frontend = frontend_name(args.pipeline_frontend, staged.config)
        raise_if_any(trainer_problems(args, model, staged, frontend, world, kwargs))
        if args.pipeline_cpu_affinity:  # before the engine, whose `measured` split times the pieces
            logger.info("rank %d bound to CPUs %s", args.process_index, bind_local_rank())
        pp = args.resolved_pipeline_size(world)
        pp_group, self.data_parallel, self.tensor_parallel = parallel_groups(
            world, pp, args.pipeline_tensor_parallel_size, args.pipeline_data_parallel, args.ddp_timeout
        )
        self.engine = PipelineEngine(
            staged,
            schedule=args.pipeline_schedule,
            microbatches=args.resolved_microbatches(world),
            stages_per_rank=args.resolved_stages_per_rank(),
            split=args.pipeline_split,
            batch_size=args.per_device_train_batch_size,
            group=pp_group,
            data_parallel=self.data_parallel,
            frontend=frontend,
            weights=weights,
            sequence_lengths=dataset_lengths(kwargs.get("train_dataset")),
            task=args.pipeline_task,
            tensor_parallel=self.tensor_parallel,
        )
        self.pipeline = PipelineModule(self.engine, staged.config, model)
        self.watchdog.stages = list(self.engine.stage_indices)
        self._tied_reduced = False
        self._timeline_written = False
        self._pipeline_generator: PipelineGenerator | None = None
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(WatchdogStep(self.watchdog))
        self._pipeline_metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        if self.compute_loss_func is not None or overrides(type(self), PipeTrainer, "compute_microbatch_loss"):
            self.engine.loss.hook = self.compute_microbatch_loss
        logger.info(
            "pipeline plan on rank %d (stages %s):\n%s",
            args.process_index,
            self.engine.stage_indices,
            self.engine.plan,
        )

    @property
    def generator(self) -> PipelineGenerator:
        """Generation through this trainer's pipeline: `trainer.generator.generate(...)` takes `generate`'s arguments
        and returns its sequences on every rank, no rank holding more than its stages (`hf_pipe.generation`). Built
        at first use, which is collective over the world: reach it on every rank."""
        if self._pipeline_generator is None:
            groups = self.args.pipeline_generation_groups
            self._pipeline_generator = PipelineGenerator(self.engine, self._stage_model, groups=groups)
        return self._pipeline_generator

    @property
    def _dp_size(self) -> int:
        return self.data_parallel.size if self.data_parallel else 1

    @property
    def _dp_rank(self) -> int:
        return self.data_parallel.rank if self.data_parallel else 0

    @property
    def _writes(self) -> bool:
        """Whether this rank writes its stages' files: the first replica's, TP rank 0 (the others hold the same
        weights, or took part in gathering them whole)."""
        return self._dp_rank == 0 and (self.tensor_parallel is None or self.tensor_parallel.rank == 0)

    def train(self, *args: Any, **kwargs: Any):
        # before the first step, on every rank: a training set whose collator cannot give the loss its labels (a
        # trainer built only to evaluate, predict or save may hold one)
        task = self.engine.plan.task
        raise_if_any(
            label_column_problems(self.train_dataset, {}, task, self.data_collator, forward_needs_labels=False)
        )
        return super().train(*args, **kwargs)

    # -- what Trainer would do across processes -----------------------------------------------------------------
    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        # Not `self.model`, so Trainer neither DDP-wraps it (the ranks hold different stages) nor moves it.
        return self.pipeline

    def _get_dataloader(self, *args: Any, **kwargs: Any):
        # Trainer's preparation, sharded over the pipeline replicas instead of every process (`batch_sync.py`)
        self.accelerator.prepare = lambda loader: prepare_unsharded(
            self.accelerator, loader, self._dp_size, self._dp_rank
        )
        try:
            return super()._get_dataloader(*args, **kwargs)
        finally:
            del self.accelerator.prepare

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device):
        # Trainer's own loop, then the batches of the pipeline's first rank on all of its ranks (`batch_sync.py`)
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        batch_samples = one_batch_per_pipeline(self.engine, batch_samples)
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        # Trainer first gathers the logged loss over every process; its evaluation and saving watch their own waits
        with waiting("Trainer's gather of the logged loss", every_rank(), until_nested=True):
            return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        # Trainer sums label counts over processes; every stage holds the same batches, so count them once.
        return label_items(self, batch_samples)

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
        return sum_over_replicas(count, self.data_parallel, self.engine.device)

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
        return gather_for_metrics(self, data)

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
        return trainer_normalizer(self, inputs, num_items_in_batch, training)

    def _router_aux_weight(self, num_items_in_batch: Any) -> tuple[float, bool]:
        """What each microbatch's MoE aux loss is multiplied by, as Trainer weighs it per accumulation step (the
        microbatches being those steps): (weight, also divided by the step's microbatch count)."""
        return aux_weight(self, num_items_in_batch)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        model.train()
        self._tied_reduced = False
        inputs = self._prepare_inputs(inputs)
        raise_if_any(self.engine.batch_problems(inputs))  # before anything runs, on every rank
        normalizer = self._loss_normalizer(inputs, num_items_in_batch)
        if (router := self.engine.loss.router) is not None:
            router.weight, router.mean_over_microbatches = self._router_aux_weight(num_items_in_batch)
        tracing = self.args.pipeline_trace_dir and self.state.global_step == 1 and not self.engine.timeline.armed
        if tracing and self.engine.recorded is None:
            self.engine.record_timeline(self.args.pipeline_trace_steps)  # after step 1, which infers shapes
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss = self.engine.train_step(inputs, num_items=normalizer, num_items_in_batch=num_items_in_batch)
        self._record_pipeline_metrics("train")
        if self.args.torch_empty_cache_steps and self.state.global_step % self.args.torch_empty_cache_steps == 0:
            clear_device_cache()  # where Trainer's training_step empties it
        if self.engine.recorded is not None and not self._timeline_written:
            self._write_timeline()
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
        """What compute_microbatch_loss reported for the step, pooled over the data-parallel replicas."""
        values = pool_metrics(self.engine.metrics, self.data_parallel, self.engine.device)
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

    def _write_timeline(self) -> None:
        self._timeline_written = True
        self.log(report_timeline(self.engine, self.args.pipeline_trace_dir, write=self.is_world_process_zero()))

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

    # -- evaluation (`evaluation.py`) ----------------------------------------------------------------------------
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        # Trainer's, through the pipeline: the first stage's batch, the loss and outputs of the last stage
        return prediction_step(self, inputs, prediction_loss_only, ignore_keys)

    # -- saving and loading (`checkpointing.py`) -----------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """One ordinary HF checkpoint (`from_pretrained` loads it on one device); every rank writes its stages."""
        checkpointing.save_model(self, output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # written into a staging folder, published by one rename once every rank has written its part
        checkpointing.save_checkpoint(self, trial, lambda: super(PipeTrainer, self)._save_checkpoint(model, trial))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        checkpointing.save_optimizer_and_scheduler(self, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:  # any layout's, or Trainer's; none is an error
            checkpointing.load_optimizer_and_scheduler(self, checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        checkpointing.load_stage_weights(self, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(
            "Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric
        )
        checkpointing.load_stage_weights(self, self.state.best_model_checkpoint)


def loss_override_problems(cls: type) -> list[str]:
    """A `compute_loss` override PipeTrainer would silently bypass: it never runs a whole-model forward."""
    return compute_loss_problems(cls, PipeTrainer)
