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

Per head, the terms HF averages: causal LM, the shifted labels not -100; masked LM, token classification and
multiple choice, the labels not -100; sequence classification, its `problem_type`'s (rows, or every label of a
multi-label or multi-output regression). Question answering averages two means, each with its own count (the start
and the end positions inside the sequence): each microbatch contributes its start sum over the batch's start count
plus its end sum over the batch's end count, halved, and the step's normaliser counts one term per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import (
    CausalLMOutput,
    MaskedLMOutput,
    MoeCausalLMOutputWithPast,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .families import CAUSAL_LM, MASKED_LM, MULTIPLE_CHOICE, QUESTION_ANSWERING, SEQ2SEQ_LM, SEQ_CLS, TASKS, TOKEN_CLS
from .families.base import LABEL_KEYS
from .microbatch import IGNORE_INDEX, Microbatches
from .router_loss import RouterLoss

#: (outputs with `.logits`, labels, inputs, num_items_in_batch) -> loss, or (loss, metrics): each metric a value,
#: a (sum, count) pair, or ("min" | "max", value)
LossHook = Callable[[Any, torch.Tensor, dict[str, Any], Any], Any]

_OUTPUTS = {
    CAUSAL_LM: CausalLMOutput,
    MASKED_LM: MaskedLMOutput,
    SEQ_CLS: SequenceClassifierOutput,
    TOKEN_CLS: TokenClassifierOutput,
    MULTIPLE_CHOICE: MultipleChoiceModelOutput,
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


def span_targets(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Question answering's start or end positions as HF scores them: squeezed to one per row and clamped to
    `[0, length]`, `length` (outside the sequence) being the ignored index."""
    if positions.dim() > 1:
        positions = positions.squeeze(-1)
    return positions.clamp(0, length)


def as_logits(output: Any) -> Any:
    """A last stage's output as the loss reads it: one tensor, or a tuple of them (question answering's start and end
    logits); a traced stage returns its single output in a tuple or list."""
    if isinstance(output, (tuple, list)):
        return output[0] if len(output) == 1 else tuple(output)
    return output


#: metrics a user loss reports as `("min", value)` / `("max", value)`: the least / greatest over the microbatches
EXTREMES = {"min": min, "max": max}


def reduce_metrics(per_microbatch: list[dict[str, Any]]) -> dict[str, tuple[str, float, float]]:
    """Each metric of a step as (reduction, total, count): `(sum, count)` pairs pooled over the microbatches (a token
    accuracy over the whole batch), plain values summed with their number (their mean), `("min", value)` and
    `("max", value)` the least and greatest. Replicas pool them the same way."""
    out: dict[str, tuple[str, float, float]] = {}
    for name in dict.fromkeys(k for m in per_microbatch for k in m):
        values = [m[name] for m in per_microbatch if name in m]
        if isinstance(values[0], tuple) and values[0][0] in EXTREMES:
            how = values[0][0]
            out[name] = (how, EXTREMES[how](float(v[1]) for v in values), 1.0)
            continue
        pairs = [v if isinstance(v, tuple) else (v, 1.0) for v in values]
        out[name] = ("mean", sum(float(v[0]) for v in pairs), sum(float(v[1]) for v in pairs))
    return out


class PipelineLoss:
    """`loss_fn` for the last stage's schedule: `(logits, target) -> this microbatch's share of the step loss`.

    Before each step the engine calls `begin` with the step's microbatches; torch hands the loss function each
    microbatch's own label tensor as its target, by which the microbatch is found. torch's shape inference also
    calls it once on a copy: that call only needs a differentiable scalar and has no side effects.
    """

    def __init__(self, task: str, config: Any, router: RouterLoss | None = None):
        if task not in TASKS:
            raise ValueError(f"no loss for task {task!r}; hf_pipe has losses for {list(TASKS)}")
        self.task = task
        self.config = config
        #: the MoE load-balancing loss: the last stage's output then ends with its statistics (`router_loss.py`)
        self.router = router
        #: what the aux loss of the output being scored is multiplied by (training: `router.weight`; evaluation:
        #: the model's coefficient, as HF adds it)
        self._aux_weight = router.coef if router is not None else 0.0
        self._step_aux_weight = self._aux_weight
        self.normalizer: float = 1.0
        #: the user's loss, called per microbatch instead of the model's (see the module docstring)
        self.hook: LossHook | None = None
        self.num_items_in_batch: Any = None
        #: what the hook reported for each microbatch of the current step
        self.metrics: list[dict[str, Any]] = []
        self._microbatches: Microbatches | None = None
        self._index: dict[int, int] = {}
        #: the microbatch a hook is scoring (None: a whole batch, in evaluation)
        self._current: int | None = None
        #: question answering: (the batch's length, its count of start terms, of end terms)
        self._spans: tuple[int, int, int] = (0, 0, 0)

    def count(self, inputs: Mapping[str, Any]) -> int:
        """Number of loss terms of a whole batch (`labels`, causal-LM `shift_labels`, answer spans): what HF's mean
        divides by (question answering: 1, the mean of its two means is taken inside `sum`)."""
        if self.task == QUESTION_ANSWERING:
            return 1
        labels = inputs["labels"]
        if self.task == CAUSAL_LM:
            shift_labels = inputs.get("shift_labels")
            targets = shift_labels if shift_labels is not None else labels[..., 1:]
            return int((targets != IGNORE_INDEX).sum())
        if self.task != SEQ_CLS:
            return int((labels != IGNORE_INDEX).sum())
        problem = seq_cls_problem_type(self.config, labels)
        # HF records the problem type it inferred on the config; do the same so checkpoints agree.
        self.config.problem_type = problem
        if problem == "single_label_classification":
            return int((labels != IGNORE_INDEX).sum())
        return labels.numel()

    def _span_counts(self, inputs: list[Mapping[str, Any]], length: int) -> tuple[int, int, int]:
        starts, ends = (
            sum(int((span_targets(x[k], length) != length).sum()) for x in inputs)
            for k in LABEL_KEYS[QUESTION_ANSWERING]
        )
        return length, starts, ends

    def begin(self, microbatches: Microbatches, normalizer: float, num_items_in_batch: Any = None) -> list[Any]:
        """Arm the loss for one step; returns the targets to give the schedule (one tensor per microbatch)."""
        self._microbatches = microbatches
        self.normalizer = normalizer
        self.num_items_in_batch = num_items_in_batch
        self.metrics = []
        if self.router is not None:
            self._step_aux_weight = self.router.weight / (
                len(microbatches) if self.router.mean_over_microbatches else 1
            )
        if self.task == QUESTION_ANSWERING:
            self._spans = self._span_counts(microbatches.inputs, microbatches.batch_shape[1])
        # torch hands each microbatch's target back to the loss, by which the microbatch is found
        keys = ("shift_labels", "labels", *LABEL_KEYS[self.task])
        targets = [next(x[k] for k in keys if x.get(k) is not None) for x in microbatches.inputs]
        self._index = {id(t): i for i, t in enumerate(targets)}
        return targets

    def split_router(self, output: Any) -> tuple[Any, torch.Tensor | None]:
        """(the head's logits, the router statistics) of a last stage's output; (logits, None) without a router
        loss."""
        output = as_logits(output)
        if self.router is None or not isinstance(output, tuple):
            return output, None
        *logits, sums = output
        return (logits[0] if len(logits) == 1 else tuple(logits)), sums

    def __call__(self, logits: Any, target: torch.Tensor) -> torch.Tensor:
        logits, sums = self.split_router(logits)
        index = self._index.get(id(target))
        if index is None:  # torch's shape inference, on a copy of the first target
            probe = sum(t.float().sum() for t in logits) if isinstance(logits, tuple) else logits.float().sum()
            return probe if sums is None else probe + sums.sum()
        mbs = self._microbatches
        self._aux_weight = self._step_aux_weight
        if self.hook is None:
            return self.sum(logits, mbs.inputs[index]) / self.normalizer + self._aux_term(sums)
        self._current = index
        try:
            return self._call_hook(logits, mbs.labels[index], mbs.inputs[index], sums)
        finally:
            self._current = None

    def whole_batch(self, logits: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The loss of a whole batch from its logits (evaluation): as Trainer computes it on one device. `logits` may
        be the tuple an encoder-decoder's last stage returns in evaluation (logits first), or end with the router
        statistics of every microbatch (added up: the whole batch's aux loss, as HF computes it in one forward)."""
        self.metrics = []
        logits, sums = self.split_router(logits)
        self._aux_weight = self.router.coef if self.router is not None else 0.0
        if self.task == QUESTION_ANSWERING:
            self._spans = self._span_counts([inputs], logits[0].shape[1])
        if self.hook is None:
            return self.sum(logits, inputs) / self.normalizer + self._aux_term(sums)
        return self._call_hook(logits, inputs.get("labels"), inputs, sums)

    def _aux_term(self, sums: torch.Tensor | None) -> torch.Tensor | float:
        """The weighted aux loss of these router statistics (0 without), its value kept as the `aux_loss` metric."""
        if sums is None:
            return 0.0
        aux = self.router.aux(sums)
        self.metrics.append({"aux_loss": aux.detach()})
        return self._aux_weight * aux

    def rows(self) -> slice:
        """The rows of the step's batch that the microbatch a hook is scoring holds (all of them in evaluation, where
        the hook sees the whole batch): how a hook finds per-row values computed before the step, such as a frozen
        reference model's log-probabilities. Padded batches only (a packed microbatch mixes rows)."""
        if self._current is None:
            return slice(None)
        mbs = self._microbatches
        start = sum(int(x["input_ids"].shape[0]) for x in mbs.inputs[: self._current])
        return slice(start, start + int(mbs.inputs[self._current]["input_ids"].shape[0]))

    @property
    def aux_weight(self) -> float:
        """What the aux loss of the output being scored is multiplied by (a user loss adding `outputs.aux_loss`
        reads it): in training the step's weight per microbatch, in evaluation the model's coefficient."""
        return self._aux_weight

    def model_loss(self, outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's own loss of `outputs` (as `outputs()` makes them) for `inputs` (a microbatch, or a whole
        batch), normalised for this step; an MoE model's weighted `aux_loss` included, as HF adds it."""
        if self.task == QUESTION_ANSWERING:
            return self.sum((outputs.start_logits, outputs.end_logits), inputs) / self.normalizer
        loss = self.sum(outputs.logits, inputs) / self.normalizer
        aux = getattr(outputs, "aux_loss", None)
        return loss if aux is None else loss + self._aux_weight * aux

    def outputs(self, logits: Any, sums: torch.Tensor | None = None) -> Any:
        """What the model's forward would have returned without labels: its output class, with `.logits` (question
        answering: `.start_logits` and `.end_logits`; an encoder-decoder in evaluation also its encoder's output; an
        MoE model's `aux_loss`, from the router statistics its last stage returns)."""
        if sums is None:
            logits, sums = self.split_router(logits)
        if sums is not None:
            return MoeCausalLMOutputWithPast(logits=logits, aux_loss=self.router.aux(sums))
        if self.task == QUESTION_ANSWERING:
            return QuestionAnsweringModelOutput(start_logits=logits[0], end_logits=logits[1])
        if isinstance(logits, tuple):  # an encoder-decoder in evaluation: the logits and the encoder's output
            return _OUTPUTS[self.task](**dict(zip(_SEQ2SEQ_FIELDS, logits)))
        return _OUTPUTS[self.task](logits=logits)

    def _call_hook(
        self, logits: Any, labels: torch.Tensor | None, inputs: dict[str, Any], sums: torch.Tensor | None = None
    ) -> torch.Tensor:
        outputs = self.outputs(logits, sums)
        result = self.hook(outputs, labels, inputs, self.num_items_in_batch)
        loss, metrics = result if isinstance(result, tuple) else (result, None)
        if sums is not None:
            self.metrics.append({"aux_loss": outputs.aux_loss.detach()})
        if metrics:
            self.metrics.append(metrics)
        return loss

    def sum(self, logits: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Sum of the loss terms of one microbatch (or batch) with HF's semantics for the task; `inputs` holds its
        labels (causal LM: `shift_labels`, shifted once for the whole batch; an encoder-decoder's are not shifted:
        its decoder reads them shifted)."""
        if self.task == SEQ2SEQ_LM and isinstance(logits, tuple):
            logits = logits[0]  # evaluation: the logits, then the encoder's output
        if self.task in (CAUSAL_LM, MASKED_LM, TOKEN_CLS, SEQ2SEQ_LM):
            # ForCausalLMLoss / ForMaskedLMLoss / ForTokenClassification / T5's and BART's CrossEntropyLoss: upcast,
            # ignore -100
            targets = inputs["shift_labels"] if self.task == CAUSAL_LM else inputs["labels"]
            return F.cross_entropy(
                logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        if self.task == MULTIPLE_CHOICE:  # CrossEntropyLoss over the (examples, choices) scores
            return F.cross_entropy(logits, inputs["labels"], ignore_index=IGNORE_INDEX, reduction="sum")
        if self.task == QUESTION_ANSWERING:
            return self._span_sum(logits, inputs)
        labels = inputs["labels"]
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

    def _span_sum(self, logits: tuple[torch.Tensor, torch.Tensor], inputs: Mapping[str, Any]) -> torch.Tensor:
        """(start CE sum / the batch's start count + end CE sum / its end count) / 2: summed over the microbatches,
        HF's `(start_loss + end_loss) / 2` of the whole batch. Logits past the batch's length (padding added for the
        replicas) are left out, as HF never sees them."""
        length, *counts = self._spans
        total = 0.0
        for side, key, count in zip(logits, LABEL_KEYS[QUESTION_ANSWERING], counts):
            targets = span_targets(inputs[key], length)
            total = total + F.cross_entropy(side[:, :length], targets, ignore_index=length, reduction="sum") / count
        return total / 2
