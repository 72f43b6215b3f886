"""The GPT-2 example through the real launchers: `accelerate launch` (the MULTI_GPU config on a CPU-only machine)
and `torchrun`, each training 2 ranks, with the loss falling and a checkpoint `from_pretrained` loads."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
EXAMPLE_ARGS = ["--num_train_epochs", "6", "--learning_rate", "3e-3", "--logging_steps", "5", "--report_to", "none"]


def _run(cmd: list[str], timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _train_losses(out: str) -> list[float]:
    return [float(ast.literal_eval(m)["loss"]) for m in re.findall(r"\{'loss': [^}]*\}", out)]


def _check(out: str, output_dir) -> None:
    from transformers import AutoModelForCausalLM

    losses = _train_losses(out)
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
    assert "sample:" in out
    model = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    assert model.config.n_layer == 4 and model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.timeout(300)
def test_gpt2_example_with_accelerate_launch(tmp_path):
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", "examples/accelerate/cpu.yaml"]
    out = _run(cmd + ["examples/gpt2/train.py", "--output_dir", str(tmp_path), *EXAMPLE_ARGS])
    assert out.count("'train_runtime'") == 1  # logged once, by the main process of one 2-rank run
    _check(out, tmp_path)


@pytest.mark.timeout(300)
def test_gpt2_example_with_torchrun(tmp_path):
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "examples/gpt2/train.py"]
    _check(
        _run(cmd + ["--output_dir", str(tmp_path), *EXAMPLE_ARGS, "--pipeline_schedule", "interleaved1f1b"]), tmp_path
    )


_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("group alive at exit:", dist.is_initialized()))  # runs after PipeTrainer's (LIFO)
from hf_pipe import PipeTrainer, PipeTrainingArguments
from tests._models import tiny_model
PipeTrainer(model=tiny_model("gpt2"), args=PipeTrainingArguments(output_dir=sys.argv[1], report_to=[]))
if sys.argv[2] == "raise":
    raise RuntimeError("the user's script fails")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ending", ["clean", "raise"])
def test_process_group_destroyed_at_a_clean_exit_only(tmp_path, ending):
    # Left alive at exit, a gloo group can abort the rank (SIGABRT) after training succeeded; after an error it is
    # left alone, since destroying it while peers wait in a collective can hang.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path), ending]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == (0 if ending == "clean" else 1), proc.stderr[-3000:]
    assert f"group alive at exit: {ending == 'raise'}" in proc.stdout, proc.stdout + proc.stderr[-3000:]
