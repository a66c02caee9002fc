#!/usr/bin/env bash
# Create .venv with the CPU build of torch and k4serve (+ serving, export, test extras). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.k4serve-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # Pinned: resolves to the CPU build here (an unpinned torch pulls a multi-GB CUDA build).
  .venv/bin/pip install -q "torch==${K4SERVE_TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi
