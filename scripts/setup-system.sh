#!/usr/bin/env bash
# Install the Debian / Raspberry Pi OS packages gate-agent needs to build and
# test, only those missing. Idempotent; uses sudo when not root.
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
py=${PYTHON:-python3}

have_cmd "$py" || need+=(python3)
"$py" -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
[ -n "$inc" ] && [ -f "$inc/Python.h" ] || need+=(python3-dev)
have_cmd gcc || need+=(gcc)
have_cmd mosquitto || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
# Headers of the regional broker's plugin (mosquitto/gate_acl.c).
[ -f /usr/include/mosquitto_broker.h ] || need+=(mosquitto-dev)
[ -f /usr/include/mosquitto.h ] || need+=(libmosquitto-dev)
[ -f /usr/include/openssl/x509.h ] || need+=(libssl-dev)
have_cmd openssl || need+=(openssl)
have_cmd systemd-analyze || need+=(systemd)
# PostgreSQL for the regional ingest's PostgreSQL tests (Debian keeps initdb off PATH); not on a
# board (a Raspberry Pi, or GATE_POSTGRES=0): the gate never uses it.
postgres=${GATE_POSTGRES:-$(grep -qs Raspberry /proc/device-tree/model && echo 0 || echo 1)}
if [ "$postgres" = 1 ]; then
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || have_cmd initdb || need+=(postgresql)
fi
# Debian's chromium and its driver for the console's browser tests (tests/test_console_browser.py);
# not on a board (a Raspberry Pi, or GATE_BROWSER=0): the console needs no browser on the board.
browser=${GATE_BROWSER:-$(grep -qs Raspberry /proc/device-tree/model && echo 0 || echo 1)}
if [ "$browser" = 1 ]; then
  have_cmd chromium || need+=(chromium)
  have_cmd chromedriver || need+=(chromium-driver)
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! have_cmd apt-get; then
  echo "gate-agent: missing system packages: ${need[*]}; install them with your package manager" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if have_cmd sudo; then sudo="sudo"; else
    echo "gate-agent: need root to install ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
echo "gate-agent: installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
