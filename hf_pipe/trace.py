"""The trace frontend: pipeline any model torch.export can capture, as PiPPy does, with what torch leaves undone.

`torch.distributed.pipelining.pipeline` exports the model and cuts the graph at split points. hf_pipe runs it on a
*fake* copy of the model (shapes and dtypes, no storage) and then points the stage modules at the model's own
parameters, so tracing allocates no weights and can be repeated for each batch shape. On top of torch it adds:

- the passes of `graph_passes.py`: skip connections (a value made in one stage and used by a later, non-adjacent
  one — attention masks, rotary cos/sin, position ids — is threaded through the stages in between, as the
  multi-stage-per-rank schedules require), stage 0's inputs in the model's order, kwargs accepted by every stage,
  dense stage outputs;
- shared parameters: torch deep-copies a weight used by several stages (tied embeddings) into each one; the stages
  here share the model's Parameter, and the engine sums its gradient over the ranks that hold it;
- tensor constants export lifts out of the forward keep their values;
- an export failure becomes one error quoting what torch.export rejected.

Traced stages are specialised to the traced microbatch shape: `TracedStages` traces once per batch shape.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.pipelining import SplitPoint, pipe_split
from torch.distributed.pipelining._IR import Pipe
from torch.distributed.pipelining._IR import annotate_split_points as _torch_annotate
from torch.distributed.pipelining.stage import _PipelineStage

from .errors import PipelineConfigError
from .families import MULTIPLE_CHOICE, get_family
from .grad_accumulation import InPlaceAccumulationMixin
from .graph_passes import accept_root_kwargs, forward_skip_connections, run_generated_code, stop_needless_gradients
from .schedule import NoSelfSendMixin
from .split import _SPLIT_POINTS_ATTR, SplitPlan, SplitPolicy, plan_blocks
from .timeline import TimedStageMixin

# Traced shapes after which the trace frontend advises padding to a few lengths.
_MANY_TRACES = 8

logger = logging.getLogger(__name__)

__all__ = ["TraceError", "TracedStage", "build_stage", "pipe_split", "pipeline", "trace_stages"]


class TraceError(PipelineConfigError):
    """torch.export could not capture the model as one graph; the message quotes what it rejected."""


# -- tracing ---------------------------------------------------------------------------------------------------------
def fake_copy(model: nn.Module, device: torch.device) -> tuple[nn.Module, FakeTensorMode]:
    """A copy of `model` whose parameters and buffers are fake tensors on `device`: shapes, no storage.

    Tied weights stay tied (one fake tensor per real one). Meta-device parameters (weights this rank freed) copy too.
    """
    mode = FakeTensorMode()
    memo: dict[int, Any] = {}
    with mode:
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in memo:
                fake = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                is_param = isinstance(tensor, nn.Parameter)
                memo[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if is_param else fake
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree's deprecation note while copying HF outputs specs
        copied = copy.deepcopy(model, memo)
    # marks annotate_split_points left on the model are installed on the copy each time it is traced
    _remove_split_hooks(m for m in copied.modules() if "_orig_forward" in m.__dict__)
    config = getattr(copied, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        # Training never uses a KV cache, and a DynamicCache in the output is not exportable.
        config.use_cache = False
    return copied, mode


def _export_error(model: nn.Module, error: Exception) -> TraceError:
    cause = error.__cause__ or error
    text = str(cause).strip()
    # torch.export's messages end with pages of general advice: quote what it rejected, not the advice
    quoted = "\n    ".join(text.splitlines()[:12])[:1500]
    return TraceError(
        f"torch.export could not capture {type(model).__name__} as one graph, so the trace frontend cannot split "
        f"it. torch.export said:\n    {type(cause).__name__}: {quoted}\n"
        "Fix: use pipeline_frontend='module' with a family adapter (hf_pipe.register_family; a Llama-shaped "
        "decoder can reuse hf_pipe.families.LlamaAdapter), or change the construct above (data-dependent control "
        "flow, .item(), unsupported outputs) so that the forward exports."
    )


def _trace(
    fake: nn.Module, mode: FakeTensorMode, spec: Mapping[str, SplitPoint], mb_args: tuple, mb_kwargs: Mapping
) -> Pipe:
    """torch's `Pipe.from_tracing` on the fake copy, with fake inputs of the microbatch's shapes."""

    def to_fake(value: Any) -> Any:
        if not torch.is_tensor(value) or isinstance(value, FakeTensor):
            return value
        with mode:
            return torch.empty(value.shape, dtype=value.dtype, device=value.device)

    args = tuple(to_fake(a) for a in mb_args)
    kwargs = {k: to_fake(v) for k, v in mb_kwargs.items()}
    _torch_annotate(fake, dict(spec))
    try:
        # autocast is applied when the stages run, not baked into the graph
        with torch.autocast(args[0].device.type if args else "cpu", enabled=False), warnings.catch_warnings():
            # Pipe deep-copies the fake graph's tensors, which reads their (absent) data pointers
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
            return Pipe.from_tracing(fake, args, kwargs)
    except RuntimeError as error:
        if error.__cause__ is None:
            raise
        raise _export_error(fake, error) from error.__cause__
    except AssertionError as error:
        if "unexpected placeholder node" not in str(error):
            raise
        # torch 2.11 (fixed by 2.13): a region the forward runs under `torch.autocast(enabled=False)` (the rotary
        # embedding of the Llama family, GPT-NeoX, Falcon, GPT-J) exports as a subgraph that its split misplaces
        raise TraceError(
            f"torch {torch.__version__}'s pipeline split cannot place {type(fake).__name__}'s graph (it said: "
            f"{error}): a part of its forward that runs under torch.autocast(enabled=False), such as a rotary "
            "embedding, exports as a subgraph this torch misplaces. Use torch >= 2.13, or pipeline_frontend="
            "'module' (the Llama family has an adapter; hf_pipe.register_family for another decoder)."
        ) from error
    finally:  # so that the copy can be traced again
        _remove_split_hooks(fake.get_submodule(fqn) for fqn in spec)


def _remove_split_hooks(modules: Iterable[nn.Module]) -> None:
    """Undo torch's `annotate_split_points`, which wraps `forward` on each marked instance."""
    for module in modules:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_orig_forward", None)


