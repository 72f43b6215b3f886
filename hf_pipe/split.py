"""Stage boundaries for a model: pure data, computed without a process group and without allocating weights.

A `SplitPlan` says, for each stage, which blocks and which module FQNs it owns (embeddings on the first stage; final
norm, head, pooler or classifier on the last), its estimated forward FLOPs per token and its parameter count. It can
be printed, compared in tests, and overridden by an explicit split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import SplitPoint

from .errors import PipelineConfigError
from .families import (
    CAUSAL_LM,
    MASKED_LM,
    MULTIPLE_CHOICE,
    QUESTION_ANSWERING,
    SEQ2SEQ_LM,
    SEQ_CLS,
    TASKS,
    TOKEN_CLS,
    FamilyAdapter,
    FlopsPerToken,
    get_family,
    registered_families,
    task_of,
)
from .families.base import TASK_CLASSES, is_bare_body, is_vision_language

#: What `split` accepts: a policy name, the layer indices where stages begin, or SplitPoint marks by module FQN.
SplitPolicy = str | Sequence[int] | Mapping[str, SplitPoint]
POLICIES = ("auto", "measured", "uniform")
_SPLIT_POINTS_ATTR = "_hf_pipe_split_points"


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    flops_per_token: float
    params: int
    #: (block, half) for each block only half of which is on this stage: 0 the attention half, 1 the MLP half
    halves: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class SplitPlan:
    model_type: str
    task: str | None
    policy: str
    num_layers: int
    stages: tuple[StagePlan, ...]
    blocks: str = ""  # FQN of the block list the stages split (`model.layers`)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def layer_starts(self) -> list[float]:
        """The block index each stage begins at — the form an explicit split takes; `4.5` is block 4's MLP half."""
        return [s.layers[0] + 0.5 if (s.layers[0], 1) in s.halves else s.layers[0] for s in self.stages]

    @property
    def imbalance(self) -> float:
        """max / mean of the per-stage cost: 1.0 is a perfectly balanced pipeline."""
        costs = [s.flops_per_token for s in self.stages]
        return max(costs) / (sum(costs) / len(costs))

    def stage_blocks(self, stage: StagePlan) -> str:
        """A stage's blocks as a person reads them (`4-7`; an encoder-decoder's `enc 4-5 + dec 0-1`)."""
        return f"{stage.layers[0]}-{stage.layers[-1]}"

    def extra_modules(self, stage: StagePlan) -> list[str]:
        """Short names of the modules a stage owns besides its blocks (embeddings, norm, head)."""
        return [
            m.rsplit(".", 1)[-1] for m in stage.modules if not _is_layer(m, stage.layers) and not _in_half(m, stage)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "imbalance": self.imbalance, "layer_starts": self.layer_starts}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        total = sum(s.flops_per_token for s in self.stages)
        rows = [f"{self.model_type} ({self.task or 'body'}), {self.num_stages} stages, policy {self.policy}:"]
        for s in self.stages:
            extra = self.extra_modules(s)
            halves = "".join(f", block {b} {('attention', 'MLP')[part]} half only" for b, part in s.halves)
            rows.append(
                f"  stage {s.index}: layers {s.layers[0]}-{s.layers[-1]} ({len(s.layers) - len(s.halves) / 2:g}"
                f"{halves})"
                f"{' + ' + ', '.join(extra) if extra else ''}; {s.params / 1e6:.2f}M params, "
                f"{100 * s.flops_per_token / total:.1f}% of FLOPs"
            )
        rows.append(f"  max/mean cost {self.imbalance:.3f}")
        return "\n".join(rows)


def _is_layer(fqn: str, layers: tuple[int, ...]) -> bool:
    return fqn.rsplit(".", 1)[-1] in {str(i) for i in layers}


def _in_half(fqn: str, stage: StagePlan) -> bool:
    return any(f".{b}." in f".{fqn}." for b, _ in stage.halves)


