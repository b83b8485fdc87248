#!/usr/bin/env bash
# 01_expand_vocab: the vocab stage with the minima-3b preset (MiniMA's recipe); PRESET=tiny runs it at CPU demo
# scale. Change only the paths (env vars or trailing key=value arguments). BASE_MODEL also resizes that model.
# Multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
PRESET=${PRESET:-minima-3b}
exec "$MINIMA" vocab --preset "$PRESET" base_tokenizer="${BASE_TOKENIZER:-/path/to/Llama-2-7b-hf}" extra_sp_model="${EXTRA_SP:-/path/to/chinese_sp.model}" ${BASE_MODEL:+base_model="$BASE_MODEL"} out_dir="${OUT:-runs/minima-3b/01_vocab}" "$@"
