"""Cut one batch into the microbatches of a pipeline step, and put the last stage's outputs back in batch layout.

torch's schedules chunk every tensor along dim 0. That is right for rows of padded sequences and wrong for packed
(padding-free) batches, whose rows hold several sequences told apart by `position_ids` that restart
(`DataCollatorWithFlattening`, TRL's padding-free and BFD packing): HF attends within each sequence, a one-row batch
cannot be chunked along dim 0, and the cumulative offsets flash attention takes (`cu_seq_lens_*`) mean nothing once
cut in pieces (torchtitan#4098; torchtitan#3856 cuts its microbatches up front for the same reason). So here:

- rows (padded batches): dim-0 chunks, as torch cuts them;
- packed batches, for models whose masking honours `position_ids`: the sequences, in order, grouped into
  microbatches of balanced token counts — a sequence is never cut — each one row, padded to one common length with
  short padding sequences (labels -100), with its own `position_ids` and, where the batch had them, its own
  `cu_seq_lens_*`, `max_length_*` and `seq_idx`;
- causal-LM labels are shifted once, for the whole batch (`shift_labels`, which HF's loss takes as given), before any
  cut: a label never moves into another microbatch, whatever the collator put at sequence starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import PipelineConfigError

IGNORE_INDEX = -100
#: flash-attention sequence boundaries, recomputed for each microbatch
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
#: what the loss reads (question answering's answer spans included); never passed to a stage
LOSS_KEYS = ("labels", "shift_labels", "start_positions", "end_positions")
#: per-token values of a padding position: nothing to predict, a token id that exists
_PAD_VALUES = {"labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX}
#: packed microbatches are padded to a multiple of this many tokens (fewer distinct shapes: fewer stage set-ups), with
#: padding sequences at most this long (their positions stay below any model's position count)
PACK_MULTIPLE = 64


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """What HF's causal-LM loss compares position t with: the label at t + 1, and -100 after the last."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Per row, True where a sequence begins: position 0 of the row, and wherever positions do not go up by one —
    the rule HF's `find_packed_sequence_indices` uses."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return starts


def is_packed(batch: Mapping[str, Any]) -> bool:
    """A padding-free batch: `position_ids` restart inside a row and there is no attention mask (HF then attends
    within each sequence, for models whose masks take `position_ids`)."""
    position_ids = batch.get("position_ids")
    if position_ids is None or batch.get("attention_mask") is not None or position_ids.dim() != 2:
        return False
    return bool(sequence_starts(position_ids)[:, 1:].any())


@dataclass
class Microbatches:
    """One step's microbatches: what each stage gets, what the loss reads, and how to undo the cut."""

    input_ids: list[torch.Tensor]
    #: per microbatch, the keyword arguments every stage receives (attention mask, positions, ...)
    kwargs: list[dict[str, Any]]
    #: per microbatch, the labels as the collator made them (None for question answering, whose answer spans are in
    #: `inputs`), and the causal-LM `shift_labels` (else None)
    labels: list[torch.Tensor | None]
    shift_labels: list[torch.Tensor | None]
    #: the batch's (rows, length)
    batch_shape: tuple[int, int]
    #: packed cuts only: per microbatch, (row, start, length, offset) of each sequence it took from the batch
    segments: list[list[tuple[int, int, int, int]]] | None = None
    #: how many sequences the batch packed (rows for a padded batch)
    num_sequences: int = 0
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def merge(self, outputs: list[Any]) -> Any:
        """The last stage's per-microbatch outputs, in the batch's own layout (rows, then positions): padding added
        for the cut (rows padded to the replicas' length, packed rows to a common length) is dropped. Outputs that
        are tuples (question answering's start and end logits; an encoder-decoder's logits and encoder output) are
        merged element by element."""
        outputs = [o[0] if isinstance(o, (tuple, list)) and len(o) == 1 else o for o in outputs]
        if isinstance(outputs[0], (tuple, list)):
            return tuple(self.merge([o[i] for o in outputs]) for i in range(len(outputs[0])))
        rows, length = self.batch_shape
        if self.segments is None:
            merged = torch.cat(outputs)
            ids = self.input_ids[0]  # per-token outputs of a row of tokens carry the cut's padding
            per_token = ids.dim() == 2 and merged.dim() >= 2 and merged.shape[1] == ids.shape[1] > length
            return merged[:, :length].contiguous() if per_token else merged
        merged = outputs[0].new_zeros((rows, length, *outputs[0].shape[2:]))
        for output, segments in zip(outputs, self.segments):
            for row, start, size, offset in segments:
                merged[row, start : start + size] = output[0, offset : offset + size]
        return merged


