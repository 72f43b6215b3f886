"""Prototype "trace frontend" on top of torch.distributed.pipelining.pipeline (torch 2.13, transformers 5.24).

What torch leaves undone, and what this module adds:

* `trace(...)`               pipeline() with SplitPoint.BEGINNING at block FQNs; undoes annotate_split_points
                             afterwards (so the model can be traced again) and turns torch's generic "cannot capture
                             your model as a full graph" into an error that quotes torch.export's own exception.
* `forward_skip_connections` rewrites Pipe.split_gm so that every stage only talks to its neighbours: values that a
                             stage > k+1 consumes (masks, rotary cos/sin, root inputs) are threaded through every
                             stage in between. Keeps the invariants `_PipelineStage` derives its send/recv info from.
* `accept_root_kwargs`       non-first stages ignore the microbatch kwargs that every schedule passes to every stage.
* `check_adjacent`           re-derives, exactly as `_PipelineStage` does, each stage's recv sources / send
                             destinations / P2P order from the top-level graph and checks they are adjacent and match.
* `drop_dead_attrs`, `param_fqns`, `share_params`
                             map every stage parameter back to the model's canonical FQN (tied aliases included),
                             re-point stage parameters to the model's own Parameter objects (torch deep-copies
                             parameters used by several stages, e.g. GPT-2 wte/lm_head), so one optimizer on
                             `model.parameters()` keeps working across per-shape retraces.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.distributed.pipelining import SplitPoint
from torch.distributed.pipelining._IR import Pipe, annotate_split_points, get_submod_name
from torch.fx.graph import CodeGen

Key = tuple  # ("root", placeholder_name) | ("out", producer_stage, index_or_None)


class TraceError(RuntimeError):
    """torch.export could not capture the model; the message quotes torch.export's own exception."""


# --------------------------------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------------------------------
def split_spec(block_prefix: str, starts: Sequence[int]) -> dict[str, SplitPoint]:
    """`{"transformer.h.2": SplitPoint.BEGINNING, ...}` for every block index where a stage (other than 0) begins."""
    return {f"{block_prefix}.{i}": SplitPoint.BEGINNING for i in starts if i > 0}


def trace(model: torch.nn.Module, spec: dict[str, SplitPoint], mb_args: tuple, mb_kwargs: dict | None = None) -> Pipe:
    """`torch.distributed.pipelining.pipeline(...)`, but re-traceable and with a quotable export error.

    `mb_args`/`mb_kwargs` must be ONE microbatch (the traced stages are specialised to its shapes).
    """
    if getattr(model.config, "use_cache", False):
        raise TraceError(
            f"{type(model).__name__}.config.use_cache is True: the forward then returns a "
            "transformers DynamicCache, which torch.export rejects with \"Found <class "
            "'transformers.cache_utils.DynamicCache'> in output, which is not a known type. If this type holds "
            "tensors, you need to register a pytree for it.\" Set model.config.use_cache = False for training."
        )
    annotate_split_points(model, spec)
    try:
        return Pipe.from_tracing(model, mb_args, mb_kwargs)
    except RuntimeError as e:
        cause = e.__cause__
        if cause is None:
            raise
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} as one graph: "
            f"{type(cause).__name__}: {str(cause).strip()}"
        ) from cause
    finally:
        # annotate_split_points monkey-patches `forward` on the instances; a second annotate would wrap the
        # wrapper (two pipe_split calls per block). Restore the class forward.
        for qualname in spec:
            mod = model.get_submodule(qualname)
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("_orig_forward", None)


# --------------------------------------------------------------------------------------------------------------
# the top-level graph, as _PipelineStage reads it
# --------------------------------------------------------------------------------------------------------------
def _stage_nodes(g: fx.Graph) -> list[fx.Node]:
    # _PipelineStage.__init__: submod_nodes = [n for n in graph.nodes if n.op == "call_module"]; i-th is stage i.
    return [n for n in g.nodes if n.op == "call_module"]


