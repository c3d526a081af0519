#!/usr/bin/env bash
# The device check for a lent CUDA GPU (issue 24): scripts/gpu_check.sh OUTDIR [--dry-run] [--no-bench] [...]
# Builds the CUDA variant of the patched llama.cpp for this GPU, runs the gpu tests and a short hybrid benchmark, and
# writes logs, result.json and summary.md into OUTDIR; offline, from what `scripts/gpu_check.py --prepare` put in
# .whl/. The logic is in scripts/gpu_check.py (tested without a GPU); this wrapper only picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# A device image's python3 is the one with its packages (PyTorch's venv there); PYTHON overrides it.
py="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
exec "$py" scripts/gpu_check.py "$@"
