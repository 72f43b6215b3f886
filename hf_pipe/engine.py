"""One pipelined training (or evaluation) step of a HF model on this rank: the piece PipeTrainer drives.

The engine owns this rank's stage modules, the torch schedule, the loss, tied-weight gradient sync and the global
gradient norm. torch.distributed.pipelining runs the schedule; what it leaves to the user is here:

- loss normalised by the whole batch's label count (`loss.py`), reported on every rank, not only the last;
- tied weights whose copies live on different ranks stay one parameter (gradients summed over their owners);
- global gradient norm and clipping over all stages, a tied weight counted once;
- Linear weight gradients accumulated in place, microbatch after microbatch (`grad_accumulation.py`);
- batches of a new shape (dynamic padding): torch infers send/receive shapes at a stage's first step, so a stage
  set and schedule are kept per batch shape; microbatches are cut here (`microbatch.py`), packed batches included.

How the stages are made (module split, tracing) is a frontend's business (`frontends/`), where their weights come
from a weight source's (`weights.py`): the engine only runs them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.tensor import DTensor, distribute_tensor

from .checkpoint import canonical_state_names
from .errors import PipelineConfigError, raise_if_any, raise_on_every_rank
from .families import CAUSAL_LM
from .families.base import ATTENTION_KWARGS, LABEL_KEYS
from .frontends import LocalStages, frontend_name, select_frontend
from .grad_accumulation import ONE_PASS_SCHEDULES, accumulate_linear_grads_in_place
from .launch import computing, new_group, timeout_s, waiting
from .loss import PipelineLoss, reduce_metrics
from .microbatch import LOSS_KEYS, Microbatches, cut_packed, cut_rows, is_packed, shifted_labels
from .schedule import (
    default_stages_per_rank,
    forward_only_schedule,
    largest_divisor_at_most,
    placement,
    run_microbatches,
    schedule_class,
    schedule_for_batch,
)
from .split import SplitPolicy
from .timeline import Action, Timeline
from .validate import pipeline_problems
from .weights import Resident, meta_names, weights_problems

# Distinct batch shapes whose stages and schedule are kept; older ones are rebuilt when they come back.
_SHAPE_CACHE_SIZE = 16


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 (DTensor) tensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class DataParallel:
    """Data-parallel replicas of the pipeline: the replicas of this rank's stages, and every replica's pipeline."""

    group: dist.ProcessGroup
    mesh: Any  # the 1-D "dp" DeviceMesh (FSDP2 shards over it)
    size: int
    rank: int
    mode: str  # "ddp" or "fsdp"
    pipelines: list[list[int]]  # global ranks of each replica's pipeline, stage-rank order


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
    ):
        self.group = group if group is not None else dist.group.WORLD
        self.dp = data_parallel
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
        self.local = self._build(model, weights if weights is not None else Resident())
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
        self._runnable: list[nn.Module] = [self._wrap_data_parallel(m) for m in self.modules]
        # after wrapping: FSDP2 replaces each parameter by its sharded version
        self._tied = self._setup_tied(self.local.tied)
        self.loss = PipelineLoss(self.plan.task, config)
        #: what a user loss reported for the last step, as (reduction, total, count) per metric
        #: (`loss.reduce_metrics`), on every rank
        self.metrics: dict[str, tuple[str, float, float]] = {}
        #: consecutive rows of a batch that one loss term compares (a preference pair: 2), kept in one microbatch
        self.rows_per_example = 1
        self.has_first = 0 in self.stage_indices
        self.has_last = self.num_stages - 1 in self.stage_indices
        self._schedules: OrderedDict[tuple, Any] = OrderedDict()
        self.timeline = Timeline(self.pp_rank)
        #: every rank's recorded actions, set when the steps armed with `record_timeline` have run
        self.recorded: list[Action] | None = None

    @property
    def _replicated(self) -> bool:
        return self.dp is not None and self.dp.size > 1

    @property
    def _neighbours(self) -> str:
        """The stages this rank's stages exchange activations and gradients with, and their ranks (for errors)."""
        peers = sorted(
            {s for i in self.stage_indices for s in (i - 1, i + 1) if 0 <= s < self.num_stages}
            - set(self.stage_indices)
        )
        if not peers:
            return "no other rank (every stage is here)"
        return ", ".join(f"stage {s} on rank {self._global(self.stage_to_rank[s])}" for s in peers)

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank) if self.group is not dist.group.WORLD else pp_rank

    @property
    def _pipeline_ranks(self) -> str:
        return (
            "every rank of the pipeline (ranks " + ", ".join(str(self._global(r)) for r in range(self.pp_size)) + ")"
        )

    def _build(self, model: nn.Module, weights: Any) -> LocalStages:
        """This rank's stages through the frontend, their tensors real on the device; a problem on any rank (a
        checkpoint that does not fit, a weight left on meta) is one error on every rank, before any step."""
        problems: list[str] = []
        local = None
        try:
            local = self.frontend.build(model, self.plan, self.stage_indices, self.device, weights)
        except PipelineConfigError as err:
            problems = err.problems
        if local is not None and (left := meta_names(model, local.keep)):
            problems.append(
                f"{len(left)} tensor(s) of this rank's stages are still on the meta device after loading: "
                f"{left[:8]}; give the model a checkpoint holding them (pipeline_checkpoint) or build it whole."
            )
        raise_on_every_rank(problems)
        return local

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

    def _setup_tied(
        self, groups: list[tuple[list[str], list[int]]]
    ) -> list[tuple[nn.Parameter, dist.ProcessGroup | None, bool]]:
        """Tied weights whose copies sit on several ranks: (local param, group of owner ranks, counts in the norm).

        `new_group` is collective over the world, so every rank walks the same groups in the same order.
        """
        tied = []
        self._tied_owners: list[tuple[list[str], Any, list[int]]] = []  # (FQNs, group, global ranks), for errors
        local = dict(self.named_parameters())
        # every replica's pipeline, as global ranks (one pipeline when there is no data parallelism)
        pipelines = (
            self.dp.pipelines if self.dp else [[dist.get_global_rank(self.group, r) for r in range(self.pp_size)]]
        )
        for fqns, stages in groups:
            ranks = sorted({self.stage_to_rank[s] for s in stages})
            if len(ranks) < 2 or not self._trainable(fqns):
                continue  # a frozen tied weight (a PEFT base embedding) gets no gradient to sum
            mine = None
            for pipeline in pipelines:
                pg = new_group([pipeline[r] for r in ranks], timeout_s())
                if dist.get_rank() in pipeline:
                    mine = pg
            param = next((local[f] for f in fqns if f in local), None)
            if param is not None:
                self._tied_owners.append((fqns, mine, [self._global(r) for r in ranks]))
                tied.append((param, mine, self.pp_rank == ranks[0]))
        return tied

    def _trainable(self, fqns: list[str]) -> bool:
        """Whether a tied weight trains; the same answer on every rank (it is the model's flag, not the rank's)."""
        return self._requires_grad.get(fqns[0], True)

    def _wrap_data_parallel(self, module: nn.Module) -> nn.Module:
        """DDP or FSDP2 over the data-parallel replicas of this stage; torch's stages drive both (no_sync, reshard)."""
        if not self._replicated or not self.frontend.wraps_data_parallel:
            return module  # traced stages: gradients averaged in `reduce_tied_gradients`
        if self.dp.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            return fully_shard(module, mesh=self.dp.mesh)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device] if self.device.type == "cuda" else None
        # No buffer broadcast: it is a collective in every forward, and torch also runs the forward on metadata
        # while inferring stage shapes; the buffers here (rotary tables, position ids) never change anyway.
        return DistributedDataParallel(
            module, process_group=self.dp.group, device_ids=device_ids, broadcast_buffers=False
        )

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

    def _microbatches(
        self, batch: Mapping[str, Any], training: bool, labelled: bool = True
    ) -> tuple[str, Microbatches, dict[str, Any]]:
        """This step's schedule name, its microbatches (rows chunked, or a packed batch cut at its sequences), and
        the batch on the device (with causal-LM `shift_labels`; without labels, `labelled=False`, no loss column)."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        unlabelled = [] if labelled else self.frontend.unlabelled_problems(batch)
        raise_if_any(self.batch_problems(batch, training) + unlabelled)
        if not labelled:  # a part of the labels (one span end) is no label: the model's forward would ignore it
            batch = {k: v for k, v in batch.items() if k not in LOSS_KEYS}
        batch = self.frontend.stage_inputs(batch)
        shift = None
        if self.plan.task == CAUSAL_LM and labelled:
            given = batch.pop("shift_labels", None)
            shift = given if given is not None else shifted_labels(batch["labels"])
            batch["shift_labels"] = shift
        dp = self._replicated
        if self.frontend.packs_sequences and is_packed(batch):
            agree = self._longest_over_replicas if dp else None
            mbs = cut_packed(batch, self.microbatches, shift, agree_length=agree)
            return self.schedule_name if training else "forward", mbs, batch
        rows = batch["input_ids"].shape[0]
        if training:
            name, count = schedule_for_batch(
                self.schedule_name,
                pp_size=self.pp_size,
                stages_per_rank=self.stages_per_rank,
                microbatches=self.microbatches,
                batch_size=rows // self.rows_per_example,
            )
        else:  # forward only: any count of equal microbatches works
            name, count = "forward", largest_divisor_at_most(rows, self.microbatches)
        # With DDP or FSDP2 a new shape makes torch's shape inference talk to the replicas, so they must meet new
        # shapes at the same steps: pad to the longest sequence among them (masked, labels -100).
        length = self._longest_over_replicas(batch["input_ids"].shape[-1]) if dp else None
        pad = getattr(self.config, "pad_token_id", None)
        return name, cut_rows(batch, count, shift, length, pad if isinstance(pad, int) else None), batch

    def _longest_over_replicas(self, length: int) -> int:
        longest = torch.tensor(length, device=self.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.dp.group)
        return int(longest)

    def _schedule_for(self, name: str, mbs: Microbatches):
        kwargs = mbs.kwargs[0]
        # module stages take any keyword values per microbatch; traced ones are specialised to their shapes
        shapes = tuple(
            (k, tuple(v.shape))
            for k, v in sorted(kwargs.items())
            if torch.is_tensor(v) and (self.frontend.shape_specialised or k not in ATTENTION_KWARGS)
        )
        key = (name, len(mbs), tuple(mbs.input_ids[0].shape), shapes)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        training = name != "forward"
        stages = self.frontend.torch_stages(
            self.local,
            self._runnable,
            self.stage_indices,
            self.num_stages,
            (mbs.input_ids[0], kwargs),
            training,
            device=self.device,
            group=self.group,
            timeline=self.timeline,
        )
        if self._in_place:  # modules already routed are left as they are
            accumulate_linear_grads_in_place([stage.submod for stage in stages])
        loss_fn = self.loss if training else None  # evaluation scores the merged logits
        if not training and self.stages_per_rank > 1:
            sched = forward_only_schedule(stages, self.stage_to_rank, len(mbs), loss_fn)
        else:
            cls = schedule_class("gpipe" if not training else name)
            target = stages if self.stages_per_rank > 1 else stages[0]
            sched = cls(target, n_microbatches=len(mbs), loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = sched
        if len(self._schedules) > _SHAPE_CACHE_SIZE:
            self._schedules.popitem(last=False)
        return sched

    def _run(self, batch: Mapping[str, Any], training: bool, num_items: float | None, num_items_in_batch: Any):
        """One step; returns (the batch loss on every rank, the last stage's logits in batch layout or None). An
        evaluation batch without labels has no loss: (None, logits), as the model's forward without labels."""
        labelled = training or self.has_labels(batch)
        name, mbs, batch = self._microbatches(batch, training, labelled)
        if num_items is None and labelled:
            num_items = self.loss.count(batch)
        what = "the pipeline step (activations and gradients through the stages)" if training else "evaluation step"
        with waiting(what, self._neighbours):
            if not labelled:
                return self._forward_only(name, mbs)
            return self._run_schedule(name, mbs, batch, training, num_items, num_items_in_batch)

    def _forward_only(self, name: str, mbs: Microbatches) -> tuple[None, Any]:
        """A batch without labels: the logits on the last stage's rank, no loss (nor a user loss's metrics)."""
        with computing():
            sched = self._schedule_for(name, mbs)
        self.metrics = {}
        with torch.no_grad():
            outputs = run_microbatches(sched, mbs, None, None)
        return None, mbs.merge(outputs) if self.has_last else None

    def _run_schedule(self, name, mbs, batch, training, num_items, num_items_in_batch):
        with computing():  # tracing a new shape is compute, not a wait
            sched = self._schedule_for(name, mbs)
        targets = self.loss.begin(mbs, float(num_items), num_items_in_batch)
        logits, losses = None, []
        if training:
            run_microbatches(sched, mbs, targets, losses)
            loss = torch.stack(losses).sum() if self.has_last else None
        else:
            with torch.no_grad():
                outputs = run_microbatches(sched, mbs, None, None)
                if self.has_last:  # scored on the whole batch, as Trainer scores it
                    logits = mbs.merge(outputs)
                    loss = self.loss.whole_batch(logits, batch)
                else:
                    loss = None
        loss = loss.detach().float().reshape(()) if loss is not None else torch.zeros((), device=self.device)
        src = self.stage_to_rank[self.num_stages - 1]
        with waiting(
            "the loss broadcast from the last stage", f"stage {self.num_stages - 1} on rank {self._global(src)}"
        ):
            dist.broadcast(loss, group_src=src, group=self.group)
            if self.loss.hook is not None:  # what the user's loss reported, on every rank
                metrics = [reduce_metrics(self.loss.metrics) if self.has_last else None]
                dist.broadcast_object_list(metrics, group_src=src, group=self.group, device=self.device)
                self.metrics = metrics[0]
        return loss, logits

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
        loss = self._run(batch, True, num_items, num_items_in_batch)[0]
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
        return self._run(batch, False, num_items, num_items_in_batch)

    # -- gradients -------------------------------------------------------------------------------------------
    def reduce_tied_gradients(self) -> None:
        """Sum the gradients of tied weights over the ranks holding a copy, so the copies stay one parameter.

        Traced stages with data parallelism also average every gradient over the replicas here (as DDP would; a
        DDP wrapper per traced shape would hook each weight once per shape).
        """
        ranks = sorted({r for _, _, owners in self._tied_owners for r in owners})
        with waiting(
            "the tied-weight gradient all-reduce",
            f"the ranks holding a copy of a tied weight (ranks {', '.join(map(str, ranks))})",
        ):
            self._reduce_tied_gradients()

    def _reduce_tied_gradients(self) -> None:
        if self._replicated and not self.frontend.wraps_data_parallel:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads).div_(self.dp.size)
                dist.all_reduce(flat, group=self.dp.group)
                for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    grad.copy_(reduced)
        for param, pg, _ in self._tied:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            # under FSDP2 each copy is sharded alike over the replicas: the local shards line up
            dist.all_reduce(_local(param.grad), group=pg)

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients over all stages, each tied weight counted once."""
        counted_elsewhere = {id(p) for p, _, counts in self._tied if not counts}
        grads = [_local(p.grad) for p in self.parameters() if p.grad is not None and id(p) not in counted_elsewhere]
        # torch's own fused (foreach) norm over this rank's gradients, then the sum of squares over ranks
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True) if grads else None
        squares = local.float().pow(2) if local is not None else torch.zeros((), device=self.device)
        with waiting("the gradient-norm all-reduce", self._pipeline_ranks):
            if self.dp is not None and self.dp.mode == "fsdp" and self.dp.size > 1:
                dist.all_reduce(squares, group=self.dp.group)  # each replica holds a shard of every gradient
            dist.all_reduce(squares, group=self.group)
        return squares.sqrt()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients by the global norm, as `torch.nn.utils.clip_grad_norm_` does on one device."""
        norm = self.grad_norm()
        if max_norm and max_norm > 0:
            params = [p for p in self.parameters() if p.grad is not None]
            if any(isinstance(p.grad, DTensor) for p in params):  # FSDP2: scale each local shard
                coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                for p in params:
                    _local(p.grad).mul_(coef.to(p.grad.dtype))
            else:  # torch's own clipping with the global norm (fused foreach kernels)
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm
