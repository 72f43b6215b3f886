"""GPT-2: learned positions, tied `wte`/`lm_head`."""

from __future__ import annotations

from transformers.masking_utils import create_causal_mask

from .base import CAUSAL_LM, FamilyAdapter, FlopsPerToken, attention_flops, positions, softmax_loss_flops


class Gpt2Adapter(FamilyAdapter):
    base_prefix = "transformer"
    layers = "h"
    embeddings = {"wte": "wte", "wpe": "wpe", "drop": "drop"}
    final = {"ln_f": "ln_f"}
    heads = {CAUSAL_LM: {"lm_head": "lm_head"}}

    def flops_per_token(self, config, task, seq_len):
        h, v = config.n_embd, config.vocab_size
        inner = config.n_inner or 4 * h
        layer = 2.0 * (4 * h * h + 2 * h * inner) + attention_flops(h, seq_len)
        head = 2.0 * h * v + softmax_loss_flops(v) if task == CAUSAL_LM else 0.0
        return FlopsPerToken(embeddings=2.0 * h, layer=layer, head=head)

    def embed(self, parts, input_ids, batch):
        hidden = parts["wte"](input_ids) + parts["wpe"](positions(input_ids))
        if batch.get("token_type_ids") is not None:
            hidden = hidden + parts["wte"](batch["token_type_ids"])
        return parts["drop"](hidden)

    def context(self, config, parts, hidden, batch):
        position_ids = positions(hidden)
        mask = create_causal_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=batch.get("attention_mask"),
            cache=None,
            position_ids=position_ids,
        )
        return mask, position_ids

    def layer(self, block, index, hidden, context):
        mask, position_ids = context
        return block(hidden, attention_mask=mask, position_ids=position_ids)

    def head(self, parts, hidden, task):
        return parts["lm_head"](parts["ln_f"](hidden))
