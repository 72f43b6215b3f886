"""Llama and the decoders shaped like it (Mistral, Qwen2, Qwen3): RoPE, GQA, optional sliding windows."""

from __future__ import annotations

from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .base import (
    ATTENTION_KWARGS,
    CAUSAL_LM,
    QUESTION_ANSWERING,
    SEQ_CLS,
    TOKEN_CLS,
    FamilyAdapter,
    FlopsPerToken,
    attention_flops,
    attention_kwargs,
    head_flops,
    kv_cache,
    pool_last_token,
    positions,
    softmax_loss_flops,
    span_logits,
)

_FULL, _SLIDING = "full_attention", "sliding_attention"


class LlamaAdapter(FamilyAdapter):
    base_prefix = "model"
    layers = "layers"
    embeddings = {"embed_tokens": "embed_tokens"}
    final = {"norm": "norm"}
    shared = {"rotary_emb": "rotary_emb"}
    heads = {
        CAUSAL_LM: {"lm_head": "lm_head"},
        SEQ_CLS: {"score": "score"},
        TOKEN_CLS: {"dropout": "dropout", "score": "score"},
        QUESTION_ANSWERING: {"qa_outputs": "qa_outputs"},
    }
    pools_last_token = (SEQ_CLS,)
    halves = (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))
    batch_keys = ("attention_mask", "position_ids", *ATTENTION_KWARGS)
    packed_sequences = True

    def flops_per_token(self, config, task, seq_len):
        h, v, inner = config.hidden_size, config.vocab_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
        attention = 2.0 * (h * (q + 2 * kv) + q * h) + attention_flops(q, seq_len)
        layer = attention + 2.0 * 3 * h * inner
        head = head_flops(task, config, h, seq_len, lm=2.0 * h * v + softmax_loss_flops(v))
        return FlopsPerToken(embeddings=float(h), layer=layer, head=head, first_half=attention)

    def _layer_types(self, config):
        # Qwen2/Qwen3 name each layer's attention; Mistral slides every layer when `sliding_window` is set.
        types = getattr(config, "layer_types", None)
        if types:
            return list(types)
        sliding = getattr(config, "sliding_window", None) is not None and config.model_type == "mistral"
        return [_SLIDING if sliding else _FULL] * config.num_hidden_layers

    def embed(self, parts, input_ids, batch):
        return parts["embed_tokens"](input_ids)

    def context(self, config, parts, hidden, batch):
        position_ids = positions(hidden, batch)
        kwargs = dict(
            config=config,
            inputs_embeds=hidden,
            attention_mask=batch.get("attention_mask"),
            **kv_cache(batch),
            position_ids=position_ids,
        )
        types = self._layer_types(config)
        masks = {_FULL: create_causal_mask(**kwargs) if _FULL in types else None}
        if _SLIDING in types:
            masks[_SLIDING] = create_sliding_window_causal_mask(**kwargs)
        rotary = parts["rotary_emb"](hidden, position_ids=position_ids)
        return [masks[t] for t in types], rotary, position_ids, attention_kwargs(batch)

    def layer(self, block, index, hidden, context):
        masks, rotary, position_ids, kwargs = context
        return block(
            hidden, attention_mask=masks[index], position_embeddings=rotary, position_ids=position_ids, **kwargs
        )

    def half(self, block, part, index, hidden, context):
        # LlamaDecoderLayer.forward, one residual branch at a time
        masks, rotary, position_ids, kwargs = context
        if part == 0:
            attention, _ = block.self_attn(
                hidden_states=block.input_layernorm(hidden),
                attention_mask=masks[index],
                position_ids=position_ids,
                position_embeddings=rotary,
                **kwargs,
            )
            return hidden + attention
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def head(self, parts, hidden, task, batch):
        hidden = parts["norm"](hidden)
        if task == CAUSAL_LM:
            return parts["lm_head"](hidden)
        if task == SEQ_CLS:  # scored on every token, then pooled at the last non-padding one, as HF does
            return pool_last_token(parts["score"](hidden), batch)
        if task == TOKEN_CLS:
            return parts["score"](parts["dropout"](hidden))
        return span_logits(parts["qa_outputs"](hidden))
