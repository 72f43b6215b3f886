"""Graph passes over torch's `Pipe` that the trace frontend needs and torch does not do (see `trace.py`).

- `forward_skip_connections`: every stage receives only from the previous one and sends only to the next, so the
  multi-stage-per-rank schedules run on traced stages; stage 0 takes the model's inputs in the model's order.
- `accept_root_kwargs`: later stages accept the microbatch kwargs every schedule passes to every stage.
- `run_generated_code`: the stages' submodules run their graphs as generated Python, not node by node.
- `stop_needless_gradients`: values crossing a boundary that depend on no weight (rotary tables, masks) get none.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.pipelining._IR import Pipe, get_submod_name
from torch.fx.graph import CodeGen

from .versions import torch_at_least

# ("root", placeholder name) for a model input, ("out", producing stage, output index or None) for a stage output
Key = tuple


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
                    fresh.meta = copy.copy(metas[key])
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


def run_generated_code(pipe: Pipe) -> None:
    """The submodules torch's split leaves in each stage (one per model module: `model.layers.3`, ...) are
    `torch.export` `InterpreterModule`s, which run their graph through `torch.fx.Interpreter`, one Python dispatch per
    node: about a tenth of a traced stage's step on the benchmark's Llama. Each also holds its graph compiled to Python
    (`GraphModule` code, the same ops in the same order); this makes them run that, except where that code would
    shadow its own `self` (a node named after a submodule `self`, as BERT's attention has)."""
    for i in range(pipe.num_stages):
        for module in pipe.get_stage_module(i).modules():
            graph = getattr(module, "graph", None)
            if hasattr(module, "_run_with_interpreter") and not any(n.name == "self" for n in graph.nodes):
                module._run_with_interpreter = False


# -- values that need no gradient ------------------------------------------------------------------------------------
def graph_attr(module: nn.Module, node: Any) -> Any:
    """The value a `get_attr` node of `module`'s graph reads (None where it names nothing); None for any other
    argument."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = module
    for atom in node.target.split("."):
        value = getattr(value, atom, None)
    return value


def _needs_grad(module: nn.Module, inputs: list[bool]) -> Any:
    """Which outputs of `module`'s graph depend on a trainable parameter or on an input that does (`inputs`, by
    placeholder): a bool, or a list for a tuple output. Submodules' graphs are followed; anything unknown counts as
    needing a gradient."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, fx.Graph):
        return any(inputs) or any(p.requires_grad for p in module.parameters())
    needs: dict[fx.Node, Any] = {}
    feed = iter(inputs)

    def of(arg: Any) -> bool:
        value = needs.get(arg, False) if isinstance(arg, fx.Node) else False
        return any(value) if isinstance(value, list) else bool(value)

    for node in graph.nodes:
        if node.op == "placeholder":
            needs[node] = next(feed, True)
        elif node.op == "get_attr":
            needs[node] = bool(getattr(graph_attr(module, node), "requires_grad", True))
        elif node.op == "call_module":
            sub = module.get_submodule(node.target)
            names = [p.target for p in getattr(sub, "graph", fx.Graph()).nodes if p.op == "placeholder"]
            given = [of(a) for a in node.args] + [
                of(node.kwargs[n]) for n in names[len(node.args) :] if n in node.kwargs
            ]
            needs[node] = _needs_grad(sub, given)
        elif (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(needs.get(node.args[0]), list)
        ):
            outputs = needs[node.args[0]]
            needs[node] = (
                outputs[node.args[1]] if isinstance(node.args[1], int) and node.args[1] < len(outputs) else True
            )
        elif node.op == "output":
            result = node.args[0]
            if isinstance(result, fx.Node):
                return of(result)
            flat: list[fx.Node] = []
            fx.node.map_arg(result, flat.append)
            return [of(n) for n in flat]
        else:
            needs[node] = any(of(a) for a in node.all_input_nodes)
    return True


class _ZeroGrads(torch.autograd.Function):
    """`value` itself; in backward, zero gradients for `others`: inputs a stage received but that need no gradient
    (rotary tables, masks), for which torch's stages still send one back (torch < 2.13 requires one)."""

    @staticmethod
    def forward(ctx, value, *others):
        ctx.others = [(o.shape, o.dtype, o.device) for o in others]
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.others))


