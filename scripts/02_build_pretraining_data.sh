#!/usr/bin/env bash
# 02_build_pretraining_data: the records stage with the minima-3b preset (MiniMA's recipe); PRESET=tiny runs it at CPU demo
# scale. Change only the paths (env vars or trailing key=value arguments).
# Multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
PRESET=${PRESET:-minima-3b}
exec "$MINIMA" records --preset "$PRESET" inputs="${INPUTS:-/path/to/corpus/*.jsonl}" tokenizer="${TOKENIZER:-runs/minima-3b/01_vocab}" format=lm out_dir="${OUT:-runs/minima-3b/02_records_lm}" "$@"
