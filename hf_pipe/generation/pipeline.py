"""The decoding loop through the pipeline: every rank runs only its own stages, each with its own KV cache.

The rows of a batch are cut into groups that are in flight together. For each step (the prefill, then one token at
a time) and each group, in that order on every rank:

- the first stage embeds the group's next tokens and sends hidden states on; each stage runs its blocks with its
  cache for that group (`cache.StageCache`) and sends on;
- the last stage computes the last position's logits and chooses the next tokens (`choice.py`), then sends the
  decision (`choice.Step`: tokens, the rows' new order under beam search, done) to every other rank of the pipeline
  on a second process group with the same ranks (so that decisions and hidden states, which may travel between the
  same two ranks, never cross: NCCL matches messages in order, not by tag).

While the last stage chooses group g's tokens, the first stage already embeds group g+1's: with as many groups as
stages, every stage works at every moment of the decode (`PipelineGenerator` picks that many by default). Each rank
does its work in the same (step, group, stage) order, and every message goes from an earlier item to a later one,
so no rank waits on a message that a wait of its own holds back.

Each rank keeps HF's own bookkeeping of the inputs (`prepare_inputs_for_generation`,
`_update_model_kwargs_for_generation` on the group's rows): attention mask, positions and token types are rebuilt on
every rank, only the tokens travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..evaluation import broadcast_from_last_stage
from ..families.base import CACHE
from ..launch import progress, waiting
from ..stage import BlockHalf
from .cache import StageCache
from .choice import BeamSearch, Sampling, Step

#: keys `prepare_inputs_for_generation` gives that say how to call the model, not what it reads
MODEL_CALL_KEYS = ("input_ids", "use_cache", "logits_to_keep", "return_dict", "cache", "output_attentions",
                   "output_hidden_states")  # fmt: skip


@dataclass
class Group:
    """One group of rows in flight: its rows of the batch, HF's model kwargs for them, its caches (one per local
    stage) and, on the last stage's rank, the token choice."""

    rows: slice
    ids: torch.Tensor
    kwargs: dict[str, Any]
    caches: dict[int, StageCache] = field(default_factory=dict)
    choice: Sampling | BeamSearch | None = None
    done: bool = False
    #: encoder-decoders: the group's source rows (each example once), each row's source in them, and on each
    #: decoder stage the encoder's output for the group's rows (`seq2seq.py`)
    sources: slice | None = None
    expand: torch.Tensor | None = None
    encoded: dict[int, torch.Tensor] = field(default_factory=dict)


