"""Where a rank's stage weights come from: the model as the user built it, a checkpoint read stage by stage, or an
initialisation that is the same for every pipeline layout.

A frontend names the parameters and buffers this rank's stages use; a source makes exactly those real, on the stage
device, and leaves every other parameter on the meta device, so a rank never holds more than its stages:

- `Resident`: a fully built model (every rank built or loaded the whole thing): the rest is freed.
- `Checkpoint`: a skeleton on the meta device filled from a checkpoint folder by transformers' own loading (key
  renames, legacy names, base-model prefixes, dtype casts, tied weights) on a copy of the model whose other modules
  were cut away before loading: from safetensors only this rank's tensors are read (only the files holding them are
  opened), straight onto the device. transformers' DistributedConfig(pp_size) cuts its models the same way.
- `Initialise`: a skeleton initialised from scratch, module by module with HF's own `_init_weights`, each module's
  random stream seeded by its name: the same weights whatever the split, the stage count or the frontend.
  `initialize_weights(model, seed)` gives them to a whole model on one process, for a reference run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn

from .errors import PipelineConfigError
from .weight_sync import sends_weights, start_from_first_rank

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def state_names(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `model` under every name it has (tied weights, non-persistent buffers too)."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent)
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        module._buffers[leaf] = value


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Names of each parameter known under several names (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _free(model: nn.Module, keep: Collection[str]) -> None:
    """Every parameter outside `keep` becomes a meta tensor of its shape (per parameter: a tied weight one of whose
    names is kept stays)."""
    kept = {id(t) for name, t in state_names(model) if name in keep}
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and id(param) not in kept and param.device.type != "meta":
                module._parameters[leaf] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )


def meta_names(model: nn.Module, keep: Collection[str]) -> list[str]:
    """Names in `keep` still on the meta device: weights no source gave a value."""
    return sorted(name for name, t in state_names(model) if name in keep and t.device.type == "meta")


def has_meta_tensors(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def weights_problems(model: nn.Module, weights: Any) -> list[str]:
    """A skeleton on the meta device needs a source for its weights; a model partly on meta is neither."""
    params = list(model.parameters())
    on_meta = sum(p.device.type == "meta" for p in params)
    if on_meta == 0 or (weights is not None and on_meta == len(params)):
        return []
    if on_meta < len(params):
        return [
            f"{type(model).__name__} has {on_meta} of {len(params)} parameters on the meta device: build it whole, "
            "or all on the meta device (torch.device('meta') / accelerate's init_empty_weights) with a checkpoint to "
            "read its weights from (pipeline_checkpoint) or none (initialised from scratch)."
        ]
    return [
        f"{type(model).__name__} is on the meta device and no weights were given: pass weights=Checkpoint(path, "
        "seed) to read its stages from a checkpoint, or weights=Initialise(seed) to initialise them from scratch."
    ]


class Resident:
    """The model as given, fully built on every rank: this rank's tensors move to the device, the rest is freed.

    Every rank's stages start from rank 0's values (`weight_sync.py`), as Trainer + DDP starts every replica from
    rank 0's: a script that built its model before seeding gives each rank other weights."""

    def materialize(self, model: nn.Module, keep: Collection[str], device: torch.device) -> None:
        sends = sends_weights()
        if sends:  # from the whole model, before the other stages are freed
            start_from_first_rank(model, keep, device)
        _free(model, keep)
        with torch.no_grad():
            for name, tensor in list(state_names(model)):
                if name in keep and tensor.device != device:
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.to(device)  # the same Parameter: tied names stay tied
                    else:
                        _set(model, name, tensor.to(device))
        if not sends:  # straight into the stage tensors, on the device
            start_from_first_rank(model, keep, device)


# -- from scratch ------------------------------------------------------------------------------------------------
def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def initialize_weights(model: nn.Module, seed: int) -> None:
    """HF's weight initialisation of a whole `model` on one process, each module seeded by `seed` and its name: the
    weights PipeTrainer gives a meta model it initialises from scratch, on every pipeline layout (the reference for
    a from-scratch run). The global RNG is left as it was.

    Example:
        >>> model = AutoModelForCausalLM.from_config(config)
        >>> hf_pipe.initialize_weights(model, seed=42)   # the weights of PipeTrainer(model=<meta model>) at seed 42
    """
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensor.__dict__.pop("_is_hf_initialized", None)
    _seeded_init(model, seed, None)


