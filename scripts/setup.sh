#!/usr/bin/env bash
# Idempotent setup: creates .venv, installs torch first (CPU wheel where one is served), then
# minima with its dev, dask and evaluate (sandbox) extras. A second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.minima-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import minima, torch, deepspeed, prefect" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip setuptools wheel
# torch first: deepspeed's build reads it, and a bare 'torch' would pull a multi-GB CUDA build.
"$VPY" -m pip install -q "torch==2.13.0"
# deepspeed is an sdist that imports torch at build time: build it against the venv's torch.
DS_BUILD_OPS=0 "$VPY" -m pip install -q --no-build-isolation "deepspeed==0.19.8"
"$VPY" -m pip install -q -e ".[dev,dask,evaluate]"
echo "$want" > "$stamp"
echo "setup: done ($("$VPY" -c 'import torch, transformers, deepspeed; print(f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")'))"
