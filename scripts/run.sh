#!/usr/bin/env bash
# Set up (idempotent) and run the app on the embedded defaults:
# PostgreSQL under ./var, web app on http://127.0.0.1:8000, one in-process worker.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/rlhf serve "$@"
