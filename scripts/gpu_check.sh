#!/usr/bin/env bash
# GPU check (a few minutes): the distributed tests' equivalence checks on CUDA with NCCL, one GPU per rank.
# Needs the project installed with a CUDA build of torch (scripts/setup.sh with HF_PIPE_TORCH_VERSION, or your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
"$PY" scripts/gpu_check.py --device cuda "$@"
