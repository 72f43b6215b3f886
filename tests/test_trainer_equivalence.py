"""PipeTrainer against Trainer on one process: same seed and data, same logged losses, grad norms, eval loss and
saved weights, over several AdamW steps with clipping and dynamic padding."""

from __future__ import annotations

import os

import pytest

from hf_pipe.cpu_affinity import core_share
from tests._data import (
    HeadCollator,
    PadCollator,
    cls_dataset,
    labelled_cls_dataset,
    lm_dataset,
    mc_dataset,
    qa_dataset,
    seq2seq_dataset,
    token_dataset,
)
from tests._dist import run_distributed
from tests._models import tiny_model

LOSS_TOL = 2e-4
WEIGHT_TOL = 5e-4

TASKS = {
    "gpt2": "causal_lm",
    "llama": "causal_lm",
    "bert-cls": "seq_cls",
    "llama-tied": "causal_lm",
    "qwen3": "causal_lm",
    "gpt_neox": "causal_lm",
    "llama-cls": "seq_cls",
    "llama-rm": "seq_cls",
    "llama-tok": "token_cls",
    "llama-qa": "question_answering",
    "bert-tok": "token_cls",
    "bert-qa": "question_answering",
    "bert-mc": "multiple_choice",
    "bert-mlm": "masked_lm",
    "roberta-mc": "multiple_choice",
    "t5": "seq2seq_lm",
    "t5-v1_1": "seq2seq_lm",
    "bart": "seq2seq_lm",
    "qwen3_moe": "causal_lm",
    "mixtral": "causal_lm",
}
#: the Auto class that loads a saved checkpoint of each task
AUTO = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "multiple_choice": "AutoModelForMultipleChoice",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
}


def _common_args(output_dir: str, **overrides) -> dict:
    args = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.01,
        max_grad_norm=0.5,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=7,
        lr_scheduler_type="linear",
        warmup_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )
    args.update(overrides)
    return args


def _datasets(name: str, train: int = 45, evaluation: int = 13, **data):
    # 45 and 13 rows: the last batch of an epoch (5 rows) and of evaluation (5 rows) are short and odd
    task = TASKS[name]
    if task == "seq_cls" and data:  # a problem type, or row lengths
        make = labelled_cls_dataset
    else:
        make = {
            "seq_cls": cls_dataset,
            "token_cls": token_dataset,
            "question_answering": qa_dataset,
            "multiple_choice": mc_dataset,
            "seq2seq_lm": seq2seq_dataset,
        }.get(task, lm_dataset)
    return make(train, seed=0, **data), make(evaluation, seed=5, **data)


def _accuracy(pred):
    """Accuracy for every head (token classification: over the labelled tokens; question answering: both span ends
    right; regression and multi-label: the mean squared error of the logits)."""
    logits, labels = pred
    if isinstance(logits, tuple):
        starts, ends = (side.argmax(-1) for side in logits)
        return {"accuracy": float(((starts == labels[0]) & (ends == labels[1])).mean())}
    if labels.dtype.kind == "f":
        return {"mse": float(((logits.reshape(labels.shape) - labels) ** 2).mean())}
    right = logits.argmax(-1) == labels
    return {"accuracy": float(right[labels != -100].mean() if logits.ndim == 3 else right.mean())}


def _token_accuracy(pred):
    """An encoder-decoder's predictions are (logits, encoder output), as its forward returns them."""
    (logits, encoder_output), labels = pred
    assert encoder_output.shape[0] == labels.shape[0] and encoder_output.ndim == 3
    known = labels != -100
    return {"accuracy": float((logits.argmax(-1) == labels)[known].mean())}


