"""User losses against Trainer on one process: `compute_loss_func` in Trainer's documented (sum) form and as a mean
per call, a subclass's `compute_microbatch_loss` with a logged metric, and the `compute_loss` overrides refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

from hf_pipe import PipelineConfigError, PipeTrainer
from tests.test_trainer_equivalence import compare

Z_WEIGHT = 1e-2


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].reshape(-1)


def z_loss_sum(outputs, labels, num_items_in_batch=None):
    """Cross-entropy plus z-loss, summed over tokens and divided by `num_items_in_batch` (Trainer's form)."""
    logits, targets = _shifted(outputs.logits, labels)
    keep = targets != -100
    terms = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    terms = terms + Z_WEIGHT * logits.logsumexp(-1).pow(2) * keep
    return terms.sum() / num_items_in_batch


def mean_loss(outputs, labels, num_items_in_batch=None):
    """A mean per call that ignores `num_items_in_batch`."""
    logits, targets = _shifted(outputs.logits, labels)
    return F.cross_entropy(logits, targets, ignore_index=-100)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, targets = _shifted(logits, labels)
    keep = targets != -100
    return (logits.argmax(-1).eq(targets) & keep).sum(), keep.sum()


class ZLossTrainer(Trainer):
    """The reference: a Trainer subclass with its own compute_loss and a logged metric, TRL-style."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._accuracies = {"train": [], "eval": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        loss = z_loss_sum(outputs, labels, count)
        correct, total = _accuracy(outputs.logits, labels)
        self._accuracies["train" if model.training else "eval"].append((correct / total).item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        values = self._accuracies[mode]
        if values:
            logs[("eval_" if mode == "eval" else "") + "token_accuracy"] = sum(values) / len(values)
        self._accuracies[mode] = []
        super().log(logs, start_time)


class ZLossPipeTrainer(PipeTrainer):
    """The same loss and metric in the pipeline's one place for them."""

    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        return z_loss_sum(outputs, labels, count), {"token_accuracy": _accuracy(outputs.logits, labels)}


PIPELINES = [
    {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
    {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},
]


def test_compute_loss_func_sum_form(tmp_path):
    print(compare("llama", tmp_path, 2, PIPELINES, setup={"trainer_kwargs": {"compute_loss_func": z_loss_sum}}))


def test_compute_loss_func_mean_form_is_trainers_gradient_accumulation(tmp_path):
    """A mean per call under the pipeline = Trainer accumulating the 4 microbatches as 4 steps of 2 rows."""
    setup = {"trainer_kwargs": {"compute_loss_func": mean_loss}, "rows": (48, 16)}
    ref = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    print(compare("llama", tmp_path, 2, PIPELINES[:1], setup=setup, ref_extra=ref))


def test_subclass_loss_and_metric(tmp_path):
    setup = {"classes": (ZLossTrainer, ZLossPipeTrainer)}
    worst = compare("llama", tmp_path, 2, PIPELINES, setup=setup)
    print(worst)
    assert all({"token_accuracy", "eval_token_accuracy"} <= set(w["metric_names"]) for w in worst.values())


class BypassedLoss(PipeTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_compute_loss_overrides_are_refused():
    from trl import SFTTrainer

    from hf_pipe.trainer import loss_override_problems

    [message] = loss_override_problems(BypassedLoss)
    assert (
        "BypassedLoss overrides compute_loss (in tests.test_user_loss.BypassedLoss), which PipeTrainer never calls"
        in message
    )
    assert "Move it to compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch)" in message
    for cls in (type("PipeFirst", (PipeTrainer, SFTTrainer), {}), type("SFTFirst", (SFTTrainer, PipeTrainer), {})):
        [message] = loss_override_problems(cls)
        assert f"{cls.__name__} overrides compute_loss (in trl.trainer.sft_trainer.SFTTrainer)" in message
    assert loss_override_problems(ZLossPipeTrainer) == [] and loss_override_problems(PipeTrainer) == []
    with pytest.raises(PipelineConfigError, match="BypassedLoss overrides compute_loss"):
        BypassedLoss(model=None, args=None)
