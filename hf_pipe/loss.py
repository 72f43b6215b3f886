"""The last stage's loss: HF semantics normalised by the whole step's label count, or the user's own loss.

torch's schedules default to `scale_grads=True`: a mean of per-microbatch means. With uneven padding that is not the
token mean HF computes over the full batch. Here each microbatch returns `sum of its losses / N`, where N counts the
loss terms of the *whole* batch (or of the whole accumulated step, like Trainer's `num_items_in_batch`), and the
schedule runs with `scale_grads=False`: the microbatch losses then add up to exactly the full-batch loss.

A user loss (Trainer's `compute_loss_func`, or a `PipeTrainer` subclass's `compute_microbatch_loss`) replaces the
model's loss: it is called per microbatch in training, with that microbatch's outputs, labels and inputs and the
step's `num_items_in_batch`, and once per batch in evaluation (where every rank holds the whole batch's logits).
A function of Trainer's documented form (sum over tokens / `num_items_in_batch`) then adds up to Trainer's loss; one
that takes a mean per call behaves as under Trainer's gradient accumulation, the microbatches being the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput, Seq2SeqLMOutput, SequenceClassifierOutput

from .families import CAUSAL_LM, MASKED_LM, SEQ2SEQ_LM, SEQ_CLS
from .microbatch import IGNORE_INDEX, Microbatches

#: (outputs with `.logits`, labels, inputs, num_items_in_batch) -> loss, or (loss, {metric: value or (sum, count)})
LossHook = Callable[[Any, torch.Tensor, dict[str, Any], Any], Any]

_OUTPUTS = {
    CAUSAL_LM: CausalLMOutput,
    MASKED_LM: MaskedLMOutput,
    SEQ_CLS: SequenceClassifierOutput,
    SEQ2SEQ_LM: Seq2SeqLMOutput,
}
#: an encoder-decoder's forward returns (in evaluation) the logits and the encoder's output, in this order
_SEQ2SEQ_FIELDS = ("logits", "encoder_last_hidden_state")


def seq_cls_problem_type(config: Any, labels: torch.Tensor) -> str:
    """HF's rule for sequence classification (BertForSequenceClassification and friends)."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def reduce_metrics(per_microbatch: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each metric of a step as (total, count): `(sum, count)` pairs pooled over the microbatches (a token accuracy
    over the whole batch), plain values summed with their number (their mean). Replicas pool them the same way."""
    out: dict[str, tuple[float, float]] = {}
    for name in dict.fromkeys(k for m in per_microbatch for k in m):
        values = [m[name] for m in per_microbatch if name in m]
        pairs = [v if isinstance(v, tuple) else (v, 1.0) for v in values]
        out[name] = (sum(float(v[0]) for v in pairs), sum(float(v[1]) for v in pairs))
    return out


class PipelineLoss:
    """`loss_fn` for the last stage's schedule: `(logits, target) -> this microbatch's share of the step loss`.

    Before each step the engine calls `begin` with the step's microbatches; torch hands the loss function each
    microbatch's own label tensor as its target, by which the microbatch is found. torch's shape inference also
    calls it once on a copy: that call only needs a differentiable scalar and has no side effects.
    """

    def __init__(self, task: str, config: Any):
        if task not in (CAUSAL_LM, MASKED_LM, SEQ_CLS, SEQ2SEQ_LM):
            raise ValueError(f"no loss for task {task!r}")
        self.task = task
        self.config = config
        self.normalizer: float = 1.0
        #: the user's loss, called per microbatch instead of the model's (see the module docstring)
        self.hook: LossHook | None = None
        self.num_items_in_batch: Any = None
        #: what the hook reported for each microbatch of the current step
        self.metrics: list[dict[str, Any]] = []
        self._microbatches: Microbatches | None = None
        self._index: dict[int, int] = {}

    def count(self, labels: torch.Tensor, shift_labels: torch.Tensor | None = None) -> int:
        """Number of loss terms in `labels` (a whole batch): what HF's mean divides by."""
        if self.task == CAUSAL_LM:
            targets = shift_labels if shift_labels is not None else labels[..., 1:]
            return int((targets != IGNORE_INDEX).sum())
        if self.task in (MASKED_LM, SEQ2SEQ_LM):  # seq2seq labels are not shifted: the decoder reads them shifted
            return int((labels != IGNORE_INDEX).sum())
        problem = seq_cls_problem_type(self.config, labels)
        # HF records the problem type it inferred on the config; do the same so checkpoints agree.
        self.config.problem_type = problem
        if problem == "single_label_classification":
            return int((labels != IGNORE_INDEX).sum())
        return labels.numel()

    def begin(self, microbatches: Microbatches, normalizer: float, num_items_in_batch: Any = None) -> list[Any]:
        """Arm the loss for one step; returns the targets to give the schedule (one per microbatch)."""
        self._microbatches = microbatches
        self.normalizer = normalizer
        self.num_items_in_batch = num_items_in_batch
        self.metrics = []
        targets = [s if s is not None else labels for labels, s in zip(microbatches.labels, microbatches.shift_labels)]
        self._index = {id(t): i for i, t in enumerate(targets)}
        return targets

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = self._index.get(id(target))
        if index is None:  # torch's shape inference, on a copy of the first target
            return logits.float().sum()
        mbs = self._microbatches
        if self.hook is None:
            return self.sum(logits, target) / self.normalizer
        return self._call_hook(logits, mbs.labels[index], mbs.inputs[index])

    def whole_batch(self, logits: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The loss of a whole batch from its logits (evaluation): as Trainer computes it on one device. `logits` may
        be the tuple an encoder-decoder's last stage returns in evaluation (logits first)."""
        self.metrics = []
        if self.hook is None:
            scores = logits[0] if isinstance(logits, tuple) else logits
            return self.sum(scores, inputs.get("shift_labels", inputs["labels"])) / self.normalizer
        return self._call_hook(logits, inputs["labels"], inputs)

    def model_loss(self, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's own loss for `inputs` (a microbatch, or a whole batch), normalised for this step."""
        return self.sum(logits, inputs.get("shift_labels", inputs["labels"])) / self.normalizer

    def outputs(self, logits: Any) -> Any:
        """What the model's forward would have returned without labels: its output class, with `.logits`."""
        if isinstance(logits, tuple):  # an encoder-decoder in evaluation: the logits and the encoder's output
            return _OUTPUTS[self.task](**dict(zip(_SEQ2SEQ_FIELDS, logits)))
        return _OUTPUTS[self.task](logits=logits)

    def _call_hook(self, logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        result = self.hook(self.outputs(logits), labels, inputs, self.num_items_in_batch)
        loss, metrics = result if isinstance(result, tuple) else (result, None)
        if metrics:
            self.metrics.append(metrics)
        return loss

    def sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the loss terms of one microbatch; `targets` are causal-LM `shift_labels`, or the labels."""
        if self.task in (CAUSAL_LM, MASKED_LM, SEQ2SEQ_LM):
            # ForCausalLMLoss / ForMaskedLMLoss / T5's and BART's CrossEntropyLoss: ignore -100 (causal targets come
            # already shifted); the upcast changes nothing in fp32 (and cross-entropy runs in fp32 under autocast)
            return F.cross_entropy(
                logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        labels = targets
        problem = seq_cls_problem_type(self.config, labels)
        if problem == "regression":
            if self.config.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype), reduction="sum")
            return F.mse_loss(logits, labels.to(logits.dtype), reduction="sum")
        if problem == "single_label_classification":
            return F.cross_entropy(
                logits.view(-1, self.config.num_labels), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum")
