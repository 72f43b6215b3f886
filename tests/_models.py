"""Tiny models, padded batches and single-process references shared by the tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97
HIDDEN = 64
LAYERS = 4

# (family, task) -> (config class, model class, config overrides)
CASES = {
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
    ),
    "llama-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
    ),
    "bert-cls": (
        transformers.BertConfig,
        transformers.BertForSequenceClassification,
        dict(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        ),
    ),
    "bert-mlm": (
        transformers.BertConfig,
        transformers.BertForMaskedLM,
        dict(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=8,
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
        ),
    ),
    # mixture of experts, the load-balancing loss on (weighted far above the families' defaults, so that a wrong
    # aux term shows); dropout-free, no router jitter
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            output_router_logits=True,
            router_aux_loss_coef=0.5,
        ),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            output_router_logits=True,
            router_aux_loss_coef=0.5,
        ),
    ),
    # a shared expert behind its gate, dense MLPs in every other block (decoder_sparse_step=2)
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
            max_position_embeddings=64,
            output_router_logits=True,
            router_aux_loss_coef=0.5,
        ),
    ),
    "olmoe": (
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            eos_token_id=1,
            output_router_logits=True,
            router_aux_loss_coef=0.5,
        ),
    ),
    # no family adapter: pipelined by the trace frontend only
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
    # multi-query attention that indexes with Python lists: export lifts tensor constants out of the forward
    "falcon": (
        transformers.FalconConfig,
        transformers.FalconForCausalLM,
        dict(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
    ),  # fmt: skip
    # rotary sin/cos are strided halves of one tensor and cross stage boundaries
    "gptj": (
        transformers.GPTJConfig,
        transformers.GPTJForCausalLM,
        dict(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=64,
            rotary_dim=8,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),  # fmt: skip
}


class _UntiedHead:
    """T5 v1.1 / mT5 as their checkpoints load in transformers 5 (which ties T5's head unless the checkpoint holds a
    different one): the head its own weight (scaled like the other projections, so that the tiny model's loss starts
    near log(vocab) and SGD steps stay tame)."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.weight = torch.nn.Parameter(torch.randn_like(self.shared.weight) * config.d_model**-0.5)
        self.all_tied_weights_keys.pop("lm_head.weight", None)


class UntiedT5ForConditionalGeneration(_UntiedHead, transformers.T5ForConditionalGeneration):
    pass


class UntiedMT5ForConditionalGeneration(_UntiedHead, transformers.MT5ForConditionalGeneration):
    pass


_T5 = dict(d_model=HIDDEN, d_kv=16, d_ff=128, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
_BART = dict(
    d_model=HIDDEN,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=96,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)
# encoder-decoders: 4 encoder + 4 decoder blocks, so that stages cut inside each stack
CASES.update(
    {
        "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration,
               dict(_T5, num_layers=4, num_decoder_layers=4, feed_forward_proj="relu")),
        "t5-v1_1": (transformers.T5Config, UntiedT5ForConditionalGeneration,
                    dict(_T5, num_layers=4, num_decoder_layers=4, feed_forward_proj="gated-gelu",
                         tie_word_embeddings=False)),
        "mt5": (transformers.MT5Config, UntiedMT5ForConditionalGeneration,
                dict(_T5, num_layers=4, num_decoder_layers=4, feed_forward_proj="gated-gelu")),
        "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration,
                 dict(_BART, encoder_layers=4, decoder_layers=4)),
        "bart-untied": (transformers.BartConfig, transformers.BartForConditionalGeneration,
                        dict(_BART, encoder_layers=4, decoder_layers=4, tie_word_embeddings=False)),
        "mbart": (transformers.MBartConfig, transformers.MBartForConditionalGeneration,
                  dict(_BART, encoder_layers=4, decoder_layers=4)),
        "plbart": (transformers.PLBartConfig, transformers.PLBartForConditionalGeneration,
                   dict(_BART, encoder_layers=4, decoder_layers=4)),
    }
)  # fmt: skip
SEQ2SEQ = ("t5", "t5-v1_1", "mt5", "bart", "bart-untied", "mbart", "plbart")


class LlamaRewardModel(transformers.LlamaForSequenceClassification):
    """A user's class whose name tells no task (a reward model): trained traced, with `pipeline_task="seq_cls"`.
    HF finds a loss by the class name too, so the class names it."""

    def __init__(self, config):
        super().__init__(config)
        self.loss_type = "ForSequenceClassification"


