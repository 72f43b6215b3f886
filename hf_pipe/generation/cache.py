"""A stage's KV cache: transformers' `DynamicCache`, holding only the layers the stage runs.

Each rank keeps one cache per stage and per group of sequences in flight. The layers keep their model-wide index (the
attention modules update `cache.layers[self.layer_idx]`), so the cache has a slot for every layer of the model, but
only this stage's are ever filled. What HF asks a cache about the whole model — how many tokens it has seen, the
mask sizes of "the first full-attention layer" — is answered from a layer this stage holds, of the same kind
(full or sliding), which has seen exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import DynamicCache


class StageCache(DynamicCache):
    """The KV cache of one stage: `layers` are the model-wide indices of the blocks whose attention it runs."""

    def __init__(self, config: Any, layers: Sequence[int]):
        super().__init__(config=config)
        self.local = list(layers)

    def _held(self, layer_idx: int) -> int:
        """`layer_idx` if this stage runs it, else the first layer it runs of the same kind (full or sliding)."""
        if layer_idx in self.local or not self.local:
            return layer_idx
        sliding = self.is_sliding[layer_idx] if layer_idx < len(self.layers) else False
        return next((i for i in self.local if self.is_sliding[i] == sliding), self.local[0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._held(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._held(layer_idx))