def annotate_split_points(model: nn.Module, spec: Mapping[str, SplitPoint]) -> None:
    """Mark where stages begin or end, by block FQN — the seed API of `torch.distributed.pipelining`.

    `SplitPoint.BEGINNING` at a block starts a stage there; `SplitPoint.END` starts one after it. The marks are kept on
    the model (for the module-split frontend, which reads them instead of the `auto` policy) and also installed as
    torch's own pipe_split hooks, so the trace frontend sees the same marks.

    Example:
        >>> annotate_split_points(model, {"model.layers.4": SplitPoint.BEGINNING})
    """
    from torch.distributed.pipelining._IR import annotate_split_points as _torch_annotate

    marks = dict(getattr(model, _SPLIT_POINTS_ATTR, {}))
    marks.update(spec)
    setattr(model, _SPLIT_POINTS_ATTR, marks)
    _torch_annotate(model, dict(spec))


def resolve_family(model_type: str) -> FamilyAdapter:
    adapter = get_family(model_type)
    if adapter is not None and adapter.frontend != "module":
        raise PipelineConfigError(
            f"model_type={model_type!r} is an encoder-decoder: its stages split the encoder's and the decoder's "
            "blocks; plan it with hf_pipe.seq2seq_split.plan_seq2seq (as PipeTrainer and hf-pipe plan do)."
        )
    if adapter is None:
        raise PipelineConfigError(
            f"model_type={model_type!r} has no split policy: hf_pipe knows {', '.join(registered_families())}. "
            "Register an adapter for it with hf_pipe.register_family (a Llama-shaped decoder can reuse "
            "hf_pipe.families.LlamaAdapter), or use the trace frontend (pipeline_frontend='trace')."
        )
    return adapter


def unsupported_head(class_name: str, model_type: str, supported: Sequence[str], frontend: str = "module") -> str:
    """The one message for a head hf_pipe cannot run: the class, the heads that run, and the fixes."""
    heads = ", ".join(TASK_CLASSES[t] for t in supported)
    own_loss = (
        "give your own loss if its logits take none of those (compute_loss_func=..., or a PipeTrainer subclass's "
        "compute_microbatch_loss, which receive outputs.logits)"
    )
    if frontend == "module":
        return (
            f"{class_name} has a head hf_pipe cannot run with pipeline_frontend='module': the {model_type} adapter "
            f"runs {heads} heads. Fix: load the model with one of those heads (AutoModelFor...); or train its own "
            "forward with pipeline_frontend='trace' (the whole forward is traced, head included), naming the loss "
            f"its logits take with pipeline_task= one of {list(TASKS)}, and {own_loss}."
        )
    return (
        f"{class_name} has a head hf_pipe cannot run with pipeline_frontend='trace': its class names no task, and "
        f"the trace frontend trains {heads} heads. Fix: name the loss its forward's logits take with pipeline_task= "
        f"one of {list(TASKS)} (a forward returning the logits, or question answering's start and end logits), "
        f"and {own_loss}; or load the model with one of those heads (AutoModelFor...)."
    )


def _resolve_task(model_or_config: Any, config: Any, adapter: FamilyAdapter, task: str | None) -> str | None:
    if task is not None:
        return task
    if isinstance(model_or_config, nn.Module):
        found = task_of(type(model_or_config).__name__, config)
        if found is None and not is_bare_body(model_or_config):
            raise PipelineConfigError(
                unsupported_head(type(model_or_config).__name__, config.model_type, list(adapter.heads))
            )
        return found
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if task_of(arch, config) in adapter.heads:
            return task_of(arch, config)
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    heads = [
        a for a in architectures if task_of(a, config) is None and a != MODEL_MAPPING_NAMES.get(config.model_type)
    ]
    if heads:
        raise PipelineConfigError(unsupported_head(heads[0], config.model_type, list(adapter.heads)))
    return next(iter(adapter.heads))


#: the Auto class that builds each task's head from a config
_AUTO_CLASSES = {
    SEQ2SEQ_LM: "AutoModelForSeq2SeqLM",
    CAUSAL_LM: "AutoModelForCausalLM",
    MASKED_LM: "AutoModelForMaskedLM",
    SEQ_CLS: "AutoModelForSequenceClassification",
    TOKEN_CLS: "AutoModelForTokenClassification",
    QUESTION_ANSWERING: "AutoModelForQuestionAnswering",
    MULTIPLE_CHOICE: "AutoModelForMultipleChoice",
}