def _key_of(arg: fx.Node, stage_of: dict[fx.Node, int]) -> Key:
    if arg.op == "placeholder":
        return ("root", arg.name)
    if arg.op == "call_function" and arg.target is operator.getitem:
        src = arg.args[0]
        if not (isinstance(src, fx.Node) and src in stage_of):
            raise NotImplementedError(f"nested getitem in the pipe graph: {arg.format_node()}")
        return ("out", stage_of[src], arg.args[1])
    if arg.op == "call_module":
        return ("out", stage_of[arg], None)
    raise NotImplementedError(f"unexpected stage argument in the pipe graph: {arg.format_node()}")


def _output_node(g: fx.Graph) -> fx.Node:
    return next(n for n in reversed(g.nodes) if n.op == "output")


def _internal_value(submod: fx.GraphModule, index: int | None) -> fx.Node:
    ret = _output_node(submod.graph).args[0]
    if index is None:
        assert isinstance(ret, fx.Node), ret
        return ret
    return ret[index]


# --------------------------------------------------------------------------------------------------------------
# skip connections
# --------------------------------------------------------------------------------------------------------------
def forward_skip_connections(pipe: Pipe) -> dict[int, list[Key]]:
    """Make every stage communicate with its neighbours only.

    For each boundary k|k+1 the set of live values L_k (produced by a stage <= k, or a root input, and consumed by a
    stage > k) becomes, in one fixed order, both the output tuple of stage k and the placeholders of stage k+1; the
    top-level graph is rebuilt with exactly one getitem per output index, created in index order (that order is what
    `_create_act_send_info` counts `out_idx` by). Returns {k: L_k} for inspection.
    """
    gm = pipe.split_gm
    g = gm.graph
    stages = _stage_nodes(g)
    n = len(stages)
    for i, node in enumerate(stages):
        if node.target != get_submod_name(i):
            raise NotImplementedError(f"stage {i} calls {node.target}, expected {get_submod_name(i)}")
        if node.kwargs:
            raise NotImplementedError(f"stage {i} is called with kwargs")
    stage_of = {node: i for i, node in enumerate(stages)}
    submods = [gm.get_submodule(node.target) for node in stages]
    roots = [p for p in g.nodes if p.op == "placeholder"]

    args_keys: list[list[Key]] = [[_key_of(a, stage_of) for a in node.args] for node in stages]
    for i, ks in enumerate(args_keys):
        if len(set(ks)) != len(ks):
            raise NotImplementedError(f"stage {i} receives the same value twice")
    if any(k[0] != "root" for k in args_keys[0]):
        raise NotImplementedError("stage 0 consumes a value produced by a stage")
    stage0_roots = [k[1] for k in args_keys[0]]

    # producer and last consumer of every value
    producer: dict[Key, int] = {}
    last_use: dict[Key, int] = {}
    order: list[Key] = []
    for i, ks in enumerate(args_keys):
        for k in ks:
            producer[k] = 0 if k[0] == "root" else k[1]
            if k not in last_use:
                order.append(k)
            last_use[k] = max(last_use.get(k, -1), i)
            if k[0] == "root" and i > 0 and k[1] not in stage0_roots:
                raise NotImplementedError(
                    f"root input {k[1]!r} is used by stage {i} but not by stage 0; stage 0's signature is the "
                    "model's, so it cannot grow a placeholder here"
                )
    out_node = _output_node(g)
    for a in out_node.all_input_nodes:
        k = _key_of(a, stage_of)
        if k[0] != "out" or k[1] != n - 1:
            raise NotImplementedError(
                f"the model output uses {a.format_node()}, which is not made by the last stage "
                "(e.g. output_hidden_states=True); only the last stage's outputs can be returned"
            )

    # live sets per boundary, ordered: stage k+1's original argument order first, then first appearance
    live: dict[int, list[Key]] = {}
    for k in range(n - 1):
        first = [key for key in args_keys[k + 1]]
        rest = [key for key in order if producer[key] <= k < last_use[key] and key not in first]
        live[k] = first + rest

    def val_meta(key: Key) -> dict:
        if key[0] == "root":
            ph = [p for p in submods[0].graph.nodes if p.op == "placeholder"][stage0_roots.index(key[1])]
            return ph.meta
        return _internal_value(submods[key[1]], key[2]).meta

    metas = {key: copy.copy(val_meta(key)) for key in order}

    # ---- rewrite each stage module
    for s, sm in enumerate(submods):
        sg = sm.graph
        old_ph = [p for p in sg.nodes if p.op == "placeholder"]
        local: dict[Key, fx.Node] = {}
        if s == 0:
            for key, p in zip(args_keys[0], old_ph, strict=True):
                local[key] = p
        else:
            old_by_key = dict(zip(args_keys[s], old_ph, strict=True))
            taken = {nd.name for nd in sg.nodes}
            first_body = next(nd for nd in sg.nodes if nd.op != "placeholder")
            with sg.inserting_before(first_body):
                for j, key in enumerate(live[s - 1]):
                    name = f"pp_in{j}"
                    while name in taken:
                        name += "_"
                    taken.add(name)
                    ph = sg.placeholder(name)
                    ph.meta = copy.copy(metas[key])
                    if key in old_by_key:
                        old_by_key[key].replace_all_uses_with(ph)
                    local[key] = ph
            for p in old_ph:
                sg.erase_node(p)
        if s < n - 1:
            own = {key: _internal_value(sm, key[2]) for key in live[s] if key[0] == "out" and key[1] == s}
            out = _output_node(sg)
            with sg.inserting_before(out):
                for key, node in own.items():  # see _unview
                    u = sg.call_function(_unview, (node,))
                    u.meta = copy.copy(node.meta)
                    own[key] = u
            values = tuple(own[key] if key in own else local[key] for key in live[s])
            out.args = (values,)
        sg.lint()
        sm.recompile()

    # ---- rebuild the top-level graph
    ng = fx.Graph()
    env: dict[Key, fx.Node] = {}
    for p in roots:
        q = ng.placeholder(p.target, default_value=p.args[0]) if p.args else ng.placeholder(p.target)
        q.meta = copy.copy(p.meta)
        env[("root", p.name)] = q
    new_stage_nodes: list[fx.Node] = []
    for s, node in enumerate(stages):
        in_keys = args_keys[0] if s == 0 else live[s - 1]
        call = ng.create_node("call_module", node.target, tuple(env[k] for k in in_keys), {}, name=node.name)
        call.meta = copy.copy(node.meta)
        new_stage_nodes.append(call)
        if s < n - 1:
            env = {k: v for k, v in env.items() if k[0] == "root"}  # roots stay addressable for stage 0 only
            for j, key in enumerate(live[s]):
                env[key] = ng.call_function(operator.getitem, (call, j))
    last_old, last_new = stages[-1], new_stage_nodes[-1]
    getitems: dict[Any, fx.Node] = {}

    def remap(a: fx.Node) -> fx.Node:
        if a is last_old:
            return last_new
        idx = a.args[1]
        if idx not in getitems:
            getitems[idx] = ng.call_function(operator.getitem, (last_new, idx))
        return getitems[idx]

    ng.output(fx.graph.map_arg(out_node.args[0], remap))
    ng._codegen = copy.deepcopy(g._codegen)
    ng.lint()
    gm.graph = ng
    gm.recompile()
    # Pipe.forward (local, single-process run) interprets the graph its DetachExecutor captured at __init__
    pipe.executor = type(pipe.executor)(gm)
    return live


