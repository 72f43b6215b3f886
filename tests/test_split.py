"""Split plans, the family registry and stage building: pure logic, no process group, no real weights."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.distributed.pipelining import SplitPoint

from hf_pipe import PipelineConfigError, annotate_split_points, plan_split, register_family, registered_families
from hf_pipe.families import LlamaAdapter, get_family
from hf_pipe.stage import build_stage_modules, tied_groups
from tests._models import tiny_model

# Real shapes, built on the meta device only (no weights are allocated).
LLAMA2_7B = transformers.LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, architectures=["LlamaForCausalLM"],
)  # fmt: skip
GPT2_XL = transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25, architectures=["GPT2LMHeadModel"])
BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
BERT_LARGE_CLS = transformers.BertConfig(**BERT_LARGE, architectures=["BertForSequenceClassification"])
BERT_LARGE_MLM = transformers.BertConfig(**BERT_LARGE, architectures=["BertForMaskedLM"])


def test_registry_has_the_families_and_refuses_duplicates():
    assert {"bert", "gpt2", "llama", "mistral", "qwen2", "qwen3"} <= set(registered_families())
    with pytest.raises(ValueError, match="already has an adapter"):
        register_family("llama", LlamaAdapter())
    register_family("my-llama-test", LlamaAdapter())
    assert isinstance(get_family("my-llama-test"), LlamaAdapter)


def test_plan_is_plain_data_with_fqns_per_stage():
    plan = plan_split(tiny_model("gpt2"), 2)
    assert plan.layer_starts == [0, 2]
    first, last = plan.stages
    assert first.modules == (
        "transformer.wte",
        "transformer.wpe",
        "transformer.drop",
        "transformer.h.0",
        "transformer.h.1",
    )
    assert last.modules == ("transformer.h.2", "transformer.h.3", "transformer.ln_f", "lm_head")
    assert json.loads(plan.to_json())["stages"][1]["layers"] == [2, 3]
    assert "max/mean cost" in str(plan)


def test_plans_need_no_weights():
    # a config is enough: the parameter counts come from a meta-device model
    plan = plan_split(LLAMA2_7B, 4)
    total = sum(s.params for s in plan.stages)
    assert 6.5e9 < total < 7.0e9  # Llama-2-7B, untied embeddings: 6.74B
    assert plan.stages[0].modules[0] == "model.embed_tokens"
    assert plan.stages[-1].modules[-2:] == ("model.norm", "lm_head")


def _brute_force_max(units: list[float], first: float, last: float, stages: int) -> float:
    """The least possible cost of the most expensive stage over every contiguous partition of `units`."""
    import itertools

    prefix = [0.0, *itertools.accumulate(units)]
    n = len(units)
    return min(
        max(
            prefix[b] - prefix[a] + (first if k == 0 else 0) + (last if k == stages - 1 else 0)
            for k, (a, b) in enumerate(zip((0, *cuts), (*cuts, n)))
        )
        for cuts in itertools.combinations(range(1, n), stages - 1)
    )


@pytest.mark.parametrize(
    "config", [LLAMA2_7B, GPT2_XL, BERT_LARGE_CLS, BERT_LARGE_MLM], ids=lambda c: c.architectures[0]
)
@pytest.mark.parametrize("stages", [2, 4, 8])
def test_auto_is_optimal_and_balanced(config, stages):
    """`auto` is the best contiguous partition under its cost model (brute force over all of them): of whole blocks,
    or of half blocks (attention | MLP) when that lowers the most expensive stage by more than 1%."""
    from hf_pipe.families import get_family, task_of

    adapter = get_family(config.model_type)
    flops = adapter.flops_per_token(
        config, task_of(config.architectures[0]), min(config.max_position_embeddings, 2048)
    )
    n = adapter.num_layers(config)
    halves = [flops.first_half, flops.layer - flops.first_half] * n
    whole = plan_split(config, stages, sub_blocks=False)
    auto = plan_split(config, stages)
    worst = max(s.flops_per_token for s in auto.stages)
    if stages <= 4:
        best_whole = _brute_force_max([flops.layer] * n, flops.embeddings, flops.head, stages)
        assert max(s.flops_per_token for s in whole.stages) == pytest.approx(best_whole, rel=1e-12)
        best_half = _brute_force_max(halves, flops.embeddings, flops.head, stages)
        uses_halves = any(s.halves for s in auto.stages)
        assert worst == pytest.approx(best_half if uses_halves else best_whole, rel=1e-12)
        assert uses_halves == (best_half < 0.99 * best_whole)
    assert worst <= max(s.flops_per_token for s in whole.stages) * (1 + 1e-12)
    assert auto.imbalance <= plan_split(config, stages, "uniform").imbalance + 1e-12
    assert auto.imbalance <= 1.10


def test_auto_imbalance_figures():
    """The figures reported for the issues: ≤ 1.10 everywhere; half-block splits are what bring 8 stages there."""
    figures = {
        (c.architectures[0], s, sub): round(plan_split(c, s, sub_blocks=sub).imbalance, 3)
        for c in (LLAMA2_7B, GPT2_XL, BERT_LARGE_CLS, BERT_LARGE_MLM)
        for s in (2, 4, 8)
        for sub in (False, True)
    }
    print(figures)
    assert all(v <= 1.10 for (arch, s, sub), v in figures.items() if sub)
    assert figures[("BertForMaskedLM", 8, False)] > 1.2  # whole blocks alone cannot balance BERT-large's MLM head


def test_half_block_stages_own_only_their_half():
    """A stage that begins mid-block owns the MLP half's modules; its neighbour the attention half's."""
    config = LLAMA2_7B
    plan = plan_split(config, 8)
    split = next(s for s in plan.stages if any(part == 1 for _, part in s.halves))
    before = plan.stages[split.index - 1]
    block = split.layers[0]
    assert (block, 0) in before.halves and plan.layer_starts[split.index] == block + 0.5
    assert f"model.layers.{block}.mlp" in split.modules and f"model.layers.{block}" not in split.modules
    assert f"model.layers.{block}.self_attn" in before.modules
    assert "MLP half only" in str(plan)


def test_uniform_and_explicit_and_split_points():
    model = tiny_model("llama", num_hidden_layers=6)
    assert plan_split(model, 4, "uniform").layer_starts == [0, 2, 4, 5]
    assert plan_split(model, 3, [0, 1, 4]).layer_starts == [0, 1, 4]
    assert plan_split(model, 3, [1, 4]).layer_starts == [0, 1, 4]  # the leading 0 may be left out
    marks = {"model.layers.2": SplitPoint.BEGINNING, "model.layers.3": SplitPoint.END}
    assert plan_split(model, 3, marks).layer_starts == [0, 2, 4]
    annotate_split_points(model, {"model.layers.5": SplitPoint.BEGINNING})
    plan = plan_split(model, 2)  # marks on the model win over "auto"
    assert plan.layer_starts == [0, 5] and plan.policy == "split points"


@pytest.mark.parametrize(
    "split, message",
    [
        ([0, 3, 2], "strictly increasing"),
        ([0, 2], "defines 2 stages but the pipeline has 3"),
        ([0, 2, 9], "strictly increasing block indices in \\[0, 6\\)"),
        ("balanced", "valid options are \\['auto', 'measured', 'uniform'\\]"),
        ({"model.norm": SplitPoint.BEGINNING}, "is not a block of this model"),
    ],
)
def test_bad_splits_say_what_to_do(split, message):
    with pytest.raises(PipelineConfigError, match=message):
        plan_split(tiny_model("llama", num_hidden_layers=6), 3, split)


def test_more_stages_than_layers_and_unknown_family():
    with pytest.raises(PipelineConfigError, match="every stage needs at least one block; use between 1 and 4"):
        plan_split(tiny_model("gpt2"), 5)
    with pytest.raises(PipelineConfigError, match="model_type='gpt_neox' has no split policy"):
        plan_split(transformers.GPTNeoXConfig(), 2)
    with pytest.raises(PipelineConfigError, match="model_type='t5' is an encoder-decoder.*plan_seq2seq"):
        plan_split(transformers.T5Config(), 2)


def test_stage_keeps_only_its_parameters():
    """A rank holds its share: every parameter no local stage owns is a meta tensor (no storage)."""
    model = tiny_model("gpt2")
    plan = plan_split(model, 2)
    total = sum(p.numel() for p in model.parameters())
    (stage,) = build_stage_modules(model, get_family("gpt2"), plan, [1])
    real = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
    assert real == plan.stages[1].params == sum(p.numel() for p in stage.parameters())
    assert real < total
    # the tied weight stays real on the last stage (it is lm_head.weight) although wte is not this stage's
    assert model.lm_head.weight.device.type == "cpu" and model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.device.type == "meta"


def test_tied_groups_are_found_by_identity():
    assert tied_groups(tiny_model("gpt2")) == [["lm_head.weight", "transformer.wte.weight"]]
    assert tied_groups(tiny_model("llama")) == []
    assert ["lm_head.weight", "model.embed_tokens.weight"] in tied_groups(tiny_model("llama-tied"))
    mlm = tied_groups(tiny_model("bert-mlm"))
    assert ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"] in mlm


def test_meta_model_plan_matches_real_model_plan():
    with torch.device("meta"):
        meta = transformers.GPT2LMHeadModel(tiny_model("gpt2").config)
    assert plan_split(meta, 2) == plan_split(tiny_model("gpt2"), 2)
