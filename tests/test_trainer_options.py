"""Trainer options under the pipeline: each one PipeTrainer accepts gives Trainer's numbers (losses, grad norms,
evaluation metrics, predictions, token and FLOP counts, final weights); the reported speeds and the model card count
what one pipeline (times its replicas) did."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import rel_err, tiny_model
from tests.test_trainer_equivalence import LOSS_TOL, WEIGHT_TOL, _common_args, _datasets, _rel

PIPELINE = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}


def _argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _token_accuracy(pred) -> dict[str, float]:
    """Next-token accuracy of argmax predictions (padded with -100 across batches by the evaluation loop)."""
    preds, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
    metrics = {"token_accuracy": float((preds == labels)[labels != -100].mean())}
    if pred.losses is not None:
        metrics["loss_sum"] = float(pred.losses.sum())
    if pred.inputs is not None:
        metrics["input_sum"] = float(pred.inputs[pred.inputs != -100].sum())
    return metrics


class _BatchAccuracy:
    """`batch_eval_metrics`: called once per batch, the summary on the last one."""

    def __init__(self):
        self.hits = self.count = 0

    def __call__(self, pred, compute_result: bool) -> dict[str, float]:
        preds, labels = pred.predictions.argmax(-1)[:, :-1], pred.label_ids[:, 1:]
        mask = labels != -100
        self.hits += int((preds == labels)[mask].sum())
        self.count += int(mask.sum())
        if not compute_result:
            return {}
        result = {"token_accuracy": self.hits / self.count}
        self.hits = self.count = 0
        return result


def _longer(train):
    # 96 rows: enough for LengthGroupedSampler to sort megabatches of 2 batches (it needs 4 batches' worth per one)
    return lm_dataset(96, seed=3)


def _with_length_column(train):
    # lengths that are not the rows' own: the sampler must read this column rather than measure input_ids
    train = _longer(train)
    return train.add_column("n_tokens", [(7 * i) % 11 for i in range(len(train))])


def run_case(name: str, output_dir: str, pipeline: dict | None, case: dict) -> dict:
    """One run of `case` (training-argument overrides under "args", Trainer keyword arguments under "trainer", a
    training-set transform under "dataset"): evaluate, train, evaluate, predict, save, write the model card.
    `pipeline=None`: plain Trainer (+ DDP on several processes)."""
    from transformers import Trainer, TrainingArguments

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    ddp_reference = pipeline is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp_reference:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Trainer + DDP over gloo, as `accelerate launch` on CPUs
    model = tiny_model(name)
    train, evaluation = _datasets(name)
    if case.get("dataset"):
        train = case["dataset"](train)
    settings = _common_args(output_dir, **case.get("args", {}))
    if pipeline is None:
        args, cls = TrainingArguments(**settings), Trainer
    else:
        args, cls = PipeTrainingArguments(**settings, **pipeline), PipeTrainer
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=PadCollator("causal_lm"),
        **case.get("trainer", {}),
    )
    # Trainer + DDP skips its DDP wrap when evaluate() ran first: its references evaluate after training only
    before = None if ddp_reference else trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    predicted = trainer.predict(evaluation)
    trainer.save_model(os.path.join(output_dir, "final"))
    trainer.create_model_card()
    return {
        "before": before,
        "after": after,
        "predict": predicted.metrics,
        "predictions": predicted.predictions,
        "logs": [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e],
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "total_flos": trainer.state.total_flos,
        "card": _card_hyperparameters(os.path.join(output_dir, "README.md")) if args.should_save else None,
    }


def _card_hyperparameters(path: str) -> dict[str, str]:
    text = open(path, encoding="utf-8").read()
    section = text.split("The following hyperparameters were used during training:\n", 1)[1].split("\n\n", 1)[0]
    return dict(line[2:].split(": ", 1) for line in section.splitlines() if line.startswith("- "))


def _cases_run(name: str, root: str, pipeline: dict | None, cases: dict[str, dict]) -> dict[str, dict]:
    return {label: run_case(name, os.path.join(root, label), pipeline, case) for label, case in cases.items()}


# Timing-dependent metrics; the step rate is checked against the step count instead.
_TIMING = ("_runtime", "_per_second", "_model_preparation_time")
# What the model card adds for a pipeline, or counts per process.
_CARD_PIPELINE_KEYS = {"num_devices", "distributed_type", "pipeline_parallel_size", "data_parallel_size"}
_CARD_PIPELINE_KEYS |= {"pipeline_schedule", "pipeline_microbatches"}


def _check_steps_per_second(metrics: dict, replicas: int, label: str) -> None:
    """One evaluation step per `per_device_eval_batch_size × replicas` samples: what one pipeline and its replicas
    ran, not one per process."""
    for split in ("eval", "test"):
        if f"{split}_steps_per_second" in metrics:
            samples = 13  # rows of the evaluation set
            steps = math.ceil(samples / (8 * replicas))
            ratio = metrics[f"{split}_steps_per_second"] / metrics[f"{split}_samples_per_second"]
            assert ratio == pytest.approx(steps / samples, rel=2e-2), (label, split, metrics)


def _predictions_diff(mine, theirs) -> float:
    """Relative difference of predictions (the -100 of padding included): an array, or one per batch with
    `eval_do_concat_batches=False`."""
    if isinstance(theirs, (list, tuple)):
        assert isinstance(mine, (list, tuple)) and len(mine) == len(theirs)
        return max((_predictions_diff(a, b) for a, b in zip(mine, theirs)), default=0.0)
    if theirs is None:
        assert mine is None
        return 0.0
    mine, theirs = torch.as_tensor(mine).double(), torch.as_tensor(theirs).double()
    assert mine.shape == theirs.shape
    return rel_err(mine, theirs)


def compare_cases(
    name: str, tmp_path, cases: dict[str, dict], pipeline: dict = PIPELINE, world: int = 2, ref_world: int = 1
) -> dict[str, dict[str, float]]:
    """Every case with PipeTrainer on `world` ranks against Trainer on `ref_world` processes (DDP when more than
    one); returns the worst difference of each kind per case.
    """
    from transformers import AutoModelForCausalLM

    ref = run_distributed(
        _cases_run, ref_world, name, str(tmp_path / "ref"), None, cases, timeout=400, launcher_env=True
    )[0]
    per_rank = run_distributed(
        _cases_run, world, name, str(tmp_path / "pp"), pipeline, cases, timeout=500, launcher_env=True
    )
    replicas = world // pipeline.get("pipeline_parallel_size", world)
    initial = tiny_model(name).state_dict()
    worst = {}
    for label in cases:
        theirs = ref[label]
        errs = {"loss": 0.0, "grad_norm": 0.0, "metrics": 0.0, "predictions": 0.0, "weights": 0.0}
        for r, rank in enumerate(per_rank):
            mine = rank[label]
            assert len(mine["logs"]) == len(theirs["logs"]) > 0, label
            for a, b in zip(mine["logs"], theirs["logs"]):
                assert a["step"] == b["step"]
                errs["loss"] = max(errs["loss"], _rel(a["loss"], b["loss"]))
                errs["grad_norm"] = max(errs["grad_norm"], _rel(a["grad_norm"], b["grad_norm"]))
                assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-9)
                assert a.get("num_input_tokens_seen") == b.get("num_input_tokens_seen"), (label, r, a, b)
            assert mine["num_input_tokens_seen"] == theirs["num_input_tokens_seen"], (label, r)
            assert mine["total_flos"] == pytest.approx(theirs["total_flos"], rel=1e-6), (label, r)
            for when in ("before", "after", "predict") if theirs["before"] is not None else ("after", "predict"):
                keys = {k for k in theirs[when] if not k.endswith(_TIMING)}
                assert keys == {k for k in mine[when] if not k.endswith(_TIMING)}, (label, when)
                for key in keys:
                    errs["metrics"] = max(errs["metrics"], _rel(mine[when][key], theirs[when][key]))
                _check_steps_per_second(mine[when], replicas, label)
            diff = _predictions_diff(mine["predictions"], theirs["predictions"])
            errs["predictions"] = max(errs["predictions"], diff)
        card = per_rank[0][label]["card"]
        assert {k: v for k, v in card.items() if k not in _CARD_PIPELINE_KEYS} == {
            k: v for k, v in theirs["card"].items() if k not in _CARD_PIPELINE_KEYS
        }, (label, card, theirs["card"])
        assert card["num_devices"] == str(world) and card["pipeline_parallel_size"] == str(world // replicas)
        assert card.get("data_parallel_size") == (str(replicas) if replicas > 1 else None), card
        ref_weights = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / label / "final").state_dict()
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pp" / label / "final").state_dict()
        errs["weights"] = max((saved[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        moved = max((ref_weights[k] - initial[k]).abs().max().item() for k in ref_weights)
        assert moved > 10 * WEIGHT_TOL, f"{label}: weights moved only {moved}"
        worst[label] = errs
        assert max(errs["loss"], errs["grad_norm"], errs["metrics"]) < LOSS_TOL, (label, errs)
        assert errs["weights"] < WEIGHT_TOL and errs["predictions"] < LOSS_TOL, (label, errs)
    return worst


TRAINING_CASES = {
    "optimizer_cls_and_kwargs": {
        "args": {
            "include_num_input_tokens_seen": "all",
            "torch_empty_cache_steps": 2,
            "lr_scheduler_type": "cosine",
            "data_seed": 3,
        },
        "trainer": {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})},
    },
    "adafactor": {
        "args": {
            "optim": "adafactor",
            "include_num_input_tokens_seen": "non_padding",
            "gradient_accumulation_steps": 2,
            "train_sampling_strategy": "sequential",
        }
    },
    "sgd_checkpointing": {
        "args": {
            "optim": "sgd",
            "optim_args": "momentum=0.9,nesterov=True",
            "learning_rate": 0.1,
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False, "every_n_layers": 2},
            "dataloader_drop_last": True,
        }
    },
    "group_by_length": {
        "args": {
            "train_sampling_strategy": "group_by_length",
            "full_determinism": True,
        },
        "dataset": _longer,
    },
    "length_column": {
        "args": {
            "train_sampling_strategy": "group_by_length",
            "length_column_name": "n_tokens",
            "remove_unused_columns": False,
        },
        "dataset": _with_length_column,
    },
    # the noise is drawn per microbatch on stage 0: on the CPU the same numbers as one draw for the batch
    "neftune": {"args": {"neftune_noise_alpha": 5.0, "use_cache": True}},
}


def test_training_options_match_trainer(tmp_path):
    """Optimizers (optimizer_cls_and_kwargs, adafactor, sgd with optim_args), checkpointing kwargs, length-grouped
    sampling (measured and from a length column), NEFTune, token counting in both modes, torch_empty_cache_steps.

    Llama, not GPT-2: GPT-2's key biases get gradients of 1e-13 (rounding only: softmax ignores them), which
    Adafactor's scale-free update turns into steps of ±lr in any two runs that round differently, pipelined or not.
    """
    print(compare_cases("llama", tmp_path, TRAINING_CASES))


EVALUATION_CASES = {
    "metrics": {
        "args": {"eval_accumulation_steps": 1, "include_for_metrics": ["inputs", "loss"]},
        "trainer": {"compute_metrics": _token_accuracy, "preprocess_logits_for_metrics": _argmax},
    },
    "prediction_loss_only": {"args": {"prediction_loss_only": True}, "trainer": {"compute_metrics": _token_accuracy}},
    "batch_eval_metrics": {
        "args": {
            "batch_eval_metrics": True,
            "eval_do_concat_batches": False,
            "eval_on_start": True,
            "eval_strategy": "steps",
            "eval_steps": 3,
        },
        "trainer": {"compute_metrics": _BatchAccuracy()},
    },
}


def test_evaluation_options_match_trainer(tmp_path):
    """compute_metrics with preprocess_logits_for_metrics, eval_accumulation_steps and include_for_metrics;
    prediction_loss_only; batch_eval_metrics with unconcatenated batches and periodic evaluation."""
    print(compare_cases("gpt2", tmp_path, EVALUATION_CASES))


def test_reported_numbers_with_replicas(tmp_path):
    """PP=2 × DP=2 on 4 ranks against Trainer + DDP on 2: tokens seen and FLOPs summed over the replicas, evaluation
    steps per second and the model card's batch sizes those of one step of both replicas; and each replica's loss
    normalised by its own label count with average_tokens_across_devices=False, as each DDP process's."""
    pipeline = {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b"}
    cases = {
        "replicas": {"args": {"include_num_input_tokens_seen": "non_padding", "gradient_accumulation_steps": 2}},
        "tokens_per_replica": {
            "args": {"average_tokens_across_devices": False, "include_num_input_tokens_seen": "all"}
        },
    }
    print(compare_cases("gpt2", tmp_path, cases, pipeline=pipeline, world=4, ref_world=2))


# Every TrainingArguments field of transformers 5.24, each decided in the "Trainer options under the pipeline" table
# of docs/trainer-options.md (works, tested or not, or refused in hf_pipe/trainer_options.py).
DECIDED_FIELDS = set(
    """output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate lr_scheduler_type
    lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon
    optim_target_modules gradient_accumulation_steps average_tokens_across_devices max_grad_norm label_smoothing_factor
    bf16 fp16 bf16_full_eval fp16_full_eval tf32 activation_checkpointing activation_checkpointing_kwargs
    gradient_checkpointing gradient_checkpointing_kwargs torch_compile torch_compile_backend torch_compile_mode
    use_liger_kernel liger_kernel_config use_cache neftune_noise_alpha torch_empty_cache_steps auto_find_batch_size
    logging_strategy logging_steps logging_first_step log_on_each_node logging_nan_inf_filter
    include_num_input_tokens_seen log_level log_level_replica disable_tqdm report_to run_name project
    trackio_space_id trackio_bucket_id trackio_static_space_id eval_strategy eval_steps eval_delay
    per_device_eval_batch_size prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object
    eval_accumulation_steps include_for_metrics batch_eval_metrics save_only_model save_strategy save_steps
    save_on_each_node save_total_limit enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id
    hub_strategy hub_always_push hub_revision load_best_model_at_end metric_for_best_model greater_is_better
    ignore_data_skip restore_callback_states_from_checkpoint full_determinism seed data_seed use_cpu
    accelerator_config parallelism_config dataloader_drop_last dataloader_num_workers dataloader_pin_memory
    dataloader_persistent_workers dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order
    remove_unused_columns label_names train_sampling_strategy length_column_name ddp_find_unused_parameters
    ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph ddp_backend ddp_timeout fsdp fsdp_config deepspeed debug
    skip_memory_metrics do_train do_eval do_predict resume_from_checkpoint local_rank past_index""".split()
)


def test_every_training_argument_is_decided():
    """A field a later transformers adds must be decided (tested to work, or refused) before it is accepted."""
    import dataclasses

    from transformers import TrainingArguments

    assert {f.name for f in dataclasses.fields(TrainingArguments)} - DECIDED_FIELDS == set()
