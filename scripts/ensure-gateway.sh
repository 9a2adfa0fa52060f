#!/usr/bin/env bash
# Installs the API gateway that `magasin cluster up` and the tests run: nginx and its njs module
# (Debian packages `nginx` and `libnginx-mod-http-js`). Idempotent: nothing is installed when
# both are there. The package's own daemon is kept from starting (and stopped if it runs):
# magasin runs nginx as a foreground process with its own prefix, configuration and port, and
# nothing may sit on port 80 behind our back.
set -eu

have() { command -v "$1" >/dev/null 2>&1; }
MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so
need=()
have nginx || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -e "$MODULE" ] || need+=(libnginx-mod-http-js)

stop_daemon() {
  if have systemctl && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/nginx ] && /etc/init.d/nginx status >/dev/null 2>&1; then
    /etc/init.d/nginx stop >/dev/null 2>&1 || true
  fi
}

if [ "${#need[@]}" -eq 0 ]; then
  stop_daemon
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "ensure-gateway: installing ${need[*]}"
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
stop_daemon
