#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest
# (for example `scripts/test.sh -m "not slow"`). Uses an embedded PostgreSQL
# unless DATABASE_URL names a test database.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Browser tests drive Debian's Chromium (Playwright cannot download browsers
# here); docker-compose checks docker-compose.yml.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing ${missing[*]} (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]}; install with 'sudo apt-get install ${missing[*]}'" >&2
    exit 1
  fi
fi

# pytest exits 5 when it collected no test: that fails here too.
exec .venv/bin/pytest "$@"
