"""What the benchmarks share: the anonymous memory of this process, and a random Llama with a word-level tokenizer."""

from __future__ import annotations

import os


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (RssAnon), MiB: safetensors maps checkpoint files, which RSS counts."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def save_llama(cfg: dict, root: str) -> None:
    """A random Llama (`cfg`: layers, hidden, inner, vocab) and a word-level tokenizer (`w2`, `w3`, ...) saved to
    `root/model`."""
    import torch
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inner"],
        num_hidden_layers=cfg["layers"], num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(os.path.join(root, "model"))
    vocab = {"[PAD]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, cfg["vocab"])}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(os.path.join(root, "model"))
