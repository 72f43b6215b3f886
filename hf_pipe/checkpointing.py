"""PipeTrainer's checkpoints: the model as one HF checkpoint written shard-per-rank, Trainer's checkpoints published
only once every rank has written its part, and the resume of a checkpoint of any pipeline layout (or of Trainer's).

- `save_model`: every pipeline rank writes its stages (`checkpoint.save_pipeline_model`), or its part of a PEFT
  adapter (`integrations/peft.py`), into one folder `from_pretrained` loads on one device;
- `save_checkpoint`: Trainer's own checkpoint, written into a staging folder and renamed into place by rank 0 after
  a barrier (a rank killed mid-save leaves nothing a resume would pick up);
- `save_optimizer_and_scheduler` / `load_optimizer_and_scheduler`: the optimizer state by parameter name
  (`optimizer_state.py`), so any layout, or plain Trainer, resumes from it;
- `load_stage_weights`: this rank's stages (or adapter tensors) from a checkpoint, for resume and the best model.

Each function takes the `PipeTrainer` whose Trainer override calls it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoint import canonical_state_names, read_tensors, save_pipeline_model
from .errors import raise_on_every_rank
from .integrations.peft import is_peft_model, read_adapter, save_adapter, saved_keys
from .launch import PipelineTimeoutError, every_rank, report_failure, waiting
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

SCHEDULER_NAME = "scheduler.pt"
STAGING_DIR = ".hf_pipe-saving"


class PipelineSaveError(RuntimeError):
    """A rank could not write its part of a checkpoint; nothing was published."""


def save_model(trainer: Any, output_dir: str) -> None:
    """One ordinary HF checkpoint (`from_pretrained` loads it on one device); every rank writes its stages."""
    engine, args = trainer.engine, trainer.args
    state = engine.local_state()  # collective over the replicas under FSDP2, over the TP ranks with TP
    if trainer._writes and is_peft_model(trainer.model):  # the adapter, as PeftModel.save_pretrained writes it
        save_adapter(trainer.model, state, output_dir, group=engine.group)
        if trainer.processing_class is not None and args.should_save:
            trainer.processing_class.save_pretrained(output_dir)
    elif trainer._writes:  # replicas hold the same weights, TP ranks gathered them: the first one writes
        save_pipeline_model(
            state, trainer.model, output_dir, group=engine.group, processing_class=trainer.processing_class
        )
    with waiting(f"the barrier after saving the model to {output_dir}", every_rank()):
        dist.barrier()
    if args.should_save:
        torch.save(args, os.path.join(output_dir, "training_args.bin"))


def save_checkpoint(trainer: Any, trial: Any, write: Callable[[], None]) -> None:
    """Trainer's checkpoint (`write`: Trainer's own `_save_checkpoint`), written where `get_last_checkpoint` cannot
    see it, then renamed into place.

    Every rank writes its part into `<output_dir>/.hf_pipe-saving/checkpoint-N`; once all have finished, rank 0
    renames it to `<output_dir>/checkpoint-N` (one atomic rename). A process killed during the save leaves only
    the staging folder, which no resume picks up and the next save clears.
    """
    args, state = trainer.args, trainer.state
    run_dir = trainer._get_output_dir(trial)
    staging_root = os.path.join(run_dir, STAGING_DIR)
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    everyone = every_rank() + ", each writing its part"
    if args.should_save:
        shutil.rmtree(staging_root, ignore_errors=True)
    with waiting(f"the barrier before writing {name}", everyone):
        dist.barrier()
    args.output_dir = staging_root  # Trainer derives the checkpoint folder from it
    try:
        with waiting(f"writing {name} (the barriers between ranks' parts)", everyone):
            write()
    except PipelineTimeoutError:
        raise
    except Exception as error:
        # This rank could not write its part (disk full, permission denied): say so to every rank (peers waiting
        # at a barrier of this save lose their connection to this process and report it), publish nothing.
        message = (
            f"rank {args.process_index} could not write its part of {name} at step {state.global_step}"
            f" into {staging_root}: {type(error).__name__}: {error}. Nothing was published: the last complete "
            "checkpoint in output_dir is still the one to resume from (resume_from_checkpoint=True). Fix: free "
            "space or fix the permissions of output_dir on this rank's node, or point output_dir elsewhere."
        )
        report_failure(message)
        raise PipelineSaveError(message) from error
    finally:
        args.output_dir = run_dir
    with waiting(f"the barrier after writing {name} (every rank's files complete)", everyone):
        dist.barrier()
    final = os.path.join(run_dir, name)
    if args.should_save:
        if os.path.isdir(final):  # saved again at the same step (e.g. at the end of training)
            shutil.rmtree(final)
        os.replace(os.path.join(staging_root, name), final)
        shutil.rmtree(staging_root, ignore_errors=True)
    with waiting(f"the barrier after publishing {name}", everyone):
        dist.barrier()
    # Trainer looked for the best checkpoint in the staging folder; point every rank at the real one.
    if state.best_global_step:
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        if os.path.isdir(best):
            state.best_model_checkpoint = best
    if args.should_save:
        state.save_to_json(os.path.join(final, TRAINER_STATE_NAME))
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )
    with waiting(f"the barrier after saving {name}", everyone):
        dist.barrier()


def parameter_names(engine: Any) -> dict[int, str]:
    """id of each of this rank's parameters -> the HF name it is saved under."""
    return {id(p): name for name, p in engine.named_parameters()}


