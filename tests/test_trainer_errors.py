"""Bad PipeTrainer input: one clear error, on every rank, before any step and before any weight is freed."""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_pipe import PipelineConfigError
from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import CASES as CASES_MODELS
from tests._models import tiny_model


def _args(**overrides):
    from hf_pipe import PipeTrainingArguments

    settings = dict(output_dir="/tmp/hf_pipe-unused", report_to=[], per_device_train_batch_size=8, use_cpu=True)
    settings.update(overrides)
    return PipeTrainingArguments(**settings)


def _errors_for(cases: list[dict]) -> list[str | None]:
    """Each case: PipeTrainingArguments overrides, optionally with a `model` (tiny_model args, or a function), a
    `dataset` (lm_dataset kwargs) and `trainer` (a function of the model, or None: more PipeTrainer arguments)."""
    from hf_pipe import PipeTrainer

    messages = []
    for case in cases:
        case = dict(case)
        model_spec = case.pop("model", None)
        dataset = case.pop("dataset", None)
        trainer = case.pop("trainer", None)
        try:
            args = _args(**case)
            if model_spec is not None or trainer is not None:
                model = (
                    None if model_spec is None else model_spec() if callable(model_spec) else tiny_model(*model_spec)
                )
                train = lm_dataset(**dataset) if dataset is not None else lm_dataset(16)
                extra = trainer(model) if trainer is not None else {}
                PipeTrainer(
                    model=model, args=args, train_dataset=train, data_collator=PadCollator("causal_lm"), **extra
                )
            messages.append(None)
        except PipelineConfigError as err:
            messages.append(str(err))
    return messages


def _t5():
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=50)
    )


def _t5_classifier():
    return transformers.T5ForSequenceClassification(
        transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=50)
    )


def _bert_pretraining():
    """A head no adapter runs: masked LM and next-sentence logits from one forward."""
    config_cls, _, kwargs = CASES_MODELS["bert-mlm"]
    return transformers.BertForPreTraining(config_cls(vocab_size=97, **kwargs))


def _gpt2_three_blocks():
    return tiny_model("gpt2", n_layer=3)


def _moe(model_type: str, **overrides):
    """A tiny MoE causal LM with its router load-balancing loss on (the default of neither family)."""
    common = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.01,
    )  # fmt: skip
    common.update(overrides)
    if model_type == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, head_dim=8, **common)
        return transformers.Qwen3MoeForCausalLM(config)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common))


def _mixtral():
    return _moe("mixtral")


def _model_init_only(model):
    return {"model_init": _gpt2_three_blocks}


def _prebuilt_optimizer(model):
    return {"optimizers": (torch.optim.AdamW(model.parameters()), None)}


def _sgd_factory(model, **kwargs):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _optimizer_factory(model):
    return {"optimizer_cls_and_kwargs": (_sgd_factory, {})}


