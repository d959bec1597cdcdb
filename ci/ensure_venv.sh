#!/usr/bin/env bash
# Create (or reuse) the project virtual environment in .venv and install the package with its
# dev extras. Idempotent: a second call with an up-to-date venv installs nothing.
# torch==2.13.0 is pinned for the CPU machine kind (a local CPU wheel); GPU users install
# their own torch first and this script leaves it alone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FIPO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.fipo-installed"
HASH="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  exit 0
fi
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e "$ROOT[dev]"
echo "$HASH" > "$STAMP"
