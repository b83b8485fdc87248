#!/usr/bin/env bash
# 08_instruct_lora: the sft stage with the minichat-3b preset (MiniChat's recipe); PRESET=tiny runs it at CPU demo
# scale. Change only the paths (env vars or trailing key=value arguments).
# Multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
PRESET=${PRESET:-minichat-3b}
if [ "$PRESET" = tiny ]; then NPROC=${NPROC:-1}; fi
exec "$MINIMA" sft --preset "$PRESET" model="${MODEL:-runs/minima-3b/05_distill}" records="${RECORDS:-runs/minima-3b/02_records_chat}" lora.enabled=true activation_checkpointing=false out_dir="${OUT:-runs/minima-3b/06_sft_lora}" launch.nproc_per_node="${NPROC:-8}" "$@"