def run_trainer(name: str, output_dir: str, pipeline: dict | None, extra: dict, setup: dict | None = None) -> dict:
    """One training run; `pipeline=None` is the plain-Trainer reference.

    `setup` (module-level objects, so that it reaches spawned ranks): `model` (tiny_model overrides), `collator`
    (a function of the task returning the data collator), `trainer_kwargs` (more Trainer arguments), `classes`
    ((Trainer class, PipeTrainer class)), `rows` ((train, eval) dataset sizes), `data` (dataset builder kwargs: row
    lengths, a classification problem type), `args` (training arguments of this case, reference included),
    `ref_args` (training arguments of the reference alone: gradient accumulation over the pipeline's microbatches).
    """
    from transformers import Trainer, TrainingArguments

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    setup = setup or {}
    extra = {**extra, **setup.get("args", {}), **(setup.get("ref_args", {}) if pipeline is None else {})}
    model = tiny_model(name, **setup.get("model", {}), **_unseeded(setup))
    train, evaluation = _datasets(name, *setup.get("rows", (45, 13)), **setup.get("data", {}))
    if pipeline is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Trainer + DDP over gloo, as `accelerate launch` on CPUs
    trainer_cls, pipe_cls = setup.get("classes", (Trainer, PipeTrainer))
    if pipeline is None:
        args, cls = TrainingArguments(**_common_args(output_dir, **extra)), trainer_cls
    else:
        args, cls = PipeTrainingArguments(**_common_args(output_dir, **extra), **pipeline), pipe_cls
    task = TASKS[name]
    metrics = {"causal_lm": None, "masked_lm": None, "seq2seq_lm": _token_accuracy}.get(task, _accuracy)
    collator = setup.get("collator", PadCollator if task in ("causal_lm", "seq_cls", "seq2seq_lm") else HeadCollator)
    collator = collator(TASKS[name])
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=metrics,
        **setup.get("trainer_kwargs", {}),
    )
    # Trainer + DDP skips its DDP wrap when evaluate() ran first (accelerate registers the unwrapped model), and
    # then trains each process alone: its multi-process references evaluate after training only.
    before = trainer.evaluate() if int(os.environ.get("WORLD_SIZE", "1")) == 1 or pipeline is not None else None
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    # every CPU any thread of this process may run on (pipeline_cpu_affinity binds them all)
    cpus = sorted({c for tid in os.listdir("/proc/self/task") for c in _thread_cpus(int(tid))})
    return {"before": before, "after": after, "logs": logs, "cpus": cpus}


def _unseeded(setup: dict) -> dict:
    """`setup["seed_per_rank"]`: each rank builds its model from its own seed (a script that builds before seeding);
    rank 0's is the reference's model."""
    return {"seed": int(os.environ.get("RANK", "0"))} if setup.get("seed_per_rank") else {}


def _thread_cpus(tid: int) -> set[int]:
    try:
        return os.sched_getaffinity(tid)
    except ProcessLookupError:  # the thread ended meanwhile
        return set()


def _pipeline_runs(name: str, root: str, pipelines: list[dict], extra: dict, setup: dict | None) -> list[dict]:
    return [run_trainer(name, os.path.join(root, f"pp{i}"), p, extra, setup) for i, p in enumerate(pipelines)]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


_NOT_METRICS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss")


def _metric_keys(mine: dict, theirs: dict) -> list[str]:
    skip = ("runtime", "per_second")
    return [
        k
        for k, v in theirs.items()
        if k in mine and k not in _NOT_METRICS and isinstance(v, float) and not any(word in k for word in skip)
    ]


def _metrics_err(mine: dict, theirs: dict) -> float:
    """Worst relative difference of the other numbers both runs logged (a user loss's metrics, accuracies)."""
    return max((_rel(mine[k], theirs[k]) for k in _metric_keys(mine, theirs)), default=0.0)


def run_logs(run: dict) -> list[dict]:
    """Every log of a run: training steps, and the evaluations before and after."""
    return [*run["logs"], *(e for e in (run["before"], run["after"]) if e is not None)]


