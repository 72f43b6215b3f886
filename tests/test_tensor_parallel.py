"""Pipeline × tensor parallelism: each stage sharded over its TP ranks with the model's own transformers TP plan,
against Trainer on one process (same seed and data): logged losses, grad norms, eval loss and saved weights."""

from __future__ import annotations

from tests.test_trainer_equivalence import compare_many

PP2_TP2 = {"pipeline_parallel_size": 2, "pipeline_tensor_parallel_size": 2, "pipeline_microbatches": 4}


def test_pp2_tp2_matches_trainer(tmp_path):
    """4 ranks: Llama and Qwen3 (its q/k norms' gradients summed over TP once per step) on 1F1B; a tied Llama on
    interleaved 1F1B with 2 stages per rank (the tied embedding stays whole, summed across stages)."""
    cases = [
        ("llama", [{**PP2_TP2, "pipeline_schedule": "1f1b"}], None),
        ("qwen3", [{**PP2_TP2, "pipeline_schedule": "1f1b"}], None),
        ("llama-tied", [{**PP2_TP2, "pipeline_schedule": "interleaved1f1b", "pipeline_stages_per_rank": 2}], None),
    ]
    print(compare_many(cases, tmp_path, 4))
