"""Bad PipeTrainer input: one clear error, on every rank, before any step and before any weight is freed."""

from __future__ import annotations

import pytest
import transformers

from hf_pipe import PipelineConfigError
from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import tiny_model


def _args(**overrides):
    from hf_pipe import PipeTrainingArguments

    settings = dict(output_dir="/tmp/hf_pipe-unused", report_to=[], per_device_train_batch_size=8, use_cpu=True)
    settings.update(overrides)
    return PipeTrainingArguments(**settings)


def _errors_for(cases: list[dict]) -> list[str | None]:
    """Each case: PipeTrainingArguments overrides, optionally with a `model` (tiny_model args, or a function) and a
    `dataset` (lm_dataset kwargs)."""
    from hf_pipe import PipeTrainer

    messages = []
    for case in cases:
        case = dict(case)
        model_spec = case.pop("model", None)
        dataset = case.pop("dataset", None)
        try:
            args = _args(**case)
            if model_spec is not None:
                model = model_spec() if callable(model_spec) else tiny_model(*model_spec)
                train = lm_dataset(**dataset) if dataset is not None else lm_dataset(16)
                PipeTrainer(model=model, args=args, train_dataset=train, data_collator=PadCollator("causal_lm"))
            messages.append(None)
        except PipelineConfigError as err:
            messages.append(str(err))
    return messages


def _t5():
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=50)
    )


def _gpt2_three_blocks():
    return tiny_model("gpt2", n_layer=3)


CASES = [
    (
        {"pipeline_parallel_size": 3},
        "pipeline_parallel_size=3 does not divide the 2 launched processes; use one of [1, 2]",
    ),
    (
        {"per_device_train_batch_size": 6, "pipeline_microbatches": 4},
        "pipeline_microbatches=4 does not divide per_device_train_batch_size=6",
    ),
    ({"fsdp": "full_shard"}, "fsdp='full_shard': FSDP here would shard the whole model"),
    ({"deepspeed": "ds_config.json"}, "deepspeed='ds_config.json': DeepSpeed wraps the whole model"),
    ({"pipeline_schedule": "zb1p"}, "pipeline_schedule='zb1p' is not a schedule; valid options are"),
    (
        {"pipeline_schedule": "dualpipev", "pipeline_microbatches": 2},
        "pipeline_microbatches=2 is fewer than the 4 pipeline stages",
    ),
    ({"pipeline_schedule": "interleaved1f1b", "model": ("gpt2", 0)}, None),  # a good setting passes
    ({"pipeline_schedule": "interleaved1f1b", "model": _gpt2_three_blocks}, "= 4 stages, but the model has 3 blocks"),
    ({"model": _t5, "pipeline_frontend": "module"}, "model_type='t5' has no family adapter"),
    ({"model": _t5}, "T5ForConditionalGeneration has no head PipeTrainer can train"),  # 'auto' would trace it
    ({"pipeline_frontend": "jit"}, "pipeline_frontend='jit' is not a frontend; valid options are"),
    (
        {"model": ("gpt2", 0), "pipeline_frontend": "trace", "gradient_checkpointing": True},
        "gradient_checkpointing=True with pipeline_frontend='trace'",
    ),
    ({"model": ("gpt2", 0), "dataset": {"n": 0}}, "train_dataset is empty (0 rows)"),
    (
        {"model": ("gpt2", 0), "dataset": {"n": 8, "min_len": 80, "max_len": 80}},
        "has sequences of 80 tokens but the model has max_position_embeddings=64",
    ),
]


def test_bad_settings_fail_on_every_rank_before_any_step():
    per_rank = run_distributed(_errors_for, 2, [case for case, _ in CASES], launcher_env=True, timeout=200)
    for r, messages in enumerate(per_rank):
        for (case, expected), message in zip(CASES, messages):
            if expected is None:
                assert message is None, (case, message)
            else:
                assert message is not None and expected in message, (r, case, message)
    assert per_rank[0] == per_rank[1]


def test_all_problems_in_one_numbered_error():
    with pytest.raises(PipelineConfigError) as info:
        _args(per_device_train_batch_size=6, pipeline_microbatches=4, label_smoothing_factor=0.1, torch_compile=True)
    text = str(info.value)
    assert text.startswith("hf_pipe found 3 configuration errors:")
    for n, needle in enumerate(["pipeline_microbatches=4", "label_smoothing_factor=0.1", "torch_compile=True"], 1):
        assert f"  {n}. {needle}" in text


def test_cpu_affinity_needs_a_cpu_per_local_rank(monkeypatch):
    from hf_pipe.cpu_affinity import allowed_cpus

    cpus = allowed_cpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(len(cpus) + 1))
    with pytest.raises(PipelineConfigError) as info:
        _args(pipeline_cpu_affinity=True)
    assert f"pipeline_cpu_affinity=True: {len(cpus) + 1} processes on this host but this process may use only " in str(
        info.value
    )
    assert f"launch at most {len(cpus)} processes per host, or set pipeline_cpu_affinity=False" in str(info.value)


def test_cpu_affinity_shares():
    from hf_pipe.cpu_affinity import core_share

    assert [core_share(list(range(8)), r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [core_share([2, 3, 5], r, 2) for r in range(2)] == [[2], [3]]  # a CPU left over stays unused


def test_args_type_is_checked():
    from hf_pipe import PipeTrainer

    with pytest.raises(TypeError, match="PipeTrainer needs args=PipeTrainingArguments"):
        PipeTrainer(model=tiny_model("gpt2"), args=transformers.TrainingArguments(output_dir="/tmp/x"))