def _unview(t):
    """Stage outputs must not be views: the zero-bubble schedules' `stage_backward_input` ends with
    `t.detach_()` on every stage output, which raises "Can't detach views in-place" (OPT's blocks return a view).
    Clone only when the runtime value is a view; forwarded values (the stage's own input buffers) pass as they are."""
    return t.clone() if isinstance(t, torch.Tensor) and t._is_view() else t


class _IgnoreRootKwargs(CodeGen):
    """Plain fx codegen whose forward also takes (and ignores) **kwargs."""

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        return super().gen_fn_def(list(free_vars) + ["**_root_kwargs"], maybe_return_annotation,
                                  expanded_def=expanded_def)


def accept_root_kwargs(pipe: Pipe) -> None:
    """Every schedule calls `stage.forward_one_chunk(i, args, kwargs)` on EVERY stage with the microbatch kwargs of
    `step(...)`; torch's non-first stage modules take only positional activations, so `attention_mask=` fails there
    with a TypeError. Give stages 1.. a `**_root_kwargs` catch-all (their placeholders are unchanged, which keeps
    `_create_act_recv_info`'s strict zip with the top-level args intact)."""
    for i in range(1, pipe.num_stages):
        sm = pipe.get_stage_module(i)
        if type(sm.graph._codegen) is not CodeGen:
            raise NotImplementedError(f"stage {i} has codegen {type(sm.graph._codegen).__name__}")
        sm.graph._codegen = _IgnoreRootKwargs()
        sm.recompile()


