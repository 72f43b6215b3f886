"""BERT: masked LM and causal LM (`BertLMHeadModel`; decoder tied to the word embeddings), sequence classification
and multiple choice (pooler + classifier), token classification and question answering (per-token classifiers)."""

from __future__ import annotations

from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import (
    CAUSAL_LM,
    MASKED_LM,
    MULTIPLE_CHOICE,
    NO_CACHE,
    QUESTION_ANSWERING,
    SEQ_CLS,
    TOKEN_CLS,
    FamilyAdapter,
    FlopsPerToken,
    attention_flops,
    choice_logits,
    head_flops,
    softmax_loss_flops,
    span_logits,
)

_POOLED = {"pooler": "bert.pooler", "dropout": "dropout", "classifier": "classifier"}


class BertAdapter(FamilyAdapter):
    base_prefix = "bert"
    layers = "encoder.layer"
    embeddings = {"embeddings": "embeddings"}
    heads = {
        MASKED_LM: {"cls": "cls"},
        CAUSAL_LM: {"cls": "cls"},
        SEQ_CLS: _POOLED,
        TOKEN_CLS: {"dropout": "dropout", "classifier": "classifier"},
        QUESTION_ANSWERING: {"qa_outputs": "qa_outputs"},
        MULTIPLE_CHOICE: _POOLED,
    }
    halves = (("attention",), ("intermediate", "output"))
    batch_keys = ("attention_mask", "position_ids", "token_type_ids")

    def flops_per_token(self, config, task, seq_len):
        h, v, inner = config.hidden_size, config.vocab_size, config.intermediate_size
        attention = 2.0 * 4 * h * h + attention_flops(h, seq_len)
        layer = attention + 2.0 * 2 * h * inner
        lm = 2.0 * (h * h + h * v) + softmax_loss_flops(v)  # the MLM transform, then the tied decoder
        head = head_flops(task, config, h, seq_len, lm=lm, pooler=True)
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

    def head(self, parts, hidden, task, batch):
        if task in (MASKED_LM, CAUSAL_LM):
            return parts["cls"](hidden)
        if task == TOKEN_CLS:
            return parts["classifier"](parts["dropout"](hidden))
        if task == QUESTION_ANSWERING:
            return span_logits(parts["qa_outputs"](hidden))
        logits = parts["classifier"](parts["dropout"](parts["pooler"](hidden)))
        return choice_logits(logits, batch) if task == MULTIPLE_CHOICE else logits
