"""Every pipeline config keeps the defaults of the config it wraps: `PipeSFTConfig` TRL's `SFTConfig` defaults (learning
rate, bf16, logging steps, gradient checkpointing, ...), `PipeRewardConfig` `RewardConfig`'s, `PipeGRPOConfig`
`GRPOConfig`'s (its generation batch sized as GRPOConfig sizes it on one process), `PipeORPOConfig` and
`PipeCPOConfig` those of TRL's experimental `ORPOConfig` and `CPOConfig`, and the Trainer configs theirs — as declared fields, and as values after `__post_init__` from the command line. No process group: nothing
here is launched (WORLD_SIZE unset)."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments

from hf_pipe import PipeSeq2SeqTrainingArguments, PipeTrainingArguments
from hf_pipe.training_args import PipelineArguments

pytest.importorskip("trl")

from trl import GRPOConfig, RewardConfig, SFTConfig  # noqa: E402
from trl.experimental.cpo import CPOConfig  # noqa: E402
from trl.experimental.orpo import ORPOConfig  # noqa: E402

from hf_pipe.trl import PipeCPOConfig, PipeGRPOConfig, PipeORPOConfig, PipeRewardConfig, PipeSFTConfig  # noqa: E402

PAIRS = [
    (PipeSFTConfig, SFTConfig),
    (PipeRewardConfig, RewardConfig),
    (PipeGRPOConfig, GRPOConfig),
    (PipeORPOConfig, ORPOConfig),
    (PipeCPOConfig, CPOConfig),
    (PipeSeq2SeqTrainingArguments, Seq2SeqTrainingArguments),
    (PipeTrainingArguments, TrainingArguments),
]
IDS = [pipe.__name__ for pipe, _ in PAIRS]
PIPELINE_FIELDS = {f.name for f in dataclasses.fields(PipelineArguments)} | {"pipeline_cpu_affinity"}


@pytest.mark.parametrize(("pipe", "base"), PAIRS, ids=IDS)
def test_every_field_keeps_the_wrapped_config_s_default(pipe, base):
    mine = {f.name: f for f in dataclasses.fields(pipe)}
    theirs = {f.name: f for f in dataclasses.fields(base)}
    assert theirs.keys() <= mine.keys()
    for name, field in theirs.items():
        assert mine[name].default == field.default, (name, mine[name].default, field.default)
        assert mine[name].default_factory == field.default_factory, name
        assert mine[name].metadata == field.metadata, name  # the help text too: the field itself is kept
    # ours add the pipeline fields, and model_init_kwargs where the wrapped config has none
    added = mine.keys() - theirs.keys()
    assert added == PIPELINE_FIELDS | ({"model_init_kwargs"} - theirs.keys()), added


def _parsed(cls: type, argv: list[str]):
    """The config the command line gives, or the error its __post_init__ raises (bf16 without a bf16 device)."""
    try:
        return HfArgumentParser((cls,)).parse_args_into_dataclasses(argv)[0]
    except ValueError as err:
        return err


@pytest.mark.parametrize("use_cpu", [False, True], ids=["default", "use_cpu"])
@pytest.mark.parametrize(("pipe", "base"), PAIRS, ids=IDS)
def test_parsed_values_are_the_wrapped_config_s(pipe, base, use_cpu, tmp_path):
    argv = ["--output_dir", str(tmp_path)] + (["--use_cpu"] if use_cpu else [])
    mine, theirs = _parsed(pipe, argv), _parsed(base, argv)
    if isinstance(theirs, ValueError):  # TRL's bf16=True on a machine without bf16 GPU: the same refusal
        assert isinstance(mine, ValueError) and str(mine) == str(theirs)
        return
    differ = {}
    for field in dataclasses.fields(base):  # every field, those set in __post_init__ (init=False) too
        a, b = getattr(mine, field.name), getattr(theirs, field.name)
        if a != b:
            differ[field.name] = (a, b)
    assert differ == {}
    if base in (SFTConfig, RewardConfig, ORPOConfig, CPOConfig):  # TRL's defaults, not TrainingArguments'
        assert mine.learning_rate == {SFTConfig: 2e-5, RewardConfig: 1e-4, ORPOConfig: 1e-6, CPOConfig: 1e-6}[base]
        assert (mine.logging_steps, mine.gradient_checkpointing, mine.bf16) == (10, True, True)
    assert mine.to_dict().keys() - theirs.to_dict().keys() == PIPELINE_FIELDS | (
        {"model_init_kwargs"} - theirs.to_dict().keys()
    )


def test_only_trl_s_false_model_init_kwargs_warning_is_dropped():
    """With a path, TRL's trainer sees hf_pipe's skeleton and would say `model_init_kwargs` are ignored (they built
    it): that one message is dropped while the trainer is built, every other one kept; with a built model it stays."""
    import inspect
    import logging

    from torch import nn
    from trl import RewardTrainer, SFTTrainer

    from hf_pipe.trl._model import path_given

    for trainer in (SFTTrainer, RewardTrainer):
        name = trainer.__name__.replace("Trainer", "Config")
        false = (
            f"You passed `model_init_kwargs` to the `{name}`, but your model is already instantiated. The "
            "`model_init_kwargs` will be ignored."
        )
        assert "You passed `model_init_kwargs` to the" in inspect.getsource(trainer.__init__)  # TRL's text still
        logger = logging.getLogger(trainer.__module__)
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, seen=seen: seen.append(record.getMessage())
        logger.addHandler(handler)
        try:
            with path_given(trainer, "path/to/model"):
                logger.warning(false)
                logger.warning(f"[RANK 0] {false}")  # as accelerate's logger words it in a launched job
                logger.warning("another warning")
            with path_given(trainer, nn.Linear(1, 1)):  # a built model: TRL's message is true
                logger.warning(false)
            logger.warning(false)
        finally:
            logger.removeHandler(handler)
        assert seen == ["another warning", false, false]


def test_cpo_s_alphapo_sugar_is_kept(tmp_path):
    """CPOConfig's own __post_init__ runs after the pipeline's: `loss_type="alphapo"` is SimPO without the NLL."""
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--loss_type", "alphapo", "--alpha", "0.2"]
    mine, theirs = _parsed(PipeCPOConfig, argv), _parsed(CPOConfig, argv)
    assert (mine.loss_type, mine.cpo_alpha, mine.alpha) == (theirs.loss_type, theirs.cpo_alpha, theirs.alpha)
    assert (mine.loss_type, mine.cpo_alpha, mine.alpha) == ("simpo", 0.0, 0.2)