def _optimizer_class(model):
    return {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})}


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
    ({"model": _t5, "pipeline_frontend": "module"}, "pipeline_frontend='module' with model_type='t5': its stages"),
    ({"model": _t5, "pipeline_frontend": "trace"}, "the trace frontend does not pipeline encoder-decoders"),
    ({"model": _t5_classifier}, "T5ForSequenceClassification has no head PipeTrainer can train on an encoder-deco"),
    # heads (issue 17): one that used to crash with an AttributeError now starts; the others are one clear error
    ({"model": ("bert-tok", 0)}, None),
    (
        {"model": _bert_pretraining},
        "BertForPreTraining has a head hf_pipe cannot run with pipeline_frontend='module': the bert adapter runs",
    ),
    (
        {"model": _bert_pretraining, "pipeline_frontend": "trace"},
        "BertForPreTraining has a head hf_pipe cannot run with pipeline_frontend='trace': its class names no task",
    ),
    (
        {"model": _bert_pretraining, "pipeline_frontend": "trace", "pipeline_task": "masked_lm"},
        "BertForPreTraining's forward returns prediction_logits (3-d), seq_relationship_logits (2-d) (without "
        "labels), but the masked_lm loss reads logits (3-d)",
    ),
    (
        {"model": ("gpt2", 0), "pipeline_task": "seq_cls"},
        "pipeline_task='seq_cls' for GPT2LMHeadModel with pipeline_frontend='module'",
    ),
    (
        {"model": ("gpt2", 0), "pipeline_task": "seq_cls", "pipeline_frontend": "trace"},
        "GPT2LMHeadModel's forward returns logits (3-d) (without labels), but the seq_cls loss reads logits (2-d)",
    ),
    ({"pipeline_task": "reward"}, "pipeline_task='reward' is not a task; valid options are"),
    (
        {"model": ("bert-qa", 0), "label_names": ["labels"]},
        "label_names=['labels'] for BertForQuestionAnswering, whose loss reads ['start_positions', 'end_positions']",
    ),
    ({"model": ("bert-qa", 0), "label_names": ["end_positions", "start_positions"]}, None),
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
    # Trainer options that cannot reach the stages (hf_pipe/trainer_options.py)
    ({"fp16": True}, "fp16=True: Trainer's fp16 GradScaler scales the loss in accelerator.backward"),
    ({"bf16_full_eval": True}, "bf16_full_eval=True: for this option Trainer moves the whole model"),
    ({"optim": "galore_adamw_layerwise"}, "optim='galore_adamw_layerwise': GaLore projects the gradients"),
    ({"optim": "apollo_adamw"}, "optim='apollo_adamw': APOLLO projects the gradients"),
    ({"optim": "adalomo"}, "optim='adalomo': AdaLOMO fuses the update into the backward pass"),
    ({"optim": "schedule_free_adamw"}, "optim='schedule_free_adamw': a schedule-free optimizer keeps two points"),
    ({"optim": "adamw_8bit"}, "optim='adamw_8bit': Trainer's 8-bit bitsandbytes set-up keeps the state of every"),
    ({"optim": "grokadamw"}, "optim='grokadamw': GrokAdamW gives each weight the momentum beta1"),
    ({"use_liger_kernel": True}, "use_liger_kernel=True: Liger patches the model's forward and loss"),
    ({"torch_compile_backend": "eager"}, "torch_compile_backend='eager' (which turns torch_compile on)"),
    ({"label_names": ["label_ids"]}, "label_names=['label_ids']: the pipeline's loss and evaluation read"),
    ({"train_sampling_strategy": "batch_rebalance"}, "train_sampling_strategy='batch_rebalance': the sampler"),
    ({"enable_jit_checkpoint": True}, "enable_jit_checkpoint=True: each rank decides to save on its own timer"),
    ({"debug": "underflow_overflow"}, "debug='underflow_overflow': its forward hooks abort on the first inf/nan"),
    (
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
        "(use_reentrant=True): torch's pipeline stages take their input gradients with torch.autograd.grad",
    ),
    (
        {"pipeline_parallel_size": 1, "eval_use_gather_object": True},
        "eval_use_gather_object=True with 2 data-parallel replicas",
    ),
    (
        {"model": ("gpt2", 0), "pipeline_frontend": "trace", "neftune_noise_alpha": 5.0},
        "neftune_noise_alpha=5.0 with pipeline_frontend='trace'",
    ),
    ({"trainer": _model_init_only}, "model_init=_gpt2_three_blocks: Trainer calls it again at train()"),
    ({"model": ("gpt2", 0), "trainer": _prebuilt_optimizer}, "optimizers=(AdamW, None): an optimizer built before"),
    (
        {"model": ("gpt2", 0), "trainer": _optimizer_factory},
        "optimizer_cls_and_kwargs=(_sgd_factory, ...): not a torch.optim.Optimizer subclass",
    ),
    ({"model": ("gpt2", 0), "trainer": _optimizer_class}, None),  # an Optimizer subclass passes
    # MoE router load-balancing loss: the stages carry its statistics (tests/test_moe.py)
    ({"model": _mixtral, "pipeline_frontend": "auto"}, None),
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


def test_every_trainer_optimizer_is_decided():
    """A new OptimizerNames member in a later transformers must be classed: per-weight (works) or refused."""
    from transformers.training_args import OptimizerNames

    from hf_pipe.trainer_options import PER_WEIGHT_OPTIMIZERS, REFUSED_OPTIMIZERS

    assert not PER_WEIGHT_OPTIMIZERS & set(REFUSED_OPTIMIZERS)
    assert {o.value for o in OptimizerNames} == PER_WEIGHT_OPTIMIZERS | set(REFUSED_OPTIMIZERS)


def test_neftune_refused_on_cuda(monkeypatch):
    """Per-microbatch noise is Trainer's on the CPU only (tested in test_trainer_options); no GPU needed here."""
    from types import SimpleNamespace

    from hf_pipe.trainer_options import frontend_option_problems

    args = SimpleNamespace(neftune_noise_alpha=5.0)
    assert frontend_option_problems(args, "module") == [] or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (problem,) = frontend_option_problems(args, "module")
    assert problem.startswith("neftune_noise_alpha=5.0 on CUDA: the stage draws the noise once per microbatch")


def test_args_type_is_checked():
    from hf_pipe import PipeTrainer

    with pytest.raises(TypeError, match="PipeTrainer needs args=PipeTrainingArguments"):
        PipeTrainer(model=tiny_model("gpt2"), args=transformers.TrainingArguments(output_dir="/tmp/x"))