def cut_rows(
    batch: Mapping[str, Any],
    count: int,
    shift_labels: torch.Tensor | None,
    length: int | None = None,
    pad_token_id: int | None = None,
) -> Microbatches:
    """Dim-0 chunks of a padded batch; `length` (≥ the batch's) pads every row to it first, masked, labels -100,
    token ids `pad_token_id` (a decoder classifier pools at the last token that is not padding). Multiple-choice
    rows, `(examples, choices, seq)`, are cut by example and padded along the sequence."""
    batch = dict(batch)
    if shift_labels is not None:
        batch["shift_labels"] = shift_labels
    rows, own_length = batch["input_ids"].shape[0], batch["input_ids"].shape[-1]
    if length is not None and length > own_length:
        batch = _pad_rows(batch, length, pad_token_id)
    parts = {
        k: (v.tensor_split(count) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else [v] * count)
        for k, v in batch.items()
        if k not in FLASH_KEYS
    }
    chunks = [{k: v[i] for k, v in parts.items()} for i in range(count)]
    if "position_ids" in batch and any(k in batch for k in FLASH_KEYS):
        for chunk in chunks:
            chunk.update(flash_kwargs(chunk["position_ids"]))
    return _microbatches(chunks, (rows, own_length), None, rows)


def _pad_rows(batch: dict[str, Any], length: int, pad_token_id: int | None = None) -> dict[str, Any]:
    ids = batch["input_ids"]
    extra = length - ids.shape[-1]
    if batch.get("attention_mask") is None:
        batch["attention_mask"] = torch.ones_like(ids)
    seq = ids.dim() - 1  # the sequence dimension (after the choices of a multiple-choice batch)
    pad_values = {**_PAD_VALUES, "input_ids": pad_token_id or 0}
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > seq and v.shape[: seq + 1] == ids.shape:
            pad = (0, 0) * (v.dim() - seq - 1) + (0, extra)
            if k == "position_ids":  # positions go on, as HF would number the padding
                v = torch.cat([v, v[..., -1:] + torch.arange(1, extra + 1, device=v.device)], dim=seq)
            else:
                v = F.pad(v, pad, value=pad_values.get(k, 0))
        out[k] = v
    return out


