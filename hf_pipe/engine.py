"""One pipelined training (or evaluation, or forward-only) step of a HF model on this rank: the piece PipeTrainer
drives.

The engine owns this rank's stage modules, the torch schedules, the loss, tied-weight gradient sync and the global
gradient norm, and composes the pieces in `runtime/`: `build.py` (stages through the frontend, data-parallel
wrappers), `steps.py` (microbatches, a schedule per batch shape, train / evaluation / forward-only steps),
`gradients.py` (tied reduction, norm, clipping). torch.distributed.pipelining runs the schedule; what it leaves to
the user is there:

- loss normalised by the whole batch's label count (`loss.py`), reported on every rank, not only the last;
- tied weights whose copies live on different ranks stay one parameter (gradients summed over their owners);
- global gradient norm and clipping over all stages, a tied weight counted once;
- Linear weight gradients accumulated in place, microbatch after microbatch (`grad_accumulation.py`);
- batches of a new shape (dynamic padding): torch infers send/receive shapes at a stage's first step, so a stage
  set and schedule are kept per batch shape; microbatches are cut there (`microbatch.py`), packed batches included.

How the stages are made (module split, tracing) is a frontend's business (`frontends/`), where their weights come
from a weight source's (`weights.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.tensor import DTensor, distribute_tensor

from .checkpoint import canonical_state_names
from .errors import PipelineConfigError, raise_if_any
from .families import CAUSAL_LM
from .families.base import LABEL_KEYS
from .frontends import frontend_name, select_frontend
from .grad_accumulation import ONE_PASS_SCHEDULES
from .launch import DataParallel
from .loss import PipelineLoss
from .microbatch import Microbatches
from .runtime.build import build_stages, wrap_data_parallel
from .runtime.gradients import Gradients
from .runtime.steps import Steps
from .schedule import default_stages_per_rank, placement, schedule_class
from .split import SplitPolicy
from .tensor_parallel import TensorParallel, tensor_parallel_problems
from .timeline import Action, Timeline
from .validate import pipeline_problems
from .weights import Resident, weights_problems

__all__ = ["DataParallel", "PipelineEngine", "PipelineModule", "default_device"]


def default_device() -> torch.device:
    """`cuda:LOCAL_RANK` where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PipelineEngine:
    """This rank's part of a pipeline over `group` (default: the world): its stages, schedule and loss.

    `model` is the whole model, fully built (every rank built or loaded the same one: the engine keeps this rank's
    stages and frees the rest), or a skeleton on the meta device whose stage tensors `weights` gives
    (`weights.Checkpoint(path, seed)`, `weights.Initialise(seed)`): then no rank ever holds more than its stages.
    Settings are checked on every rank before anything is built; `batch_size`, when given, is checked against
    `microbatches` too. A shorter batch (an epoch's last) still runs: see `schedule.schedule_for_batch`.

    `tensor_parallel` (`launch.parallel_groups`) shards each stage over its TP ranks with the model's own
    transformers TP plan (`tensor_parallel.py`).

    `frontend` (see `frontends/`): `"module"` splits a family with an adapter at its modules; `"trace"` exports
    any model (a family without an adapter, or your own `nn.Module` whose forward takes `input_ids` and returns
    logits: pass `task=`, one of `families.TASKS`); `"auto"` takes the module split where it can; an
    encoder-decoder (T5, BART) takes `"seq2seq"` (`"auto"` picks it), its split balanced at `sequence_lengths`
    (source, target tokens). `split="measured"` times the pieces on every rank before planning (collective over the
    world).

    Example:
        >>> engine = PipelineEngine(model, schedule="1f1b", microbatches=4)
        >>> loss = engine.train_step(batch)       # same loss on every rank; grads in engine.parameters()
        >>> engine.reduce_tied_gradients(); norm = engine.clip_grad_norm_(1.0); optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        schedule: str = "1f1b",
        microbatches: int | None = None,
        stages_per_rank: int | None = None,
        split: SplitPolicy = "auto",
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        data_parallel: DataParallel | None = None,
        frontend: str = "auto",
        task: str | None = None,
        weights: Any = None,
        sequence_lengths: tuple[int, int] | None = None,
        tensor_parallel: TensorParallel | None = None,
    ):
        self.group = group if group is not None else dist.group.WORLD
        self.dp = data_parallel
        #: this rank's tensor-parallel side (None without TP): its stages sharded with the model's TP plan
        self.tp = tensor_parallel if tensor_parallel is not None and tensor_parallel.size > 1 else None
        self.pp_size = dist.get_world_size(self.group)
        self.pp_rank = dist.get_rank(self.group)
        self.schedule_name = schedule.lower()
        schedule_class(schedule)  # an unknown name fails here, listing the valid ones
        self.stages_per_rank = stages_per_rank or default_stages_per_rank(schedule)
        self.num_stages = self.pp_size * self.stages_per_rank
        self.microbatches = microbatches or self.num_stages
        self.batch_size = batch_size
        self.config = config = getattr(model, "config", None)
        name = frontend_name(frontend, config)
        raise_if_any(
            pipeline_problems(
                config,
                schedule=schedule,
                pp_size=self.pp_size,
                stages_per_rank=self.stages_per_rank,
                microbatches=self.microbatches,
                batch_size=batch_size,
                explicit_split=not isinstance(split, str),
                frontend=name,
                data_parallel=data_parallel.mode if self._replicated else None,
            )
            + weights_problems(model, weights)
            + tensor_parallel_problems(
                config,
                self.tp.size if self.tp else 1,
                frontend=name,
                data_parallel=data_parallel.mode if self._replicated else None,
            )
        )
        self.frontend = select_frontend(name, config)
        self.device = torch.device(device) if device is not None else default_device()
        #: (source, target) tokens an encoder-decoder's split is balanced at (None: the model's positions)
        self.sequence_lengths = sequence_lengths
        self.plan = self.frontend.plan(model, self.num_stages, split, task=task, context=self)
        if self.plan.task is None:
            raise PipelineConfigError(
                f"{type(model).__name__} has no head to train; pass a model with one (...ForCausalLM, ...ForMaskedLM, "
                "...ForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering, "
                "...ForMultipleChoice), or task= one of hf_pipe.families.TASKS for a model of your own whose forward "
                "returns logits."
            )
        self.stage_to_rank = generate_stage_to_rank_mapping(self.pp_size, self.num_stages, placement(schedule))
        self.stage_indices = [s for s in range(self.num_stages) if self.stage_to_rank[s] == self.pp_rank]
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        weights = weights if weights is not None else Resident()
        self.local = build_stages(
            self.frontend, model, self.plan, self.stage_indices, self.device, weights, tp=self.tp
        )
        self.modules: list[nn.Module] = self.local.modules
        #: Linear weight gradients written straight into `.grad` (`grad_accumulation.py`), installed on the stage
        #: modules each schedule runs (a traced frontend makes new ones per shape)
        self._in_place = (
            self.frontend.accumulates_in_place and not self._replicated and self.schedule_name in ONE_PASS_SCHEDULES
        )
        canonical = canonical_state_names(model)
        # Stage-local state key -> the model FQN HF saves it under (a tied weight: the name HF keeps).
        self.state_names = [
            {k: canonical[id(t)] for k, t in m.state_dict(keep_vars=True).items() if id(t) in canonical}
            for m in self.modules
        ]
        # What the schedule runs: the stages themselves, or their DDP / FSDP2 wrappers over the replicas.
        self._runnable = [
            wrap_data_parallel(m, self.dp, self.frontend, self.device, self.tp is not None) for m in self.modules
        ]
        # after wrapping: FSDP2 replaces each parameter by its sharded version
        #: parameters whose gradients are summed over the TP ranks once per step (Qwen3's q/k norms)
        self.tp_summed = [p for name, p in self.named_parameters() if name in set(self.local.tp_summed)]
        self.gradients = Gradients(self, self.local.tied)
        self.loss = PipelineLoss(self.plan.task, config, router=self.frontend.router)
        #: what a user loss reported for the last step, as (reduction, total, count) per metric
        #: (`loss.reduce_metrics`), on every rank
        self.metrics: dict[str, tuple[str, float, float]] = {}
        #: consecutive rows of a batch that one loss term compares (a preference pair: 2), kept in one microbatch
        self.rows_per_example = 1
        self.has_first = 0 in self.stage_indices
        self.has_last = self.num_stages - 1 in self.stage_indices
        self.timeline = Timeline(self.pp_rank)
        self.steps = Steps(self)
        #: every rank's recorded actions, set when the steps armed with `record_timeline` have run
        self.recorded: list[Action] | None = None

    @property
    def _replicated(self) -> bool:
        return self.dp is not None and self.dp.size > 1

    @property
    def neighbours(self) -> str:
        """The stages this rank's stages exchange activations and gradients with, and their ranks (for errors)."""
        peers = sorted(
            {s for i in self.stage_indices for s in (i - 1, i + 1) if 0 <= s < self.num_stages}
            - set(self.stage_indices)
        )
        if not peers:
            return "no other rank (every stage is here)"
        return ", ".join(f"stage {s} on rank {self.global_rank(self.stage_to_rank[s])}" for s in peers)

    def global_rank(self, pp_rank: int) -> int:
        """The global rank of pipeline rank `pp_rank`."""
        return dist.get_global_rank(self.group, pp_rank) if self.group is not dist.group.WORLD else pp_rank

    @property
    def pipeline_ranks(self) -> str:
        """Every rank of this pipeline (for the message of a wait they all take part in)."""
        return (
            "every rank of the pipeline (ranks "
            + ", ".join(str(self.global_rank(r)) for r in range(self.pp_size))
            + ")"
        )

    # -- parameters ------------------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, each once (a tied weight held by two local stages is one parameter)."""
        seen: set[int] = set()
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their FQN in the original model, each once."""
        seen: set[int] = set()
        for module, names in zip(self.modules, self.state_names):
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield names[name], p

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and persistent buffers under the names HF saves them under, whole.

        Collective over the data-parallel replicas under FSDP2 (shards are gathered): call it on every rank.
        """
        state: dict[str, torch.Tensor] = {}
        for module, names in zip(self.modules, self.state_names):
            for key, tensor in module.state_dict().items():
                if key in names:  # traced stages also list the model's non-persistent buffers
                    state[names[key]] = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        return state

    def load_local_state(self, tensors: dict[str, torch.Tensor], only_given: bool = False) -> None:
        """Copy `tensors` (model FQN -> tensor, e.g. from `checkpoint.read_tensors`) into this rank's stages: every
        tensor of them, or (`only_given`) those in `tensors`, say an adapter's."""
        with torch.no_grad():
            for module, names in zip(self.modules, self.state_names):
                for key, tensor in module.state_dict(keep_vars=True).items():
                    if key not in names or (only_given and names[key] not in tensors):
                        continue
                    value = tensors[names[key]].to(device=self.device, dtype=tensor.dtype)
                    if isinstance(tensor, DTensor):
                        value = distribute_tensor(value, tensor.device_mesh, tensor.placements)
                    tensor.copy_(value)

    def _trainable(self, fqns: list[str]) -> bool:
        """Whether a tied weight trains; the same answer on every rank (it is the model's flag, not the rank's)."""
        return self._requires_grad.get(fqns[0], True)

    # -- steps -----------------------------------------------------------------------------------------------
    def has_labels(self, batch: Mapping[str, Any]) -> bool:
        """Whether the batch holds every column the head's loss reads (Trainer's `has_labels`, the head's label names
        being Trainer's `label_names`): without them evaluation runs forward only, with no loss, as Trainer does."""
        return all(batch.get(k) is not None for k in LABEL_KEYS[self.plan.task])

    def batch_problems(self, batch: Mapping[str, Any], training: bool = True) -> list[str]:
        """Batch keys no stage consumes or this frontend cannot honour: each would be dropped silently; in training,
        labels the head's loss needs and the batch lacks (evaluation runs without them: what the forward then needs,
        an encoder-decoder's decoder input, is checked when it runs)."""
        label_keys = LABEL_KEYS[self.plan.task]
        consumed = self.frontend.batch_keys(batch) | {"input_ids", *label_keys}
        if self.plan.task == CAUSAL_LM:
            consumed.add("shift_labels")
        problems = [
            f"batch key {key!r} is not consumed by the pipeline ({self.frontend.keys_note()}), so the model would "
            "train without it; remove it from the collator's output (or the dataset columns), or use a model that "
            "takes it."
            for key, value in batch.items()
            if key not in consumed and value is not None
        ]
        problems += self.frontend.batch_problems(batch)
        if not training:  # evaluation and prediction take batches without labels, as Trainer does
            return problems
        if label_keys == ("labels",) and "labels" not in batch:
            problems.append(
                "the batch has no 'labels': hf_pipe trains with the loss of the last stage; give the collator labels "
                "(e.g. DataCollatorForLanguageModeling(mlm=False) for a causal LM)."
            )
        elif missing := [k for k in label_keys if batch.get(k) is None]:
            problems.append(
                f"the batch has no {' / '.join(map(repr, missing))}: the {self.plan.task} head's loss reads "
                f"{' and '.join(map(repr, label_keys))} (the answer span's token positions, one per row); give the "
                "collator those columns."
            )
        return problems

    def train_step(
        self, batch: Mapping[str, Any], num_items: float | None = None, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Forward and backward of one batch through the pipeline; gradients accumulate into `.grad`.

        Returns the batch loss (HF semantics) on every rank. `num_items` overrides the label count the model's loss
        is normalised by, as Trainer's `num_items_in_batch` does across gradient accumulation; `num_items_in_batch`
        is what a user loss (`loss.hook`) receives. What the hook reported for the step is in `metrics`.
        Call `reduce_tied_gradients` once after the last accumulation step, before clipping.
        """
        self.timeline.begin_step()
        loss = self.steps.train(batch, num_items, num_items_in_batch)
        if self.timeline.end_step():
            self.recorded = self.timeline.gather(self.group)
        return loss

    def record_timeline(self, steps: int) -> None:
        """Time every stage action of the next `steps` training steps; all ranks' actions land in `recorded`."""
        self.recorded = None
        self.timeline.arm(steps)

    def eval_step(
        self, batch: Mapping[str, Any], num_items: float | None = None, num_items_in_batch: Any = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Forward only: (loss on every rank, the batch's logits on the rank with the last stage, else None). An
        encoder-decoder's are (logits, encoder output), as its forward returns them. A batch without the head's
        labels (`has_labels`) has no loss: (None, the logits or None), the model's outputs without labels."""
        return self.steps.evaluate(batch, num_items, num_items_in_batch)

    def forward(
        self,
        batch: Mapping[str, Any],
        on_last: Callable[[Any, dict[str, Any]], Any] | None = None,
        stages: tuple[Any, list[nn.Module]] | None = None,
    ) -> tuple[Any, Microbatches, dict[str, Any]]:
        """Every microbatch of `batch` through every stage, no backward: the pass a frozen reference model's
        log-probabilities, a KL term or a rollout's scores need. Collective over the pipeline.

        On the last stage's rank returns the outputs in batch layout, or with `on_last` the list of
        `on_last(outputs, microbatch inputs)` per microbatch (each computed as its microbatch leaves the last stage,
        so that its logits need not be kept); None on the other ranks; then the microbatches and the batch on the
        device. `stages` runs another set of stages with the same split: (their `LocalStages`, the modules to run),
        e.g. a frozen copy built by `self.frontend.build` (module-split frontends).

        Example:
            >>> logps, mbs, _ = engine.forward(batch, on_last=lambda out, mb: out.logits.log_softmax(-1).amax(-1))
        """
        return self.steps.forward(batch, on_last, stages)

    # -- gradients -------------------------------------------------------------------------------------------
    def reduce_tied_gradients(self) -> None:
        """Sum the gradients of tied weights over the ranks holding a copy, so the copies stay one parameter.

        Traced stages with data parallelism also average every gradient over the replicas here (as DDP would; a
        DDP wrapper per traced shape would hook each weight once per shape).
        """
        self.gradients.reduce()

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients over all stages, each tied weight counted once."""
        return self.gradients.norm()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients by the global norm, as `torch.nn.utils.clip_grad_norm_` does on one device."""
        return self.gradients.clip(max_norm)


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
