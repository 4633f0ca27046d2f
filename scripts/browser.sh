#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser test (tests/test_dashboard.py).
# The test drives it with Playwright's driver from PyPI; no browser is ever downloaded.
set -euo pipefail

[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "browser: /usr/bin/chromium is missing; run as root: apt-get install -y chromium" >&2
  exit 1
fi
echo "browser: installing chromium"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends chromium; then
  apt-get update
  apt-get install -y --no-install-recommends chromium
fi