def cut_packed(
    batch: Mapping[str, Any],
    count: int,
    shift_labels: torch.Tensor | None,
    agree_length: Callable[[int], int] | None = None,
) -> Microbatches:
    """The batch's sequences in order, in `count` microbatches of balanced token counts, each one padded row.

    `agree_length(n)` turns this pipeline's microbatch length into the one every data-parallel replica uses.
    """
    batch = dict(batch)
    if shift_labels is not None:
        batch["shift_labels"] = shift_labels
    ids, position_ids = batch["input_ids"], batch["position_ids"]
    rows, length = ids.shape
    per_token = {}
    for key, value in batch.items():
        if key in FLASH_KEYS or value is None:
            continue
        if not (torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == ids.shape):
            raise PipelineConfigError(
                f"batch key {key!r} (shape {tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}) "
                f"is not one value per token of the packed batch {tuple(ids.shape)}: a packed batch is cut at its "
                "sequence boundaries, so every tensor in it must be per token; drop it from the collator's output."
            )
        per_token[key] = value
    starts = sequence_starts(position_ids)
    segments = []  # (row, start, length)
    for row in range(rows):
        bounds = [*starts[row].nonzero().flatten().tolist(), length]
        segments += [(row, a, b - a) for a, b in zip(bounds, bounds[1:])]
    if len(segments) < count:
        raise PipelineConfigError(
            f"a packed batch of {len(segments)} sequence(s) cannot fill pipeline_microbatches={count}: a sequence is "
            "never cut across microbatches. Pack more sequences per batch (per_device_train_batch_size), lower "
            f"pipeline_microbatches to at most {len(segments)}, or set dataloader_drop_last=True if it is an "
            "epoch's short last batch."
        )
    sizes = balanced_groups([s[2] for s in segments], count)
    groups, first = [], 0
    for size in sizes:
        groups.append(segments[first : first + size])
        first += size
    longest = max(sum(s[2] for s in group) for group in groups)
    padded = -(-longest // PACK_MULTIPLE) * PACK_MULTIPLE
    padded = agree_length(padded) if agree_length is not None else padded
    chunks, layout = [], []
    for group in groups:
        chunk = {k: torch.cat([v[row, a : a + n] for row, a, n in group]).unsqueeze(0) for k, v in per_token.items()}
        used = chunk["input_ids"].shape[1]
        chunk = {k: _pad_packed(k, v, padded - used) for k, v in chunk.items()}
        if "seq_idx" in chunk:
            chunk["seq_idx"] = (sequence_starts(chunk["position_ids"]).cumsum(-1) - 1).to(batch["seq_idx"].dtype)
        if any(k in batch for k in FLASH_KEYS):
            chunk.update(flash_kwargs(chunk["position_ids"]))
        offsets = [0, *torch.tensor([n for _, _, n in group]).cumsum(0).tolist()]
        layout.append([(row, a, n, offset) for (row, a, n), offset in zip(group, offsets)])
        chunks.append(chunk)
    return _microbatches(chunks, (rows, length), layout, len(segments))


def _pad_packed(key: str, value: torch.Tensor, extra: int) -> torch.Tensor:
    """`extra` tokens of padding at the end of a packed row: sequences of their own, at most PACK_MULTIPLE long."""
    if extra == 0:
        return value
    if key == "position_ids":
        fill = torch.arange(extra, device=value.device, dtype=value.dtype) % PACK_MULTIPLE
        return torch.cat([value, fill.unsqueeze(0)], dim=1)
    pad = (0, 0) * (value.dim() - 2) + (0, extra)
    return F.pad(value, pad, value=_PAD_VALUES.get(key, 0))


def flash_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """`cu_seq_lens_*` / `max_length_*` of a microbatch, from its positions (as HF's padding-free collators make
    them): the cumulative sequence offsets over the flattened microbatch, and the longest sequence."""
    starts = sequence_starts(position_ids).flatten().nonzero().flatten()
    bounds = torch.cat([starts, starts.new_tensor([position_ids.numel()])]).to(torch.int32)
    longest = int(bounds.diff().max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def balanced_groups(lengths: list[int], count: int) -> list[int]:
    """Sizes of `count` contiguous groups of `lengths`, each non-empty, minimising the largest group's sum.

    The smallest feasible capacity by bisection (greedy packing is optimal for a given capacity), then groups packed
    greedily up to it while leaving one item for each group still to fill.
    """
    lo, hi = max(lengths), sum(lengths)
    while lo < hi:
        mid = (lo + hi) // 2
        groups, total = 1, 0
        for n in lengths:
            if total + n > mid:
                groups, total = groups + 1, 0
            total += n
        lo, hi = (lo, mid) if groups <= count else (mid + 1, hi)
    sizes, first = [], 0
    for g in range(count):
        last = len(lengths) - (count - g - 1)  # items left for the later groups
        end, total = first, 0
        while end < last and (end == first or total + lengths[end] <= lo or g == count - 1):
            total += lengths[end]
            end += 1
        sizes.append(end - first)
        first = end
    return sizes


def _microbatches(
    chunks: list[dict[str, Any]],
    batch_shape: tuple[int, int],
    segments: list[list[tuple[int, int, int, int]]] | None,
    num_sequences: int,
) -> Microbatches:
    return Microbatches(
        input_ids=[c["input_ids"] for c in chunks],
        kwargs=[{k: v for k, v in c.items() if k not in ("input_ids", *LOSS_KEYS)} for c in chunks],
        labels=[c.get("labels") for c in chunks],
        shift_labels=[c.get("shift_labels") for c in chunks],
        batch_shape=batch_shape,
        segments=segments,
        num_sequences=num_sequences,
        inputs=chunks,
    )
