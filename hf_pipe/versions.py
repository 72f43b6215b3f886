"""The torch release hf_pipe runs on (pyproject.toml allows torch >= 2.11), for the few places that differ by it."""

from __future__ import annotations

import torch


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the installed torch is `major.minor` or later (local builds such as `2.11.0+cu130` included)."""
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (major, minor)
