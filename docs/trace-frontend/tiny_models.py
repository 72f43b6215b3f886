"""Tiny HF models (4 layers, hidden 64, vocab 100) for the trace-frontend prototype, plus their block prefixes."""
import torch
import transformers as T

VOCAB = 100


def make(family: str, seed: int = 0, use_cache=False):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
        model, blocks = T.GPT2LMHeadModel(cfg), "transformer.h"
    elif family == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                            pad_token_id=0, **common)
        model, blocks = T.LlamaForCausalLM(cfg), "model.layers"
    elif family == "llama_tied":
        cfg = T.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                            pad_token_id=0, tie_word_embeddings=True, **common)
        model, blocks = T.LlamaForCausalLM(cfg), "model.layers"
    elif family == "bert":
        cfg = T.BertConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           num_labels=3, pad_token_id=0, **common)
        model, blocks = T.BertForSequenceClassification(cfg), "bert.encoder.layer"
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                              bos_token_id=0, eos_token_id=0, **common)
        model, blocks = T.GPTNeoXForCausalLM(cfg), "gpt_neox.layers"
    elif family == "opt":
        cfg = T.OPTConfig(num_hidden_layers=4, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                          word_embed_proj_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1, **common)
        model, blocks = T.OPTForCausalLM(cfg), "model.decoder.layers"
    elif family == "phi":
        cfg = T.PhiConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                          bos_token_id=0, eos_token_id=0, **common)
        model, blocks = T.PhiForCausalLM(cfg), "model.layers"
    elif family == "falcon":
        cfg = T.FalconConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0, bos_token_id=0, eos_token_id=0, **common)
        model, blocks = T.FalconForCausalLM(cfg), "transformer.h"
    else:
        raise ValueError(family)
    if use_cache is not None:
        model.config.use_cache = use_cache
    return model, blocks


def batch(family: str, bs: int, seq: int, seed: int = 1, pad: bool = True):
    """input_ids, attention_mask (right padding on some rows when pad), labels for the family's task."""
    g = torch.Generator().manual_seed(seed * 1000 + seq)
    ids = torch.randint(2, VOCAB, (bs, seq), generator=g)
    am = torch.ones(bs, seq, dtype=torch.long)
    if pad:
        for r in range(1, bs, 2):
            am[r, seq - 1 - (r % 3):] = 0
    if family == "bert":
        labels = torch.randint(0, 3, (bs,), generator=g)
    else:
        labels = ids.masked_fill(am == 0, -100)
    return ids, am, labels
