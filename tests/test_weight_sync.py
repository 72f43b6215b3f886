"""A model built before seeding holds other weights on every rank: PipeTrainer starts every stage from rank 0's, as
Trainer + DDP starts every replica from rank 0's. Each rank here builds its model from its own seed; the runs must
log, and save, what Trainer on one process logs and saves starting from rank 0's model (tied weights split over
ranks, traced stages, pipeline × data parallel); PEFT adapters (LoRA A is random) start from rank 0's too; a rank
whose model rank 0 cannot feed is one error on every rank."""

from __future__ import annotations

import os

import pytest
import torch

from tests._data import PadCollator
from tests._dist import run_distributed
from tests._models import tiny_model
from tests.test_trainer_equivalence import _many_pipelines, _many_references, check_runs, run_trainer

UNSEEDED = {"seed_per_rank": True}
ONE_F_ONE_B = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}
CASES_2 = [
    ("gpt2", [ONE_F_ONE_B], UNSEEDED),  # wte on rank 0, lm_head (the same weight) on rank 1
    ("bert-mlm", [{**ONE_F_ONE_B, "pipeline_frontend": "trace"}], {**UNSEEDED, "collator": PadCollator}),
]
DATA_PARALLEL = [
    {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "pipeline_data_parallel": mode}
    for mode in ("ddp", "fsdp")
] + [{"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "pipeline_frontend": "trace"}]  # no DDP wrapper
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def _lora_model(seed: int):
    """A tied Llama with LoRA adapters, base and adapters drawn from `seed` (an unseeded script's ranks differ)."""
    import peft

    model = tiny_model("llama-tied", seed=seed)
    torch.manual_seed(1000 + seed)
    return peft.get_peft_model(model, peft.LoraConfig(**LORA))


def _engine_checks() -> dict:
    """Engine-level: a PeftModel's stages start from rank 0's base and adapters; a rank whose model differs in shape
    from rank 0's fails on every rank, naming the tensor."""
    import torch.distributed as dist

    from hf_pipe.engine import PipelineEngine
    from hf_pipe.errors import PipelineConfigError
    from hf_pipe.integrations.peft import stage_model

    rank = dist.get_rank()
    out = {}
    engine = PipelineEngine(stage_model(_lora_model(rank)), schedule="1f1b", microbatches=2)
    first = stage_model(_lora_model(0)).state_dict()
    local = engine.local_state()
    out["peft_keys"] = sorted(local)
    out["peft_err"] = max((local[k] - first[k]).abs().max().item() for k in local)
    out["peft_spread"] = max(  # how far this rank's own build was from rank 0's: the sync had work to do
        (stage_model(_lora_model(rank)).state_dict()[k] - first[k]).abs().max().item() for k in local
    )
    with pytest.raises(PipelineConfigError) as err:
        PipelineEngine(tiny_model("gpt2", vocab_size=97 + rank), schedule="1f1b", microbatches=2)
    out["error"] = str(err.value)
    return out


def _two_ranks(cases: list[tuple], root: str) -> dict:
    runs = _many_pipelines(cases, root, {})  # PipeTrainer sets the process group up, as under torchrun
    return {"runs": runs, "engine": _engine_checks()}


def test_unseeded_build_trains_rank_0s_model(tmp_path):
    refs = run_distributed(_many_references, 1, CASES_2, str(tmp_path), {}, launcher_env=True)[0]
    per_rank = run_distributed(_two_ranks, 2, CASES_2, str(tmp_path), launcher_env=True, timeout=400)
    worst = {}
    for c, ((name, pipelines, setup), ref) in enumerate(zip(CASES_2, refs)):
        runs = [rank["runs"][c] for rank in per_rank]
        worst.update(check_runs(name, tmp_path / f"case{c}", 2, pipelines, ref, runs, setup=setup))
    print(worst)
    for rank, result in enumerate(per_rank):
        engine = result["engine"]
        assert any(".lora_A." in k for k in engine["peft_keys"]) and any(".lora_B." in k for k in engine["peft_keys"])
        assert engine["peft_err"] == 0.0, (rank, engine["peft_err"])
        # rank 1 on its own: base and adapters other than rank 0's
        assert engine["peft_spread"] > 0.01 if rank else engine["peft_spread"] == 0.0
        assert "rank 1's stage tensor lm_head.weight (float32 (98, 64)) cannot come from rank 0" in engine["error"]
        assert "float32 (97, 64)" in engine["error"]


def _replicas(root: str) -> list[dict]:
    return [run_trainer("gpt2", os.path.join(root, f"pp{i}"), p, {}, UNSEEDED) for i, p in enumerate(DATA_PARALLEL)]


def test_unseeded_build_pipeline_by_data_parallel(tmp_path):
    """pp 2 × dp 2: DDP would start each stage's replicas from the first of them, not from global rank 0, FSDP2 would
    shard each rank's own weights, traced stages have no DDP wrapper; every stage and replica starts from rank 0's. The reference is Trainer +
    DDP on 2 processes, themselves built from their own seeds (DDP broadcasts its rank 0's weights)."""
    ref = run_distributed(run_trainer, 2, "gpt2", str(tmp_path / "ref"), None, {}, UNSEEDED, launcher_env=True)[0]
    per_rank = run_distributed(_replicas, 4, str(tmp_path), launcher_env=True, timeout=400)
    print(check_runs("gpt2", tmp_path, 4, DATA_PARALLEL, ref, per_rank, setup=UNSEEDED))
