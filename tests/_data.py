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


def token_dataset(n: int = 48, seed: int = 0, num_labels: int = 3, **lengths) -> datasets.Dataset:
    """Rows of tokens with one tag per token (token classification), in `labels` (a column the model's forward
    names, so Trainer keeps it)."""
    ds = lm_dataset(n, seed, **lengths)
    g = torch.Generator().manual_seed(seed + 1)
    tags = [torch.randint(0, num_labels, (len(ids),), generator=g).tolist() for ids in ds["input_ids"]]
    return ds.add_column("labels", tags)


def qa_dataset(n: int = 48, seed: int = 0, **lengths) -> datasets.Dataset:
    """Rows of tokens with an answer span; some positions lie past the row (HF clamps them and ignores them)."""
    ds = lm_dataset(n, seed, **lengths)
    g = torch.Generator().manual_seed(seed + 1)
    spans = [torch.randint(0, len(ids) + 4, (2,), generator=g).sort().values.tolist() for ids in ds["input_ids"]]
    return ds.add_column("start_positions", [s for s, _ in spans]).add_column("end_positions", [e for _, e in spans])


def mc_dataset(n: int = 48, seed: int = 0, choices: int = 3, min_len: int = 4, max_len: int = 14) -> datasets.Dataset:
    """Examples of `choices` token sequences of uneven lengths each, and the index of the right one."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        lengths = torch.randint(min_len, max_len + 1, (choices,), generator=g).tolist()
        options = [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in lengths]
        rows.append({"input_ids": options, "label": int(torch.randint(0, choices, (1,), generator=g))})
    return datasets.Dataset.from_list(rows)


def labelled_cls_dataset(n: int = 48, seed: int = 0, problem: str = "single", **lengths) -> datasets.Dataset:
    """Sequence classification rows for each HF `problem_type`: a class of 3, a regression target (one float), or a
    multi-hot vector of 3 labels."""
    ds = lm_dataset(n, seed, **lengths)
    g = torch.Generator().manual_seed(seed + 1)
    if problem == "regression":
        labels = torch.randn(n, generator=g).tolist()
    elif problem == "multi_label":
        labels = (torch.rand(n, 3, generator=g) < 0.5).float().tolist()
    else:
        labels = torch.randint(0, 3, (n,), generator=g).tolist()
    return ds.add_column("label", labels)


class HeadCollator:
    """Dynamic padding for every head: per-token tags (-100 on padding), answer spans, (examples, choices, seq)
    multiple-choice batches, or one label per row; `padding_side="left"` pads at the start, as decoder classifiers
    are often fed."""

    def __init__(self, task: str, padding_side: str = "right"):
        self.task = task
        self.left = padding_side == "left"

    def _pad(self, rows: list[list[int]], longest: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), longest), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.left:
                out[i, longest - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
        return out

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.task == "multiple_choice":
            flat = [option for f in features for option in f["input_ids"]]
            longest = max(map(len, flat))
            shape = (len(features), len(features[0]["input_ids"]), longest)
            ids = self._pad(flat, longest, 0).view(shape)
            mask = self._pad([[1] * len(o) for o in flat], longest, 0).view(shape)
            return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}
        rows = [f["input_ids"] for f in features]
        longest = max(map(len, rows))
        batch = {
            "input_ids": self._pad(rows, longest, 0),
            "attention_mask": self._pad([[1] * len(r) for r in rows], longest, 0),
        }
        if self.task == "token_cls":
            batch["labels"] = self._pad([f["labels"] for f in features], longest, -100)
        elif self.task == "question_answering":
            for key in ("start_positions", "end_positions"):
                batch[key] = torch.tensor([f[key] for f in features])
        else:
            batch["labels"] = torch.tensor([f["label"] for f in features])
        return batch


def left_padding(task: str) -> HeadCollator:
    return HeadCollator(task, padding_side="left")
