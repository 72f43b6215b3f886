"""Two "nodes" on 127.0.0.1 (two launcher invocations, one process each) train the same as one node of two."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests._dist import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SCRIPT = "tests/scripts/tiny_train.py"


def _node_commands(launcher: str, port: int, out: str) -> list[list[str]]:
    if launcher == "torchrun":
        return [
            [os.path.join(BIN, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
             "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "hf_pipe_test", SCRIPT, out]
            for _ in range(2)
        ]  # fmt: skip
    return [
        [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         SCRIPT, out]
        for rank in range(2)
    ]  # fmt: skip


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_on_localhost(tmp_path, launcher):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one_node = subprocess.run(
        [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", SCRIPT, str(tmp_path / "one")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in _node_commands(launcher, free_port(), str(tmp_path / "two"))
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