def meta_model(config: Any, task: str | None) -> nn.Module:
    import transformers

    name = "AutoModelForImageTextToText" if task == CAUSAL_LM and is_vision_language(config) else None
    auto = getattr(transformers, name or _AUTO_CLASSES.get(task, "AutoModel"))
    with torch.device("meta"):
        return auto.from_config(config)


def body_prefix(model: nn.Module, adapter: FamilyAdapter) -> str:
    """The attribute of a head model that holds its body: the class's own `base_model_prefix` (Llama's and Qwen's
    question answering heads keep `transformer` where their other heads say `model`), else the adapter's."""
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return adapter.base_prefix


def stage_modules(
    adapter: FamilyAdapter,
    task: str | None,
    layers: Sequence[int],
    first: bool,
    last: bool,
    halves: Sequence[tuple[int, int]] = (),
    prefix: str | None = None,
) -> list[str]:
    """The module FQNs (from the root model) a stage owns; of a block in `halves`, only that half's sub-modules.
    `prefix`: the body's attribute (`body_prefix`), default the adapter's."""
    body = f"{prefix or adapter.base_prefix}." if task is not None else ""
    fqns = [f"{body}{p}" for p in adapter.embeddings.values()] if first else []
    fqns += [f"{body}{p}" for p in adapter.shared.values()]
    half_of = dict(halves)
    for i in layers:
        if i in half_of:
            fqns += [f"{body}{adapter.layers}.{i}.{name}" for name in adapter.halves[half_of[i]]]
        else:
            fqns.append(f"{body}{adapter.layers}.{i}")
    if last:
        fqns += [f"{body}{p}" for p in adapter.final.values()]
        fqns += list(adapter.heads.get(task, {}).values()) if task is not None else []
    return fqns


def _param_count(model: nn.Module, fqns: Sequence[str]) -> int:
    seen: set[int] = set()
    total = 0
    for fqn in fqns:
        module = model.get_submodule(fqn) if fqn else model
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _balanced_counts(layer_cost: Sequence[float], first: float, last: float, num_stages: int) -> list[int]:
    """Layers per stage minimising the most expensive stage (then the spread), over contiguous partitions.

    Dynamic programme over (stages used, layers used); exact, O(stages · layers²), instant for real models.
    """
    n = len(layer_cost)
    prefix = [0.0]
    for c in layer_cost:
        prefix.append(prefix[-1] + c)
    inf = (float("inf"), float("inf"))
    # best[k][j]: (max, sum of squares) placing the first j layers on the first k stages; choice[k][j]: layers on stage k.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                cost = prefix[j] - prefix[i] + (first if k == 1 else 0.0) + (last if k == num_stages else 0.0)
                cand = (max(best[k - 1][i][0], cost), best[k - 1][i][1] + cost * cost)
                if cand < best[k][j]:
                    best[k][j], choice[k][j] = cand, j - i
    counts, j = [], n
    for k in range(num_stages, 0, -1):
        counts.append(choice[k][j])
        j -= choice[k][j]
    return counts[::-1]


def _max_cost(cost: Sequence[float], counts: Sequence[int], first: float, last: float) -> float:
    bounds = [sum(counts[:k]) for k in range(len(counts) + 1)]
    stage_costs = [sum(cost[bounds[k] : bounds[k + 1]]) for k in range(len(counts))]
    stage_costs[0] += first
    stage_costs[-1] += last
    return max(stage_costs)


def _starts_from_marks(marks: Mapping[str, SplitPoint], layer_fqns: Sequence[str]) -> list[int]:
    index = {fqn: i for i, fqn in enumerate(layer_fqns)}
    starts = {0}
    for fqn, point in marks.items():
        if fqn not in index:
            raise PipelineConfigError(
                f"split point {fqn!r} is not a block of this model; mark one of {layer_fqns[0]!r} ... "
                f"{layer_fqns[-1]!r}."
            )
        start = index[fqn] if point == SplitPoint.BEGINNING else index[fqn] + 1
        if start < len(layer_fqns):
            starts.add(start)
    return sorted(starts)


