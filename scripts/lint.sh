#!/usr/bin/env bash
# Lint: ruff (rules and formatting) and the import-layer contracts in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
