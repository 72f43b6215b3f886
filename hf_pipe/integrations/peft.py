"""PEFT adapters under the pipeline.

A `PeftModel` (LoRA, DoRA, IA3, ... — the methods that add modules or wrap layers) is pipelined through the model it
wraps, `peft_model.base_model.model`: the same module tree with the adapter layers injected, so every family adapter
and the trace frontend split it as they split the plain model, and only the adapter's parameters are trainable and in
the optimizer. Prompt-learning methods (prefix / prompt tuning) change the model's inputs and are refused.

- Saving writes what `PeftModel.save_pretrained` writes — `adapter_config.json` and `adapter_model.safetensors`, keys
  exactly as PEFT names them — from the adapter tensors of every rank, gathered to the first; resuming reads them back
  rank by rank. `PeftModel.from_pretrained(base, dir)` loads the result on one device.
- A `PeftModel` built on a skeleton on the meta device (`get_peft_model(<meta model>, config)`) gets its base weights
  from the checkpoint (or initialised from scratch) as any skeleton does, each rank its stages only, and its adapter
  weights initialised as PEFT initialises them, each layer's random numbers seeded by its name: the same values
  whatever the layout. `initialize_adapters(peft_model, seed)` gives a whole model on one process the same adapters.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..weights import _module_seed, _retie, _set, _tied_names, state_names

ADAPTER_FILE = "adapter_model.safetensors"
#: LoRA initialisations that only draw random numbers (the others read or rewrite the base weights whole)
_RANDOM_LORA_INITS = (True, False, "gaussian")


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def stage_model(model: nn.Module) -> nn.Module:
    """The model whose modules the stages are cut from: a PeftModel's wrapped model, with the adapters injected."""
    return model.base_model.model if is_peft_model(model) else model


def _config(peft_model: Any) -> Any:
    return peft_model.peft_config[peft_model.active_adapter]


def peft_problems(peft_model: Any, on_meta: bool) -> list[str]:
    """PEFT set-ups the pipeline cannot train as PEFT would, each with the fix."""
    config = _config(peft_model)
    if config.is_prompt_learning:
        return [
            f"peft_type={config.peft_type.value}: prompt-learning methods change the model's inputs and attention "
            "(virtual tokens, past key values), which the pipeline's stages do not take; use a method that adds "
            "modules or wraps layers (LoRA, DoRA, IA3, ...)."
        ]
    problems = []
    if len(peft_model.peft_config) > 1:
        problems.append(
            f"the PeftModel holds {len(peft_model.peft_config)} adapters ({', '.join(peft_model.peft_config)}): "
            "PipeTrainer trains and saves one; delete the others (peft_model.delete_adapter) first."
        )
    kind = config.peft_type.value
    if on_meta and kind not in ("LORA", "IA3"):
        problems.append(
            f"peft_type={kind} on a model on the meta device: hf_pipe initialises the adapters of LoRA (and DoRA) "
            "and IA3 there; build this PeftModel on a fully built model instead."
        )
    if on_meta and kind == "LORA" and config.init_lora_weights not in _RANDOM_LORA_INITS:
        problems.append(
            f"init_lora_weights={config.init_lora_weights!r} on a model on the meta device: that initialisation "
            "reads (or rewrites) each base weight whole; build this PeftModel on a fully built model, or use "
            "init_lora_weights=True or 'gaussian'."
        )
    return problems


def _is_adapter(name: str, prefix: str) -> bool:
    return any(part.startswith(prefix) for part in name.split("."))


def base_name(name: str, adapter: str, prefix: str) -> str | None:
    """The name a base tensor of the PEFT-injected model has in the plain model (None: an adapter's own tensor):
    `q_proj.base_layer.weight` is `q_proj.weight`, `lm_head.modules_to_save.default.weight` a copy of `lm_head.weight`."""
    if _is_adapter(name, prefix):
        return None
    parts, out, i = name.split("."), [], 0
    while i < len(parts):
        if parts[i] in ("base_layer", "original_module"):
            i += 1
        elif parts[i] == "modules_to_save" and i + 1 < len(parts) and parts[i + 1] == adapter:
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