def _check_starts(
    starts: Sequence[float], num_layers: int, num_stages: int, setting: str, halves: bool = False
) -> list[float]:
    starts = [int(s) if isinstance(s, float) and s.is_integer() else s for s in starts]
    if starts and starts[0] != 0:
        starts = [0, *starts]
    problems = []
    whole_or_half = all(isinstance(s, int) or (isinstance(s, float) and (2 * s).is_integer()) for s in starts)
    if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in starts) or not whole_or_half:
        problems.append(f"{setting}={starts} must be a list of block indices (k.5: block k's MLP half).")
    elif not halves and any(isinstance(s, float) for s in starts):
        problems.append(
            f"{setting}={starts}: a stage can begin mid-block (k.5) only in families whose adapter defines "
            "halves (gpt2, bert, the Llama family, with the module frontend); use whole block indices."
        )
    elif any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= num_layers:
        problems.append(
            f"{setting}={starts} must be strictly increasing block indices in [0, {num_layers}), "
            "one per stage: the index where each stage begins."
        )
    elif len(starts) != num_stages:
        problems.append(
            f"{setting}={starts} defines {len(starts)} stages but the pipeline has {num_stages} "
            "(pipeline_parallel_size × pipeline_stages_per_rank); give one start index per stage."
        )
    if problems:
        raise PipelineConfigError(problems)
    return starts