# --------------------------------------------------------------------------------------------------------------
# consistency check, re-deriving what _PipelineStage derives
# --------------------------------------------------------------------------------------------------------------
def check_adjacent(pipe: Pipe, has_backward: bool = True) -> list[str]:
    """Mirror `_PipelineStage._create_act_recv_info` / `_create_act_send_info` / `_create_grad_recv_info` for every
    stage and return the problems the schedules would hit (empty list: consistent)."""
    g = pipe.split_gm.graph
    stages = _stage_nodes(g)
    name_to_idx = {nd.name: i for i, nd in enumerate(stages)}
    problems: list[str] = []
    sends: dict[int, list[tuple[int, int]]] = {}  # src stage -> [(out_idx, dst)] in send order
    for i, node in enumerate(stages):
        sm = pipe.get_stage_module(i)
        phs = [p for p in sm.graph.nodes if p.op == "placeholder"]
        if len(phs) != len(node.args):
            problems.append(f"stage {i}: {len(phs)} placeholders but {len(node.args)} top-level args")
        # recv: chase getitem to the producing call_module (as _create_act_recv_info does)
        for p, a in zip(phs, node.args):
            if a.op == "placeholder":
                if i > 0:
                    problems.append(f"stage {i}: root input {a.name} as positional arg (non-first stages reject "
                                    "root args in _retrieve_recv_activations)")
                continue
            src = a
            while src.target is operator.getitem:
                src = src.args[0]
            if name_to_idx[src.name] != i - 1:
                problems.append(f"stage {i}: receives {p.name} from stage {name_to_idx[src.name]}")
        # send: iterate node.users like _create_act_send_info
        out_idx = 0
        act_send: dict[int, list[int]] = {}
        for user in node.users:
            if user.target is operator.getitem:
                dsts = act_send.setdefault(out_idx, [])
                for gu in user.users:
                    if gu.op == "call_module":
                        dsts.append(name_to_idx[gu.name])
                if user.args[1] != out_idx:
                    problems.append(f"stage {i}: getitem index {user.args[1]} seen as out_idx {out_idx}")
                out_idx += 1
            else:
                dsts = act_send.setdefault(out_idx, [])
                if user.op == "call_module":
                    dsts.append(name_to_idx[user.name])
        outs = list(_flatten(_output_node(sm.graph).args))
        for idx, dsts in act_send.items():
            for d in dsts:
                if d != i + 1:
                    problems.append(f"stage {i}: output {idx} sent to stage {d}")
            val = outs[idx].meta["val"] if idx < len(outs) else None
            if has_backward and val is not None and val.is_floating_point() and len(dsts) > 1:
                problems.append(f"stage {i}: float output {idx} has {len(dsts)} consumers "
                                "('Backward of skip connections not supported yet')")
            sends.setdefault(i, []).extend((idx, d) for d in dsts)
    # P2P order: what stage i sends to i+1 (in send order) must be what stage i+1 receives (in placeholder order)
    for i in range(len(stages) - 1):
        sent = [idx for idx, d in sends.get(i, []) if d == i + 1]
        recv = [a.args[1] if a.target is operator.getitem else None for a in stages[i + 1].args]
        if sent != recv and not (recv == [None] and sent == [0]):
            problems.append(f"boundary {i}|{i + 1}: send order {sent} != recv order {recv}")
        outs = list(_flatten(_output_node(pipe.get_stage_module(i).graph).args))
        phs = [p for p in pipe.get_stage_module(i + 1).graph.nodes if p.op == "placeholder"]
        for j, p in zip(sent, phs):
            a, b = outs[j].meta["val"], p.meta["val"]
            if a.shape != b.shape or a.dtype != b.dtype:
                problems.append(f"boundary {i}|{i + 1}: out {j} {a.dtype}{tuple(a.shape)} -> "
                                f"{p.name} {b.dtype}{tuple(b.shape)}")
    return problems


