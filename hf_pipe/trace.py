"""The trace frontend: pipeline any model torch.export can capture, as PiPPy does, with what torch leaves undone.

`torch.distributed.pipelining.pipeline` exports the model and cuts the graph at split points. hf_pipe runs it on a
*fake* copy of the model (shapes and dtypes, no storage) and then points the stage modules at the model's own
parameters, so tracing allocates no weights and can be repeated for each batch shape. On top of torch it adds:

- skip connections (`forward_skip_connections`): a value made in one stage and used by a later, non-adjacent one
  (attention masks, rotary cos/sin, position ids) is threaded through the stages in between, so every stage talks
  only to its neighbours — which the multi-stage-per-rank schedules (interleaved, zero-bubble, DualPipeV) require;
- shared parameters: torch deep-copies a weight used by several stages (tied embeddings) into each one; the stages
  here share the model's Parameter, and the engine sums its gradient over the ranks that hold it;
- stages 1.. accept (and ignore) the microbatch keyword arguments every schedule passes to every stage;
- stage outputs are never views (zero-bubble schedules detach stage outputs in place);
- an export failure becomes one error quoting what torch.export rejected.

Traced stages are specialised to the traced microbatch shape: `PipelineEngine` keeps one trace per batch shape.
"""

from __future__ import annotations

import copy
import operator
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.pipelining import SplitPoint, pipe_split
from torch.distributed.pipelining._IR import Pipe, get_submod_name
from torch.distributed.pipelining._IR import annotate_split_points as _torch_annotate
from torch.distributed.pipelining.stage import _PipelineStage
from torch.fx.graph import CodeGen

from .errors import PipelineConfigError
from .split import _SPLIT_POINTS_ATTR, SplitPolicy, plan_blocks
from .timeline import TimedStageMixin

__all__ = ["TraceError", "TracedStage", "build_stage", "pipe_split", "pipeline", "trace_stages"]

# ("root", placeholder name) for a model input, ("out", producing stage, output index or None) for a stage output
Key = tuple


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
    for module in copied.modules():  # marks from annotate_split_points are installed on the copy when it is traced
        if "_orig_forward" in module.__dict__:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_orig_forward")
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
    finally:
        # annotate_split_points wraps `forward` on each instance; restore it so the copy can be traced again
        for fqn in spec:
            module = fake.get_submodule(fqn)
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_orig_forward", None)


# -- the top-level graph, as torch's _PipelineStage reads it ---------------------------------------------------------
def _stage_nodes(graph: fx.Graph) -> list[fx.Node]:
    # _PipelineStage: the i-th call_module node of the top-level graph is stage i
    return [n for n in graph.nodes if n.op == "call_module"]


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _key_of(arg: fx.Node, stage_of: dict[fx.Node, int]) -> Key:
    if arg.op == "placeholder":
        return ("root", arg.name)
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[0] in stage_of:
        return ("out", stage_of[arg.args[0]], arg.args[1])
    if arg.op == "call_module":
        return ("out", stage_of[arg], None)
    raise NotImplementedError(f"unexpected stage argument in the pipe graph: {arg.format_node()}")


def _internal_value(submod: fx.GraphModule, index: int | None) -> fx.Node:
    ret = _output_node(submod.graph).args[0]
    return ret if index is None else ret[index]


def _fresh(value: Any) -> Any:
    """What a stage sends is a dense tensor of its own: zero-bubble schedules `detach_()` stage outputs in place,
    which raises "Can't detach views in-place" (OPT's blocks return views), and gloo receives only into contiguous
    buffers (GPT-J's rotary sin/cos are strided halves of one tensor)."""
    if isinstance(value, torch.Tensor) and (value._is_view() or not value.is_contiguous()):
        return value.clone(memory_format=torch.contiguous_format)
    return value


def _dense_meta(meta: dict) -> dict:
    """Node metadata whose example value is contiguous: torch allocates receive buffers with its strides."""
    meta = copy.copy(meta)
    value = meta.get("val")
    if isinstance(value, FakeTensor) and not value.is_contiguous():
        with value.fake_mode:
            meta["val"] = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    return meta


