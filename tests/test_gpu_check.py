"""The GPU check's dry run: scripts/gpu_check.py on the CPU with tiny models, so the script stays ready for a day a
GPU is lent (its real run: bash scripts/gpu_check.sh on one GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    print(proc.stdout[proc.stdout.index("(a) equivalence") :])
    with open(tmp_path / "gpu_check.json") as f:
        result = json.load(f)
    checks = [r["check"] for r in result["equivalence"]]
    assert {"fp32 llama module", "fp32 gpt2 trace", "bf16 llama module", "bf16 gpt2 trace"} <= set(checks), checks
    assert all(r["ok"] for r in result["equivalence"]), result["equivalence"]
    assert [r["model"] for r in result["overhead"]] == ["smollm2-135m", "llama-1.1b"]
    assert all(r["ratio"] > 0 and r["estimate_GiB"] > 0 for r in result["overhead"])
