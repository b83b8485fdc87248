#!/usr/bin/env bash
# 01_expand_vocab: the vocab stage with the minima-3b preset (MiniMA's recipe). Change only the paths (env vars or
# trailing key=value arguments); multi-node: set NNODES / NODE_RANK / MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIMA=${MINIMA:-.venv/bin/minima}
exec "$MINIMA" vocab --preset minima-3b base_tokenizer="${BASE_TOKENIZER:-/path/to/Llama-2-7b-hf}" extra_sp_model="${EXTRA_SP:-/path/to/chinese_sp.model}" base_model="${BASE_MODEL:-/path/to/Llama-2-7b-hf}" out_dir="${OUT:-runs/minima-3b/01_vocab}" "$@"
