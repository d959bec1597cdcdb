#!/usr/bin/env bash
# The README's test command: set up .venv if needed, lint, then run the CPU test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/ci/ensure_venv.sh"
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
python -m ruff check fipo_megatron tests tools benchmarks examples  # lint (pyproject.toml [tool.ruff]), a few seconds
python -m pytest -q -m "not gpu and not engine" --timeout=900 "$@" tests
