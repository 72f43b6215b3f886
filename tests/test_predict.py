"""Evaluation and prediction without labels, against Trainer on one process (same seed, same data).

SQuAD-style evaluation features carry no answer spans, `predict()` on new data carries no labels: Trainer's
`prediction_step` then runs the model without them and returns `(None, outputs, None)` (`(None, None, None)` when
only the loss is asked for). Each model trains two steps with labels, then predicts on unlabelled rows: the
predictions equal Trainer's, `label_ids` is None and no `test_loss` is reported; a `QuestionAnsweringTrainer`-like
subclass (transformers' `examples/pytorch/question-answering/trainer_qa.py`: `evaluation_loop` without
compute_metrics, then post-processing and metrics of its own) gets Trainer's exact match and F1.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from tests._data import cls_dataset, lm_dataset, qa_dataset, seq2seq_dataset
from tests._dist import run_distributed
from tests._models import tiny_model
from tests.test_trainer_equivalence import _common_args

ONE_F_ONE_B = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}
TRACED = {"pipeline_frontend": "trace", **ONE_F_ONE_B}
SGD = {"optim": "sgd", "learning_rate": 0.5}  # question answering: see tests/test_heads.py
SPANS = ("start_positions", "end_positions")
PRED_TOL = 1e-4


class AnyCollator:
    """Dynamic padding of whatever columns a batch has: `input_ids` (and its mask), per-token columns (labels padded
    with -100, decoder inputs with 0) and one value per row (`label` as `labels`, answer spans): the same collator
    for labelled training and unlabelled prediction."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        def pad(rows, value):
            out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
            for i, row in enumerate(rows):
                out[i, : len(row)] = torch.tensor(row)
            return out

        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, 0), "attention_mask": pad([[1] * len(r) for r in ids], 0)}
        for key in features[0]:
            values = [f[key] for f in features]
            if key == "input_ids":
                continue
            if isinstance(values[0], list):
                batch[key] = pad(values, -100 if key == "labels" else 0)
            else:
                batch["labels" if key == "label" else key] = torch.tensor(values)
        return batch


def _datasets(name: str, train_rows: int = 16):
    """(labelled training rows, unlabelled prediction rows, the prediction rows' labels or None)."""
    if name == "bert-qa":
        evaluation = qa_dataset(13, seed=5)
        return qa_dataset(train_rows), evaluation.remove_columns(list(SPANS)), evaluation
    if name == "bert-cls":
        return cls_dataset(train_rows), cls_dataset(13, seed=5).remove_columns(["label"]), None
    if name == "t5":
        evaluation = seq2seq_dataset(13, seed=5)
        # T5's own shift of the targets (decoder start 0, padding 0): the decoder's input, given instead of labels
        decoder = [[0, *row[:-1]] for row in evaluation["labels"]]
        unlabelled = evaluation.remove_columns(["labels"]).add_column("decoder_input_ids", decoder)
        return seq2seq_dataset(train_rows), unlabelled, None
    train = lm_dataset(train_rows)
    return train.add_column("labels", train["input_ids"]), lm_dataset(13, seed=5), None


def _spans(predictions, lengths: list[int]) -> list[tuple[int, int]]:
    """The best span of each row (start <= end, inside the row), as run_qa's post-processing picks it."""
    starts, ends = predictions
    best = []
    for s, e, n in zip(starts, ends, lengths):
        scores = s[:n, None] + e[None, :n]
        scores = np.where(np.triu(np.ones((n, n), dtype=bool)), scores, -np.inf)
        i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        best.append((int(i), int(j)))
    return best


def _squad_metrics(predicted: list[tuple[int, int]], answers: list[tuple[int, int]]) -> dict[str, float]:
    """Exact match and token F1 of the predicted spans against the answers (SQuAD's measures on token positions)."""
    exact, f1 = [], []
    for (ps, pe), (gs, ge) in zip(predicted, answers):
        exact.append(float((ps, pe) == (gs, ge)))
        common = max(0, min(pe, ge) - max(ps, gs) + 1)
        if common == 0:
            f1.append(0.0)
            continue
        precision, recall = common / (pe - ps + 1), common / max(ge - gs + 1, 1)
        f1.append(2 * precision * recall / (precision + recall))
    return {"exact_match": 100 * float(np.mean(exact)), "f1": 100 * float(np.mean(f1))}