# -- parameters ------------------------------------------------------------------------------------------------------
_CALL_SUFFIX = re.compile(r"@\d+$")


def _model_fqn(name: str) -> str:
    """A stage-local name is the model FQN, but for the `@N` suffix export gives modules called more than once."""
    return ".".join(_CALL_SUFFIX.sub("", part) for part in name.split("."))


def _read_attrs(module: nn.Module) -> set[str]:
    used = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        graph = getattr(sub, "graph", None)
        if isinstance(graph, fx.Graph):
            used.update(f"{prefix}.{n.target}" if prefix else n.target for n in graph.nodes if n.op == "get_attr")
    return used


def _drop_dead_attrs(module: nn.Module) -> None:
    """Drop parameters and buffers no graph of the stage reads: torch leaves the original tied Parameter next to the
    copy the graph uses (GPT-2's stage 0 keeps `lm_head.weight` next to `transformer.wte.weight`)."""
    used = _read_attrs(module)
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in used:
            parent, _, leaf = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)


def _state_fqns(module: nn.Module) -> set[str]:
    """The model FQNs of the parameters and buffers a stage module holds (every name a tied one has)."""
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
    return {_model_fqn(n) for n in names}


def share_tensors(module: nn.Module, model: nn.Module, index: int) -> None:
    """Point every parameter and buffer of a stage module at the model's own tensor of the same FQN.

    Tensor constants export lifted from the forward (Falcon's `torch.tensor([-2])`) are no tensors of the model:
    the fake tensor of such a constant carries its value, which the stage gets, on the traced device.
    """
    for name in [n for n, _ in module.named_parameters(remove_duplicate=False)]:
        parent, _, leaf = name.rpartition(".")
        (module.get_submodule(parent) if parent else module)._parameters[leaf] = model.get_parameter(_model_fqn(name))
    for name, buffer in list(module.named_buffers(remove_duplicate=False)):
        parent, _, leaf = name.rpartition(".")
        try:
            real = model.get_buffer(_model_fqn(name))
        except AttributeError:
            real = _constant(buffer, name, index)
        (module.get_submodule(parent) if parent else module)._buffers[leaf] = real
    for sub in module.modules():  # constants can also live as plain attributes
        for attr, value in list(vars(sub).items()):
            if isinstance(value, FakeTensor):
                setattr(sub, attr, _constant(value, attr, index))


def _constant(value: torch.Tensor, name: str, index: int) -> torch.Tensor:
    if not isinstance(value, FakeTensor):
        return value  # already made real
    if value.constant is None:
        raise NotImplementedError(
            f"stage {index} holds a tensor {name!r} that is neither a parameter nor a buffer of the model and whose "
            "value the trace does not know (a tensor captured by the forward); register it as a buffer"
        )
    return value.constant.to(value.device)


