#!/usr/bin/env bash
# The prepared GPU check: every figure the scale path needs, on one GPU, in at most 8 minutes, no downloads.
#
#   bash benchmarks/gpu_check.sh               # one GPU: prints one line per figure, writes the gpu section
#                                              # of benchmarks/RESULTS.md
#   bash benchmarks/gpu_check.sh --cpu-smoke   # every arm at toy size on CPU (the test suite runs this)
#
# Extra arguments go to benchmarks/gpu_check.py (--only ARM..., --budget-s S, --work DIR, --no-write).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Nothing is downloaded: every model is random and built here, the data is minima's demo corpus.
exec timeout "${GPU_CHECK_TIMEOUT_S:-540}" "$PY" benchmarks/gpu_check.py "$@"