def compare(
    name: str,
    tmp_path,
    world: int,
    pipelines: list[dict],
    loss_tol: float = LOSS_TOL,
    weight_tol: float = WEIGHT_TOL,
    ref_world: int = 1,
    setup: dict | None = None,
    ref_extra: dict | None = None,
    **extra,
) -> dict[str, float]:
    """PipeTrainer runs (`pipelines`, each a dict of pipeline settings) on `world` ranks against Trainer on
    `ref_world` processes (DDP when more than one); `setup` as `run_trainer` takes it; `ref_extra` overrides the
    training arguments of the reference alone."""
    ref = run_distributed(
        run_trainer,
        ref_world,
        name,
        str(tmp_path / "ref"),
        None,
        {**extra, **(ref_extra or {})},
        setup,
        timeout=300,
        launcher_env=True,
    )[0]
    per_rank = run_distributed(
        _pipeline_runs, world, name, str(tmp_path), pipelines, extra, setup, timeout=400, launcher_env=True
    )
    return check_runs(name, tmp_path, world, pipelines, ref, per_rank, loss_tol, weight_tol, setup)


def _many_references(cases: list[tuple], root: str, extra: dict) -> list[dict]:
    return [
        run_trainer(name, os.path.join(root, f"case{c}", "ref"), None, extra, setup)
        for c, (name, _, setup) in enumerate(cases)
    ]


def _many_pipelines(cases: list[tuple], root: str, extra: dict) -> list[list[dict]]:
    return [
        _pipeline_runs(name, os.path.join(root, f"case{c}"), p, extra, setup)
        for c, (name, p, setup) in enumerate(cases)
    ]


def compare_many(
    cases: list[tuple[str, list[dict], dict | None]],
    tmp_path,
    world: int,
    loss_tol: float = LOSS_TOL,
    weight_tol: float = WEIGHT_TOL,
    **extra,
) -> dict[str, dict]:
    """`compare` for several models at once, `cases` being (name, pipelines, setup): every Trainer reference in one
    process, every pipeline in one group of `world` ranks (process start-up dominates tiny runs on 2 cores)."""
    refs = run_distributed(_many_references, 1, cases, str(tmp_path), extra, timeout=400, launcher_env=True)[0]
    per_rank = run_distributed(_many_pipelines, world, cases, str(tmp_path), extra, timeout=600, launcher_env=True)
    worst = {}
    for c, ((name, pipelines, setup), ref) in enumerate(zip(cases, refs)):
        runs = [rank[c] for rank in per_rank]
        found = check_runs(name, tmp_path / f"case{c}", world, pipelines, ref, runs, loss_tol, weight_tol, setup)
        assert not set(found) & set(worst), f"two cases labelled {sorted(set(found) & set(worst))}: give one a label"
        worst.update(found)
    return worst


