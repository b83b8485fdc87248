#!/usr/bin/env bash
# 03_adapt: the adapt stage with the minima-3b preset (MiniMA's recipe); PRESET=tiny runs it at CPU demo
# scale. Change only the paths (env vars or trailing key=value arguments).
# Multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
PRESET=${PRESET:-minima-3b}
if [ "$PRESET" = tiny ]; then NPROC=${NPROC:-1}; fi
exec "$MINIMA" adapt --preset "$PRESET" model="${MODEL:-runs/minima-3b/01_vocab}" records="${RECORDS:-runs/minima-3b/02_records_lm}" launch.nnodes="${NNODES:-1}" launch.node_rank="${NODE_RANK:-0}" launch.nproc_per_node="${NPROC:-8}" launch.master_addr="${MASTER_ADDR:-127.0.0.1}" "$@"