def row_groups(rows: int, groups: int, unit: int) -> list[slice]:
    """`rows` cut into at most `groups` contiguous groups of whole units (an example's beams), as even as possible."""
    units = rows // unit
    groups = max(1, min(groups, units))
    sizes = [units // groups + (1 if g < units % groups else 0) for g in range(groups)]
    starts = [sum(sizes[:g]) * unit for g in range(groups)]
    return [slice(s, s + n * unit) for s, n in zip(starts, sizes)]


def attention_layers(stage: Any) -> list[int]:
    """The blocks whose attention a stage runs (a stage that begins mid-block runs only the MLP of its first)."""
    return [i for i, b in zip(stage.layer_ids, stage.blocks) if not (isinstance(b, BlockHalf) and b.part == 1)]


def slice_rows(kwargs: dict[str, Any], rows: slice, total: int) -> dict[str, Any]:
    """HF's model kwargs for some rows: every tensor (or model output of tensors) with a row per sequence, cut."""

    def cut(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == total:
            return value[rows]
        return value

    return {k: cut(v) for k, v in kwargs.items()}


class DecodeLoop:
    """One `generate` call's decoding on this rank (see the module docstring)."""

    def __init__(self, generator: Any, model: Any, input_ids: torch.Tensor, processors: Any, stopping: Any,
                 config: Any, model_kwargs: dict[str, Any]):  # fmt: skip
        engine = generator.engine
        self.engine, self.model, self.config = engine, model, config
        self.back = generator.back
        self.stages = engine.modules
        self.last_rank = engine.stage_to_rank[engine.num_stages - 1]
        self.has_last = engine.has_last
        self.dtype = generator.dtype
        self.hidden_size = model.config.get_text_config().hidden_size
        beams = config.num_beams
        choice = BeamSearch if beams > 1 else Sampling
        total = input_ids.shape[0]
        model_kwargs = {k: v for k, v in model_kwargs.items() if k != "cache"}  # each stage keeps its own
        self.groups = []
        for rows in row_groups(total, generator.groups, beams):
            group = Group(rows, input_ids[rows], slice_rows(model_kwargs, rows, total))
            group.caches = {s.index: cache for s in self.stages if (cache := self.new_cache(s)) is not None}
            if self.has_last:
                group.choice = choice(input_ids[rows], processors, stopping, config, model)
            self.groups.append(group)
        self.sends: list[Any] = []

    def new_cache(self, stage: Any) -> Any:
        """A stage's KV cache for one group (None: the stage keeps none)."""
        return StageCache(self.model.config, attention_layers(stage))

    def stage_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What the stages read from HF's model inputs for a step."""
        return {k: v for k, v in inputs.items() if k not in MODEL_CALL_KEYS and v is not None}

    def run(self) -> torch.Tensor:
        engine = self.engine
        with torch.no_grad(), waiting("generation through the stages", engine.neighbours):
            step = 0
            while True:
                earlier = len(self.sends)  # the previous step's sends, waited for once this step has run
                running = [g for g in self.groups if not g.done]
                if not running:
                    break
                for group in self.groups:
                    if group.done:
                        if self.has_last and running:
                            group.choice.skip_draw()
                        continue
                    if step > 0 and not self.has_last:
                        self._receive_step(group)
                        if group.done:
                            continue
                    self._run_group(group, first=step == 0)
                    progress()
                step += 1
                self._wait_sends(keep=len(self.sends) - earlier)
                if not self.has_last and all(g.done for g in self.groups):
                    break
            self._wait_sends(keep=0)
        return broadcast_from_last_stage(engine, self._sequences() if self.has_last else None)

    def _wait_sends(self, keep: int) -> None:
        """Wait for the sends of earlier steps (their peers took them by now), keeping the last `keep` in flight."""
        done, self.sends = self.sends[: len(self.sends) - keep], self.sends[len(self.sends) - keep :]
        for work in done:
            work.wait()

    def _run_group(self, group: Group, first: bool) -> None:
        """One step of one group through this rank's stages, then HF's bookkeeping of its inputs."""
        model = self.model
        inputs = model.prepare_inputs_for_generation(
            group.ids, next_sequence_length=None if first else 1, is_first_iteration=first, **group.kwargs
        )
        self._run_stages(group, inputs, first)
        group.kwargs = model._update_model_kwargs_for_generation(
            {}, group.kwargs, is_encoder_decoder=model.config.is_encoder_decoder
        )

    def _run_stages(self, group: Group, inputs: dict[str, Any], first: bool) -> None:
        batch = self.stage_batch(inputs)
        tokens = inputs["input_ids"]
        local: dict[int, list[torch.Tensor]] = {}
        for stage in self.stages:
            (x,) = [tokens] if stage.is_first else self._receive(stage, local, (*tokens.shape, self.hidden_size))
            out = stage(x, **batch, **{CACHE: group.caches[stage.index]})
            if stage.is_last:
                self._decide(group, group.choice.choose(out))
            else:
                self._send(stage, local, out)

    def _receive(self, stage: Any, local: dict[int, list[torch.Tensor]], *shapes: tuple[int, ...]) -> list[Any]:
        """What the previous stage sent `stage` this step: kept in `local` when it runs on this rank, else received
        (tensors of `shapes`, in the activations' dtype)."""
        if stage.index - 1 in local:
            return local.pop(stage.index - 1)
        engine, received = self.engine, []
        for shape in shapes:
            x = torch.empty(shape, dtype=self.dtype, device=engine.device)
            dist.recv(x, group_src=engine.stage_to_rank[stage.index - 1], group=engine.group)
            received.append(x)
        return received

    def _send(self, stage: Any, local: dict[int, list[torch.Tensor]], *tensors: torch.Tensor) -> None:
        """`tensors` to the next stage: into `local` when it runs on this rank, else sent without waiting."""
        engine = self.engine
        if engine.stage_to_rank[stage.index + 1] == engine.pp_rank:
            local[stage.index] = list(tensors)
            return
        for x in tensors:
            self.sends.append(
                dist.isend(x.contiguous(), group_dst=engine.stage_to_rank[stage.index + 1], group=engine.group)
            )

    def _decide(self, group: Group, step: Step) -> None:
        """The last stage's decision, applied here and sent to every other rank of the pipeline."""
        group.ids = group.choice.rows
        group.done = step.done
        if step.reorder is not None:
            for cache in group.caches.values():
                cache.reorder_cache(step.reorder)
        reorder = step.reorder if step.reorder is not None else torch.full_like(step.tokens, -1)
        message = torch.cat(
            [step.tokens.long(), reorder.long(), torch.tensor([int(step.done)], device=reorder.device)]
        )
        for rank in range(self.engine.pp_size):
            if rank != self.engine.pp_rank:
                self.sends.append(dist.isend(message, dst=self.engine.global_rank(rank), group=self.back))

    def _receive_step(self, group: Group) -> None:
        """The last stage's decision for `group`'s previous step, applied to this rank's caches and rows."""
        rows = group.ids.shape[0]
        message = torch.empty(2 * rows + 1, dtype=torch.long, device=self.engine.device)
        dist.recv(message, src=self.engine.global_rank(self.last_rank), group=self.back)
        tokens, reorder, done = message[:rows], message[rows : 2 * rows], bool(message[-1])
        group.done = done
        if done:
            return
        ids = group.ids
        if reorder[0] >= 0:
            ids = ids[reorder]
            for cache in group.caches.values():
                cache.reorder_cache(reorder)
        group.ids = torch.cat([ids, tokens[:, None]], dim=-1)

    def _sequences(self) -> torch.Tensor:
        """Every group's sequences in row order, padded as `generate` pads a batch: rows that finished early carry
        the pad token up to the longest (sampling); beams are cut at the longest generated (beam search)."""
        parts = [g.choice.sequences() for g in self.groups]
        longest = max(p.shape[1] for p in parts)
        pad, eos = self.config._pad_token_tensor, self.config._eos_token_tensor
        fill = int(pad) if pad is not None else int(eos[0]) if eos is not None else -1  # as `_beam_search` fills
        return torch.cat([torch.nn.functional.pad(p, (0, longest - p.shape[1]), value=fill) for p in parts])
