"""Train a small GPT-2 from scratch across pipeline ranks with PipeTrainer (tied embeddings on different stages).

Offline by default: a byte-level BPE tokenizer is trained at start-up on the bundled text and a small GPT-2 config is
built from the arguments. On a machine with the hub, pass --model_name_or_path / --dataset_name instead.

    torchrun --nproc_per_node 2 examples/gpt2/train.py --output_dir out/gpt2
    accelerate launch --config_file examples/accelerate/cpu.yaml examples/gpt2/train.py --output_dir out/gpt2
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    set_seed,
)

from hf_pipe import PipeTrainer, PipeTrainingArguments

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_TEXT = os.path.join(HERE, "..", "data", "corpus.txt")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Pretrained GPT-2; default: from scratch."})
    n_layer: int = field(default=4, metadata={"help": "Blocks of the from-scratch model."})
    n_embd: int = field(default=128, metadata={"help": "Hidden size of the from-scratch model."})
    n_head: int = field(default=4, metadata={"help": "Attention heads of the from-scratch model."})
    vocab_size: int = field(default=1000, metadata={"help": "Size of the tokenizer trained on the text."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset with a 'text' column."})
    train_file: str = field(default=BUNDLED_TEXT, metadata={"help": "Plain text, one example per line."})
    max_length: int = field(default=64, metadata={"help": "Longest example in tokens (longer lines are cut)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of the lines held out for evaluation."})


def train_tokenizer(path: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `path` with the `tokenizers` library (seconds on this text)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([path], vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")
    tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


def load_text(data: DataArguments, seed: int) -> datasets.DatasetDict:
    if data.dataset_name:
        raw = datasets.load_dataset(data.dataset_name)
    else:
        raw = datasets.load_dataset("text", data_files={"train": data.train_file})
    if "validation" not in raw:
        raw = raw["train"].train_test_split(test_size=data.eval_fraction, seed=seed)
        raw["validation"] = raw.pop("test")
    return raw.filter(lambda row: len(row["text"].strip()) > 0)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, PipeTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    set_seed(args.seed)

    if model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        tokenizer = train_tokenizer(data_args.train_file, model_args.vocab_size)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=data_args.max_length,
            n_layer=model_args.n_layer,
            n_embd=model_args.n_embd,
            n_head=model_args.n_head,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)  # same seed on every rank: the same weights everywhere

    raw = load_text(data_args, args.seed)
    tokenized = raw.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=data_args.max_length),
        batched=True,
        remove_columns=raw["train"].column_names,
    )
    # Lines differ in length: every batch is padded to its own longest line (dynamic padding).
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    trainer = PipeTrainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=collator,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)

    if trainer.is_world_process_zero():
        logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        if len(logged) >= 2:
            print(f"train loss {logged[0]:.3f} -> {logged[-1]:.3f} (logged every {args.logging_steps} steps)")
        print(
            f"held-out loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f} (perplexity "
            f"{math.exp(before['eval_loss']):.1f} -> {math.exp(after['eval_loss']):.1f}; the bundled text is 45 lines, "
            "so a long run overfits it)"
        )
        # The checkpoint is an ordinary HF one: load it on one device and generate.
        reloaded = AutoModelForCausalLM.from_pretrained(final_dir)
        prompt = tokenizer("The river", return_tensors="pt")
        with torch.no_grad():
            out = reloaded.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        print(f"saved to {final_dir}; sample: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