# -- skip connections ------------------------------------------------------------------------------------------------
def forward_skip_connections(pipe: Pipe) -> dict[int, list[Key]]:
    """Rewrite `pipe.split_gm` so every stage receives only from the previous one and sends only to the next.

    For each boundary k|k+1, the values made by a stage ≤ k (or model inputs) and used by a stage > k become, in one
    fixed order, both the outputs of stage k and the inputs of stage k+1. The top-level graph is rebuilt with one
    getitem per output index, created in index order: `_PipelineStage` derives its send order from that. torch
    handles only adjacent stages (and rejects a float value with two consumers: "Backward of skip connections not
    supported yet"); this pass is what lets the interleaved and zero-bubble schedules run on traced stages.
    Returns {boundary k: the values crossing it}.
    """
    gm = pipe.split_gm
    graph = gm.graph
    stages = _stage_nodes(graph)
    n = len(stages)
    for i, node in enumerate(stages):
        if node.target != get_submod_name(i) or node.kwargs:
            raise NotImplementedError(f"stage {i} is called as {node.format_node()}")
    stage_of = {node: i for i, node in enumerate(stages)}
    submods = [gm.get_submodule(node.target) for node in stages]
    roots = [p for p in graph.nodes if p.op == "placeholder"]
    args_keys = [[_key_of(a, stage_of) for a in node.args] for node in stages]
    stage0_roots = [k[1] for k in args_keys[0]]
    if any(k[0] != "root" for k in args_keys[0]):
        raise NotImplementedError("stage 0 consumes a value made by a stage")

    producer: dict[Key, int] = {}
    last_use: dict[Key, int] = {}
    order: list[Key] = []
    for i, keys in enumerate(args_keys):
        if len(set(keys)) != len(keys):
            raise NotImplementedError(f"stage {i} receives the same value twice")
        for key in keys:
            if key[0] == "root" and key[1] not in stage0_roots:
                raise NotImplementedError(f"model input {key[1]!r} is used by stage {i} but not by stage 0")
            producer[key] = 0 if key[0] == "root" else key[1]
            if key not in last_use:
                order.append(key)
            last_use[key] = max(last_use.get(key, -1), i)
    out_node = _output_node(graph)
    for arg in out_node.all_input_nodes:
        key = _key_of(arg, stage_of)
        if key[0] != "out" or key[1] != n - 1:
            raise NotImplementedError(
                f"the model output uses {arg.format_node()}, which the last stage does not make (e.g. "
                "output_hidden_states=True): only the last stage's outputs can be returned"
            )

    # values crossing each boundary: stage k+1's own inputs first (in its order), then those passing through
    live = {
        k: [
            *args_keys[k + 1],
            *(key for key in order if producer[key] <= k < last_use[key] and key not in args_keys[k + 1]),
        ]
        for k in range(n - 1)
    }

    def meta_of(key: Key) -> dict:
        if key[0] == "root":
            placeholders = [p for p in submods[0].graph.nodes if p.op == "placeholder"]
            return placeholders[stage0_roots.index(key[1])].meta
        return _internal_value(submods[key[1]], key[2]).meta

    metas = {key: _dense_meta(meta_of(key)) for key in order}

    for s, submod in enumerate(submods):
        sg = submod.graph
        placeholders = [p for p in sg.nodes if p.op == "placeholder"]
        local: dict[Key, fx.Node] = {}
        if s == 0:
            local.update(zip(args_keys[0], placeholders, strict=True))
            # Stage 0's forward takes the model's inputs by name (torch copies the model's signature onto it) but
            # binds them to its placeholders in the model's input order, while torch's split left the
            # placeholders in order of first use: BERT's `token_type_ids` then silently received the attention
            # mask. Put them in the model's input order.
            body = next(node for node in sg.nodes if node.op != "placeholder")
            args_keys[0] = [key for key in (("root", p.name) for p in roots) if key in local]
            for key in args_keys[0]:
                body.prepend(local[key])
        else:
            old = dict(zip(args_keys[s], placeholders, strict=True))
            taken = {node.name for node in sg.nodes}
            with sg.inserting_before(next(node for node in sg.nodes if node.op != "placeholder")):
                for j, key in enumerate(live[s - 1]):
                    name = f"pp_in{j}"
                    while name in taken:
                        name += "_"
                    taken.add(name)
                    placeholder = sg.placeholder(name)
                    placeholder.meta = copy.copy(metas[key])
                    if key in old:
                        old[key].replace_all_uses_with(placeholder)
                    local[key] = placeholder
            for placeholder in placeholders:
                sg.erase_node(placeholder)
        if s < n - 1:
            out = _output_node(sg)
            own = {key: _internal_value(submod, key[2]) for key in live[s] if key[0] == "out" and key[1] == s}
            sent = []
            with sg.inserting_before(out):
                for key in live[s]:
                    fresh = sg.call_function(_fresh, (own.get(key, local.get(key)),))
                    fresh.meta = _dense_meta(metas[key])
                    sent.append(fresh)
            out.args = (tuple(sent),)
        sg.lint()
        submod.recompile()

    top = fx.Graph()
    env: dict[Key, fx.Node] = {}
    for p in roots:
        q = top.placeholder(p.target, default_value=p.args[0]) if p.args else top.placeholder(p.target)
        q.meta = copy.copy(p.meta)
        env[("root", p.name)] = q
    new_nodes: list[fx.Node] = []
    for s, node in enumerate(stages):
        inputs = args_keys[0] if s == 0 else live[s - 1]
        call = top.create_node("call_module", node.target, tuple(env[k] for k in inputs), {}, name=node.name)
        call.meta = copy.copy(node.meta)
        new_nodes.append(call)
        if s < n - 1:
            env = {k: v for k, v in env.items() if k[0] == "root"}
            for j, key in enumerate(live[s]):
                env[key] = top.call_function(operator.getitem, (call, j))
    last_old, last_new = stages[-1], new_nodes[-1]
    getitems: dict[Any, fx.Node] = {}

    def remap(arg: fx.Node) -> fx.Node:
        if arg is last_old:
            return last_new
        index = arg.args[1]
        if index not in getitems:
            getitems[index] = top.call_function(operator.getitem, (last_new, index))
        return getitems[index]

    top.output(fx.graph.map_arg(out_node.args[0], remap))
    top._codegen = copy.deepcopy(graph._codegen)
    top.lint()
    gm.graph = top
    gm.recompile()
    pipe.executor = type(pipe.executor)(gm)  # Pipe.forward (one process) interprets the graph it captured
    return live


