#!/usr/bin/env bash
# 08_instruct_lora: the sft stage with the minichat-3b preset (MiniMA's recipe). Change only the paths (env vars or
# trailing key=value arguments); multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
exec "$MINIMA" sft --preset minichat-3b model="${MODEL:-runs/minima-3b/05_distill}" records="${RECORDS:-runs/minima-3b/02_records_chat}" lora.enabled=true lr=2e-4 out_dir="${OUT:-runs/minima-3b/06_sft_lora}" launch.nproc_per_node="${NPROC:-8}" "$@"
