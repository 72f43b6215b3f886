"""Pipeline × tensor parallelism: each stage sharded over its TP ranks with the model's own transformers TP plan,
against Trainer on one process (same seed and data): logged losses, grad norms, eval loss and saved weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.tensor import DTensor

from hf_pipe.cli import PlanArguments, describe
from hf_pipe.training_args import PipelineArguments
from tests._dist import run_distributed
from tests.test_resume_layouts import LAYOUT_TOL, _diff, _run
from tests.test_trainer_equivalence import (
    _common_args,
    _many_pipelines,
    _many_references,
    _pipeline_runs,
    check_runs,
    run_trainer,
)

PER_REPLICA = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}
PP2_TP2 = {"pipeline_parallel_size": 2, "pipeline_tensor_parallel_size": 2, "pipeline_microbatches": 4}


def test_pp2_tp2_matches_trainer(tmp_path):
    """4 forked ranks (no DDP wrapper here): Llama and Qwen3 (its q/k norms' gradients summed over TP once per step) on 1F1B; a tied Llama on
    interleaved 1F1B with 2 stages per rank (the tied embedding stays whole, summed across stages)."""
    cases = [
        ("llama", [{**PP2_TP2, "pipeline_schedule": "1f1b"}], None),
        ("qwen3", [{**PP2_TP2, "pipeline_schedule": "1f1b"}], None),
        ("llama-tied", [{**PP2_TP2, "pipeline_schedule": "interleaved1f1b", "pipeline_stages_per_rank": 2}], None),
    ]
    refs = run_distributed(_many_references, 1, cases, str(tmp_path), {}, launcher_env=True, fork=True)[0]
    per_rank = run_distributed(_many_pipelines, 4, cases, str(tmp_path), {}, timeout=400, launcher_env=True, fork=True)
    for c, ((name, pipelines, setup), ref) in enumerate(zip(cases, refs)):
        runs = [rank[c] for rank in per_rank]
        print(check_runs(name, tmp_path / f"case{c}", 4, pipelines, ref, runs, setup=setup))


def _load_by_path(path: str) -> dict:
    """PipeTrainer given a checkpoint path at PP=2 × TP=2: the names each rank read as TP slices, and how far its
    weights are from the checkpoint's."""
    from transformers import AutoModelForCausalLM

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    args = PipeTrainingArguments(**_common_args(path + "-load"), **PP2_TP2)
    trainer = PipeTrainer(model=path, args=args)
    saved = AutoModelForCausalLM.from_pretrained(path).state_dict()
    local = {n: p for n, p in trainer.engine.named_parameters()}
    shards = {n: tuple(p.to_local().shape) for n, p in local.items() if isinstance(p, DTensor)}
    diff = max((trainer.engine.local_state()[n] - saved[n]).abs().max().item() for n in local)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in local.values())
    # generation through the TP stages (each with its KV cache of its own heads)
    prompt = _prompt()
    tokens = trainer.generator.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6)
    return {"sliced": trainer.engine.local.tp_sliced, "shards": shards, "diff": diff, "held": held, "tokens": tokens}


def _prompt() -> torch.Tensor:
    return torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(3))


def _save_resume_load(root: str) -> dict:
    """On 4 ranks: 6 steps at PP=2 × TP=2 (checkpoints every 2); its checkpoint-2 resumed at PP=4 × TP=1, whose
    checkpoint-4 is resumed at PP=2 × TP=2 again; the final model loaded by path, and generating greedily."""
    tp2 = {**PP2_TP2, "pipeline_schedule": "1f1b"}
    pp4 = {"pipeline_schedule": "1f1b", "pipeline_split": "0,1,2,3"}
    out = {"run": _run(os.path.join(root, "tp2"), dict(tp2))}
    out["pp4"] = _run(os.path.join(root, "pp4"), pp4, os.path.join(root, "tp2", "checkpoint-2"))
    out["back"] = _run(os.path.join(root, "back"), dict(tp2), os.path.join(root, "pp4", "checkpoint-4"), False)
    out["load"] = _load_by_path(os.path.join(root, "tp2", "final"))
    return out


