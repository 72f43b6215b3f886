"""What `PipeTrainer(model=...)` accepts, and where each rank's weights then come from.

- a checkpoint folder or hub id (as TRL's trainers take a model id), with `model_init_kwargs` as `from_pretrained`
  takes them: every rank builds the model's skeleton on the meta device and reads only its stages' tensors;
- a model on the meta device (`torch.device("meta")`, accelerate's `init_empty_weights`): read the same way from
  `pipeline_checkpoint`, or, without one, initialised from scratch, the same for every pipeline layout;
- a fully built model, as Trainer takes it: every rank holds it whole at start-up and frees what it does not run;
- a PEFT model of any of those: its stages are cut from the model it wraps (`integrations/peft.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .errors import PipelineConfigError, raise_if_any
from .integrations.peft import AdapterWeights, is_peft_model, peft_problems, stage_model
from .weights import Checkpoint, Initialise, Resident, checkpoint_files, has_meta_tensors, weights_problems

logger = logging.getLogger(__name__)

_hinted: list[bool] = []  # the memory hint, once per process

#: from_pretrained arguments that say where the files are, not how to build the model
_HUB_KWARGS = ("revision", "trust_remote_code", "subfolder", "cache_dir", "token", "local_files_only")


def model_and_weights(model: str | nn.Module, args: Any, init_missing: str = "seeded") -> tuple[nn.Module, Any]:
    """The model PipeTrainer holds (for a path: its skeleton) and the weight source of this rank's stages;
    `init_missing`: how a checkpoint's missing weights are drawn (`weights.Checkpoint`)."""
    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})  # a config without the field: none
    if isinstance(model, str):
        return skeleton(model, kwargs), Checkpoint(model, seed=args.seed, init_missing=init_missing, **kwargs)
    if is_peft_model(model):  # the stages are cut from the wrapped model, adapters injected
        staged = stage_model(model)
        raise_if_any(peft_problems(model, on_meta=has_meta_tensors(staged)))
        _, weights = model_and_weights(staged, args, init_missing)
        return model, (AdapterWeights(weights, model, args.seed) if has_meta_tensors(staged) else weights)
    if has_meta_tensors(model):
        raise_if_any(weights_problems(model, Initialise(args.seed)))  # partly on meta
        if args.pipeline_checkpoint:
            return model, Checkpoint(args.pipeline_checkpoint, seed=args.seed, init_missing=init_missing, **kwargs)
        named = getattr(getattr(model, "config", None), "_name_or_path", "")
        if named and os.path.isdir(named) and checkpoint_files(named):
            logger.warning(
                "%s is on the meta device and pipeline_checkpoint is unset: initialising it from scratch. Its "
                "config names %s, which holds weights: set pipeline_checkpoint=%r to train from those.",
                type(model).__name__, named, named,
            )  # fmt: skip
        return model, Initialise(args.seed)
    if args.process_index == 0 and not _hinted:
        _hinted.append(True)
        logger.warning(
            "hf_pipe: every rank holds the whole model at start-up; PipeTrainer(model='<checkpoint path>') or a "
            "model built on the meta device lets each rank read only its own stages."
        )
    return model, Resident()


def skeleton(path: str, kwargs: dict[str, Any], auto_class: Any = None, **config_kwargs: Any) -> nn.Module:
    """The model `from_pretrained(path, **kwargs)` would build — its class, config, dtype and attention — on the
    meta device: no weights allocated. With `auto_class` (e.g. `AutoModelForSequenceClassification`), the model
    `auto_class.from_pretrained(path, **config_kwargs)` would build instead (a reward model from a causal LM's
    checkpoint: the new head is initialised when the stages are read)."""
    import transformers
    from transformers import AutoConfig, GenerationConfig

    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = AutoConfig.from_pretrained(path, **hub, **config_kwargs)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if auto_class is not None:
        cls = auto_class._model_mapping.get(type(config), None)
    if cls is None:
        raise PipelineConfigError(
            f"the config at {path!r} names no {getattr(auto_class, '__name__', 'transformers')} model class "
            f"(architectures={architectures}); load the "
            "model yourself on the meta device (with torch.device('meta'): model = AutoModelFor...from_config(config)) "
            "and pass it with pipeline_checkpoint."
        )
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
    if dtype == "auto":  # as from_pretrained resolves it: the config's, else the default
        dtype = getattr(config, "dtype", None) or torch.get_default_dtype()
    build = {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    if kwargs.get("attn_implementation") is not None:
        build["attn_implementation"] = kwargs["attn_implementation"]
    with torch.device("meta"):
        model = cls._from_config(config, **build)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path, **hub)
    except OSError:
        pass  # no generation_config.json: the one made from the config stays
    return model
