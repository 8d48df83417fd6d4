#!/usr/bin/env bash
# GPU check: fedrec's training, DP step and evaluation on CUDA, plus a short benchmark.
#   benchmarks/gpu_check.sh          (from the repository root; exit 1 without CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
exec "$PY" -m benchmarks.gpu_check "$@"