def _flatten(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, fx.Node):
        yield x


# --------------------------------------------------------------------------------------------------------------
# parameters: dead attributes, FQNs, sharing across retraces
# --------------------------------------------------------------------------------------------------------------
_CALL_SUFFIX = re.compile(r"@\d+$")


def _clean_fqn(name: str) -> str:
    """Stage-local parameter names ARE original FQNs (torch assigns them at their FQN path); strip the `@N`
    call-name suffixes that torch.export's unflattener uses for modules called more than once."""
    return ".".join(_CALL_SUFFIX.sub("", a) for a in name.split("."))


def _read_attrs(sm: torch.nn.Module) -> set[str]:
    used = set()
    for mn, mod in sm.named_modules(remove_duplicate=False):
        g = getattr(mod, "graph", None)
        if isinstance(g, fx.Graph):
            for nd in g.nodes:
                if nd.op == "get_attr":
                    used.add(f"{mn}.{nd.target}" if mn else nd.target)
    return used


def drop_dead_attrs(pipe: Pipe) -> dict[int, list[str]]:
    """Remove parameters/buffers that no graph of the stage reads. torch's aliasing step leaves one behind for
    tied weights: stage 0 of GPT-2 keeps `lm_head.weight` (the ORIGINAL tied Parameter) next to the deep copy
    `transformer.wte.weight` that its graph actually reads, so `stage.parameters()` holds a parameter that never
    gets a gradient."""
    dropped: dict[int, list[str]] = {}
    for i in range(pipe.num_stages):
        sm = pipe.get_stage_module(i)
        used = _read_attrs(sm)
        names = [n for n, _ in sm.named_parameters(remove_duplicate=False)] + \
                [n for n, _ in sm.named_buffers(remove_duplicate=False)]
        for name in names:
            if name not in used:
                parent, _, leaf = name.rpartition(".")
                mod = sm.get_submodule(parent) if parent else sm
                if leaf in mod._parameters:
                    del mod._parameters[leaf]
                elif leaf in mod._buffers:
                    del mod._buffers[leaf]
                dropped.setdefault(i, []).append(name)
    return dropped


