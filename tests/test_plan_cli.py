"""`hf-pipe plan` prints the plan PipeTrainer builds, from a config alone (no ranks, no weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import tiny_model

FLAGS = [
    ["--pipeline_schedule", "1f1b"],
    ["--pipeline_schedule", "interleaved1f1b", "--pipeline_microbatches", "4"],
    ["--pipeline_schedule", "zbvzerobubble", "--pipeline_split", "uniform"],
]


def _trainer_plans(model_dir: str) -> list[dict]:
    from transformers import AutoModelForCausalLM, HfArgumentParser

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    out = []
    for flags in FLAGS:
        (args,) = HfArgumentParser(PipeTrainingArguments).parse_args_into_dataclasses(
            [
                "--output_dir",
                "/tmp/hf_pipe-unused",
                "--report_to",
                "none",
                "--per_device_train_batch_size",
                "8",
                *flags,
            ]
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = PipeTrainer(
            model=model, args=args, train_dataset=lm_dataset(8), data_collator=PadCollator("causal_lm")
        )
        plan = trainer.engine.plan
        out.append(
            {
                "layer_starts": plan.layer_starts,
                "modules": [list(s.modules) for s in plan.stages],
                "microbatches": trainer.engine.microbatches,
                "ranks": [trainer.engine.stage_to_rank[s.index] for s in plan.stages],
            }
        )
    return out


def _cli(model_dir: str, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hf_pipe.cli", "plan", "--model_name_or_path", model_dir, "--world_size", "2"]
    cmd += ["--per_device_train_batch_size", "8", "--json", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_plan_cli_matches_the_trainer(tmp_path):
    tiny_model("gpt2", n_layer=8).save_pretrained(tmp_path)
    built = run_distributed(_trainer_plans, 2, str(tmp_path), launcher_env=True)[0]
    for flags, trainer_plan in zip(FLAGS, built):
        summary = _cli(str(tmp_path), flags)
        assert summary["layer_starts"] == trainer_plan["layer_starts"], flags
        assert [s["modules"] for s in summary["stages"]] == trainer_plan["modules"], flags
        assert [s["rank"] for s in summary["stages"]] == trainer_plan["ranks"], flags
        assert summary["microbatches"] == trainer_plan["microbatches"], flags
        assert 0 < summary["bubble_fraction"] < 1 and summary["stages"][0]["total_bytes"] > 0


def test_plan_cli_table_and_errors(tmp_path, capsys):
    from hf_pipe.cli import main

    assert main(["plan", "--model_type", "llama", "--config", "num_hidden_layers=8,hidden_size=256,"
                 "intermediate_size=512,num_attention_heads=4,vocab_size=1000", "--pipeline_parallel_size", "4"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "4 stages on 4 ranks" in table and "predicted bubble" in table and "lm_head" in table
    from hf_pipe import PipelineConfigError

    with pytest.raises(PipelineConfigError, match="= 16 stages, but the model has 8 blocks"):
        main(["plan", "--model_type", "llama", "--config", "num_hidden_layers=8", "--pipeline_parallel_size", "16"])


def test_plan_for_a_family_without_adapter(capsys):
    """`auto` resolves to the trace frontend, which splits the model's own block list (found on a meta model)."""
    from hf_pipe.cli import main

    config = "num_hidden_layers=8,hidden_size=256,intermediate_size=1024,num_attention_heads=4,vocab_size=1000"
    assert main(["plan", "--model_type", "gpt_neox", "--config", config, "--pipeline_parallel_size", "2"]) == 0
    table = capsys.readouterr().out
    assert "gpt_neox (causal_lm): 2 stages on 2 ranks" in table
    assert "embed_in" in table and "lm_head" in table  # embeddings on the first stage, the head on the last
    from hf_pipe import PipelineConfigError

    with pytest.raises(PipelineConfigError, match="model_type='gpt_neox' has no family adapter"):
        main(["plan", "--model_type", "gpt_neox", "--config", config, "--pipeline_frontend", "module"])


_SMALL = "num_hidden_layers=4,hidden_size=64,intermediate_size=128,num_attention_heads=4,vocab_size=1000"
# per head: (model type, architecture, the head module the last stage ends with, logits per token it keeps)
_HEADS = [
    ("llama", "LlamaForCausalLM", "lm_head", 1000),
    ("llama", "LlamaForSequenceClassification", "score", 2),  # scored on every token, then pooled
    ("llama", "LlamaForTokenClassification", "score", 2),
    ("llama", "LlamaForQuestionAnswering", "qa_outputs", 2),
    ("bert", "BertForMaskedLM", "cls", 1000),
    ("bert", "BertForSequenceClassification", "classifier", None),  # pooled: one vector per sequence
    ("bert", "BertForTokenClassification", "classifier", 2),
    ("bert", "BertForQuestionAnswering", "qa_outputs", 2),
    ("bert", "BertForMultipleChoice", "classifier", None),
]


@pytest.mark.parametrize("model_type, architecture, module, logits", _HEADS, ids=[h[1] for h in _HEADS])
def test_plan_knows_each_head(model_type, architecture, module, logits):
    """Each head's modules on the last stage (as PipeTrainer splits the model itself), its FLOPs and the activations
    its logits and loss keep (a multiple-choice batch holds num_choices sequences per example)."""
    import transformers

    from hf_pipe import plan_split
    from hf_pipe.cli import PlanArguments, describe
    from hf_pipe.training_args import PipelineArguments

    plan_args = PlanArguments(model_type=model_type, config=_SMALL, architecture=architecture, seq_len=32)
    summary = describe(plan_args, PipelineArguments(pipeline_parallel_size=2))
    last = summary["stages"][-1]
    assert last["modules"][-1].rsplit(".", 1)[-1] == module
    config = transformers.AutoConfig.for_model(model_type, **_parse(_SMALL))
    model = getattr(transformers, architecture)(config)
    stages = plan_split(model, 2, seq_len=32).stages
    assert [list(s.modules) for s in stages] == [s["modules"] for s in summary["stages"]]
    # what the last stage's microbatches keep in flight: 8 rows / 4 microbatches, of 32 tokens, 1 in flight (1F1B)
    choices = 4 if architecture.endswith("MultipleChoice") else 1
    sequences = 8 // summary["microbatches"] * choices * last["microbatches_in_flight"]
    if logits is not None:  # fp32 logits and the log-softmax of the loss, per token
        assert last["head_activation_bytes"] == sequences * 32 * logits * (4 + 4)
        assert summary["head_flops_per_token"] >= 2 * 64 * logits
    else:  # the pooled hidden vector and the logits, per sequence
        assert last["head_activation_bytes"] == sequences * (64 + (2 if choices == 1 else 1)) * (4 + 4)
    if architecture.endswith("MultipleChoice"):
        six = describe(
            PlanArguments(**{**vars(plan_args), "num_choices": 6}), PipelineArguments(pipeline_parallel_size=2)
        )
        assert six["stages"][0]["activation_bytes"] == 6 * summary["stages"][0]["activation_bytes"] // 4


def _parse(text: str) -> dict:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
