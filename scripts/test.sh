#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest
# (for example `scripts/test.sh -m "not slow"`). Uses an embedded PostgreSQL
# unless DATABASE_URL names a test database.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Browser tests drive Debian's Chromium (Playwright cannot download browsers here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing chromium (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing: install it with 'sudo apt-get install chromium'" >&2
    exit 1
  fi
fi

# pytest exits 5 when it collected no test: that fails here too.
exec .venv/bin/pytest "$@"