def _choose_starts(
    split: SplitPolicy,
    marks: Mapping[str, SplitPoint] | None,
    layer_fqns: Sequence[str],
    layer_cost: Sequence[float],
    first: float,
    last: float,
    num_stages: int,
    first_half: float = 0.0,
    halves: bool = False,
) -> tuple[str, list[float]]:
    """(policy name, block index each stage begins at) for a split setting; marks on the model win over "auto".

    With `first_half` (the cost of a block's attention half), `"auto"` may also begin a stage at a block's MLP half
    (start `k + 0.5`), when that lowers the most expensive stage by more than 1%.
    """
    num_layers = len(layer_fqns)
    if isinstance(split, Mapping):
        return "split points", _check_starts(_starts_from_marks(split, layer_fqns), num_layers, num_stages, "split")
    if isinstance(split, str) and split.lower() == "auto" and marks:
        starts = _starts_from_marks(marks, layer_fqns)
        return "split points", _check_starts(starts, num_layers, num_stages, "annotate_split_points")
    if isinstance(split, str) and split.lower() in POLICIES:
        if split.lower() in ("auto", "measured"):  # "measured": the same search over costs timed at start-up
            counts = _balanced_counts(layer_cost, first, last, num_stages)
            if first_half:
                halves = [c for cost in layer_cost for c in (first_half, cost - first_half)]
                units = _balanced_counts(halves, first, last, num_stages)
                if _max_cost(halves, units, first, last) < 0.99 * _max_cost(layer_cost, counts, first, last):
                    starts = [sum(units[:k]) for k in range(num_stages)]
                    return split.lower(), [u // 2 if u % 2 == 0 else u / 2 for u in starts]
        else:
            base, extra = divmod(num_layers, num_stages)
            counts = [base + (1 if k < extra else 0) for k in range(num_stages)]
        return split.lower(), [sum(counts[:k]) for k in range(num_stages)]
    if isinstance(split, str):
        raise PipelineConfigError(
            f"pipeline_split={split!r} is not a split policy; valid options are {list(POLICIES)}, a list of block "
            "indices where stages begin, or SplitPoint marks."
        )
    return "explicit", _check_starts(split, num_layers, num_stages, "pipeline_split", halves)


def plan_split(
    model_or_config: Any,
    num_stages: int,
    split: SplitPolicy = "auto",
    *,
    task: str | None = None,
    seq_len: int | None = None,
    sub_blocks: bool = True,
    costs: FlopsPerToken | None = None,
) -> SplitPlan:
    """Decide the stage boundaries of a model or config, without a process group and without allocating weights.

    Args:
        model_or_config: a `PreTrainedModel` (real or on the meta device) or its `PretrainedConfig`.
        num_stages: total pipeline stages (ranks × stages per rank).
        split: `"auto"` balances estimated forward FLOPs per token (blocks, embeddings, LM head and loss);
            `"uniform"` gives every stage the same number of blocks; a list of block indices where stages begin
            (`[0, 6, 12, 18]`); or SplitPoint marks by block FQN. Marks left by `annotate_split_points` win over
            `"auto"`.
        task: one of `families.TASKS` (`"causal_lm"`, `"seq_cls"`, `"question_answering"`, ...); read from the
            model class or `config.architectures`.
        seq_len: sequence length the attention cost is estimated at (default: the model's positions, at most 2048).
        costs: per-token costs to balance instead of the FLOP estimate (`"measured"` passes timings, see
            `measure.measure_costs`); `"measured"` without them plans like `"auto"`.
        sub_blocks: let `"auto"` begin a stage at a block's MLP half (families whose adapter defines `halves`), when
            that lowers the most expensive stage by more than 1%: with few blocks per stage a whole block is too
            coarse to balance the LM head.

    Example:
        >>> plan = plan_split(LlamaConfig(num_hidden_layers=32), 4)
        >>> print(plan)            # stage -> layers, params, share of FLOPs, max/mean cost
    """
    is_model = isinstance(model_or_config, nn.Module)
    config = model_or_config.config if is_model else model_or_config
    adapter = resolve_family(config.model_type)
    own = task_of(type(model_or_config).__name__, config) if is_model else None
    if is_model and task is not None and task != own:
        raise PipelineConfigError(
            f"task={task!r} for {type(model_or_config).__name__}, whose class names {own or 'no head'}: the module "
            f"frontend runs a model's own head with its family's forward; load the model with a {TASK_CLASSES[task]} "
            "head, or trace this class's own forward with that loss (pipeline_frontend='trace', "
            f"pipeline_task={task!r})."
        )
    task = _resolve_task(model_or_config, config, adapter, task)
    if task is not None and task not in adapter.heads:
        name = type(model_or_config).__name__ if is_model else f"task={task!r}"
        raise PipelineConfigError(unsupported_head(name, config.model_type, list(adapter.heads)))
    num_layers = adapter.num_layers(config)
    if num_stages < 1 or num_stages > num_layers:
        raise PipelineConfigError(
            f"{num_stages} pipeline stages (pipeline_parallel_size × pipeline_stages_per_rank) for a model with "
            f"{num_layers} blocks: every stage needs at least one block; use between 1 and {num_layers} stages."
        )
    seq_len = seq_len or min(getattr(config, "max_position_embeddings", 2048) or 2048, 2048)
    flops = costs or adapter.flops_per_token(config, task, seq_len)
    meta = model_or_config if is_model else meta_model(config, task)
    prefix = body_prefix(meta, adapter)
    body = f"{prefix}." if task is not None else ""
    layer_fqns = [f"{body}{adapter.layers}.{i}" for i in range(num_layers)]

    marks = getattr(model_or_config, _SPLIT_POINTS_ATTR, None) if is_model else None
    halves_ok = sub_blocks and bool(adapter.halves)
    layer_cost = flops.layer_costs(num_layers)
    policy, starts = _choose_starts(
        split,
        marks,
        layer_fqns,
        layer_cost,
        flops.embeddings,
        flops.head,
        num_stages,
        flops.first_half if halves_ok else 0.0,
        halves_ok,
    )

    # in half-block units: unit 2k is block k's attention half, 2k + 1 its MLP half
    bounds = [round(2 * start) for start in starts] + [2 * num_layers]
    stages = []
    for k in range(num_stages):
        lo, hi = bounds[k], bounds[k + 1]
        layers = tuple(range(lo // 2, (hi + 1) // 2))
        halves = ((lo // 2, 1),) if lo % 2 else ()  # begins at a block's MLP half
        halves += ((hi // 2, 0),) if hi % 2 else ()  # ends after a block's attention half
        first, last = k == 0, k == num_stages - 1
        half_cost = {b: (flops.first_half, layer_cost[b] - flops.first_half)[part] for b, part in halves}
        cost = sum(half_cost.get(b, layer_cost[b]) for b in layers)
        cost += (flops.embeddings if first else 0.0) + (flops.head if last else 0.0)
        modules = stage_modules(adapter, task, layers, first, last, halves, prefix)
        stages.append(StagePlan(k, layers, tuple(modules), cost, _param_count(meta, modules), halves))
    return SplitPlan(config.model_type, task, policy, num_layers, tuple(stages), f"{body}{adapter.layers}")


def find_blocks(model: nn.Module) -> str:
    """FQN of the model's repeated blocks: the `nn.ModuleList` of same-class modules holding the most parameters."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name)
    if best is None:
        raise PipelineConfigError(
            f"{type(model).__name__} has no nn.ModuleList of repeated blocks to split at: mark the stage boundaries "
            "with hf_pipe.annotate_split_points(model, {fqn: SplitPoint.BEGINNING}) or pipe_split() in its forward."
        )
    return best[1]


def plan_blocks(
    model: nn.Module, num_stages: int, split: SplitPolicy = "auto", *, task: str | None = None
) -> SplitPlan:
    """Stage boundaries at the blocks of any model, with or without a family adapter (the trace frontend's plan).

    A registered family is planned as `plan_split` does (half blocks included). Any other model is split at its repeated blocks
    (`find_blocks`); `"auto"` then balances an estimate from the weights: a block's forward costs about two FLOPs
    per token per weight, and the last stage also runs the output embedding (the LM head), if the model has one.
    Embedding lookups cost next to nothing.
    """
    config = getattr(model, "config", None)
    adapter = get_family(getattr(config, "model_type", "")) if config is not None else None
    own_task = task_of(type(model).__name__, config)
    if adapter is not None and own_task in adapter.heads and task in (None, own_task):
        # a stage may begin at a block's second half: `trace.block_split_spec` marks its first module
        return plan_split(model, num_stages, split, task=task)
    prefix = find_blocks(model)
    blocks = model.get_submodule(prefix)
    layer_fqns = [f"{prefix}.{i}" for i in range(len(blocks))]
    if num_stages < 1 or num_stages > len(blocks):
        raise PipelineConfigError(
            f"{num_stages} pipeline stages (pipeline_parallel_size × pipeline_stages_per_rank) for a model with "
            f"{len(blocks)} blocks ({prefix}): every stage needs at least one block; use between 1 and "
            f"{len(blocks)} stages."
        )
    task = task or own_task
    cost = [2.0 * _param_count(model, [fqn]) for fqn in layer_fqns]
    names = {id(m): n for n, m in model.named_modules()}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_cost = 2.0 * head.weight.numel() if head is not None else 0.0
    marks = getattr(model, _SPLIT_POINTS_ATTR, None)
    policy, starts = _choose_starts(split, marks, layer_fqns, cost, 0.0, head_cost, num_stages)
    # weights outside the blocks: the input embeddings on the first stage, the rest (final norm, head) on the last
    first_extra = [names[id(embed)]] if embed is not None else []
    last_extra = [names[id(head)]] if head is not None and names[id(head)] not in first_extra else []
    bounds = [*starts, len(blocks)]
    stages = []
    for k in range(num_stages):
        layers = tuple(range(bounds[k], bounds[k + 1]))
        first, last = k == 0, k == num_stages - 1
        modules = (first_extra if first else []) + [layer_fqns[i] for i in layers] + (last_extra if last else [])
        flops = sum(cost[i] for i in layers) + (head_cost if last else 0.0)
        stages.append(StagePlan(k, layers, tuple(modules), flops, _param_count(model, modules)))
    model_type = getattr(config, "model_type", None) or type(model).__name__
    return SplitPlan(model_type, task, policy, len(blocks), tuple(stages), prefix)