@torch.no_grad()
def _seeded_init(model: nn.Module, seed: int, names: Collection[str] | None) -> None:
    """HF's `initialize_weights` walk (children first, each sub-model with its own `_init_weights`), seeding each
    module's random numbers by its name, so its values do not depend on which other modules exist; `names`: only
    the modules holding (in their subtree) one of these tensors. Tensors loaded from a checkpoint are kept, as HF keeps
    them (its init functions skip tensors flagged `_is_hf_initialized`)."""
    from transformers import PreTrainedModel
    from transformers import initialization as init

    if names is not None:  # a tied weight is initialised by every module holding it, wherever it was named
        ids = {id(t) for name, t in state_names(model) if name in names}
        names = {name for name, t in state_names(model) if id(t) in ids}
    wanted = None if names is None else {name.rpartition(".")[0] for name in names}
    devices = sorted({t.device.index or 0 for _, t in state_names(model) if t.device.type == "cuda"})

    def visit(module: nn.Module, owner: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            child_owner = child if isinstance(child, PreTrainedModel) else owner
            visit(child, child_owner, f"{name}.{child_name}" if name else child_name)
        holds = wanted is None or not name or any(w == name or w.startswith(name + ".") for w in wanted)
        # a module whose every tensor was loaded has nothing to draw; its `_init_weights` might reach for sub-modules
        # cut away on this rank (T5's attention, whose shared position bias a stage keeps without its projections)
        tensors = [*module.parameters(), *module.buffers()]
        loaded = names is not None and tensors and all(getattr(t, "_is_hf_initialized", False) for t in tensors)
        if holds and not loaded and not getattr(module, "_is_hf_initialized", False):
            torch.manual_seed(_module_seed(seed, name))
            owner._init_weights(module)
            module._is_hf_initialized = True

    with torch.random.fork_rng(devices=devices), init.guard_torch_init_functions():
        visit(model, model, "")


class Initialise:
    """A skeleton on the meta device initialised from scratch: this rank's tensors only, seeded module by module."""

    def __init__(self, seed: int):
        self.seed = seed

    def materialize(self, model: nn.Module, keep: Collection[str], device: torch.device) -> None:
        _free(model, keep)
        groups = _tied_names(model)
        for name, tensor in list(state_names(model)):
            if name in keep and tensor.device.type == "meta":
                value = torch.empty_like(tensor, device=device)
                _set(
                    model,
                    name,
                    nn.Parameter(value, requires_grad=tensor.requires_grad) if _is_param(tensor) else value,
                )
        _retie(model, groups)
        _seeded_init(model, self.seed, keep)


def _is_param(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter)


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Give every name of a tied group the group's one real parameter (setting a tensor by name unties it)."""
    for group in groups:
        real = next((model.get_parameter(n) for n in group if model.get_parameter(n).device.type != "meta"), None)
        if real is not None:
            for name in group:
                _set(model, name, real)


# -- from a checkpoint -----------------------------------------------------------------------------------------
def checkpoint_files(path: str) -> dict[str, str] | None:
    """checkpoint key -> file of a local safetensors checkpoint (sharded with an index, or one file), else None."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_NAME)
    return None


class Checkpoint:
    """A skeleton filled from an HF checkpoint (a local folder, or a hub id transformers resolves), this rank's
    tensors only, by transformers' own `from_pretrained` on a copy of the model with the other modules cut away.

    `kwargs` are `from_pretrained`'s (revision, trust_remote_code, ...); the dtype and attention implementation are
    the skeleton's. Missing weights (a new head) are initialised by HF's `_init_weights`, drawn as `init_missing`
    says: `"seeded"` (default) seeds each module by `seed` and its name as `Initialise` does, the same for every
    layout; `"global"` draws them as `from_pretrained` does on one process right after `torch.manual_seed(seed)`
    (what TRL's trainers do with a model path: `set_seed(args.seed)`, then `from_pretrained`), from the global
    generator of the stage's device, the global state left as it was. For the draws to follow the one-process order
    when several ranks hold missing weights, each rank then also builds the modules the checkpoint lacks on other
    ranks (a local safetensors folder; with a hub id only this rank's are drawn: exact when every missing weight is
    on one rank, as a new head is).
    """

    def __init__(self, path: str, seed: int, init_missing: str = "seeded", **kwargs: Any):
        if init_missing not in ("seeded", "global"):
            raise ValueError(f"init_missing={init_missing!r}; valid options are ['seeded', 'global']")
        self.path = path
        self.seed = seed
        self.init_missing = init_missing
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "torch_dtype", "attn_implementation")}

    def materialize(self, model: nn.Module, keep: Collection[str], device: torch.device) -> None:
        groups = _tied_names(model)
        _free(model, keep)
        built = set(keep)
        if self.init_missing == "global":
            built |= missing_names(model, self.path)
        loaded = _load_pruned(model, self.path, built, device, self.seed, self.kwargs, self.init_missing)
        for name, tensor in state_names(loaded):
            if name in keep:
                _set(model, name, tensor)
        _retie(model, groups)


def missing_names(model: nn.Module, path: str) -> set[str]:
    """The model's weights a local safetensors checkpoint lacks (tied copies aside: HF ties them, drawing nothing):
    a new head's, with a checkpoint of another head (a causal LM's, whose `lm_head` the model does not take). Empty
    when the checkpoint's keys are not known up front, or when they do not name the model's body (legacy names that
    transformers converts while loading)."""
    files = checkpoint_files(path) if os.path.isdir(path) else None
    if files is None:
        return set()
    base = getattr(model, "base_model_prefix", "")
    names = set(model.state_dict(keep_vars=True))
    present = {_model_name(key, names, base) for key in files} - {None}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = names - present - tied
    if not present or (base and any(n.startswith(f"{base}.") for n in missing)):
        return set()
    return missing


def _cut(model: nn.Module, keep: Collection[str]) -> list[str]:
    """Replace each module holding none of `keep`'s tensors by an empty module (parameter-free modules stay: their
    buffers are recomputed when loading); returns the names of the modules cut."""
    needed = {name.rpartition(".")[0] for name in keep}
    cut = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            fqn = f"{prefix}{name}"
            if any(n == fqn or n.startswith(fqn + ".") for n in needed):
                visit(child, fqn + ".")
            elif any(True for _ in child.parameters()):
                setattr(module, name, nn.Module())
                cut.append(fqn)

    visit(model, "")
    return cut


def _load_pruned(
    skeleton: nn.Module,
    path: str,
    keep: Collection[str],
    device: torch.device,
    seed: int,
    kwargs: dict[str, Any],
    init_missing: str = "seeded",
) -> nn.Module:
    """`from_pretrained` of `skeleton`'s class, config and dtype, on `device`, with every module outside `keep`
    (and the sources of tied weights it needs) cut away before loading; missing weights drawn as `Checkpoint`
    says."""
    cls = type(skeleton)
    tied_sources = {t: s for t, s in (getattr(skeleton, "all_tied_weights_keys", None) or {}).items()}
    keep = set(keep) | {s for t, s in tied_sources.items() if t in keep}
    base = getattr(skeleton, "base_model_prefix", "")
    cut_names: list[str] = []

    def __init__(self, config, *args, **kw):  # noqa: N807
        cls.__init__(self, config, *args, **kw)
        cut_names.extend(_cut(self, keep))
        self.all_tied_weights_keys = {t: s for t, s in self.all_tied_weights_keys.items() if t in keep and s in keep}

    def initialize_weights(self):  # missing weights (HF calls this while loading)
        if init_missing == "seeded":  # as from scratch
            _seeded_init(self, seed, keep)
            return
        # as from_pretrained on one process right after torch.manual_seed(seed): HF's walk, which draws only for
        # the weights not loaded (the others are flagged initialised), in the whole model's order
        devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            cls.initialize_weights(self)

    local = type(cls.__name__, (cls,), {"__init__": __init__, "initialize_weights": initialize_weights})
    local.__module__, local.__qualname__ = cls.__module__, cls.__qualname__
    # keys of the modules cut away belong to other ranks: not "unexpected"
    local._keys_to_ignore_on_load_unexpected = [
        *(cls._keys_to_ignore_on_load_unexpected or []),
        *(rf"^({re.escape(base)}\.)?{re.escape(_strip(n, base))}\." for n in _module_names(skeleton, keep)),
    ]
    dtype = next((p.dtype for p in skeleton.parameters() if p.is_floating_point()), None)
    files = checkpoint_files(path) if os.path.isdir(path) else None
    source: dict[str, Any] = {"pretrained_model_name_or_path": path}
    if files is not None and _maps_by_name(files, skeleton, base):
        # only the files holding this rank's tensors are opened; otherwise transformers maps them all (and renames)
        source = {"pretrained_model_name_or_path": None, "state_dict": _lazy_tensors(path, files, keep, base)}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "subfolder", "cache_dir")}
    mismatched = _mismatched(source.get("state_dict"), skeleton, base)
    if mismatched and not kwargs.get("ignore_mismatched_sizes"):
        raise PipelineConfigError(_mismatch_message(path, cls, mismatched))
    try:
        model, info = local.from_pretrained(
            **source,
            config=skeleton.config,
            dtype=dtype,
            device_map={"": device},
            output_loading_info=True,
            **kwargs,
        )
    except RuntimeError as err:  # transformers refuses other shapes after its renames, its report logged above
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise PipelineConfigError(_mismatch_message(path, cls, ["(see transformers' loading report above)"])) from err
    problems = []
    unclaimed = sorted(info.get("unexpected_keys", ()))  # after the other stages' keys were set aside
    missing = sorted(set(info.get("missing_keys", ())) & set(keep))
    if _saved_class(path) == cls.__name__:  # a checkpoint of this very class: every tensor has its place
        if unclaimed:
            problems.append(
                f"checkpoint {path} holds {len(unclaimed)} tensor(s) no stage of {cls.__name__} takes: "
                f"{unclaimed[:8]}; check that the checkpoint matches the model's config."
            )
        if missing:
            problems.append(
                f"checkpoint {path} lacks {len(missing)} tensor(s) of {cls.__name__} this rank's stages need: "
                f"{missing[:8]}; check that the checkpoint matches the model's config."
            )
    # else: another head's checkpoint (a causal LM's for a classifier): transformers' own report says which
    # weights it left out and which it initialised, as from_pretrained does
    if problems:
        raise PipelineConfigError(problems)
    model.__class__ = cls
    return model


def _mismatch_message(path: str, cls: type, keys: list[str]) -> str:
    return (
        f"checkpoint {path} has tensor(s) of another shape than {cls.__name__}'s: {keys[:8]}; check the config, or "
        "pass ignore_mismatched_sizes=True in model_init_kwargs to initialise them instead."
    )


def _mismatched(tensors: dict[str, Any] | None, model: nn.Module, base: str) -> list[str]:
    """Checkpoint slices whose shape is not the model's tensor's (read from the files' headers, no data)."""
    if not tensors:
        return []
    shapes = {name: tuple(t.shape) for name, t in state_names(model)}
    out = []
    for key, value in tensors.items():
        name = _model_name(key, shapes, base)
        if name is not None and tuple(value.get_shape()) != shapes[name]:
            out.append(f"{key}: {tuple(value.get_shape())} in the checkpoint, {shapes[name]} in the model")
    return sorted(out)


def _saved_class(path: str) -> str | None:
    """The model class a local checkpoint was saved from (its config's first architecture)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return (json.load(f).get("architectures") or [None])[0]
    except (OSError, ValueError):
        return None


def _strip(name: str, base: str) -> str:
    return name[len(base) + 1 :] if base and name.startswith(base + ".") else name


def _module_names(model: nn.Module, keep: Collection[str]) -> list[str]:
    """Names of the modules `_cut` would cut: the largest ones holding parameters, none of them kept."""
    needed = {name.rpartition(".")[0] for name in keep}
    out = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}{name}"
            if any(n == fqn or n.startswith(fqn + ".") for n in needed):
                visit(child, fqn + ".")
            elif any(True for _ in child.parameters()):
                out.append(fqn)

    visit(model, "")
    return out


def _model_name(key: str, names: Collection[str], base: str) -> str | None:
    """The model's name for a checkpoint key saved under the same name, or with / without the base-model prefix."""
    for candidate in (key, f"{base}.{key}" if base else key, _strip(key, base)):
        if candidate in names:
            return candidate
    return None


def _maps_by_name(files: dict[str, str], model: nn.Module, base: str) -> bool:
    """Whether every checkpoint key is a model name (± the base prefix): then the files to open are known up front.
    Other checkpoints (legacy names, fused tensors to convert) go through transformers' loading whole."""
    names = {n for n, _ in state_names(model)}
    return all(_model_name(k, names, base) is not None for k in files)


def _lazy_tensors(path: str, files: dict[str, str], keep: Collection[str], base: str) -> dict[str, Any]:
    """The checkpoint's tensors this rank needs, as safetensors slices read on demand, opening only their files."""
    from safetensors import safe_open

    wanted = {k for k in files if _model_name(k, keep, base) is not None}
    out: dict[str, Any] = {}
    for file in sorted({files[k] for k in wanted}):
        handle = safe_open(os.path.join(path, file), framework="pt")
        out.update({k: handle.get_slice(k) for k in handle.keys() if k in wanted})
    return out
