#!/usr/bin/env bash
# 04_prune: the prune stage with the minima-3b preset (MiniMA's recipe); PRESET=tiny runs it at CPU demo
# scale. Change only the paths (env vars or trailing key=value arguments).
# Multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
PRESET=${PRESET:-minima-3b}
exec "$MINIMA" prune --preset "$PRESET" teacher="${TEACHER:-runs/minima-3b/03_adapt}" records="${RECORDS:-runs/minima-3b/02_records_lm}" "$@"