def _with_zero_grads(value: Any, *others: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
        return _ZeroGrads.apply(value, *others)
    return value


class _Anchored(torch.autograd.Function):
    """`value` as a tensor in `anchor`'s autograd graph (no gradient reaches either): torch 2.11's zero-bubble
    backward asks autograd for gradients of every stage output, and refuses one outside the graph."""

    @staticmethod
    def forward(ctx, value, anchor):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _to_wire(value: torch.Tensor, anchor: Any = None) -> torch.Tensor:
    value = value.to(torch.float32)
    if isinstance(anchor, torch.Tensor) and anchor.requires_grad and torch.is_grad_enabled():
        return _Anchored.apply(value, anchor)
    return value


def _from_wire(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.detach().to(dtype)


# torch < 2.13 gives every received tensor requires_grad, which a boolean mask cannot have: send such values as float32
_NON_FLOAT_ON_WIRE = not torch_at_least(2, 13)


def stop_needless_gradients(pipe: Pipe, live: dict[int, list[Key]]) -> int:
    """Values that cross a stage boundary but depend on no trainable weight (rotary cos/sin, float masks) get no
    gradient: torch's traced stages make every floating input require one, so the receiving stage computed gradients
    for them through every block (a sum over heads per use) and sent them back. They are used detached instead, and
    the gradient torch still sends is a zero. On torch < 2.13, non-floating values (boolean masks) travel as float32
    the same way. Returns how many values were cut off."""
    n = pipe.num_stages
    mods = [pipe.get_stage_module(i) for i in range(n)]
    roots = [p for p in mods[0].graph.nodes if p.op == "placeholder"]
    needs = _listed(_needs_grad(mods[0], [False] * len(roots)))  # the batch's tensors need no gradient
    cut = 0
    for s in range(1, n):
        graph = mods[s].graph
        placeholders = [p for p in graph.nodes if p.op == "placeholder"]
        zero: list[fx.Node] = []
        inputs: list[bool] = []
        for j, p in enumerate(placeholders[: len(live[s - 1])]):
            value = p.meta.get("val")
            floating = isinstance(value, torch.Tensor) and value.is_floating_point()
            needed = needs[j] if j < len(needs) else True
            inputs.append(needed)
            if needed or value is None or not (floating or _NON_FLOAT_ON_WIRE):
                continue
            with graph.inserting_before(next(node for node in graph.nodes if node.op != "placeholder")):
                used = graph.call_function(
                    _from_wire if not floating else torch.Tensor.detach, (p, value.dtype) if not floating else (p,)
                )
            p.replace_all_uses_with(used, delete_user_cb=lambda user, used=used: user is not used)
            used.meta = copy.copy(p.meta)
            if not floating:  # the producer sends it as float32
                with value.fake_mode:
                    p.meta["val"] = torch.empty(value.shape, dtype=torch.float32, device=value.device)
                sent = _output_node(mods[s - 1].graph).args[0]
                anchor = next((node for node, needed in zip(sent, needs) if needed), None)
                with mods[s - 1].graph.inserting_before(_output_node(mods[s - 1].graph)):
                    wire = mods[s - 1].graph.call_function(_to_wire, (sent[j], anchor))
                wire.meta = copy.copy(p.meta)
                out = _output_node(mods[s - 1].graph)
                out.args = (tuple(wire if k == j else a for k, a in enumerate(out.args[0])),)
                mods[s - 1].graph.lint()
                mods[s - 1].recompile()
            zero.append(p)
            cut += 1
        outputs = _listed(_needs_grad(mods[s], inputs))
        if zero:
            out = _output_node(graph)
            flat: list[fx.Node] = []
            fx.node.map_arg(out.args[0], flat.append)
            # the zero gradients ride on an output that gets a gradient (the hidden states)
            first = next((node for node, needed in zip(flat, outputs) if needed), flat[0])
            target = first.args[0] if first.target is _fresh else first  # inside the dense copy
            with graph.inserting_before(first if first.target is _fresh else out):
                attached = graph.call_function(_with_zero_grads, (target, *zero))
            attached.meta = copy.copy(target.meta)
            first.replace_input_with(target, attached) if first.target is _fresh else out.replace_input_with(
                first, attached
            )
            graph.lint()
            mods[s].recompile()
        needs = outputs
    return cut


def _listed(needs: Any) -> list[bool]:
    return needs if isinstance(needs, list) else [needs]
