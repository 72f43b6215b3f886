"""BERT: masked LM (decoder tied to the word embeddings) and sequence classification (pooler + classifier)."""

from __future__ import annotations

from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import MASKED_LM, NO_CACHE, SEQ_CLS, FamilyAdapter, FlopsPerToken, attention_flops, softmax_loss_flops


class BertAdapter(FamilyAdapter):
    base_prefix = "bert"
    layers = "encoder.layer"
    embeddings = {"embeddings": "embeddings"}
    heads = {
        MASKED_LM: {"cls": "cls"},
        SEQ_CLS: {"pooler": "bert.pooler", "dropout": "dropout", "classifier": "classifier"},
    }
    halves = (("attention",), ("intermediate", "output"))
    batch_keys = ("attention_mask", "position_ids", "token_type_ids")

    def flops_per_token(self, config, task, seq_len):
        h, v, inner = config.hidden_size, config.vocab_size, config.intermediate_size
        attention = 2.0 * 4 * h * h + attention_flops(h, seq_len)
        layer = attention + 2.0 * 2 * h * inner
        if task == MASKED_LM:
            head = 2.0 * (h * h + h * v) + softmax_loss_flops(v)
        elif task == SEQ_CLS:  # pooler and classifier run once per sequence
            head = 2.0 * (h * h + h * config.num_labels) / seq_len
        else:
            head = 0.0
        return FlopsPerToken(embeddings=3.0 * h, layer=layer, head=head, first_half=attention)

    def embed(self, parts, input_ids, batch):
        return parts["embeddings"](
            input_ids=input_ids, token_type_ids=batch.get("token_type_ids"), position_ids=batch.get("position_ids")
        )

    def context(self, config, parts, hidden, batch):
        make_mask = create_causal_mask if config.is_decoder else create_bidirectional_mask
        return make_mask(config=config, inputs_embeds=hidden, attention_mask=batch.get("attention_mask"), **NO_CACHE)

    def layer(self, block, index, hidden, context):
        return block(hidden, context)

    def half(self, block, part, index, hidden, context):
        # BertLayer.forward without cross-attention (an encoder): post-norm, each half ends in its own LayerNorm
        if part == 0:
            return block.attention(hidden, context)[0]
        return block.output(block.intermediate(hidden), hidden)

    def head(self, parts, hidden, task):
        if task == MASKED_LM:
            return parts["cls"](hidden)
        return parts["classifier"](parts["dropout"](parts["pooler"](hidden)))