# -- the public API --------------------------------------------------------------------------------------------------
def trace_stages(
    model: nn.Module,
    spec: Mapping[str, SplitPoint],
    mb_args: tuple = (),
    mb_kwargs: Mapping[str, Any] | None = None,
    *,
    fake: tuple[nn.Module, FakeTensorMode] | None = None,
    training: bool | None = None,
) -> Pipe:
    """Trace `model` at one microbatch's shapes, cut it at `spec`, and return torch's `Pipe` with hf_pipe's passes.

    The stage modules use `model`'s own parameters and buffers. `fake` (from `fake_copy`) is reused across calls;
    `training` selects train or eval behaviour (dropout) in the traced graph, default `model.training`.
    """
    device = next((t.device for t in [*mb_args, *(mb_kwargs or {}).values()] if torch.is_tensor(t)), None)
    fake_model, mode = fake if fake is not None else fake_copy(model, device or torch.device("cpu"))
    fake_model.train(model.training if training is None else training)
    pipe = _trace(fake_model, mode, spec, tuple(mb_args), dict(mb_kwargs or {}))
    for i in range(pipe.num_stages):
        module = pipe.get_stage_module(i)
        _drop_dead_attrs(module)
        share_tensors(module, model, i)
    live = forward_skip_connections(pipe)
    stop_needless_gradients(pipe, live)
    accept_root_kwargs(pipe)
    run_generated_code(pipe)
    return pipe


def output_structure(model: nn.Module, input_ids: torch.Tensor) -> dict[str | int, int] | None:
    """What the model's forward returns for `input_ids` (no labels), run on a fake copy of it: each output's name (a
    ModelOutput's key, else its index) and number of dimensions; None where the forward does not run on fake tensors
    (tracing then reports why). A copy of its own: a forward run outside export leaves state on the modules (cached
    constants) that a later export of the same copy must not see (Falcon's then corrupts the heap)."""
    fake, mode = fake_copy(model, input_ids.device)
    try:
        with mode, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fake(torch.empty(input_ids.shape, dtype=input_ids.dtype, device=input_ids.device))
    except Exception:  # noqa: BLE001  (a forward export cannot capture either: the trace quotes the reason)
        return None
    if torch.is_tensor(out):
        out = (out,)
    items = out.items() if hasattr(out, "items") else enumerate(out)
    return {k: v.dim() if torch.is_tensor(v) else -1 for k, v in items}


#: named inputs of a model's forward that traced stages cannot feed it: stage 0 takes the batch's token ids
_UNTRACEABLE_INPUTS = ("inputs_embeds", "pixel_values", "past_key_values", "cache", "cache_position")


def traced_batch_keys(model: nn.Module) -> tuple[str, ...]:
    """The batch keys traced stages pass on: the model's own named forward inputs, which the traced graph consumes
    exactly as the forward does (an unknown keyword would be a TypeError in Trainer too)."""
    params = inspect.signature(model.forward).parameters.values()
    named = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return tuple(n for n in named if n not in ("input_ids", "labels", *_UNTRACEABLE_INPUTS))


def masks_follow_positions(model: nn.Module) -> bool:
    """Whether a model's attention masks come from HF's `create_causal_mask`, which takes `position_ids` and, given no
    attention mask, attends within each packed sequence; a traced graph keeps that (it never takes the shortcut for
    unpacked positions)."""
    module = sys.modules.get(type(model).__module__)
    return module is not None and "create_causal_mask" in vars(module)


def block_split_spec(blocks: str, starts: list[float], model_type: str = "") -> dict[str, SplitPoint]:
    """`{"model.layers.4": SplitPoint.BEGINNING, ...}` for every block where a stage other than the first begins; a
    stage beginning at block k's second half (`k.5`, families with `halves`) begins at its first module
    (`model.layers.4.post_attention_layernorm`): torch's split cuts the block's graph there, the residual stream
    being what crosses."""
    spec = {}
    for start in starts:
        if start <= 0:
            continue
        if float(start).is_integer():
            spec[f"{blocks}.{int(start)}"] = SplitPoint.BEGINNING
            continue
        adapter = get_family(model_type)
        if adapter is None or not adapter.halves:
            raise ValueError(f"stage start {start}: {model_type!r} blocks cannot be split in halves")
        spec[f"{blocks}.{int(start)}.{adapter.halves[1][0]}"] = SplitPoint.BEGINNING
    return spec


