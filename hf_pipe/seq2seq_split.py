"""Stage boundaries of an encoder-decoder (T5, BART): pure data, no process group, no weights (as `split.py`).

The stages split one list: the encoder's blocks, then the decoder's (index `E + j` is decoder block j, for an
encoder of `E` blocks), so a stage may hold encoder blocks, decoder blocks or both. `auto` balances FLOPs per
sequence: an encoder block runs over the source length, a decoder block over the target length plus cross-attention
over the source (it costs more); the first stage also embeds the source, the stage with decoder block 0 embeds the
target, the last runs the head over the target. Explicit splits and `annotate_split_points` marks index that list
too (`encoder.block.3`, `decoder.block.0`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import PipelineConfigError
from .families import SEQ2SEQ_LM, get_family, registered_families, task_of
from .families.seq2seq import Seq2SeqAdapter
from .split import _SPLIT_POINTS_ATTR, SplitPlan, SplitPolicy, StagePlan, _choose_starts, meta_model

#: lengths the attention costs are estimated at when the data gives none
DEFAULT_LENGTH = 512


@dataclass(frozen=True)
class Seq2SeqSplitPlan(SplitPlan):
    """A `SplitPlan` over the encoder's blocks then the decoder's; `flops_per_token` is per source + target token."""

    encoder_layers: int = 0
    source_len: int = 0
    target_len: int = 0

    def stage_blocks(self, stage: StagePlan) -> str:
        enc = [i for i in stage.layers if i < self.encoder_layers]
        dec = [i - self.encoder_layers for i in stage.layers if i >= self.encoder_layers]
        parts = [f"{name} {ids[0]}-{ids[-1]}" for name, ids in (("enc", enc), ("dec", dec)) if ids]
        return " + ".join(parts)

    def extra_modules(self, stage: StagePlan) -> list[str]:
        blocks = {self.blocks_of(i) for i in stage.layers}
        out = []
        for name in (m for m in stage.modules if m not in blocks):
            parts = name.split(".")[1:] if name.startswith("model.") else name.split(".")
            # encoder.block.0.layer.0.SelfAttention.relative_attention_bias -> encoder.relative_attention_bias
            out.append(f"{parts[0]}.{parts[-1]}" if len(parts) > 2 else ".".join(parts))
        return out

    def blocks_of(self, index: int) -> str:
        encoder, decoder = self.blocks.split(" + ")
        return f"{encoder}.{index}" if index < self.encoder_layers else f"{decoder}.{index - self.encoder_layers}"

    def __str__(self) -> str:
        total = sum(s.flops_per_token for s in self.stages)
        rows = [
            f"{self.model_type} ({self.task}), {self.num_stages} stages, policy {self.policy}, {self.encoder_layers} "
            f"encoder + {self.num_layers - self.encoder_layers} decoder blocks, source {self.source_len} / target "
            f"{self.target_len} tokens:"
        ]
        for s in self.stages:
            extra = self.extra_modules(s)
            rows.append(
                f"  stage {s.index}: {self.stage_blocks(s)}{' + ' + ', '.join(extra) if extra else ''}; "
                f"{s.params / 1e6:.2f}M params, {100 * s.flops_per_token / total:.1f}% of FLOPs"
            )
        rows.append(f"  max/mean cost {self.imbalance:.3f}")
        return "\n".join(rows)


def seq2seq_adapter(model_type: str) -> Seq2SeqAdapter:
    adapter = get_family(model_type)
    if not isinstance(adapter, Seq2SeqAdapter):
        known = [t for t in registered_families() if isinstance(get_family(t), Seq2SeqAdapter)]
        raise PipelineConfigError(
            f"model_type={model_type!r} is not an encoder-decoder hf_pipe can split; the encoder-decoder families "
            f"are {', '.join(known)}. Register a hf_pipe.families.seq2seq.Seq2SeqAdapter for it with "
            "hf_pipe.register_family."
        )
    return adapter


def stage_roles(
    adapter: Seq2SeqAdapter, layers: Sequence[int], encoder_layers: int, first: bool, last: bool
) -> dict[str, str]:
    """The non-block modules a stage of these blocks runs, by role (paths from the root model)."""
    enc = [i for i in layers if i < encoder_layers]
    dec = [i - encoder_layers for i in layers if i >= encoder_layers]
    roles: dict[str, str] = {}
    if first:
        roles.update(adapter.encoder_embeddings)
    if enc and 0 not in enc:
        roles.update(adapter.encoder_shared)
    if encoder_layers - 1 in enc:
        roles.update(adapter.encoder_final)
    if 0 in dec:
        roles.update(adapter.decoder_embeddings)
    if dec and 0 not in dec:
        roles.update(adapter.decoder_shared)
    if last:
        roles.update(adapter.decoder_final)
        roles.update(adapter.heads[SEQ2SEQ_LM])
    return roles


def stage_modules(adapter: Seq2SeqAdapter, layers: Sequence[int], encoder_layers: int, first: bool, last: bool):
    """Module FQNs (and head buffers) a stage owns: its blocks and the modules of its roles, each once."""
    block_names = [
        f"{adapter.encoder_layers}.{i}" if i < encoder_layers else f"{adapter.decoder_layers}.{i - encoder_layers}"
        for i in layers
    ]
    roles = stage_roles(adapter, layers, encoder_layers, first, last)
    names = list(dict.fromkeys([*roles.values(), *block_names, *(adapter.head_buffers if last else ())]))
    return names


def _param_count(model: nn.Module, names: Sequence[str]) -> int:
    seen: set[int] = set()
    modules = {n for n, _ in model.named_modules()}
    for name in names:
        if name in modules:
            seen.update(id(p) for p in model.get_submodule(name).parameters())
    params = {id(p): p for p in model.parameters()}
    return sum(params[i].numel() for i in seen if i in params)


def resolve_lengths(config: Any, source_len: int | None, target_len: int | None) -> tuple[int, int]:
    """(source, target) lengths the costs are estimated at: given, else the model's positions (at most 512)."""
    positions = getattr(config, "max_position_embeddings", None) or DEFAULT_LENGTH
    source = source_len or min(positions, DEFAULT_LENGTH)
    return source, target_len or source


