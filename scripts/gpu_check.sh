#!/usr/bin/env bash
# GPU check (about 5 minutes on one H200): equivalence on CUDA (fp32, bf16; module and trace frontends), PipeTrainer's
# overhead against Trainer with gradient accumulation on one GPU, peak memory against hf-pipe plan's estimate; with
# 2+ GPUs, --multi adds the NCCL runs. Runs from the source tree on the installed torch (>= 2.11) and transformers
# (>= 5.17): PYTHON=python3 bash scripts/gpu_check.sh on a machine with its own CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
"$PY" scripts/gpu_check.py --device cuda "$@"
