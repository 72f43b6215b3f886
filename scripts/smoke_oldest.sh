#!/usr/bin/env bash
# The oldest versions pyproject.toml allows (torch 2.11, transformers 5.17: what the lent GPU machines carry) in a
# fresh .venv-oldest, then a CPU smoke run of the suite's core tests on them: both frontends, every head, the
# encoder-decoders, the trainer against Trainer, PEFT and TRL. About 10 minutes on 2 cores, plus the install (this
# registry has no CPU wheel of torch 2.11: pip takes the CUDA one, which runs on the CPU).
#   bash scripts/smoke_oldest.sh            # or VENV=/path/to/existing/venv to reuse one (nothing installed then)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-}
if [[ -z "$VENV" ]]; then
  VENV=.venv-oldest
  "${PYTHON:-python3}" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.11.0"
  "$VENV/bin/python" -m pip install -q "transformers==5.17.0" -e ".[test]"
fi
"$VENV/bin/python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '· transformers', \
transformers.__version__, '· accelerate', accelerate.__version__)"
PYTHONPATH=$PWD exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_validation.py tests/test_split.py tests/test_engine_equivalence.py tests/test_trace_frontend.py \
  tests/test_trainer_equivalence.py tests/test_heads.py tests/test_seq2seq.py tests/test_packed.py \
  tests/test_peft.py tests/test_trl.py "$@"
