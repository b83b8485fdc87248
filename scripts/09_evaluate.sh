#!/usr/bin/env bash
# 09_evaluate: the evaluate stage with the minima-3b preset (MiniMA's recipe). Change only the paths (env vars or
# trailing key=value arguments); multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
exec "$MINIMA" evaluate --preset minima-3b model="${MODEL:-runs/minima-3b/06_sft}" tasks="[mmlu,ceval,cmmlu,gsm8k]" shots=5 "$@"
