"""Small datasets of uneven lengths and a dynamic-padding collator, for the Trainer-level tests."""

from __future__ import annotations

import datasets
import torch

from tests._models import VOCAB


def lm_dataset(n: int = 48, seed: int = 0, min_len: int = 5, max_len: int = 20) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        rows.append({"input_ids": torch.randint(1, VOCAB, (length,), generator=g).tolist()})
    return datasets.Dataset.from_list(rows)


def seq2seq_dataset(n: int = 48, seed: int = 0) -> datasets.Dataset:
    """Sources of 4-20 tokens, targets of 2-12 (their own lengths: each batch pads both sides differently): the
    source's first tokens reversed, so that a few steps already get some right."""
    g = torch.Generator().manual_seed(seed + 2)
    ds = lm_dataset(n, seed, min_len=4)
    lengths = torch.randint(2, 13, (n,), generator=g).tolist()
    return ds.add_column("labels", [row[:length][::-1] for row, length in zip(ds["input_ids"], lengths)])


def cls_dataset(n: int = 48, seed: int = 0, num_labels: int = 3) -> datasets.Dataset:
    ds = lm_dataset(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, num_labels, (n,), generator=g).tolist()
    return ds.add_column("label", labels)


class PadCollator:
    """Pads each batch to its own longest row (dynamic padding); LM labels are the inputs with -100 on padding."""

    def __init__(self, task: str):
        self.task = task

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros(len(features), longest, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "seq_cls":
            batch["labels"] = torch.tensor([f["label"] for f in features])
        elif self.task == "seq2seq_lm":  # targets padded to their own longest, -100 (the model shifts them)
            target = max(len(f["labels"]) for f in features)
            batch["labels"] = torch.full((len(features), target), -100, dtype=torch.long)
            for i, f in enumerate(features):
                batch["labels"][i, : len(f["labels"])] = torch.tensor(f["labels"])
        else:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        return batch
