"""Mixture-of-experts decoders shaped like Llama: Qwen3-MoE, Qwen2-MoE (shared expert), Mixtral, OLMoE.

Their blocks are Llama's with a sparse MLP (a router picking `num_experts_per_tok` of `num_experts` experts per
token; Qwen2-MoE adds an always-on shared expert behind a sigmoid gate), so the Llama adapter runs them; what differs:

- the cost model counts the experts a token runs (top-k, plus the router and any shared expert), not all of them,
  and the dense blocks some configs keep (`mlp_only_layers`, `decoder_sparse_step`) at their own cost; a stage's
  parameter count (`SplitPlan`) still holds every expert;
- with `output_router_logits=True` the stages carry HF's load-balancing loss statistics (`router_loss.py`).
"""

from __future__ import annotations

from typing import Any

from .base import FlopsPerToken, head_flops, softmax_loss_flops
from .llama import _FULL, _SLIDING, LlamaAdapter


def num_experts(config: Any) -> int:
    """Routed experts per MoE block (`num_experts`; Mixtral's `num_local_experts`)."""
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)


def sparse_layers(config: Any) -> list[bool]:
    """Per block, whether its MLP is the sparse one, as the Qwen MoE blocks decide (`mlp_only_layers`,
    `decoder_sparse_step`); Mixtral and OLMoE route in every block."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    experts = num_experts(config)
    return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(config.num_hidden_layers)]


def mlp_flops(config: Any) -> tuple[float, float]:
    """Forward FLOPs per token of (a sparse MLP, a dense MLP): the router, the top-k experts a token runs and any
    shared expert with its gate; the dense MLP of the blocks that keep one."""
    h = config.hidden_size
    expert = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    sparse = 2.0 * h * num_experts(config) + config.num_experts_per_tok * 2.0 * 3 * h * expert
    shared = getattr(config, "shared_expert_intermediate_size", None) or 0
    if shared:
        sparse += 2.0 * 3 * h * shared + 2.0 * h
    return sparse, 2.0 * 3 * h * config.intermediate_size


class MoeAdapter(LlamaAdapter):
    """Llama's pieces; MoE costs (active experts per token) and router statistics between stages."""

    #: the stages carry HF's load-balancing loss statistics when the model returns router logits
    router_loss = True

    def flops_per_token(self, config, task, seq_len):
        h, v = config.hidden_size, config.vocab_size
        head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
        attention = 2.0 * (h * (q + 2 * kv) + q * h) + 4.0 * seq_len * q
        sparse, dense = mlp_flops(config)
        layers = tuple(attention + (sparse if s else dense) for s in sparse_layers(config))
        head = head_flops(task, config, h, seq_len, lm=2.0 * h * v + softmax_loss_flops(v))
        return FlopsPerToken(embeddings=float(h), layer=max(layers), head=head, first_half=attention, layers=layers)

    def _layer_types(self, config):
        # Qwen2-MoE names each layer's attention; Mixtral and Qwen3-MoE slide every layer when `sliding_window` is
        # set (Qwen3-MoE only with `use_sliding_window`, its config clears the window otherwise); OLMoE never slides
        types = getattr(config, "layer_types", None)
        if types:
            return list(types)
        sliding = getattr(config, "sliding_window", None) is not None
        return [_SLIDING if sliding else _FULL] * config.num_hidden_layers