_LLAMA = CASES["llama"][2]
_BERT = CASES["bert-cls"][2]
# The heads beyond causal / masked LM and BERT's classifier, on a decoder (Llama) and encoders (BERT; RoBERTa has no
# adapter: traced). Llama's classifiers pool at the last token that is not pad_token_id; its token classifier's
# dropout (classifier_dropout, else 0.1) is set to 0 like every other dropout here.
CASES.update(
    {
        "llama-cls": (
            transformers.LlamaConfig,
            transformers.LlamaForSequenceClassification,
            dict(_LLAMA, num_labels=3, pad_token_id=0),
        ),
        "llama-rm": (transformers.LlamaConfig, LlamaRewardModel, dict(_LLAMA, num_labels=1, pad_token_id=0)),
        "llama-tok": (
            transformers.LlamaConfig,
            transformers.LlamaForTokenClassification,
            dict(_LLAMA, num_labels=3, classifier_dropout=0.0),
        ),
        "llama-qa": (transformers.LlamaConfig, transformers.LlamaForQuestionAnswering, _LLAMA),
        "bert-tok": (transformers.BertConfig, transformers.BertForTokenClassification, _BERT),
        "bert-qa": (transformers.BertConfig, transformers.BertForQuestionAnswering, dict(_BERT, num_labels=2)),
        "bert-mc": (transformers.BertConfig, transformers.BertForMultipleChoice, _BERT),
        # the other adapters' heads (checked against one process in tests/test_heads.py)
        "gpt2-cls": (
            transformers.GPT2Config,
            transformers.GPT2ForSequenceClassification,
            dict(CASES["gpt2"][2], num_labels=3, pad_token_id=0),
        ),
        "gpt2-tok": (
            transformers.GPT2Config,
            transformers.GPT2ForTokenClassification,
            dict(CASES["gpt2"][2], num_labels=3, classifier_dropout=0.0),
        ),
        "gpt2-qa": (transformers.GPT2Config, transformers.GPT2ForQuestionAnswering, CASES["gpt2"][2]),
        "qwen2-qa": (transformers.Qwen2Config, transformers.Qwen2ForQuestionAnswering, CASES["qwen2"][2]),
        "mistral-cls": (
            transformers.MistralConfig,
            transformers.MistralForSequenceClassification,
            dict(CASES["mistral"][2], num_labels=3, pad_token_id=0),
        ),
        "bert-lm": (transformers.BertConfig, transformers.BertLMHeadModel, dict(_BERT, is_decoder=True)),
        "roberta-mc": (
            transformers.RobertaConfig,
            transformers.RobertaForMultipleChoice,
            dict(_BERT, max_position_embeddings=66, pad_token_id=0),
        ),
    }
)


class TinyBlock(torch.nn.Module):
    """Pre-norm causal self-attention and MLP: a user's own block, not a transformers class."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.norm2 = torch.nn.LayerNorm(hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(), torch.nn.Linear(2 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(torch.nn.Module):
    """A causal LM of the user's own (no config, no family): embeddings, a ModuleList of blocks, a head.

    Returns the logits, or (loss, logits) with HF's shifted causal-LM loss when given labels.
    """

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = LAYERS, heads: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList([TinyBlock(hidden, heads) for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        t = input_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        mask = (
            causal[None, None] if attention_mask is None else causal[None, None] & attention_mask[:, None, None].bool()
        )
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.norm(x))
        if labels is None:
            return logits
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.reshape(-1), ignore_index=-100), logits


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    if name == "custom":
        torch.manual_seed(seed)
        layers = overrides.get("num_hidden_layers", LAYERS)
        return TinyDecoder(layers=layers).train()
    config_cls, model_cls, kwargs = CASES[name]
    config = config_cls(**{"vocab_size": VOCAB, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    model.train()
    return model


def padded_batch(name: str, batch_size: int = 8, seq_len: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch with uneven lengths, so microbatches hold different numbers of label tokens."""
    if name in SEQ2SEQ:
        batch = seq2seq_batch(batch_size, seq_len, max(3, seq_len // 2 + seed), seed)
        if name == "mbart":  # decoder inputs given, as DataCollatorForSeq2Seq(model=...) gives them, and masked
            from transformers.models.mbart.modeling_mbart import shift_tokens_right

            batch["decoder_input_ids"] = shift_tokens_right(batch["labels"], 1)
            batch["decoder_attention_mask"] = (batch["labels"] != -100).long()
        return batch
    task = {"bert-cls": "seq_cls", "bert-mlm": "masked_lm"}.get(name, "causal_lm")
    return uneven_batch(task, batch_size, seq_len, seed, token_type_ids=name == "bert-cls")


def uneven_batch(
    task: str | None, batch_size: int, seq_len: int, seed: int, token_type_ids: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded batch with uneven lengths and labels for `task` (3 classes for "seq_cls"; causal LM labels for
    anything else), optionally two-segment `token_type_ids`."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
    lengths = torch.randint(seq_len // 3, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if task == "seq_cls":
        batch["labels"] = torch.randint(0, 3, (batch_size,), generator=g)
    elif task == "masked_lm":
        chosen = (torch.rand(batch_size, seq_len, generator=g) < 0.3) & (mask == 1)
        batch["labels"] = input_ids.masked_fill(~chosen, -100)
    else:
        batch["labels"] = input_ids.masked_fill(mask == 0, -100)
    if token_type_ids:
        batch["token_type_ids"] = (torch.arange(seq_len)[None, :] >= seq_len // 2).long().expand(batch_size, -1)
    return batch


def seq2seq_batch(batch_size: int, source_len: int, target_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded sources (pad 0, masked) and targets (-100) of uneven lengths, each side its own length."""
    g = torch.Generator().manual_seed(seed)
    batch = uneven_batch(None, batch_size, source_len, seed)
    labels = torch.randint(3, VOCAB, (batch_size, target_len), generator=g)
    lengths = torch.randint(1, target_len + 1, (batch_size,), generator=g)
    lengths[-1] = target_len
    batch["labels"] = labels.masked_fill(torch.arange(target_len)[None, :] >= lengths[:, None], -100)
    return batch


def reference_step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of the whole model on the whole batch in one process (HF's own forward and loss)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    grads = {
        n: p.grad.detach().clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None
    }
    return loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max |a - b| / max |b|: the relative difference used by every equivalence test.

    `floor` bounds the denominator from below for tensors that are zero in exact arithmetic (BERT's key biases get
    gradients of 1e-13, pure rounding, in any two runs); tests pass 1e-3 × the largest gradient of the model.
    """
    scale = max(b.abs().max().item(), floor)
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
