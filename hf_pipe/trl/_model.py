"""A model id or path given to a TRL trainer over the pipeline: the model TRL would load, built on the meta device
(`loading.skeleton`), each rank then reading only its stages from the checkpoint; weights the checkpoint lacks (a
reward model's new score head) and the LoRA adapters of a `peft_config` drawn as TRL draws them on one process
(`set_seed(args.seed)`, `from_pretrained`, `get_peft_model`, all from the global generator)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..integrations.peft import is_peft_model
from ..loading import skeleton
from ..weights import missing_names


def model_for(trainer: Any, model: Any, args: Any, auto_class: Any = None, **config_kwargs: Any) -> Any:
    """`model` as `trainer` (a TRL trainer over the pipeline, before its `__init__`) runs it: a built model as it
    is; a model id or path as TRL's `create_model_from_path` would build it (`args.model_init_kwargs`, TRL's float32
    default dtype, `auto_class` with `config_kwargs`), on the meta device, read from that path."""
    if not isinstance(model, str):
        return model
    args.pipeline_checkpoint = args.pipeline_checkpoint or model
    # TRL draws missing weights right after set_seed(args.seed), from the global generator (weights.Checkpoint)
    trainer._init_missing = "global"
    kwargs = dict(args.model_init_kwargs or {})
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.float32  # TRL's default, where from_pretrained's is the checkpoint's ("auto")
    built = skeleton(model, kwargs, auto_class, **config_kwargs)
    trainer._path_skeleton = copy.deepcopy(built)  # on the meta device: no weights copied (`replay_adapter_draws`)
    return built


@torch.no_grad()
def replay_adapter_draws(trainer: Any) -> None:
    """The LoRA weights TRL draws for a model path, in this rank's stages (call it once the trainer is built).

    TRL seeds (`set_seed(args.seed)`), loads the path — drawing the weights the checkpoint lacks, a reward model's
    score head — and calls `get_peft_model`, whose LoRA inits draw from the global generator in module order. TRL's
    call ran here on the meta skeleton, where the draws were lost (the stages' adapters were then initialised seeded
    per layer): the draws are replayed on the skeleton kept before TRL wrapped it (`trainer._path_skeleton`), its
    loaded weights zero-stride CPU tensors flagged as loaded (no memory, no draws) and its missing ones real, and
    this rank's stages take the adapters they hold."""
    from peft import PeftType, get_peft_model

    shadow = trainer.__dict__.pop("_path_skeleton", None)
    if shadow is None or not is_peft_model(trainer.model):
        return
    config = trainer.model.peft_config[trainer.model.active_adapter]
    if config.peft_type != PeftType.LORA or config.init_lora_weights not in (True, False, "gaussian"):
        return  # no random draws to replay, or inits computed from the base weights (PiSSA, OLoRA, ...)
    missing = set()
    if getattr(trainer, "_init_missing", "seeded") == "global" and trainer.args.pipeline_checkpoint:
        missing = missing_names(shadow, trainer.args.pipeline_checkpoint)
    for name, param in list(shadow.named_parameters()):
        if param.is_meta:
            module_name, _, leaf = name.rpartition(".")
            module = shadow.get_submodule(module_name)
            loaded = name not in missing
            shape_only = torch.zeros((), dtype=param.dtype).expand(param.shape)
            value = nn.Parameter(shape_only if loaded else torch.zeros(param.shape, dtype=param.dtype), False)
            value._is_hf_initialized = loaded  # loaded from the checkpoint: from_pretrained draws nothing for it
            setattr(module, leaf, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trainer.args.seed)
        if missing:
            shadow.initialize_weights()  # the draws from_pretrained makes for the weights the checkpoint lacks
        drawn = dict(get_peft_model(shadow, copy.deepcopy(config)).base_model.model.named_parameters())
    for name, param in trainer.engine.named_parameters():
        if ".lora_" in name and ".lora_magnitude_vector." not in name:  # DoRA's magnitude: from the base weight
            param.copy_(drawn[name])


@contextlib.contextmanager
def path_given(trl_trainer: type, model: Any) -> Iterator[None]:
    """While TRL's `__init__` runs on the skeleton of a path: without its warning that `model_init_kwargs` are
    ignored for an instantiated model (the skeleton was built with them, the stages are read with them)."""
    if not isinstance(model, str):
        yield
        return
    trl_logger = logging.getLogger(trl_trainer.__module__)  # accelerate's get_logger logs through it
    quiet = _Drop("You passed `model_init_kwargs`")
    trl_logger.addFilter(quiet)
    try:
        yield
    finally:
        trl_logger.removeFilter(quiet)


class _Drop(logging.Filter):
    """Drops the records whose message holds `text` (accelerate may prefix it: "[RANK 0] "); every other passes."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def route_router_logits(model: Any, args: Any) -> None:
    """TRL's switch of an MoE model's router logits (SFT sets it on the config after the model is set up, DPO passes
    `output_router_logits=True` to each forward): on with a non-zero `router_aux_loss_coef` (the config's own when
    unset), off with zero. The pipeline's stages are cut before that, so they must see it on the config first."""
    config = getattr(model, "config", None)
    if config is None:
        return
    text = config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    if hasattr(text, "output_router_logits") and hasattr(text, "router_aux_loss_coef"):
        text.output_router_logits = coef != 0.0
        text.router_aux_loss_coef = coef