class _QuestionAnswering:
    """transformers' `trainer_qa.QuestionAnsweringTrainer.evaluate`: the loop without compute_metrics, then its own
    post-processing of the start / end logits and the metrics on the predicted spans."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        dataloader = self.get_eval_dataloader(eval_dataset)
        compute_metrics, self.compute_metrics = self.compute_metrics, None
        try:
            output = self.evaluation_loop(
                dataloader,
                description="Evaluation",
                prediction_loss_only=True if compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            self.compute_metrics = compute_metrics
        spans = _spans(output.predictions, [len(ids) for ids in eval_dataset["input_ids"]])
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in compute_metrics(spans).items()}
        metrics.update(output.metrics)
        self.log(metrics)
        return metrics, output.predictions


def _run(cases: list[tuple[str, dict]], root: str, reference: bool, errors: bool = False) -> dict:
    """Each case (model name, pipeline settings): train two steps with labels, then predict without them; then,
    with `errors`, the refusals of `_label_errors`."""
    from transformers import Trainer, TrainingArguments

    from hf_pipe import PipelineConfigError, PipeTrainer, PipeTrainingArguments

    class QATrainer(_QuestionAnswering, Trainer):
        pass

    class PipeQATrainer(_QuestionAnswering, PipeTrainer):
        pass

    results = []
    for c, (name, pipeline) in enumerate(cases):
        extra = dict(SGD if name == "bert-qa" else {}, **pipeline.pop("args", {}))
        own = pipeline.pop("pipeline_args", {})  # the pipeline's batch sizes, when replicas share the batch
        theirs = pipeline.pop("reference_args", {})
        train_rows = pipeline.pop("train_rows", 16)
        output_dir = os.path.join(root, f"case{c}")
        if reference:
            args = TrainingArguments(**_common_args(output_dir, **{**extra, **theirs}))
        else:
            args = PipeTrainingArguments(**_common_args(output_dir, **{**extra, **own}), **pipeline)
        qa = name == "bert-qa"
        cls = (QATrainer if reference else PipeQATrainer) if qa else Trainer if reference else PipeTrainer
        train, unlabelled, labelled = _datasets(name, train_rows)
        answers = None
        if qa:  # spans past the row are clamped to its end, as HF clamps them
            rows = zip(*(labelled[k] for k in (*SPANS, "input_ids")))
            answers = [(min(s, len(ids)), min(e, len(ids))) for s, e, ids in rows]
        trainer = cls(
            model=tiny_model(name),
            args=args,
            train_dataset=train,
            eval_dataset=unlabelled,
            data_collator=AnyCollator(),
            compute_metrics=functools.partial(_squad_metrics, answers=answers) if qa else None,
        )
        trainer.train()
        out = trainer.predict(unlabelled)
        result = {"predictions": out.predictions, "label_ids": out.label_ids, "metric_names": sorted(out.metrics)}
        loss_only = trainer.evaluation_loop(trainer.get_eval_dataloader(unlabelled), "loss", prediction_loss_only=True)
        result["loss_only"] = (loss_only.predictions, loss_only.label_ids, sorted(loss_only.metrics))
        if qa:
            metrics, predictions = trainer.evaluate()
            result["qa_metrics"] = {k: v for k, v in metrics.items() if k in ("eval_exact_match", "eval_f1")}
            result["qa_predictions"] = predictions
        if name == "t5":  # neither labels nor decoder inputs: HF's forward cannot run, and neither can the pipeline
            try:
                trainer.predict(unlabelled.remove_columns(["decoder_input_ids"]))
                result["no_decoder_inputs"] = None
            except (ValueError, PipelineConfigError) as error:
                result["no_decoder_inputs"] = f"{type(error).__name__}: {error}"
        results.append(result)
    return {"cases": results, "errors": _label_errors(root) if errors else None}


def _label_errors(root: str) -> dict[str, str]:
    """Training data without labels: when training starts if the collator cannot add them (a trainer built only to
    predict or save may hold such a set), else at the first step before anything runs; an encoder-decoder's evaluation set with neither labels nor decoder inputs, at
    construction (its evaluate() for compute_metrics runs the forward, which needs one of them)."""
    from hf_pipe import PipelineConfigError, PipeTrainer, PipeTrainingArguments

    args = PipeTrainingArguments(**_common_args(os.path.join(root, "errors")), **ONE_F_ONE_B)
    unlabelled = lm_dataset(16)
    attempts = {
        "train, default collator": lambda: PipeTrainer(
            model=tiny_model("gpt2"), args=args, train_dataset=unlabelled
        ).train(),
        "t5 eval set": lambda: PipeTrainer(
            model=tiny_model("t5"),
            args=args,
            train_dataset=seq2seq_dataset(16),
            eval_dataset=seq2seq_dataset(13).remove_columns(["labels"]),
            compute_metrics=lambda pred: {},
        ),
        "train, own collator": lambda: PipeTrainer(
            model=tiny_model("gpt2"), args=args, train_dataset=unlabelled, data_collator=AnyCollator()
        ).train(),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = ""
        except PipelineConfigError as error:
            errors[name] = str(error)
    return errors


def _worst(mine, theirs) -> float:
    """Largest absolute difference of two predictions (arrays, tuples or lists of them, padding -100 included)."""
    if isinstance(theirs, (tuple, list)):
        assert isinstance(mine, (tuple, list)) and len(mine) == len(theirs)
        return max(_worst(a, b) for a, b in zip(mine, theirs))
    assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
    return float(np.abs(mine.astype(np.float64) - theirs.astype(np.float64)).max())


def _compare(
    cases: list[tuple[str, dict]], tmp_path, world: int, errors: bool = False, fork: bool = True
) -> dict[str, float]:
    import copy

    ref = run_distributed(_run, 1, copy.deepcopy(cases), str(tmp_path / "ref"), True, timeout=400, launcher_env=True)
    ref = [ref[0]["cases"]]
    pipelines = copy.deepcopy(cases)
    runs = run_distributed(
        _run, world, pipelines, str(tmp_path / "pp"), False, errors, timeout=600, launcher_env=True, fork=fork
    )
    per_rank = [run["cases"] for run in runs]
    for run in runs if errors else ():
        refused = run["errors"]
        assert "train_dataset has the columns ['input_ids'] but no 'labels'" in refused["train, default collator"]
        assert "eval_dataset has the columns ['input_ids'], with neither 'labels'" in refused["t5 eval set"]
        assert "the batch has no 'labels'" in refused["train, own collator"], refused
    worst = {}
    for c, (name, pipeline) in enumerate(cases):
        theirs = ref[0][c]
        label = f"{name} {pipeline.get('pipeline_frontend', 'auto')} x{world}"
        assert theirs["label_ids"] is None and not any("loss" in k for k in theirs["metric_names"]), theirs
        assert theirs["loss_only"] == (None, None, []) or theirs["loss_only"][:2] == (None, None)
        errs = []
        for rank in per_rank:
            mine = rank[c]
            assert mine["label_ids"] is None and mine["metric_names"] == theirs["metric_names"], (label, mine)
            assert mine["loss_only"][:2] == (None, None) and mine["loss_only"][2] == theirs["loss_only"][2], label
            errs.append(_worst(mine["predictions"], theirs["predictions"]))
            if "qa_metrics" in theirs:
                print(label, theirs["qa_metrics"])
                assert mine["qa_metrics"] == theirs["qa_metrics"], (label, mine["qa_metrics"], theirs["qa_metrics"])
                errs.append(_worst(mine["qa_predictions"], theirs["qa_predictions"]))
            if "no_decoder_inputs" in theirs:
                # HF 5.24: "ValueError: You must specify exactly one of input_ids or inputs_embeds" (its decoder's)
                assert theirs["no_decoder_inputs"].startswith("ValueError"), theirs["no_decoder_inputs"]
                assert "PipelineConfigError" in mine["no_decoder_inputs"], mine["no_decoder_inputs"]
                assert "decoder_input_ids" in mine["no_decoder_inputs"]
        worst[label] = max(errs)
        assert worst[label] < PRED_TOL, (label, worst[label])
    return worst


def test_predict_without_labels_two_ranks(tmp_path):
    """Question answering (predict, and run_qa's evaluation on unlabelled features), a causal LM on both frontends
    (`eval_do_concat_batches=False`), a sequence classifier, an encoder-decoder given its decoder inputs."""
    cases = [
        ("bert-qa", dict(ONE_F_ONE_B)),
        ("gpt2", dict(ONE_F_ONE_B, args={"include_for_metrics": ["inputs"], "eval_do_concat_batches": False})),
        ("gpt2", dict(TRACED, args={"eval_do_concat_batches": False})),
        ("bert-cls", dict(ONE_F_ONE_B)),
        ("t5", dict(ONE_F_ONE_B)),
    ]
    print(_compare(cases, tmp_path, 2, errors=True))


def test_predict_without_labels_pipeline_and_data_parallel(tmp_path):
    """World 4 = 2 stages × 2 replicas: the predictions (and the inputs, `include_for_metrics`) gathered over the
    replicas without a loss to gather, the short last batch cut back as Trainer cuts it."""
    case = {
        "pipeline_parallel_size": 2,
        "pipeline_schedule": "1f1b",
        # two steps of 16 rows: 8 per replica; evaluation in batches of 4, Trainer's as each replica's
        "train_rows": 32,
        "args": {"per_device_eval_batch_size": 4, "include_for_metrics": ["inputs"]},
        "reference_args": {"per_device_train_batch_size": 16},
    }
    # spawned ranks: forked ones (which inherit this process's torch state) once crashed in DDP's reducer here
    print(_compare([("gpt2", case)], tmp_path, 4, fork=False))
