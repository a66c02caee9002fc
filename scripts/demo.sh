#!/usr/bin/env bash
# The main job from a fresh clone: set up .venv, start a real tritonserver on the tiny preset (CPU), send one
# streaming gRPC request, write outputs/demo.mp4, stop the server. Extra arguments go to `k4serve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
.venv/bin/k4serve serve --once "a red fox running through snow" -o outputs/demo.mp4 --seconds 2 \
  --log-file outputs/tritonserver.log "$@"
echo "wrote outputs/demo.mp4 (tritonserver's log: outputs/tritonserver.log)"
