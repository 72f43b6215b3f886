"""One step of this rank's stages: the batch cut into microbatches, a torch schedule per batch shape, the loss (and
a user loss's metrics) broadcast from the last stage to every rank.

torch infers send/receive shapes at a stage's first step, so batches of a new shape (dynamic padding) need stages
and a schedule of their own: they are kept per shape, the oldest dropped past `SHAPE_CACHE_SIZE`. Microbatches are
cut here (`microbatch.py`): rows chunked, or a packed batch cut at its sequences; with data-parallel replicas every
replica pads to the longest sequence among them, so that they meet new shapes at the same steps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..errors import raise_if_any
from ..families import CAUSAL_LM
from ..families.base import ATTENTION_KWARGS
from ..grad_accumulation import accumulate_linear_grads_in_place
from ..launch import computing, waiting
from ..loss import reduce_metrics
from ..microbatch import LOSS_KEYS, Microbatches, cut_packed, cut_rows, is_packed, shifted_labels
from ..schedule import (
    forward_only_schedule,
    largest_divisor_at_most,
    run_microbatches,
    schedule_class,
    schedule_for_batch,
)

#: distinct batch shapes whose stages and schedule are kept; older ones are rebuilt when they come back
SHAPE_CACHE_SIZE = 16
#: the schedule name of a pass with no backward
FORWARD = "forward"


class Steps:
    """The steps of `engine`'s stages (its frontend, placement, loss and timeline)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._schedules: OrderedDict[tuple, Any] = OrderedDict()

    # -- microbatches ----------------------------------------------------------------------------------------------
    def microbatches(
        self, batch: Mapping[str, Any], training: bool, labelled: bool = True
    ) -> tuple[str, Microbatches, dict[str, Any]]:
        """This step's schedule name, its microbatches, and the batch on the device (with causal-LM
        `shift_labels`; without labels, `labelled=False`, no loss column)."""
        engine = self.engine
        batch = {k: v.to(engine.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        unlabelled = [] if labelled else engine.frontend.unlabelled_problems(batch)
        raise_if_any(engine.batch_problems(batch, training) + unlabelled)
        if not labelled:  # a part of the labels (one span end) is no label: the model's forward would ignore it
            batch = {k: v for k, v in batch.items() if k not in LOSS_KEYS}
        batch = engine.frontend.stage_inputs(batch)
        shift = None
        if engine.plan.task == CAUSAL_LM and labelled:
            given = batch.pop("shift_labels", None)
            shift = given if given is not None else shifted_labels(batch["labels"])
            batch["shift_labels"] = shift
        dp = engine._replicated
        if engine.frontend.packs_sequences and is_packed(batch):
            agree = self._longest_over_replicas if dp else None
            mbs = cut_packed(batch, engine.microbatches, shift, agree_length=agree)
            return engine.schedule_name if training else FORWARD, mbs, batch
        rows = batch["input_ids"].shape[0]
        if training:
            name, count = schedule_for_batch(
                engine.schedule_name,
                pp_size=engine.pp_size,
                stages_per_rank=engine.stages_per_rank,
                microbatches=engine.microbatches,
                batch_size=rows // engine.rows_per_example,
            )
        else:  # forward only: any count of equal microbatches works, whole examples each (a preference pair's rows)
            per = engine.rows_per_example
            name, count = FORWARD, largest_divisor_at_most(rows // per, engine.microbatches)
        # With DDP or FSDP2 a new shape makes torch's shape inference talk to the replicas, so they must meet new
        # shapes at the same steps: pad to the longest sequence among them (masked, labels -100).
        length = self._longest_over_replicas(batch["input_ids"].shape[-1]) if dp else None
        text = engine.config.get_text_config() if hasattr(engine.config, "get_text_config") else engine.config
        pad = getattr(text, "pad_token_id", None)  # a vision-language model's: its text model's
        return name, cut_rows(batch, count, shift, length, pad if isinstance(pad, int) else None), batch

    def _longest_over_replicas(self, length: int) -> int:
        longest = torch.tensor(length, device=self.engine.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.engine.dp.group)
        return int(longest)

    # -- schedules -------------------------------------------------------------------------------------------------
    def schedule(self, name: str, mbs: Microbatches, stages: tuple[Any, list] | None = None, loss_fn: Any = None):
        """The torch schedule `name` for microbatches shaped like `mbs`, over `stages` ((local stages, the modules
        to run); default the engine's own), cached per shape and stage set. Training schedules score the engine's
        loss; a forward-only one calls `loss_fn` (set per call) on each microbatch's output, if given."""
        engine = self.engine
        local, runnable = stages if stages is not None else (engine.local, engine._runnable)
        kwargs = mbs.kwargs[0]
        # module stages take any keyword values per microbatch; traced ones are specialised to their shapes
        shapes = tuple(
            (k, tuple(v.shape))
            for k, v in sorted(kwargs.items())
            if torch.is_tensor(v) and (engine.frontend.shape_specialised or k not in ATTENTION_KWARGS)
        )
        key = (name, id(runnable), len(mbs), tuple(mbs.input_ids[0].shape), shapes)
        training = name != FORWARD
        if key in self._schedules:
            self._schedules.move_to_end(key)
            sched = self._schedules[key]
        else:
            with computing():  # tracing a new shape is compute, not a wait
                sched = self._build_schedule(name, mbs, local, runnable, training)
            self._schedules[key] = sched
            if len(self._schedules) > SHAPE_CACHE_SIZE:
                self._schedules.popitem(last=False)
        if not training:
            sched._loss_fn = loss_fn  # what the last stage makes of each microbatch's output (None: keep it)
        return sched

    def _build_schedule(self, name: str, mbs: Microbatches, local: Any, runnable: list, training: bool):
        engine = self.engine
        stages = engine.frontend.torch_stages(
            local,
            runnable,
            engine.stage_indices,
            engine.num_stages,
            (mbs.input_ids[0], mbs.kwargs[0]),
            training,
            device=engine.device,
            group=engine.group,
            timeline=engine.timeline,
        )
        if engine._in_place and training:  # modules already routed are left as they are
            accumulate_linear_grads_in_place([stage.submod for stage in stages])
        if not training and engine.stages_per_rank > 1:
            return forward_only_schedule(stages, engine.stage_to_rank, len(mbs), None)
        cls = schedule_class(name if training else "gpipe")
        target = stages if engine.stages_per_rank > 1 else stages[0]
        return cls(target, n_microbatches=len(mbs), loss_fn=engine.loss if training else None, scale_grads=False)

    # -- steps -----------------------------------------------------------------------------------------------------
    def train(self, batch: Mapping[str, Any], num_items: float | None, num_items_in_batch: Any) -> torch.Tensor:
        """Forward and backward of one batch; the batch loss on every rank."""
        engine = self.engine
        name, mbs, batch = self.microbatches(batch, True)
        if num_items is None:
            num_items = engine.loss.count(batch)
        with waiting("the pipeline step (activations and gradients through the stages)", engine.neighbours):
            sched = self.schedule(name, mbs)
            targets = engine.loss.begin(mbs, float(num_items), num_items_in_batch)
            losses: list[torch.Tensor] = []
            run_microbatches(sched, mbs, targets, losses)
            loss = torch.stack(losses).sum() if engine.has_last else None
            return self.broadcast_loss(loss)

    def forward(
        self,
        batch: Mapping[str, Any],
        on_last: Callable[[Any, dict[str, Any]], Any] | None = None,
        stages: tuple[Any, list] | None = None,
    ) -> tuple[Any, Microbatches, dict[str, Any]]:
        """Every microbatch of `batch` (with or without labels) through every stage (`stages`, default the engine's
        own), no backward.

        Returns (on the last stage's rank, else None: the outputs in batch layout, or with `on_last` the list of
        `on_last(outputs, microbatch inputs)` per microbatch, each computed as its microbatch leaves the last stage
        so that its outputs need not be kept; the microbatches; the batch on the device).
        """
        engine = self.engine
        _, mbs, batch = self.microbatches(batch, False, engine.has_labels(batch))
        results: list[Any] = []

        def keep(output: Any, index: int) -> torch.Tensor:
            results.append(on_last(engine.loss.outputs(output), mbs.inputs[index]))
            return torch.zeros(())  # torch's schedule keeps it as the microbatch's "loss"

        with torch.no_grad(), waiting("the forward pass through the stages", engine.neighbours):
            sched = self.schedule(FORWARD, mbs, stages, loss_fn=keep if on_last is not None else None)
            targets = list(range(len(mbs))) if on_last is not None else None
            outputs = run_microbatches(sched, mbs, targets, [] if on_last is not None else None, backward=False)
        if not engine.has_last:
            return None, mbs, batch
        return (results if on_last is not None else mbs.merge(outputs)), mbs, batch

    def evaluate(self, batch: Mapping[str, Any], num_items: float | None, num_items_in_batch: Any):
        """Forward only: (the loss on every rank, the batch's outputs on the last stage's rank, else None). A batch
        without the head's labels has no loss (None on every rank), as the model's forward without labels."""
        engine = self.engine
        logits, mbs, batch = self.forward(batch)
        if not engine.has_labels(batch):
            engine.metrics = {}  # nor a user loss's metrics
            return None, logits
        if num_items is None:
            num_items = engine.loss.count(batch)
        engine.loss.begin(mbs, float(num_items), num_items_in_batch)
        loss = engine.loss.whole_batch(logits, batch) if engine.has_last else None
        with waiting("the evaluation step", engine.neighbours):
            return self.broadcast_loss(loss), logits

    def broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The last stage's loss (and what a user loss reported) on every rank of the pipeline."""
        engine = self.engine
        loss = loss.detach().float().reshape(()) if loss is not None else torch.zeros((), device=engine.device)
        src = engine.stage_to_rank[engine.num_stages - 1]
        with waiting(
            "the loss broadcast from the last stage",
            f"stage {engine.num_stages - 1} on rank {engine.global_rank(src)}",
        ):
            dist.broadcast(loss, group_src=src, group=engine.group)
            if engine.loss.hook is not None or engine.loss.router is not None:  # what the loss reported, everywhere
                metrics = [reduce_metrics(engine.loss.metrics) if engine.has_last else None]
                dist.broadcast_object_list(metrics, group_src=src, group=engine.group, device=engine.device)
                engine.metrics = metrics[0]
        return loss
