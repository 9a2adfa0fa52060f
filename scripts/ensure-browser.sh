#!/usr/bin/env bash
# Installs Debian's Chromium for the console's browser tests (Playwright drives it; it cannot
# download a browser of its own here). Idempotent: nothing happens when it is installed.
set -eu
[ -x /usr/bin/chromium ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "ensure-browser: installing chromium"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
