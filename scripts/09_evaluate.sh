#!/usr/bin/env bash
# 09_evaluate: the evaluate stage with the minima-3b preset (MiniMA's recipe); PRESET=tiny runs it at CPU demo
# scale. Change only the paths (env vars or trailing key=value arguments).
# Multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
PRESET=${PRESET:-minima-3b}
exec "$MINIMA" evaluate --preset "$PRESET" model="${MODEL:-runs/minima-3b/06_sft}" tasks="[mmlu,ceval,cmmlu,gsm8k]" shots=5 "$@"