def dataset_lengths(dataset: Any) -> tuple[int, int] | None:
    """Mean (source, target) lengths of a dataset with `input_ids` and `labels` columns (Arrow, no scan), for an
    encoder-decoder's split; None for any other dataset."""
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" not in columns or "labels" not in columns or not len(dataset):
        return None
    import pyarrow.compute as pc

    try:
        lengths = [pc.mean(pc.list_value_length(dataset.data.column(c))).as_py() for c in ("input_ids", "labels")]
    except (TypeError, ValueError, AttributeError, NotImplementedError):  # not a list column (a class label)
        return None
    return (max(1, round(lengths[0])), max(1, round(lengths[1]))) if all(lengths) else None


def plan_seq2seq(
    model_or_config: Any,
    num_stages: int,
    split: SplitPolicy = "auto",
    *,
    source_len: int | None = None,
    target_len: int | None = None,
) -> Seq2SeqSplitPlan:
    """Stage boundaries of an encoder-decoder model or config over its encoder then decoder blocks.

    `split`: `"auto"` (FLOPs balanced at `source_len` / `target_len` tokens, default the model's positions, at most
    512, for both), `"uniform"`, block indices where stages begin (encoder blocks first: `[0, 6]` for T5-small is the
    encoder, then the decoder) or SplitPoint marks by block FQN.

    Example:
        >>> print(plan_seq2seq(T5Config(num_layers=6), 4, source_len=512, target_len=128))
    """
    is_model = isinstance(model_or_config, nn.Module)
    config = model_or_config.config if is_model else model_or_config
    adapter = seq2seq_adapter(config.model_type)
    name = type(model_or_config).__name__ if is_model else (getattr(config, "architectures", None) or [""])[0]
    if (is_model or name) and task_of(name, config) != SEQ2SEQ_LM:
        raise PipelineConfigError(
            f"{name} ({config.model_type}) has no head PipeTrainer can train on an encoder-decoder: it trains the "
            f"language-model head (AutoModelForSeq2SeqLM, e.g. {config.model_type.upper()}ForConditionalGeneration)."
        )
    if isinstance(split, str) and split.lower() == "measured":
        raise PipelineConfigError(
            "pipeline_split='measured' times the pieces of a decoder-only family; for an encoder-decoder use 'auto' "
            "(FLOPs over the source and target lengths), 'uniform' or the block indices where stages begin."
        )
    encoder, decoder = adapter.num_encoder_layers(config), adapter.num_decoder_layers(config)
    num_layers = encoder + decoder
    if num_stages < 1 or num_stages > num_layers:
        raise PipelineConfigError(
            f"{num_stages} pipeline stages (pipeline_parallel_size × pipeline_stages_per_rank) for a model with "
            f"{encoder} encoder + {decoder} decoder blocks: every stage needs at least one block; use between 1 and "
            f"{num_layers} stages."
        )
    source_len, target_len = resolve_lengths(config, source_len, target_len)
    flops = adapter.seq2seq_flops(config, source_len, target_len)
    cost = [flops.encoder_layer] * encoder + [flops.decoder_layer] * decoder
    cost[encoder] += flops.decoder_embeddings  # the stage with decoder block 0 embeds the target
    fqns = [f"{adapter.encoder_layers}.{i}" for i in range(encoder)]
    fqns += [f"{adapter.decoder_layers}.{j}" for j in range(decoder)]
    marks = getattr(model_or_config, _SPLIT_POINTS_ATTR, None) if is_model else None
    policy, starts = _choose_starts(split, marks, fqns, cost, flops.encoder_embeddings, flops.head, num_stages)
    meta = model_or_config if is_model else meta_model(config, SEQ2SEQ_LM)
    bounds = [*starts, num_layers]
    per_token = 1.0 / (source_len + target_len)
    stages = []
    for k in range(num_stages):
        layers = tuple(range(int(bounds[k]), int(bounds[k + 1])))
        first, last = k == 0, k == num_stages - 1
        flops_k = sum(cost[i] for i in layers) + (flops.encoder_embeddings if first else 0.0)
        flops_k += flops.head if last else 0.0
        modules = stage_modules(adapter, layers, encoder, first, last)
        stages.append(StagePlan(k, layers, tuple(modules), flops_k * per_token, _param_count(meta, modules)))
    return Seq2SeqSplitPlan(
        config.model_type,
        SEQ2SEQ_LM,
        policy,
        num_layers,
        tuple(stages),
        f"{adapter.encoder_layers} + {adapter.decoder_layers}",
        encoder_layers=encoder,
        source_len=source_len,
        target_len=target_len,
    )
