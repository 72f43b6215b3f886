"""A model id or path given to a TRL trainer over the pipeline: the model TRL would load, built on the meta device
(`loading.skeleton`), each rank then reading only its stages from the checkpoint; weights the checkpoint lacks (a
reward model's new score head) drawn as TRL's `from_pretrained` draws them on one process."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..loading import skeleton


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
    return skeleton(model, kwargs, auto_class, **config_kwargs)


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