def pipeline(
    model: nn.Module,
    mb_args: tuple = (),
    mb_kwargs: Mapping[str, Any] | None = None,
    *,
    split_spec: Mapping[str, SplitPoint] | None = None,
    split_policy: SplitPolicy | None = None,
    num_stages: int | None = None,
) -> Pipe:
    """`torch.distributed.pipelining.pipeline` with hf_pipe's passes: skip connections, shared weights, any model.

    Where the stages begin, in order of precedence: `split_spec` (SplitPoint by module FQN), `split_policy` with
    `num_stages` (`"auto"` balances the blocks by cost, `"uniform"`, or block start indices; marks left by
    `hf_pipe.annotate_split_points` count as the policy), else the `pipe_split()` calls in the model's forward.
    `mb_args` / `mb_kwargs` are one microbatch: the stages are specialised to its shapes. Build a rank's stage with
    `hf_pipe.trace.build_stage(pipe, index, device)` and run it with any torch schedule.

    Example:
        >>> pipe = pipeline(model, (input_ids[:2],), split_policy="auto", num_stages=4)
        >>> stage = build_stage(pipe, rank, torch.device("cpu"))
    """
    if split_spec is None and split_policy is not None:
        if num_stages is None:
            raise ValueError("split_policy needs num_stages")
        plan = plan_blocks(model, num_stages, split_policy)
        split_spec = block_split_spec(plan.blocks, plan.layer_starts, plan.model_type)
    if split_spec is None:  # marks left by annotate_split_points (pipe_split() calls in the forward stay anyway)
        split_spec = getattr(model, _SPLIT_POINTS_ATTR, {})
    return trace_stages(model, split_spec, mb_args, mb_kwargs)


class TracedStages:
    """This rank's traced stages of one model, for `PipelineEngine`: traced once at set-up, then once per shape.

    The set-up trace (at a small shape) makes export errors surface before any step and tells which weights each
    stage uses; this rank keeps its stages' weights, on `device`, and frees the rest. Later traces run on a fake
    copy made before the freeing and point at the same weights, so one optimizer serves every shape.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: SplitPlan,
        stage_indices: list[int],
        device: torch.device,
        tied_groups: list[list[str]],
        announce: bool,
        weights: Any,
    ):
        self.model = model
        self.stage_indices = stage_indices
        self.announce = announce  # this rank logs the advice to pad
        self.traces = 0
        self.fake = fake_copy(model, device)
        self.spec = block_split_spec(plan.blocks, plan.layer_starts, plan.model_type)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 8
        # a multiple-choice model takes (examples, choices, seq)
        shape = (1, 2, min(8, positions)) if plan.task == MULTIPLE_CHOICE else (1, min(8, positions))
        probe = torch.zeros(shape, dtype=torch.long, device=device)
        #: the forward's outputs (name or index: dimensions), see `output_structure`; None: unknown
        self.outputs = output_structure(model, probe)
        pipe = trace_stages(model, self.spec, (probe,), fake=self.fake, training=True)
        used = [_state_fqns(pipe.get_stage_module(i)) for i in range(pipe.num_stages)]
        #: (FQNs of a tied weight, the stages whose graphs use it)
        self.tied = [(fqns, [i for i, names in enumerate(used) if names & set(fqns)]) for fqns in tied_groups]
        #: the model's parameters and buffers this rank's stages read
        self.keep = set().union(*(used[i] for i in stage_indices))
        weights.materialize(model, self.keep, device)  # this rank's tensors real, on the device; the rest on meta
        self.modules = [pipe.get_stage_module(i) for i in stage_indices]
        for index, module in zip(stage_indices, self.modules):
            share_tensors(module, model, index)

    def for_batch(
        self, input_ids: torch.Tensor, kwargs: Mapping[str, Any], training: bool
    ) -> tuple[list[nn.Module], Any]:
        """This rank's stage modules traced at one microbatch's shapes (`input_ids` and the stage keyword
        arguments; the labels stay out of the graph: the loss is the schedule's, on the last stage)."""
        chunk = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        start = time.perf_counter()
        pipe = trace_stages(self.model, self.spec, (input_ids,), chunk, fake=self.fake, training=training)
        self.traces += 1
        if self.traces == _MANY_TRACES and self.announce:
            logger.warning(
                "traced stages: %d batch shapes traced so far (the last took %.1f s); each new sequence length is "
                "traced once. Pad batches to a few lengths (DataCollator pad_to_multiple_of=64) to trace less.",
                self.traces, time.perf_counter() - start,
            )  # fmt: skip
        return [pipe.get_stage_module(i) for i in self.stage_indices], pipe.info()


class TracedStage(NoSelfSendMixin, InPlaceAccumulationMixin, TimedStageMixin, _PipelineStage):
    """torch's stage for a traced module, timed for the timeline, its Linear weight gradients accumulated in place
    (`grad_accumulation.py`), and with V placements working on gloo."""


def build_stage(pipe: Pipe, index: int, device: torch.device, group: dist.ProcessGroup | None = None, **kw: Any):
    """This rank's stage `index` of a traced pipe, ready for any torch schedule (`Pipe.build_stage`, fixed for V
    placements on gloo). Keyword arguments go to `TracedStage` (`timeline=`)."""
    return TracedStage(pipe.get_stage_module(index), index, pipe.info(), device, group, **kw)
