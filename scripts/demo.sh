#!/usr/bin/env bash
# Set up (idempotent) and run the demo pipeline end to end on CPU: runs/demo/report.md at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
export PREFECT_HOME="${PREFECT_HOME:-$PWD/runs/.prefect}" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
exec .venv/bin/minima demo "$@"
