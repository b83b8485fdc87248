#!/usr/bin/env bash
# 03_adapt: the adapt stage with the minima-3b preset (MiniMA's recipe). Change only the paths (env vars or
# trailing key=value arguments); multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
exec "$MINIMA" adapt --preset minima-3b model="${MODEL:-runs/minima-3b/01_vocab}" records="${RECORDS:-runs/minima-3b/02_records_lm}" launch.nnodes="${NNODES:-1}" launch.node_rank="${NODE_RANK:-0}" launch.nproc_per_node="${NPROC:-8}" launch.master_addr="${MASTER_ADDR:-127.0.0.1}" "$@"