class AdapterWeights:
    """The weight source of a PeftModel on the meta device: base tensors from `base` (a checkpoint, or from scratch)
    loaded into a plain copy of the model and moved in under their PEFT names, adapters initialised as PEFT would."""

    def __init__(self, base: Any, peft_model: Any, seed: int):
        self.base = base
        self.peft_model = peft_model
        self.seed = seed

    def materialize(self, model: nn.Module, keep: Collection[str], device: torch.device) -> None:
        adapter, prefix = self.peft_model.active_adapter, self.peft_model.base_model.prefix
        groups = _tied_names(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        with torch.device("meta"):
            plain = type(model)._from_config(model.config, dtype=dtype)
        names = {name: base_name(name, adapter, prefix) for name in keep}
        self.base.materialize(plain, {b for b in names.values() if b is not None}, device)
        loaded = dict(state_names(plain))
        current = dict(state_names(model))
        for name, base in names.items():
            if base is None:
                continue
            value = loaded[base]
            copy = ".modules_to_save." in f".{name}"  # a trainable copy, not the base weight itself
            if isinstance(current[name], nn.Parameter):
                value = nn.Parameter(value.detach().clone() if copy else value.detach(), current[name].requires_grad)
            _set(model, name, value)
        _retie(model, groups)
        for name in (n for n, b in names.items() if b is None):
            tensor = current[name]
            _set(model, name, nn.Parameter(torch.empty_like(tensor, device=device), tensor.requires_grad))
        init_adapter_layers(model, self.peft_model, self.seed, keep)


def _adapter_layers(model: nn.Module, names: Collection[str] | None) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and (names is None or any(n.startswith(name + ".") for n in names)):
            yield name, module


@torch.no_grad()
def init_adapter_layers(model: nn.Module, peft_model: Any, seed: int, names: Collection[str] | None = None) -> None:
    """PEFT's own initialisation of each adapter layer of `model` (the injected model), its random numbers seeded
    by `seed` and the layer's name; `names`: only the layers holding one of these tensors."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    adapter, config = peft_model.active_adapter, _config(peft_model)
    devices = sorted({t.device.index or 0 for _, t in state_names(model) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        for name, layer in _adapter_layers(model, names):
            torch.manual_seed(_module_seed(seed, name))
            if isinstance(layer, LoraLayer):
                if config.init_lora_weights is False:  # nn.Linear's own initialisation, as PEFT leaves it
                    layer.lora_A[adapter].reset_parameters()
                    layer.lora_B[adapter].reset_parameters()
                else:
                    layer.reset_lora_parameters(adapter, config.init_lora_weights)
                if adapter in layer.lora_variant:  # DoRA: the magnitude, from the base weight now loaded
                    layer.lora_variant[adapter].init(layer, adapter_name=adapter, config=config)
            elif isinstance(layer, IA3Layer):
                layer.reset_ia3_parameters(adapter)


def initialize_adapters(peft_model: Any, seed: int) -> None:
    """The adapter weights PipeTrainer gives a PeftModel built on the meta device, for a whole PeftModel on one
    process (the reference of such a run).

    Example:
        >>> peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(...))
        >>> hf_pipe.integrations.peft.initialize_adapters(peft_model, seed=args.seed)
    """
    init_adapter_layers(stage_model(peft_model), peft_model, seed)


# -- saving and loading ------------------------------------------------------------------------------------------
def saved_keys(peft_model: Any, local: Collection[str]) -> dict[str, str]:
    """For each of this rank's tensor names (stage-model names) that PEFT saves, the key it saves it under.

    PEFT picks and renames them from the whole model's state dict (other ranks' tensors are on meta there)."""
    from peft import get_peft_model_state_dict

    names: dict[int, list[str]] = {}
    for name, tensor in stage_model(peft_model).state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    full = {
        "base_model.model." + name: tensor
        for name, tensor in stage_model(peft_model).state_dict(keep_vars=True).items()
    }
    saved = get_peft_model_state_dict(peft_model, state_dict=full, save_embedding_layers="auto")
    key_of = {name: key for key, tensor in saved.items() for name in names.get(id(tensor), [])}
    return {name: key_of[name] for name in local if name in key_of}


def save_adapter(peft_model: Any, local: dict[str, torch.Tensor], output_dir: str, group: Any) -> None:
    """Write the adapter as `PeftModel.save_pretrained` does, from every rank's `local` tensors (stage-model name
    -> tensor), gathered to the group's first rank. Collective over `group`."""
    keys = saved_keys(peft_model, local)
    mine = {"base_model.model." + name: local[name].detach().to("cpu").contiguous() for name in keys}
    gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if dist.get_rank(group) == 0:
        merged = {k: v for part in gathered for k, v in (part or {}).items()}
        os.makedirs(output_dir, exist_ok=True)
        peft_model.save_pretrained(output_dir, state_dict=merged, save_embedding_layers="auto")
    dist.barrier(group=group)


def read_adapter(checkpoint: str, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors (stage-model name -> tensor) from a saved adapter; `keys` from `saved_keys`."""
    from safetensors import safe_open

    with safe_open(os.path.join(checkpoint, ADAPTER_FILE), "pt") as f:
        return {name: f.get_tensor(key) for name, key in keys.items()}
