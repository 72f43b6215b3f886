"""`PipeTrainingArguments`: `TrainingArguments` plus the pipeline knobs, validated before any model is touched.

The knobs live in `PipeArgumentsMixin`, which any `TrainingArguments` subclass (Seq2Seq's, TRL's configs) carries
without losing its own field defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .cpu_affinity import affinity_problems, allowed_cpus, local_world
from .errors import raise_if_any
from .families import TASKS
from .launch import init_process_group
from .schedule import SCHEDULES, check_schedule, default_stages_per_rank, divisors, largest_divisor_at_most
from .split import POLICIES
from .trainer_options import training_args_problems
from .validate import frontend_problems


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class PipelineArguments:
    """The pipeline settings, on their own: `PipeTrainingArguments` adds them to `TrainingArguments`, and
    `hf-pipe plan` parses exactly these, so the flags of a training script and of the planner are the same."""

    pipeline_parallel_size: int | None = field(
        default=None,
        metadata={
            "help": "Number of pipeline ranks (stages are spread over them). Default: every launched process. "
            "A world size that is a multiple of it adds data-parallel replicas of the pipeline."
        },
    )
    pipeline_schedule: str = field(
        default="1f1b",
        metadata={"help": "torch.distributed.pipelining schedule (case-insensitive).", "choices": list(SCHEDULES)},
    )
    pipeline_microbatches: int | None = field(
        default=None,
        metadata={
            "help": "Microbatches each batch is split into; must divide per_device_train_batch_size. Default: "
            "2 × the number of stages when that divides the batch (bubble ≈ 1/3 on 1F1B), else the largest divisor "
            "of the batch not above it."
        },
    )
    pipeline_stages_per_rank: int | None = field(
        default=None,
        metadata={"help": "Stages on each rank: 1 for gpipe/1f1b; default 2 for the multi-stage schedules."},
    )
    # Typed str for the command line; from Python a list of ints is accepted too.
    pipeline_split: str = field(
        default="auto",
        metadata={
            "help": "Stage boundaries: 'auto' (balance estimated FLOPs; may begin a stage at a block's MLP half), "
            "'measured' (the same, balancing the pieces' forward + backward times measured at start-up), "
            "'uniform' (equal block counts), or the block indices where stages begin, e.g. '0,6,12,18', with k.5 "
            "for block k's MLP half: '0,6.5,12,18' (a list from Python)."
        },
    )

    pipeline_frontend: str = field(
        default="auto",
        metadata={
            "help": "How stages are made: 'module' (split at the modules of a family with an adapter: any batch "
            "shape, no tracing), 'trace' (torch.export through torch.distributed.pipelining: any exportable model, "
            "traced once per batch shape), 'seq2seq' (an encoder-decoder with an adapter, T5 or BART: stages over "
            "the encoder's then the decoder's blocks), or 'auto' (the adapter's frontend where one is registered, "
            "trace otherwise).",
            "choices": ["auto", "module", "trace", "seq2seq"],
        },
    )
    pipeline_task: str | None = field(
        default=None,
        metadata={
            "help": "The head's task, for a model whose class does not name one (a custom head, your own "
            "nn.Module), with pipeline_frontend='trace': the loss the traced forward's logits take. Default: from the "
            "model class (...ForCausalLM, ...ForSequenceClassification, ...).",
            "choices": list(TASKS),
        },
    )
    pipeline_data_parallel: str = field(
        default="ddp",
        metadata={
            "help": "How data-parallel replicas of the pipeline (world size = pipeline_parallel_size × replicas) "
            "share gradients: 'ddp' (each replica holds its stages whole, gradients all-reduced) or 'fsdp' (each "
            "stage sharded over the replicas with FSDP2 fully_shard).",
            "choices": ["ddp", "fsdp"],
        },
    )
    pipeline_trace_dir: str | None = field(
        default=None,
        metadata={
            "help": "Record the measured schedule (every stage's forward/backward per microbatch) for a few steps "
            "after the first, and write a Chrome trace and a PNG timeline here; the measured bubble is logged."
        },
    )
    pipeline_trace_steps: int = field(default=2, metadata={"help": "Steps the timeline records."})
    pipeline_generation_groups: int | None = field(
        default=None,
        metadata={
            "help": "Generating through the pipeline (predict_with_generate, trainer.generator, TRL's online "
            "trainers): how many groups of rows are in flight at once. Default: one per stage, so every stage has "
            "work at every step of the decode; 1 for logits processors or stopping criteria that look across rows."
        },
    )
    pipeline_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "For a model built on the meta device (torch.device('meta'), accelerate's init_empty_weights): "
            "the checkpoint folder (or hub id) its weights are read from, each rank reading only its own stages' "
            "tensors. Unset: such a model is initialised from scratch, the same for every pipeline layout (its "
            "config._name_or_path is not read: loading is never implicit). PipeTrainer(model='<path>') reads from "
            "that path itself."
        },
    )

    def normalize_pipeline_fields(self) -> None:
        """Lower-case the schedule; turn a '0,6,12' split into block indices."""
        if isinstance(self.pipeline_split, str) and self.pipeline_split.lower() not in POLICIES:
            try:
                starts = [float(s) for s in self.pipeline_split.replace(" ", "").split(",") if s]
                self.pipeline_split = [int(s) if s.is_integer() else s for s in starts]
            except ValueError:
                pass  # reported by pipeline_problems with the valid options
        self.pipeline_schedule = self.pipeline_schedule.lower()
        self.pipeline_frontend = self.pipeline_frontend.lower()

    # Settings derived from the launch: the world size is only known once the processes exist.
    def resolved_pipeline_size(self, world_size: int) -> int:
        return self.pipeline_parallel_size or world_size

    def resolved_stages_per_rank(self) -> int:
        if self.pipeline_schedule not in SCHEDULES:
            return 1
        return self.pipeline_stages_per_rank or default_stages_per_rank(self.pipeline_schedule)

    def resolved_microbatches(self, world_size: int, batch_size: int) -> int:
        if self.pipeline_microbatches:
            return self.pipeline_microbatches
        stages = self.resolved_pipeline_size(world_size) * self.resolved_stages_per_rank()
        return largest_divisor_at_most(batch_size, 2 * stages)

    def pipeline_problems(self, world_size: int, batch_size: int) -> list[str]:
        """Every problem with the pipeline settings that needs no model, each with its fix."""
        problems = []
        if isinstance(self.pipeline_split, str) and self.pipeline_split.lower() not in POLICIES:
            problems.append(
                f"pipeline_split={self.pipeline_split!r} is not a split policy; valid options are {list(POLICIES)} "
                "or comma-separated block indices where stages begin, like '0,6,12,18'."
            )
        pp = self.resolved_pipeline_size(world_size)
        if self.pipeline_parallel_size is not None and self.pipeline_parallel_size < 1:
            problems.append(f"pipeline_parallel_size={self.pipeline_parallel_size} must be at least 1.")
            return problems
        if world_size % pp:
            problems.append(
                f"pipeline_parallel_size={pp} does not divide the {world_size} launched processes; use one of "
                f"{divisors(world_size)}, or launch a multiple of {pp} processes."
            )
        if self.pipeline_parallel_size and self.pipeline_parallel_size > world_size:
            problems.append(
                f"pipeline_parallel_size={self.pipeline_parallel_size} but only {world_size} process(es) were launched "
                "(note: `accelerate launch --cpu --num_processes N` starts one process on a CPU-only machine); "
                f"launch {self.pipeline_parallel_size} with `torchrun --nproc_per_node {self.pipeline_parallel_size}` "
                f"or `accelerate launch --multi_gpu --num_processes {self.pipeline_parallel_size}`."
            )
        problems += frontend_problems(self.pipeline_frontend)
        if self.pipeline_task is not None and self.pipeline_task not in TASKS:
            problems.append(f"pipeline_task={self.pipeline_task!r} is not a task; valid options are {list(TASKS)}.")
        if self.pipeline_data_parallel not in ("ddp", "fsdp"):
            problems.append(
                f"pipeline_data_parallel={self.pipeline_data_parallel!r} is not a data-parallel mode; valid options "
                "are ['ddp', 'fsdp']."
            )
        problems += check_schedule(
            self.pipeline_schedule,
            pp_size=pp,
            stages_per_rank=self.resolved_stages_per_rank(),
            microbatches=self.resolved_microbatches(world_size, batch_size),
            batch_size=batch_size,
        )
        return problems


@dataclass
class PipeArgumentsMixin(PipelineArguments):
    """The pipeline part of a training config, for any `TrainingArguments` subclass to carry with its own defaults:
    `PipeTrainingArguments(PipeArgumentsMixin, TrainingArguments)`, `PipeSFTConfig(PipeArgumentsMixin, SFTConfig)`.

    It declares only the pipeline fields, so every field of the config it joins keeps that config's default (a
    dataclass takes each field from the last base in reverse MRO declaring it: a full `PipeTrainingArguments` base
    would bring `TrainingArguments`' defaults back over TRL's). Its `__post_init__` checks the pipeline settings and
    starts the process group, then hands over to the config's own `__post_init__`.

    Example:
        >>> @dataclass
        ... class PipeMyConfig(PipeArgumentsMixin, MyTrainingArguments):
        ...     pass
    """

    pipeline_cpu_affinity: bool = field(
        default=False,
        metadata={
            "help": "Bind each process on a host to its own equal share of the host's CPUs (Linux). On CPU "
            "training it keeps every rank's threads and caches on its own cores; off by default because two jobs "
            "on one host would then share the same cores."
        },
    )

    def __post_init__(self):
        # A CPU-only machine launched with several processes (torchrun, or accelerate's --multi_gpu) must run gloo
        # across all of them; without this accelerate reports one process and every rank trains alone.
        if _launched_world_size() > 1 and not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        self.normalize_pipeline_fields()
        # before Trainer's own set-up, which would fail first, and less clearly, on some of these (DeepSpeed)
        raise_if_any(self.pipeline_problems(_launched_world_size()))
        # Trainer's set-up (below) starts the process group: on the CPU without ddp_timeout, so start it first
        init_process_group(self.ddp_timeout, self.ddp_backend)
        super().__post_init__()  # the config's own: TRL's, then TrainingArguments'

    def pipeline_problems(self, world_size: int, batch_size: int | None = None) -> list[str]:
        batch_size = batch_size or self.per_device_train_batch_size
        pp = self.resolved_pipeline_size(world_size)
        replicas = world_size // pp if pp > 0 and world_size % pp == 0 else 1
        problems = super().pipeline_problems(world_size, batch_size) + training_args_problems(self, replicas)
        if self.pipeline_cpu_affinity:
            problems += affinity_problems(local_world()[1], allowed_cpus())
        return problems

    def resolved_microbatches(self, world_size: int, batch_size: int | None = None) -> int:
        return super().resolved_microbatches(world_size, batch_size or self.per_device_train_batch_size)

    @property
    def place_model_on_device(self) -> bool:
        # PipeTrainer moves each rank's stages to its device; the rest of the model never leaves the host.
        return False


@dataclass
class ModelInitKwargs:
    """`model_init_kwargs`, for the configs that lack it (TRL's declare their own, which is kept)."""

    # TrainingArguments parses each of these from its JSON on the command line, as TRL's configs parse theirs
    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for from_pretrained when PipeTrainer(model='<path or hub id>') builds the model "
            "(dtype, attn_implementation, revision, trust_remote_code, ...), as TRL's trainers take them: a dict, "
            "or its JSON on the command line; dtypes also as strings ('float32', 'bfloat16', 'auto')."
        },
    )


@dataclass
class PipeTrainingArguments(PipeArgumentsMixin, ModelInitKwargs, TrainingArguments):
    """`TrainingArguments` for pipeline-parallel training with `PipeTrainer` (every TrainingArguments default kept).

    `per_device_train_batch_size` is the batch one pipeline consumes per step; it is split into
    `pipeline_microbatches`. Every rank of a pipeline sees the same batches.

    Example:
        >>> args = PipeTrainingArguments(output_dir="out", per_device_train_batch_size=8,
        ...                              pipeline_schedule="1f1b", pipeline_microbatches=4)
    """