def check_runs(
    name: str,
    tmp_path,
    world: int,
    pipelines: list[dict],
    ref: dict,
    per_rank: list[list[dict]],
    loss_tol: float = LOSS_TOL,
    weight_tol: float = WEIGHT_TOL,
    setup: dict | None = None,
) -> dict[str, dict]:
    """Assert and return the worst differences of each pipeline run (per rank) from the Trainer reference: logged
    losses, grad norms and metrics, eval loss and metrics before and after training, the saved weights (loaded with
    the task's AutoModelFor...)."""
    import transformers

    auto = getattr(transformers, AUTO[TASKS[name]])
    ref_weights = auto.from_pretrained(tmp_path / "ref" / "final").state_dict()
    worst = {}
    for i, pipeline in enumerate(pipelines):
        label = (
            f"{name} {pipeline.get('pipeline_frontend', 'auto')} {pipeline.get('pipeline_schedule', '1f1b')} x{world}"
        )
        label += f" split {pipeline['pipeline_split']}" if "pipeline_split" in pipeline else ""
        label += f" {pipeline['pipeline_data_parallel']}" if "pipeline_data_parallel" in pipeline else ""
        label += f" {setup['label']}" if setup and "label" in setup else ""
        errs = {"loss": 0.0, "grad_norm": 0.0, "eval_loss": 0.0, "metrics": 0.0, "weights": 0.0}
        errs["metric_names"] = sorted({k for log in run_logs(ref) for k in _metric_keys(log, log)})
        for r, rank in enumerate(per_rank):
            run = rank[i]
            if pipeline.get("pipeline_cpu_affinity"):
                assert run["cpus"] == core_share(sorted(os.sched_getaffinity(0)), r, world), (label, r, run["cpus"])
            assert len(run["logs"]) == len(ref["logs"]) > 0, label
            for mine, theirs in zip(run["logs"], ref["logs"]):
                assert mine["step"] == theirs["step"]
                errs["loss"] = max(errs["loss"], _rel(mine["loss"], theirs["loss"]))
                errs["grad_norm"] = max(errs["grad_norm"], _rel(mine["grad_norm"], theirs["grad_norm"]))
                assert mine["learning_rate"] == pytest.approx(theirs["learning_rate"], rel=1e-9)
                errs["metrics"] = max(errs["metrics"], _metrics_err(mine, theirs))
            for when in ("before", "after") if ref["before"] is not None else ("after",):
                errs["eval_loss"] = max(errs["eval_loss"], _rel(run[when]["eval_loss"], ref[when]["eval_loss"]))
                errs["metrics"] = max(errs["metrics"], _metrics_err(run[when], ref[when]))
                if "eval_accuracy" in ref[when]:
                    assert run[when]["eval_accuracy"] == ref[when]["eval_accuracy"], label
        saved = auto.from_pretrained(tmp_path / f"pp{i}" / "final").state_dict()
        assert saved.keys() == ref_weights.keys()
        errs["weights"] = max((saved[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        # the run must have moved the weights far beyond the tolerance, or the comparison would prove nothing
        initial = tiny_model(name, **(setup or {}).get("model", {})).state_dict()
        moved = max((ref_weights[k] - initial[k]).abs().max().item() for k in ref_weights)
        assert moved > 10 * weight_tol, f"{label}: weights moved only {moved}"
        worst[label] = errs
        assert all(errs[k] < loss_tol for k in ("loss", "grad_norm", "eval_loss", "metrics")), (label, errs)
        assert errs["weights"] < weight_tol, (label, errs)
    return worst


SCHEDULES_2 = [
    {"pipeline_schedule": "gpipe", "pipeline_microbatches": 4},
    {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
    {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},
    # the last run of each process: the binding stays for the process's lifetime
    {
        "pipeline_schedule": "zbvzerobubble",
        "pipeline_microbatches": 4,
        "pipeline_cpu_affinity": len(os.sched_getaffinity(0)) >= 2,
    },
]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-cls"])
def test_pipetrainer_matches_trainer_two_ranks(name, tmp_path):
    print(compare(name, tmp_path, 2, SCHEDULES_2))


def test_pipetrainer_four_ranks(tmp_path):
    print(compare("llama-tied", tmp_path, 4, [{"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}]))


def test_gradient_accumulation(tmp_path):
    print(compare("gpt2", tmp_path, 2, [{"pipeline_schedule": "1f1b"}], gradient_accumulation_steps=2))
    print(compare("bert-cls", tmp_path / "cls", 2, [{"pipeline_schedule": "1f1b"}], gradient_accumulation_steps=2))


TRACED = [
    {"pipeline_frontend": "trace", "pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
    {"pipeline_frontend": "trace", "pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},
]


@pytest.mark.parametrize("name", ["gpt2", "bert-cls"])
def test_pipetrainer_trace_frontend(name, tmp_path):
    """Traced stages (one trace per padded length, for training and for evaluation) match Trainer too."""
    print(compare(name, tmp_path, 2, TRACED))


@pytest.mark.rotary_trace
def test_pipetrainer_family_without_adapter(tmp_path):
    """GPT-NeoX has no adapter: pipeline_frontend='auto' traces it."""
    print(compare("gpt_neox", tmp_path, 2, [{"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}]))