def model_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """canonical FQN (first name in `named_parameters()`) -> every FQN of the same Parameter (tied aliases)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {names[0]: names for names in groups.values()}


def param_fqns(pipe: Pipe, model: torch.nn.Module) -> dict[int, dict[str, str]]:
    """{stage: {stage-local parameter name: canonical model FQN}}. Works whether or not torch deep-copied the
    parameter (identity first, then the stage-local name, which is an FQN of the original model)."""
    canon_by_id = {id(p): names[0] for names in model_aliases(model).values()
                   for p in [model.get_parameter(names[0])]}
    out: dict[int, dict[str, str]] = {}
    for i in range(pipe.num_stages):
        sm = pipe.get_stage_module(i)
        m: dict[str, str] = {}
        for name, p in sm.named_parameters(remove_duplicate=False):
            if id(p) in canon_by_id:
                m[name] = canon_by_id[id(p)]
            else:
                orig = model.get_parameter(_clean_fqn(name))
                if orig.shape != p.shape:
                    raise RuntimeError(f"stage {i} parameter {name}: shape {tuple(p.shape)} != model's "
                                       f"{tuple(orig.shape)}")
                m[name] = canon_by_id[id(orig)]
        out[i] = m
    return out


def share_params(pipe: Pipe, model: torch.nn.Module) -> int:
    """Re-point every stage parameter and buffer to the model's own object at the same FQN. Returns how many were
    re-pointed (the deep copies torch makes of parameters used by several stages). After this, every retrace of the
    same model yields stages over one set of Parameters, and gradients land in `model.parameters()`.

    Tied weights used by two stages on the SAME rank then share one Parameter and autograd adds both uses into its
    .grad (the right gradient of a tied weight); an optimizer must get each Parameter once (`model.parameters()`
    already deduplicates)."""
    n = 0
    for i in range(pipe.num_stages):
        sm = pipe.get_stage_module(i)
        for name, p in list(sm.named_parameters(remove_duplicate=False)):
            orig = model.get_parameter(_clean_fqn(name))
            if orig is not p:
                if orig.shape != p.shape or orig.dtype != p.dtype:
                    raise RuntimeError(f"stage {i} parameter {name} does not match the model's")
                parent, _, leaf = name.rpartition(".")
                (sm.get_submodule(parent) if parent else sm)._parameters[leaf] = orig
                n += 1
        for name, b in list(sm.named_buffers(remove_duplicate=False)):
            try:
                orig = model.get_buffer(_clean_fqn(name))
            except AttributeError:
                continue  # lifted constants etc.
            if orig is not b and orig.shape == b.shape:
                parent, _, leaf = name.rpartition(".")
                (sm.get_submodule(parent) if parent else sm)._buffers[leaf] = orig
                n += 1
    # keep torch's bookkeeping honest: nothing is replicated by copy any more
    return n


def prepare(model, block_prefix, starts, mb_args, mb_kwargs=None, *, share=True):
    """trace + drop_dead_attrs + (share_params) + forward_skip_connections + accept_root_kwargs + check."""
    pipe = trace(model, split_spec(block_prefix, starts), mb_args, mb_kwargs)
    drop_dead_attrs(pipe)
    if share:
        share_params(pipe, model)
    forward_skip_connections(pipe)
    accept_root_kwargs(pipe)
    problems = check_adjacent(pipe)
    if problems:
        raise RuntimeError("pipe graph still inconsistent:\n  " + "\n  ".join(problems))
    return pipe


def skip_self_warmup(stage) -> None:
    """`_PipelineStage` (the traced frontend) warms up P2P with `_get_init_p2p_neighbors_ops`, which sends to the
    ranks of stages i-1 and i+1 even when they are on this very rank (V placement: ZBV, DualPipeV), and gloo refuses
    a send to oneself ("Pair is not connected"). Drop the ops whose peer is this rank."""
    import torch.distributed as dist

    orig = stage._get_init_p2p_neighbors_ops
    me = dist.get_rank(stage.group) if stage.group is not None else dist.get_rank()

    def ops():
        keep = []
        for op in orig():
            peer = getattr(op, "group_peer", None)
            if peer is None:
                peer = dist.get_group_rank(op.group, op.peer) if op.group is not None else op.peer
            if peer != me:
                keep.append(op)
        return keep

    stage._get_init_p2p_neighbors_ops = ops
