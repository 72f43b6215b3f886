"""What hf_pipe needs to know about an encoder-decoder family (T5, BART) to split it and run its stages.

An encoder-decoder is two stacks of blocks: the encoder runs over the source, the decoder over the target and reads
the encoder's output in every block (cross-attention). The stages of such a model split one list, the encoder's
blocks then the decoder's (`frontends/seq2seq.py`). An adapter names the modules of each piece by role — the
encoder's embeddings and final norm, the decoder's, the head, and modules every stage of a stack needs (T5's relative
position bias, held by the stack's first block and used by all of them) — and runs the pieces: embed, per-stage
context (masks and position biases, rebuilt on every stage from the batch each rank holds), one block, the end of the
encoder, the head. Paths are from the root model (`encoder.block`, `model.decoder.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import SEQ2SEQ_LM, FamilyAdapter, FlopsPerToken, attention_flops, softmax_loss_flops


@dataclass(frozen=True)
class Seq2SeqFlops:
    """Forward FLOPs per *sequence* (a source of `source_len` tokens and a target of `target_len`) of the pieces:
    what the `auto` split balances. A decoder block costs more than an encoder block (cross-attention: its keys and
    values over the source, its scores over source × target)."""

    encoder_layer: float
    decoder_layer: float
    encoder_embeddings: float
    decoder_embeddings: float
    head: float


@dataclass(frozen=True)
class Dims:
    """The sizes the FLOP estimate needs."""

    hidden: int
    attention: int  # heads × head size
    ffn: int
    ffn_matrices: int  # 2, or 3 for a gated FFN (T5 v1.1's gated-gelu)
    vocab: int


class Seq2SeqAdapter(FamilyAdapter):
    """How an encoder-decoder family is split and run stage by stage (see the module docstring).

    Subclass it and register it with `register_family`, like a decoder's adapter; `frontend = "seq2seq"` makes
    `pipeline_frontend="auto"` build its stages with the encoder-decoder frontend.
    """

    frontend = "seq2seq"
    base_prefix = ""  # the decoder-only roles of FamilyAdapter: unused, paths are from the root model
    layers = ""
    embeddings: Mapping[str, str] = {}
    #: the block lists, from the root model
    encoder_layers: str
    decoder_layers: str
    #: the encoder and decoder stacks (for their configs and attributes), from the root model
    encoder: str
    decoder: str
    #: modules by role (role names unique over every mapping), from the root model
    encoder_embeddings: Mapping[str, str]
    encoder_final: Mapping[str, str] = {}
    decoder_embeddings: Mapping[str, str]
    decoder_final: Mapping[str, str] = {}
    #: modules every stage holding a block of that stack runs, owned by one of its blocks (T5's relative position
    #: bias of block 0): a weight shared by those stages, its gradients summed over the ranks holding it
    encoder_shared: Mapping[str, str] = {}
    decoder_shared: Mapping[str, str] = {}
    heads = {SEQ2SEQ_LM: {"lm_head": "lm_head"}}
    #: buffers of the root model the head reads (BART's `final_logits_bias`)
    head_buffers: tuple[str, ...] = ()
    batch_keys = ("attention_mask", "decoder_input_ids", "decoder_attention_mask")

    # -- shape --------------------------------------------------------------------------------------------------
    def num_encoder_layers(self, config: Any) -> int:
        raise NotImplementedError

    def num_decoder_layers(self, config: Any) -> int:
        raise NotImplementedError

    def num_layers(self, config: Any) -> int:
        return self.num_encoder_layers(config) + self.num_decoder_layers(config)

    def dims(self, config: Any, decoder: bool) -> Dims:
        """The sizes of the encoder's (or the decoder's) blocks."""
        raise NotImplementedError

    def flops_per_token(self, config: Any, task: str | None, seq_len: int) -> FlopsPerToken:
        """Per target token with source and target of `seq_len` (what `hf-pipe plan` shows of the head); the split
        itself balances `seq2seq_flops`, per sequence."""
        flops = self.seq2seq_flops(config, seq_len, seq_len)
        return FlopsPerToken(flops.encoder_embeddings / seq_len, flops.decoder_layer / seq_len, flops.head / seq_len)

    def seq2seq_flops(self, config: Any, source_len: int, target_len: int) -> Seq2SeqFlops:
        e, d = self.dims(config, False), self.dims(config, True)
        s, t = source_len, target_len

        def self_attention_and_ffn(dims: Dims, length: int) -> float:
            projections = 2.0 * 4 * dims.hidden * dims.attention  # q, k, v, o
            return (
                projections
                + attention_flops(dims.attention, length)
                + 2.0 * dims.ffn_matrices * dims.hidden * dims.ffn
            )

        encoder = s * self_attention_and_ffn(e, s)
        # cross-attention: q and o over the target, k and v over the source, scores and weighted sum target × source
        cross = (
            t * (2.0 * 2 * d.hidden * d.attention + attention_flops(d.attention, s))
            + s * 2.0 * 2 * d.hidden * d.attention
        )
        decoder = t * self_attention_and_ffn(d, t) + cross
        head = t * (2.0 * d.hidden * d.vocab + softmax_loss_flops(d.vocab))
        return Seq2SeqFlops(encoder, decoder, float(s * e.hidden), float(t * d.hidden), head)

    # -- forward pieces: `parts` maps role -> module for this stage, `stack` is the encoder or decoder module -------
    def decoder_input_ids(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's input for `labels`, as the model derives it when none is given (labels shifted right)."""
        return model.prepare_decoder_input_ids_from_labels(labels)

    def encoder_embed(
        self, stack: nn.Module, parts: Mapping[str, nn.Module], input_ids: torch.Tensor, training: bool
    ) -> torch.Tensor:
        raise NotImplementedError

    def encoder_context(self, stack: nn.Module, parts: Mapping[str, nn.Module], hidden: torch.Tensor, batch) -> Any:
        raise NotImplementedError

    def encoder_layer(self, stack: nn.Module, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def encoder_end(self, stack: nn.Module, parts: Mapping[str, nn.Module], hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's output from its last block's: what every decoder block attends to."""
        raise NotImplementedError

    def decoder_embed(
        self,
        stack: nn.Module,
        parts: Mapping[str, nn.Module],
        decoder_input_ids: torch.Tensor,
        training: bool,
        past: int = 0,
    ) -> torch.Tensor:
        """The decoder's input embeddings; `past`: tokens the stage's KV cache holds already (generation), where
        learned positions start."""
        raise NotImplementedError

    def decoder_context(
        self, stack: nn.Module, parts: Mapping[str, nn.Module], hidden: torch.Tensor, encoder_output, batch
    ) -> Any:
        """Masks and biases of the stage's decoder blocks; in generation `batch[CACHE]` is the stage's
        `EncoderDecoderCache` (`generation/cache.py`), which the context carries to the blocks."""
        raise NotImplementedError

    def decoder_layer(
        self, stack: nn.Module, block: nn.Module, hidden: torch.Tensor, encoder_output: torch.Tensor, context: Any
    ) -> torch.Tensor:
        raise NotImplementedError

    def seq2seq_head(
        self, model_config: Any, stack: nn.Module, parts: Mapping[str, nn.Module], hidden: torch.Tensor, buffers
    ) -> torch.Tensor:
        """The decoder's final norm and the LM head: the logits. `buffers` maps each `head_buffers` name to it."""
        raise NotImplementedError


def layer_dropped(stack: nn.Module, training: bool) -> bool:
    """BART-style LayerDrop: skip this block with probability `stack.layerdrop` in training (drawn as HF draws it)."""
    layerdrop = getattr(stack, "layerdrop", 0.0)
    return training and layerdrop > 0.0 and bool(torch.rand([]) < layerdrop)
