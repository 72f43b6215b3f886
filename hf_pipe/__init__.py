"""hf_pipe: pipeline-parallel training for HuggingFace transformers on torch.distributed.pipelining."""

from torch.distributed.pipelining import SplitPoint

from .engine import PipelineEngine
from .errors import PipelineConfigError
from .families import FamilyAdapter, register_family, registered_families
from .generation import PipelineGenerator
from .launch import PipelineTimeoutError
from .optimizer_state import write_trainer_optimizer
from .schedule import SCHEDULES, schedule_class
from .seq2seq_split import Seq2SeqSplitPlan, plan_seq2seq
from .seq2seq_trainer import PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments
from .split import SplitPlan, StagePlan, annotate_split_points, plan_split
from .trace import TraceError, pipe_split, pipeline
from .trainer import PipelineModule, PipelineSaveError, PipeTrainer
from .training_args import PipeArgumentsMixin, PipelineArguments, PipeTrainingArguments
from .weights import Checkpoint, Initialise, initialize_weights

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "Checkpoint",
    "Initialise",
    "FamilyAdapter",
    "PipelineConfigError",
    "PipeSeq2SeqTrainer",
    "PipeSeq2SeqTrainingArguments",
    "PipeTrainer",
    "PipeArgumentsMixin",
    "PipeTrainingArguments",
    "PipelineArguments",
    "PipelineEngine",
    "PipelineGenerator",
    "PipelineModule",
    "Seq2SeqSplitPlan",
    "PipelineSaveError",
    "PipelineTimeoutError",
    "SplitPlan",
    "SplitPoint",
    "StagePlan",
    "TraceError",
    "annotate_split_points",
    "initialize_weights",
    "pipe_split",
    "pipeline",
    "plan_seq2seq",
    "plan_split",
    "register_family",
    "registered_families",
    "schedule_class",
    "write_trainer_optimizer",
]
