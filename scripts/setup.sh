#!/usr/bin/env bash
# Installs everything the app needs, idempotently: a virtual environment with
# the Python packages, the front-end libraries from npm, and the default model.
# A second run finds everything in place and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# 1. Python packages, reinstalled only when pyproject.toml changes.
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  # The CPU build of torch first, pinned, so nothing pulls a multi-GB CUDA build.
  # On a GPU machine install the CUDA build of the same version instead.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# 2. Front-end libraries (htmx, SortableJS, Chart.js, Swagger UI) into static/node_modules.
#    No install scripts: these are plain files, and swagger-ui-dist's dependency
#    @scarf/scarf would otherwise report the install to an analytics server.
if [ ! -f static/node_modules/.package-lock.json ] || [ static/package-lock.json -nt static/node_modules/.package-lock.json ]; then
  echo "==> installing front-end packages into static/node_modules"
  npm ci --prefix static --ignore-scripts --no-audit --no-fund --loglevel=error
fi

# 3. The default SFT model, converted once to a safetensors checkpoint.
if [ "${RLHF_SKIP_MODEL:-0}" != "1" ]; then
  .venv/bin/rlhf models provision-default
fi
