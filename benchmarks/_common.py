"""What the benchmarks share: the anonymous memory of this process, a random Llama with a word-level tokenizer, and
one run of a benchmark's own worker on one process or two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run_ranks(script: str, args: list[str], out: str, ranks: int) -> list[dict]:
    """`python script *args` alone (`ranks` 1) or under `torchrun` on `ranks` processes, one thread each; every rank
    writes its result as JSON to `out.<rank>`, read back in rank order."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TQDM_DISABLE="1")
    command = [sys.executable, script, *args]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), script, *args]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = []
    for rank in range(ranks):
        with open(f"{out}.{rank}") as f:
            results.append(json.load(f))
    return results