def test_save_resume_on_another_tp_size_and_load_by_path(tmp_path):
    out = run_distributed(_save_resume_load, 4, str(tmp_path), launcher_env=True, fork=True, timeout=400)
    final = tmp_path / "tp2" / "final"
    to_tp1, back_to_tp2 = _diff(final, tmp_path / "pp4" / "final"), _diff(final, tmp_path / "back" / "final")
    moved = _diff(tmp_path / "tp2" / "checkpoint-2", final)
    run = out[0]["run"]["losses"]
    losses = max(abs(a - b) / abs(b) for a, b in zip(out[0]["pp4"]["losses"][2:], run[2:]))
    print(
        f"PP2 x TP2 checkpoint-2 resumed at PP4 x TP1: final weights {to_tp1:.2e} from the uninterrupted run's, "
        f"losses {losses:.1e} relative; its checkpoint-4 resumed at PP2 x TP2: {back_to_tp2:.2e}; the run moved "
        f"them {moved:.2e}; loaded by path: {[rank['load']['diff'] for rank in out]}"
    )
    assert to_tp1 < LAYOUT_TOL and back_to_tp2 < LAYOUT_TOL and losses < 1e-5 and moved > 1e-2
    # `hf-pipe plan` predicts what each rank holds (the vocabulary, 97 rows, splits 49 / 48)
    summary = describe(
        PlanArguments(model_name_or_path=str(final), world_size=4),
        PipelineArguments(pipeline_tensor_parallel_size=2, pipeline_parallel_size=2, pipeline_schedule="1f1b"),
    )
    for r, rank in enumerate(out):
        predicted = summary["stages"][r // 2]["weights_bytes"] / 4
        assert abs(rank["load"]["held"] - predicted) <= 64, (r, rank["load"]["held"], predicted)
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(final).eval()
    greedy = one.generate(_prompt(), attention_mask=torch.ones_like(_prompt()), max_new_tokens=6, do_sample=False)
    for rank in out:
        load = rank["load"]
        assert torch.equal(load["tokens"], greedy), (load["tokens"], greedy)
        assert load["diff"] == 0.0, load
        # every sharded weight of the rank's stage was read as its slice: half the rows (colwise) or columns
        assert load["sliced"] and set(load["sliced"]) == set(load["shards"]), load
        assert any(shape[0] == 64 // 2 for shape in load["shards"].values()), load


def test_refused_by_name():
    """One error naming the setting, before anything is built: a family with no TP plan, the trace frontend, a TP size
    that does not divide the heads, FSDP2 replicas, a world the mesh does not fit."""
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    from hf_pipe.tensor_parallel import tensor_parallel_problems

    llama = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, hidden_size=64)
    (gpt2,) = tensor_parallel_problems(GPT2Config(), 2, frontend="module", data_parallel=None)
    assert "model_type='gpt2'" in gpt2 and "no tensor-parallel plan" in gpt2 and "T5" in gpt2, gpt2
    (trace,) = tensor_parallel_problems(llama, 2, frontend="trace", data_parallel=None)
    assert "pipeline_frontend='trace'" in trace, trace
    heads = tensor_parallel_problems(llama, 4, frontend="module", data_parallel=None)
    assert len(heads) == 1 and "num_key_value_heads=2" in heads[0], heads
    three = tensor_parallel_problems(llama, 3, frontend="module", data_parallel=None)
    assert len(three) == 3 and "intermediate_size=128" in three[2], three
    (fsdp,) = tensor_parallel_problems(llama, 2, frontend="module", data_parallel="fsdp")
    assert "pipeline_data_parallel='fsdp'" in fsdp, fsdp
    assert tensor_parallel_problems(Qwen3Config(), 2, frontend="module", data_parallel="ddp") == []
    args = PipelineArguments(pipeline_parallel_size=2, pipeline_tensor_parallel_size=2)
    (world,) = args.pipeline_problems(6, 8)
    assert "= 4 ranks per pipeline replica does not divide the 6 launched processes" in world, world
    assert PipelineArguments(pipeline_tensor_parallel_size=2).resolved_pipeline_size(8) == 4


@pytest.mark.timeout(600)
def test_pp2_dp2_tp2_matches_trainer(tmp_path):
    """8 ranks, PP=2 × DP=2 × TP=2: each replica takes 4 of the 8 rows one process trains on per step (48 and 16
    rows: no short batch), its TP-sharded gradients averaged over the replicas once per step (no DDP wrapper, so
    the ranks can be forked)."""
    pipelines = [{**PP2_TP2, "pipeline_schedule": "1f1b", "pipeline_microbatches": 2}]
    setup = {"rows": (48, 16)}
    one_process = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 8}
    ref = run_distributed(
        run_trainer, 1, "llama", str(tmp_path / "ref"), None, one_process, setup, launcher_env=True, fork=True
    )[0]
    per_rank = run_distributed(
        _pipeline_runs, 8, "llama", str(tmp_path), pipelines, PER_REPLICA, setup, timeout=500, launcher_env=True,
        fork=True,
    )  # fmt: skip
    print(check_runs("llama", tmp_path, 8, pipelines, ref, per_rank, setup=setup))
