"""What hf_pipe needs to know about a model family to split it into stages and run each stage.

An adapter names the modules of the family (embeddings, the list of blocks, the final norm, the heads) and runs the
four pieces of a stage's forward: embed (first stage), per-stage context (masks, positions, rotary tables: rebuilt on
every stage from the batch each rank already holds, so nothing but hidden states travels between stages), one block,
and the head (last stage). Everything else — which blocks a stage owns, sending activations, the schedule — is
shared code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CAUSAL_LM = "causal_lm"
MASKED_LM = "masked_lm"
SEQ_CLS = "seq_cls"
TASKS = (CAUSAL_LM, MASKED_LM, SEQ_CLS)

# Class-name endings that tell which head (and so which loss) a model carries.
_TASK_SUFFIXES = (
    ("ForCausalLM", CAUSAL_LM),
    ("LMHeadModel", CAUSAL_LM),
    ("ForMaskedLM", MASKED_LM),
    ("ForSequenceClassification", SEQ_CLS),
)


def task_of(class_name: str) -> str | None:
    """The training task of a model class (`"GPT2LMHeadModel"` -> `"causal_lm"`), or None for a bare body."""
    for suffix, task in _TASK_SUFFIXES:
        if class_name.endswith(suffix):
            return task
    return None


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token of the pieces of a model; what the `auto` split balances."""

    embeddings: float
    layer: float
    head: float
    #: the first half of a block (attention), for families that can end a stage mid-block; 0: cannot
    first_half: float = 0.0


class FamilyAdapter:
    """How one model family is split and run stage by stage. Subclass it to add a family (see `register_family`)."""

    #: attribute of a head model that holds the body ("transformer" for GPT2LMHeadModel, "model" for Llama).
    base_prefix: str
    #: the `nn.ModuleList` of blocks, relative to the body.
    layers: str
    #: body modules the first stage runs before the blocks, by role.
    embeddings: Mapping[str, str]
    #: body modules the last stage runs after the blocks, by role.
    final: Mapping[str, str] = {}
    #: parameter-free body modules every stage runs (rotary tables).
    shared: Mapping[str, str] = {}
    #: per task, head modules relative to the *root* model, by role.
    heads: Mapping[str, Mapping[str, str]]
    #: the sub-modules of each half of a block (attention, then MLP), for families whose stages may begin mid-block;
    #: `half` runs one of them. Empty: stages begin at whole blocks only.
    halves: tuple[tuple[str, ...], tuple[str, ...]] | tuple[()] = ()
    #: batch keys the pieces consume besides `input_ids` and the labels; any other key in a batch is an error (it
    #: would be dropped silently)
    batch_keys: tuple[str, ...] = ("attention_mask",)
    #: the family's masks take `position_ids`, so a packed batch (positions restarting, no attention mask) attends
    #: within each sequence, and may be cut into microbatches at sequence boundaries
    packed_sequences: bool = False

    def num_layers(self, config: Any) -> int:
        return config.num_hidden_layers

    def flops_per_token(self, config: Any, task: str | None, seq_len: int) -> FlopsPerToken:
        raise NotImplementedError

    # Forward pieces. `parts` maps role -> module for this stage; `batch` holds this microbatch's extra inputs.
    def embed(self, parts: Mapping[str, nn.Module], input_ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def context(self, config: Any, parts: Mapping[str, nn.Module], hidden: torch.Tensor, batch: Mapping[str, Any]):
        raise NotImplementedError

    def layer(self, block: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def half(self, block: nn.Module, part: int, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """Half `part` (0: attention, 1: MLP) of block `index`, residual included, exactly as the block computes it."""
        raise NotImplementedError

    def head(self, parts: Mapping[str, nn.Module], hidden: torch.Tensor, task: str) -> torch.Tensor:
        raise NotImplementedError


#: keyword arguments of HF attention (flash attention's packed-sequence boundaries; linear attention's sequence index)
ATTENTION_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def positions(hidden: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's `position_ids`, or 0..seq-1 as HF builds them when none are given (no KV cache in training)."""
    given = batch.get("position_ids")
    if given is not None:
        return given
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _cache_keyword() -> str:
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


#: "no KV cache" for transformers' mask functions, whose keyword is `cache` from 5.20 on, `past_key_values` before
NO_CACHE: dict[str, None] = {_cache_keyword(): None}


def attention_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's attention keyword arguments, which HF passes from the model's forward down to each attention."""
    return {k: batch[k] for k in ATTENTION_KWARGS if batch.get(k) is not None}


def attention_flops(hidden_size: int, seq_len: int) -> float:
    """Scores and weighted sum, per token: 2·s·h each."""
    return 4.0 * seq_len * hidden_size


def softmax_loss_flops(vocab_size: int) -> float:
    """Cross-entropy over the vocabulary per token (exp, sum, log, gather): a few operations per logit."""
    return 4.0 * vocab_size
