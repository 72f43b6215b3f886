"""Pipeline × data parallel on a ("dp", "pp") mesh: PP=2 × DP=2 on 4 ranks against Trainer + DDP on 2 processes
(same per-device batch, same seed): logged losses, grad norms, eval loss and saved weights."""

from __future__ import annotations

import pytest

from tests.test_trainer_equivalence import compare


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_pp2_dp2_matches_trainer_ddp(tmp_path, mode):
    pipelines = [
        {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "pipeline_data_parallel": mode},
        {"pipeline_parallel_size": 2, "pipeline_schedule": "interleaved1f1b", "pipeline_data_parallel": mode},
    ]
    print(compare("gpt2", tmp_path, 4, pipelines, ref_world=2))


def test_pp2_dp2_bert_classifier(tmp_path):
    print(compare("bert-cls", tmp_path, 4, [{"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b"}], ref_world=2))


def test_pp2_dp2_traced_stages(tmp_path):
    """Traced stages average their gradients over the replicas themselves (no DDP wrapper per traced shape)."""
    pipelines = [{"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "pipeline_frontend": "trace"}]
    print(compare("gpt2", tmp_path, 4, pipelines, ref_world=2))
