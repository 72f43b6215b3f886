"""Bad settings: one error naming the setting, the values and the fix, on every rank, before any step."""

from __future__ import annotations

import pytest
import transformers

from hf_pipe import PipelineConfigError, schedule_class
from hf_pipe.errors import raise_if_any
from hf_pipe.schedule import check_schedule
from hf_pipe.validate import pipeline_problems
from tests._dist import run_distributed
from tests._models import tiny_model


def problems(**overrides):
    settings = dict(schedule="1f1b", pp_size=2, stages_per_rank=1, microbatches=4, batch_size=8)
    settings.update(overrides)
    return pipeline_problems(tiny_model("gpt2").config, **settings)


def test_good_settings_have_no_problems():
    assert problems() == []
    assert problems(schedule="Interleaved1F1B", stages_per_rank=2) == []


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(PipelineConfigError, match="valid options are \\['gpipe', '1f1b', 'interleaved1f1b'"):
        schedule_class("zerobubble")
    assert "is not a schedule" in problems(schedule="pipedream")[0]


def test_microbatches_must_divide_the_batch():
    (msg,) = problems(microbatches=4, batch_size=6)
    assert msg == (
        "pipeline_microbatches=4 does not divide per_device_train_batch_size=6; use 1, 2, 3, 6 microbatches, "
        "or a batch size divisible by 4."
    )


def test_too_few_microbatches_for_the_schedule():
    (msg,) = problems(microbatches=1, batch_size=8)
    assert "pipeline_microbatches=1 is fewer than the 2 pipeline stages" in msg and ">= 2" in msg
    (msg,) = problems(schedule="dualpipev", stages_per_rank=2, microbatches=2)
    assert "fewer than the 4 pipeline stages" in msg
    (msg,) = problems(schedule="interleaved1f1b", stages_per_rank=2, microbatches=5, batch_size=10)
    assert "interleaved schedules run microbatches in 2 rounds" in msg
    assert problems(schedule="gpipe", microbatches=1) == []


def test_stages_per_rank_must_fit_the_schedule():
    assert "runs one stage per rank" in problems(stages_per_rank=2)[0]
    assert "exactly 2 stages" in problems(schedule="zbvzerobubble", stages_per_rank=3, microbatches=6, batch_size=6)[0]
    assert "at least 2 stages per rank" in problems(schedule="loopedbfs", stages_per_rank=1)[0]


def test_more_stages_than_layers():
    (msg,) = problems(pp_size=8, microbatches=8)
    assert "= 8 stages, but the model has 4 blocks" in msg and "pipeline_parallel_size ≤ 4" in msg


def test_unknown_family():
    msg = pipeline_problems(
        transformers.GPTNeoXConfig(), schedule="1f1b", pp_size=2, stages_per_rank=1, microbatches=2
    )
    assert "model_type='gpt_neox' has no family adapter" in msg[0] and "register_family" in msg[0]


def test_traced_stages_cannot_be_sharded_by_fsdp():
    msg = pipeline_problems(
        transformers.GPTNeoXConfig(),
        schedule="1f1b",
        pp_size=2,
        stages_per_rank=1,
        microbatches=2,
        frontend="trace",
        data_parallel="fsdp",
    )
    assert len(msg) == 1 and "pipeline_data_parallel='fsdp'" in msg[0] and "pipeline_data_parallel='ddp'" in msg[0]


def test_every_problem_is_reported_at_once():
    found = problems(schedule="dualpipev", stages_per_rank=1, microbatches=3, batch_size=8, pp_size=8)
    with pytest.raises(PipelineConfigError) as info:
        raise_if_any(found)
    text = str(info.value)
    assert text.startswith(f"hf_pipe found {len(found)} configuration errors:") and len(found) >= 3
    assert "  1. " in text and "  3. " in text


def _bad_engine():
    from hf_pipe import PipelineEngine

    model = tiny_model("gpt2")
    try:
        PipelineEngine(model, schedule="1f1b", microbatches=3, batch_size=8, device="cpu")
    except PipelineConfigError as err:
        # nothing was built: the model still holds every weight
        return str(err), all(p.device.type == "cpu" for p in model.parameters())
    return None, None


def test_engine_raises_on_every_rank_before_building():
    results = run_distributed(_bad_engine, 2, timeout=120)
    for message, untouched in results:
        assert message is not None and "pipeline_microbatches=3 does not divide" in message
        assert untouched
    assert check_schedule("gpipe", pp_size=2, stages_per_rank=1, microbatches=0) == [
        "pipeline_microbatches=0 must be at least 1."
    ]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_router_loss_runs_on_module_and_traced_stages_only(model_type):
    from tests.test_trainer_errors import _moe

    shape = dict(schedule="1f1b", pp_size=2, stages_per_rank=1, microbatches=4)
    for frontend in ("module", "trace"):  # the stages carry its statistics (tests/test_moe.py)
        assert pipeline_problems(_moe(model_type).config, **shape, frontend=frontend) == []
    # a frontend that does not carry them (the encoder-decoders'), named with the fix
    (msg, *_) = pipeline_problems(_moe(model_type).config, **shape, frontend="seq2seq")
    assert msg.startswith(f"output_router_logits=True ({model_type}, router_aux_loss_coef=0.01)")
    assert "use pipeline_frontend='module'" in msg and "set config.output_router_logits=False" in msg
