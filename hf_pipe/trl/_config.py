"""What every `Pipe<Name>Config` shares: it is `@dataclass class Pipe<Name>Config(PipeArgumentsMixin, <TRL config>)`,
so every TRL default stays TRL's (and TRL's `__post_init__` runs after the pipeline's checks), and every trainer
checks it the same way before anything is built."""

from __future__ import annotations

from typing import Any


def config_problems(args: Any, config_cls: type, trl_config: type, trainer: str) -> list[str]:
    """The config type a TRL trainer over the pipeline needs (a TypeError), and what every one of them refuses."""
    if not isinstance(args, config_cls):
        raise TypeError(
            f"Pipe{trainer} needs args={config_cls.__name__}(...), got {type(args).__name__}: a "
            f"{trl_config.__name__} with the pipeline settings."
        )
    if not getattr(args, "activation_offloading", False):  # the stable TRL configs have it, the experimental ones not
        return []
    return [
        f"activation_offloading=True: {trainer} offloads the activations of its one forward, which the pipeline's "
        "schedule replaces with a forward per microbatch and stage; set it to False (or use gradient_checkpointing)."
    ]
