"""Failures: a rank that dies takes the others down quickly and by name; checkpoints are never half-visible; a run
killed mid-training resumes to the uninterrupted weights; empty-label batches behave as with Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SCRIPT = "tests/scripts/tiny_train.py"
LAUNCHERS = {
    "torchrun": [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2"],
    "accelerate": [os.path.join(BIN, "accelerate"), "launch", "--config_file", "examples/accelerate/cpu.yaml"],
}
EXIT_LIMIT_S = 60


def _launch(launcher: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*LAUNCHERS[launcher], SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_dying_rank_brings_the_job_down(tmp_path, launcher, how):
    proc = _launch(launcher, str(tmp_path), "--fail", how, "--fail_rank", "1", "--fail_step", "3")
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    with open(tmp_path / "failed_at") as f:
        seconds = ended - float(f.read())
    print(f"{launcher} {how}: every rank gone {seconds:.1f}s after rank 1 failed")
    assert seconds < EXIT_LIMIT_S
    # the launcher names the rank that failed first
    assert "rank      : 1 (local_rank: 1)" in out.split("Root Cause")[-1], out[-3000:]
    if how == "raise":
        assert "injected failure on rank 1" in out


def _final_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.timeout(400)
def test_killed_during_save_leaves_no_visible_checkpoint_and_resumes_exactly(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    full = tmp_path / "full"
    assert _launch("torchrun", str(full)).returncode == 0
    run = tmp_path / "run"
    # rank 1 is SIGKILLed while checkpoint-4 is being written
    proc = _launch("torchrun", str(run), "--fail", "kill_in_save", "--fail_step", "4")
    assert proc.returncode != 0
    assert sorted(p for p in os.listdir(run) if p.startswith("checkpoint")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(run)).endswith("checkpoint-2")
    assert (run / ".hf_pipe-saving" / "checkpoint-4").is_dir()  # the partial save stays out of sight
    proc = _launch("torchrun", str(run), "--resume")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a, b = _final_weights(full / "final"), _final_weights(run / "final")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"killed during save, resumed from checkpoint-2: worst final-weight difference {worst}")
    assert worst == 0.0


@pytest.mark.timeout(400)
def test_sigkill_mid_training_then_resume(tmp_path):
    full = tmp_path / "full"
    assert _launch("torchrun", str(full)).returncode == 0
    run = tmp_path / "run"
    proc = _launch("torchrun", str(run), "--fail", "kill", "--fail_rank", "0", "--fail_step", "5")
    assert proc.returncode != 0 and (run / "checkpoint-4").is_dir()
    assert _launch("torchrun", str(run), "--resume").returncode == 0
    a, b = _final_weights(full / "final"), _final_weights(run / "final")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"SIGKILL at step 5, resumed from checkpoint-4: worst final-weight difference {worst}")
    assert worst == 0.0