def save_optimizer_and_scheduler(trainer: Any, output_dir: str) -> None:
    """The optimizer state by parameter name, one file per pipeline rank (`optimizer_state.py`): any layout, or
    plain Trainer, resumes from it. Replicas hold the same state (FSDP2: shards, gathered first); the scheduler is the
    same on all."""
    engine = trainer.engine
    os.makedirs(output_dir, exist_ok=True)
    with waiting(f"writing the optimizer state into {output_dir}", engine.pipeline_ranks):
        save_named(trainer.optimizer, parameter_names(engine), output_dir, group=engine.group, write=trainer._writes)
    if trainer.args.should_save:
        torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
    with waiting(f"the barrier after writing the optimizer state into {output_dir}", every_rank()):
        dist.barrier()


def _optimizer_file(trainer: Any) -> str:
    """hf_pipe's earlier per-rank optimizer file of this rank."""
    name = f"optimizer-pp{trainer.engine.pp_rank:05d}"
    sharded = trainer.data_parallel is not None and trainer.data_parallel.mode == "fsdp"
    return f"{name}-dp{trainer._dp_rank:05d}.pt" if sharded else f"{name}.pt"


def load_optimizer_and_scheduler(trainer: Any, checkpoint: str) -> None:
    """This rank's optimizer state from a checkpoint of any layout, or of plain Trainer; no state is an error."""
    optimizer = trainer.optimizer
    names = parameter_names(trainer.engine)
    problems: list[str] = []
    state = hyper = old = None
    old_file = os.path.join(checkpoint, _optimizer_file(trainer))
    trainer_file = os.path.join(checkpoint, TRAINER_OPTIMIZER_NAME)
    try:
        if has_named_state(checkpoint):
            # the trained parameters' state: frozen weights (a PEFT model's base) have none
            state, hyper = read_named(checkpoint, trained_names(optimizer, names))
        elif os.path.isfile(old_file):  # hf_pipe's earlier per-rank files: the same layout only
            old = torch.load(old_file, map_location=trainer.engine.device, weights_only=True)
            mine = [len(g["params"]) for g in optimizer.param_groups]
            if [len(g["params"]) for g in old["param_groups"]] != mine:
                problems.append(
                    f"{old_file} was saved on another pipeline layout (param groups of "
                    f"{[len(g['params']) for g in old['param_groups']]} parameters, this rank has {mine}): these "
                    "per-rank files resume only the layout that wrote them; resume with that pipeline_parallel_size, "
                    "split and schedule (checkpoints written since hold the state by name and resume on any layout)."
                )
        elif os.path.isfile(trainer_file):  # plain Trainer's: positions in its param groups, mapped to names
            decay = set(Trainer.get_decay_parameter_names(trainer, trainer.model))
            groups = trainer_groups(trainer.model, decay, canonical_state_names(trainer.model))
            state, hyper = read_trainer(trainer_file, groups)
        else:
            problems.append(
                f"resume_from_checkpoint={checkpoint} holds no optimizer state ({INDEX_NAME}, "
                f"{_optimizer_file(trainer)} or Trainer's {TRAINER_OPTIMIZER_NAME}), so training would go on with "
                "fresh AdamW moments and drift from the run it continues. Resume from a checkpoint saved with its "
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
            f"{trainer.args.process_index} ({type(error).__name__}: {error}); resume from another checkpoint."
        )
    raise_on_every_rank(problems)
    if old is not None:
        optimizer.load_state_dict(old)
    else:
        load_named(optimizer, names, state, hyper)
    trainer.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))


def load_stage_weights(trainer: Any, checkpoint: str) -> None:
    """This rank's stage weights from `checkpoint`; a PEFT model's adapter tensors only (its frozen base weights are
    as they were loaded)."""
    engine = trainer.engine
    local = engine.local_state()
    if is_peft_model(trainer.model):
        keys = saved_keys(trainer.model, local)
        engine.load_local_state(read_adapter(checkpoint, keys), only_given=True)
    else:
        engine.load_local_state(read_tensors(checkpoint, sorted(local)))
