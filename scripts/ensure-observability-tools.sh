#!/usr/bin/env bash
# Installs what the deploy/ tests run: prometheus + promtool (Debian package `prometheus`) and
# amtool (`prometheus-alertmanager`). Idempotent: nothing happens when they are on PATH.
# The packages' own daemons are kept from starting (and stopped if one runs): the tests start
# their own Prometheus on a free port and nothing may sit on 9090/9093 behind our back.
set -eu

have() { command -v "$1" >/dev/null 2>&1; }
need=()
{ have promtool && have prometheus; } || need+=(prometheus)
have amtool || need+=(prometheus-alertmanager)

stop_daemons() {
  for unit in prometheus prometheus-alertmanager; do
    if have systemctl && systemctl is-active --quiet "$unit" 2>/dev/null; then
      systemctl disable --now "$unit" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$unit" ] && "/etc/init.d/$unit" status >/dev/null 2>&1; then
      "/etc/init.d/$unit" stop >/dev/null 2>&1 || true
    fi
  done
}

if [ "${#need[@]}" -eq 0 ]; then
  stop_daemons
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "ensure-observability-tools: installing ${need[*]}"
# policy-rc.d answering 101 tells the packages' maintainer scripts not to start their
# services (both sysvinit's invoke-rc.d and systemd's deb-systemd-invoke obey it).
policy=/usr/sbin/policy-rc.d
added_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  added_policy=1
fi
cleanup() { [ -z "$added_policy" ] || $SUDO rm -f "$policy"; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
stop_daemons
