"""TRL's `num_tokens` under the pipeline, which every TRL trainer logs."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def count_train_tokens(trainer: Any, tokens: Any) -> None:
    """TRL's `num_tokens`: the batch's tokens summed over the pipeline replicas (a pipeline's ranks share a batch)."""
    count = torch.as_tensor(tokens, device=trainer.engine.device, dtype=torch.long)
    if trainer._dp_size > 1:
        dist.all_reduce(count, group=trainer.data_parallel.group)
    trainer._total_train_tokens += int(count)
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]
