#!/usr/bin/env bash
# Set up (idempotent) and run the app on the embedded defaults:
# PostgreSQL under ./var, web app on http://127.0.0.1:8000 from one process per
# core (`--workers N` to choose), and the job worker as a process of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/rlhf serve "$@"
