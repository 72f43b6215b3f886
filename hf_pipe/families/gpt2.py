"""GPT-2: learned positions, tied `wte`/`lm_head`."""

from __future__ import annotations

from transformers.masking_utils import create_causal_mask

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


class Gpt2Adapter(FamilyAdapter):
    base_prefix = "transformer"
    layers = "h"
    embeddings = {"wte": "wte", "wpe": "wpe", "drop": "drop"}
    final = {"ln_f": "ln_f"}
    heads = {
        CAUSAL_LM: {"lm_head": "lm_head"},
        SEQ_CLS: {"score": "score"},
        TOKEN_CLS: {"dropout": "dropout", "classifier": "classifier"},
        QUESTION_ANSWERING: {"qa_outputs": "qa_outputs"},
    }
    pools_last_token = (SEQ_CLS,)
    halves = (("ln_1", "attn"), ("ln_2", "mlp"))
    batch_keys = ("attention_mask", "position_ids", "token_type_ids", *ATTENTION_KWARGS)
    packed_sequences = True

    def flops_per_token(self, config, task, seq_len):
        h, v = config.n_embd, config.vocab_size
        inner = config.n_inner or 4 * h
        attention = 2.0 * 4 * h * h + attention_flops(h, seq_len)
        layer = attention + 2.0 * 2 * h * inner
        head = head_flops(task, config, h, seq_len, lm=2.0 * h * v + softmax_loss_flops(v))
        return FlopsPerToken(embeddings=2.0 * h, layer=layer, head=head, first_half=attention)

    def embed(self, parts, input_ids, batch):
        hidden = parts["wte"](input_ids) + parts["wpe"](positions(input_ids, batch))
        if batch.get("token_type_ids") is not None:
            hidden = hidden + parts["wte"](batch["token_type_ids"])
        return parts["drop"](hidden)

    def context(self, config, parts, hidden, batch):
        position_ids = positions(hidden, batch)
        mask = create_causal_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=batch.get("attention_mask"),
            **kv_cache(batch),
            position_ids=position_ids,
        )
        return mask, position_ids, attention_kwargs(batch)

    def layer(self, block, index, hidden, context):
        mask, position_ids, kwargs = context
        return block(hidden, attention_mask=mask, position_ids=position_ids, **kwargs)

    def half(self, block, part, index, hidden, context):
        # GPT2Block.forward (no cross-attention), one residual branch at a time
        mask, position_ids, kwargs = context
        if part == 0:
            attention, _ = block.attn(block.ln_1(hidden), attention_mask=mask, position_ids=position_ids, **kwargs)
            return attention + hidden
        return hidden + block.mlp(block.ln_2(hidden))

    def head(self, parts, hidden, task, batch):
        hidden = parts["ln_f"](hidden)
        if task == CAUSAL_LM:
            return parts["lm_head"](hidden)
        if task == SEQ_CLS:  # scored on every token, then pooled at the last non-padding one, as HF does
            return pool_last_token(parts["score"](hidden), batch)
        if task == TOKEN_CLS:
            return parts["classifier"](parts["dropout"](hidden))
        return span_logits(parts["qa_outputs"](hidden))