class _IgnoreRootKwargs(CodeGen):
    """fx codegen whose forward also takes, and ignores, `**kwargs`."""

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        return super().gen_fn_def([*free_vars, "**_root_kwargs"], maybe_return_annotation, expanded_def=expanded_def)


def accept_root_kwargs(pipe: Pipe) -> None:
    """Every schedule calls each stage with the microbatch's keyword arguments (`attention_mask=`); torch's later
    stages take only their activations. They get a `**_root_kwargs` catch-all (the values they need arrive from the
    previous stage)."""
    for i in range(1, pipe.num_stages):
        module = pipe.get_stage_module(i)
        if type(module.graph._codegen) is not CodeGen:
            raise NotImplementedError(f"stage {i} has codegen {type(module.graph._codegen).__name__}")
        module.graph._codegen = _IgnoreRootKwargs()
        module.recompile()


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
    forward_skip_connections(pipe)
    accept_root_kwargs(pipe)
    return pipe


def block_split_spec(blocks: str, starts: list[int]) -> dict[str, SplitPoint]:
    """`{"model.layers.4": SplitPoint.BEGINNING, ...}` for every block where a stage other than the first begins."""
    return {f"{blocks}.{i}": SplitPoint.BEGINNING for i in starts if i > 0}


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
        split_spec = block_split_spec(plan.blocks, plan.layer_starts)
    if split_spec is None:  # marks left by annotate_split_points (pipe_split() calls in the forward stay anyway)
        split_spec = getattr(model, _SPLIT_POINTS_ATTR, {})
    return trace_stages(model, split_spec, mb_args, mb_kwargs)


class TracedStage(TimedStageMixin, _PipelineStage):
    """torch's stage for a traced module, timed for the timeline, and with V placements working on gloo."""

    def _get_init_p2p_neighbors_ops(self) -> list[dist.P2POp]:
        # V placement (ZBV, DualPipeV) puts stages i and i+1 on one rank; torch's warm-up then sends to this very
        # rank, which gloo refuses ("Pair is not connected"). Those messages are skipped.
        me = dist.get_rank(self.group)
        return [op for op in super()._get_init_p2p_neighbors_ops() if _peer(op) != me]


def _peer(op: dist.P2POp) -> int:
    if getattr(op, "group_peer", None) is not None:
        return op.group_peer
    return dist.get_group_rank(op.group, op.peer) if op.group is not None else op.peer


def build_stage(pipe: Pipe, index: int, device: torch.device, group: dist.ProcessGroup | None = None, **kw: Any):
    """This rank's stage `index` of a traced pipe, ready for any torch schedule (`Pipe.build_stage`, fixed for V
    placements on gloo). Keyword arguments go to `TracedStage` (`timeline=`)."""
    return TracedStage(pipe.get_stage_module(index), index, pipe.info(), device, group, **kw)
