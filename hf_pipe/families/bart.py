"""BART and the encoder-decoders built like it (mBART, PLBart): learned positions (offset by 2), an embedding
LayerNorm, optional final LayerNorms (mBART's pre-norm stacks), LayerDrop, a head tied to the shared embedding (unless
`tie_word_embeddings=False`) plus `final_logits_bias`. Decoder inputs come from the model's own shift of the labels
(BART's `shift_tokens_right`, mBART's language-code wrap)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import CACHE, CACHE_KEYWORD
from .seq2seq import Dims, Seq2SeqAdapter, layer_dropped


class BartAdapter(Seq2SeqAdapter):
    encoder = "model.encoder"
    decoder = "model.decoder"
    encoder_layers = "model.encoder.layers"
    decoder_layers = "model.decoder.layers"
    encoder_embeddings = {
        "shared": "model.shared",  # the stacks' and the head's embedding, tied or not (then unused, but saved)
        "enc_embed_tokens": "model.encoder.embed_tokens",
        "enc_embed_positions": "model.encoder.embed_positions",
        "enc_layernorm_embedding": "model.encoder.layernorm_embedding",
    }
    decoder_embeddings = {
        "dec_embed_tokens": "model.decoder.embed_tokens",
        "dec_embed_positions": "model.decoder.embed_positions",
        "dec_layernorm_embedding": "model.decoder.layernorm_embedding",
    }
    head_buffers = ("final_logits_bias",)

    def __init__(self, final_layer_norm: bool = False):
        # mBART's stacks end in a LayerNorm of their own
        self.final_layer_norm = final_layer_norm
        if final_layer_norm:
            self.encoder_final = {"enc_layer_norm": "model.encoder.layer_norm"}
            self.decoder_final = {"dec_layer_norm": "model.decoder.layer_norm"}

    def num_encoder_layers(self, config):
        return config.encoder_layers

    def num_decoder_layers(self, config):
        return config.decoder_layers

    def dims(self, config, decoder):
        ffn = config.decoder_ffn_dim if decoder else config.encoder_ffn_dim
        return Dims(config.d_model, config.d_model, ffn, 2, config.vocab_size)

    def encoder_embed(self, stack, parts, input_ids, training):
        embeds = parts["enc_embed_tokens"](input_ids)
        hidden = embeds + parts["enc_embed_positions"](embeds[:, :, -1])  # the shape only
        hidden = parts["enc_layernorm_embedding"](hidden)
        return F.dropout(hidden, p=stack.dropout, training=training)

    def encoder_context(self, stack, parts, hidden, batch):
        return create_bidirectional_mask(
            config=stack.config, inputs_embeds=hidden, attention_mask=batch.get("attention_mask")
        )

    def encoder_layer(self, stack, block, hidden, context):
        if layer_dropped(stack, block.training):
            return hidden
        return block(hidden, context)

    def encoder_end(self, stack, parts, hidden):
        return parts["enc_layer_norm"](hidden) if self.final_layer_norm else hidden

    def decoder_embed(self, stack, parts, decoder_input_ids, training, past=0):
        embeds = parts["dec_embed_tokens"](decoder_input_ids)
        position_ids = torch.arange(decoder_input_ids.shape[1], device=embeds.device) + past
        hidden = embeds + parts["dec_embed_positions"](decoder_input_ids, past, position_ids=position_ids)
        hidden = parts["dec_layernorm_embedding"](hidden)
        return F.dropout(hidden, p=stack.dropout, training=training)

    def decoder_context(self, stack, parts, hidden, encoder_output, batch):
        config = stack.config
        cache = batch.get(CACHE)  # generation: the stage's EncoderDecoderCache
        own = cache.self_attention_cache if cache is not None else None
        past = own.get_seq_length() if own is not None else 0
        mask = batch.get("decoder_attention_mask")
        if mask is None:  # as BartDecoder: every position attends (causally), the cached ones too
            mask = torch.ones(hidden.shape[0], past + hidden.shape[1], device=hidden.device)
        causal = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask, **{CACHE_KEYWORD: own})
        cross = create_bidirectional_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=batch.get("attention_mask"),
            encoder_hidden_states=encoder_output,
        )
        return causal, cross, cache

    def decoder_layer(self, stack, block, hidden, encoder_output, context):
        causal, cross, cache = context
        if layer_dropped(stack, block.training):
            return hidden
        out = block(
            hidden, causal, encoder_output, encoder_attention_mask=cross, **{CACHE_KEYWORD: cache}, use_cache=False
        )
        return out[0] if isinstance(out, tuple) else out

    def seq2seq_head(self, model_config, stack, parts, hidden, buffers):
        if self.final_layer_norm:
            hidden = parts["dec_layer_norm"](hidden)
        return parts["lm_head"](hidden) + buffers["final_logits_bias"].to(hidden.device)
