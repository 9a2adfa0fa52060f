#!/usr/bin/env bash
# Installs the console's front-end libraries (alpinejs, uplot, @picocss/pico) from npm into
# src/magasin/console/node_modules, exactly as package-lock.json pins them (`npm ci`), and
# installs Debian's `npm` first when it is missing. magasin serves the few files it needs
# from there; nothing is built.
set -eu
cd "$(dirname "$0")/../src/magasin/console"

if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "ensure-console-libraries: installing npm (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
npm ci --no-audit --no-fund --loglevel=error
touch node_modules/.installed
