"""T5 (v1.0 and v1.1 / gated-gelu) and mT5: relative position biases, one shared embedding for both stacks and the
head (v1.0 scales the decoder's output before a tied head; v1.1 checkpoints load with an untied one).

Each stack's position bias comes from its block 0's `relative_attention_bias`, which every block of the stack uses:
a stage that holds blocks of a stack but not its block 0 computes the bias itself from that weight (shared with the
stage holding block 0, like a tied weight). Cross-attention has no bias (zeros, as each block makes them).
"""

from __future__ import annotations

from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import CACHE, CACHE_KEYWORD, NO_CACHE
from .seq2seq import Dims, Seq2SeqAdapter

_BIAS = "layer.0.SelfAttention.relative_attention_bias"


class T5Adapter(Seq2SeqAdapter):
    encoder = "encoder"
    decoder = "decoder"
    encoder_layers = "encoder.block"
    decoder_layers = "decoder.block"
    # `shared` is the one embedding of both stacks and the head; named here so that it is saved even untied
    encoder_embeddings = {
        "shared": "shared",
        "enc_embed_tokens": "encoder.embed_tokens",
        "enc_dropout": "encoder.dropout",
    }
    encoder_final = {"enc_final_layer_norm": "encoder.final_layer_norm", "enc_final_dropout": "encoder.dropout"}
    decoder_embeddings = {"dec_embed_tokens": "decoder.embed_tokens", "dec_dropout": "decoder.dropout"}
    decoder_final = {"dec_final_layer_norm": "decoder.final_layer_norm", "dec_final_dropout": "decoder.dropout"}
    encoder_shared = {"enc_relative_bias": f"encoder.block.0.{_BIAS}"}
    decoder_shared = {"dec_relative_bias": f"decoder.block.0.{_BIAS}"}

    def num_encoder_layers(self, config):
        return config.num_layers

    def num_decoder_layers(self, config):
        return config.num_decoder_layers

    def dims(self, config, decoder):
        gated = getattr(config, "is_gated_act", config.feed_forward_proj.startswith("gated"))
        return Dims(config.d_model, config.num_heads * config.d_kv, config.d_ff, 3 if gated else 2, config.vocab_size)

    @staticmethod
    def _bias(stack, hidden, length):
        # block 0's own computation (T5Attention.compute_bias), from the shared relative_attention_bias
        return stack.block[0].layer[0].SelfAttention.compute_bias(length, length, device=hidden.device)

    def encoder_embed(self, stack, parts, input_ids, training):
        return parts["enc_dropout"](parts["enc_embed_tokens"](input_ids))

    def encoder_context(self, stack, parts, hidden, batch):
        mask = create_bidirectional_mask(
            config=stack.config, inputs_embeds=hidden, attention_mask=batch.get("attention_mask")
        )
        return mask, self._bias(stack, hidden, hidden.shape[1])

    def encoder_layer(self, stack, block, hidden, context):
        mask, bias = context
        return block(hidden, mask, bias, None, None, None, **NO_CACHE)[0]

    def encoder_end(self, stack, parts, hidden):
        return parts["enc_final_dropout"](parts["enc_final_layer_norm"](hidden))

    def decoder_embed(self, stack, parts, decoder_input_ids, training, past=0):
        return parts["dec_dropout"](parts["dec_embed_tokens"](decoder_input_ids))

    def decoder_context(self, stack, parts, hidden, encoder_output, batch):
        config = stack.config
        cache = batch.get(CACHE)  # generation: the stage's EncoderDecoderCache
        own = cache.self_attention_cache if cache is not None else None
        mask = create_causal_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=batch.get("decoder_attention_mask"),
            **{CACHE_KEYWORD: own},
        )
        cross_mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=batch.get("attention_mask"),
            encoder_hidden_states=encoder_output,
        )
        length = hidden.shape[1]
        if own is None:
            bias = self._bias(stack, hidden, length)
        else:  # as block 0 computes it with a cache: the new queries against every key seen so far
            past = own.get_seq_length()
            attention = stack.block[0].layer[0].SelfAttention
            bias = attention.compute_bias(length, past + length, device=hidden.device, past_seen_tokens=past)
        return mask, bias, cross_mask, cache

    def decoder_layer(self, stack, block, hidden, encoder_output, context):
        mask, bias, cross_mask, cache = context
        # cross-attention bias None: each block makes the zeros block 0 would have handed on
        return block(hidden, mask, bias, encoder_output, cross_mask, None, **{CACHE_KEYWORD: cache})[0]

    def seq2seq_head(self, model_config, stack, parts, hidden, buffers):
        hidden = parts["dec_final_dropout"](parts["dec_final_layer_norm"](hidden))
        if getattr(model_config, "scale_decoder_outputs", False):  # T5 v1.0: tied head, rescaled
            hidden = hidden * (model_config.d_model**-0.5)
        return parts["lm_head"](hidden)
