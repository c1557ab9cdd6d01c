#!/usr/bin/env bash
# Install gate-agent on a Raspberry Pi OS or Debian board:
#
#     sudo ./install.sh
#
# Installs the system packages it needs, builds the agent with its compiled
# fastpath into /opt/gate-agent/venv, creates the service user gate-agent (in
# groups gpio and dialout), installs the systemd unit, the sysusers.d and
# tmpfiles.d snippets, the board profiles, the serial reader's udev rule and
# a commented default config (/etc/gate-agent/agent.toml, only if there is
# none), creates /var/lib/gate-agent (0700) and enables the service. Safe to
# run again: an upgrade rebuilds the agent and restarts a running service;
# the config, the journal and the state are kept.
#
#     ./install.sh --root DIR [--no-build] [--no-start]
#
# stages the same tree into DIR without touching the host: no apt-get, no
# user, no chown, no systemctl; what it would do is printed as "would: ...".
# --no-build skips building the virtual environment (tests). --no-start
# enables the service without starting or restarting it (the first-boot
# script starts it later without waiting for the network).
set -euo pipefail
umask 022  # the modes below are set explicitly; new parent directories get 0755

PREFIX=/opt/gate-agent
ROOT=""
BUILD=1
START=1
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
USER_NAME=gate-agent

usage() {
  # The header comment, whole: from line 2 to the first line that is not a comment.
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  echo "Options: --root DIR (stage into DIR), --no-build (skip the venv), --no-start, -h/--help"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }
            ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    --no-build) BUILD=0; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1; see ./install.sh --help" >&2; exit 2 ;;
  esac
done

if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  if [ "$ROOT" = / ]; then
    ROOT=""  # --root / is a real install
  fi
fi
STAGING=0
[ -n "$ROOT" ] && STAGING=1

say() { echo "gate-agent install: $*"; }
would() { echo "would: $*"; }
die() { echo "gate-agent install: $*" >&2; exit 1; }

if [ "$STAGING" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  die "run it as root: sudo ./install.sh (or stage it with --root DIR)"
fi

is_pi() { grep -qs "Raspberry Pi" /proc/device-tree/model; }
systemd_running() { [ -d /run/systemd/system ]; }
have() { command -v "$1" >/dev/null 2>&1; }

# Where the Debian package is installed, apt upgrades the agent: this script
# and dpkg would fight over /opt/gate-agent/venv and the unit (docs/packaging.md).
if [ -d "$ROOT/var/lib/dpkg" ] && have dpkg-query; then
  pkg_state=$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f '${db:Status-Status}' gate-agent 2>/dev/null || true)
  case "$pkg_state" in
    ""|not-installed|config-files) ;;
    *) die "the gate-agent Debian package is installed here ($pkg_state): upgrade it with apt (docs/packaging.md); install.sh is for source installs" ;;
  esac
fi

# Run a command on the host, or only say it when staging.
host() {
  if [ "$STAGING" -eq 1 ]; then would "$*"; else "$@"; fi
}

# put SRC DST MODE [OWNER:GROUP]: install a file only when its content or mode
# differs, so a second run changes nothing (not even a timestamp).
put() {
  local src=$1 dst=$ROOT$2 mode=$3 owner=${4:-root:root}
  mkdir -p "$(dirname "$dst")"
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    [ "$(stat -c %a "$dst")" = "${mode#0}" ] || chmod "$mode" "$dst"
  else
    install -m "$mode" "$src" "$dst"
    say "installed $2"
  fi
  own "$owner" "$2"
}

# dir PATH MODE [OWNER:GROUP]
dir() {
  local path=$ROOT$1 mode=$2 owner=${3:-root:root}
  [ -d "$path" ] || { mkdir -p "$path"; say "created $1"; }
  [ "$(stat -c %a "$path")" = "${mode#0}" ] || chmod "$mode" "$path"
  own "$owner" "$1"
}

own() {
  local owner=$1 path=$2
  if [ "$STAGING" -eq 1 ]; then
    [ "$owner" = root:root ] || would "chown $owner $path"
  elif [ "$(stat -c %U:%G "$path")" != "$owner" ]; then
    chown "$owner" "$path"
  fi
}

# --- 1. system packages ------------------------------------------------------------
packages() {
  local need=() py=python3
  have "$py" || need+=(python3)
  "$py" -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
  local inc
  inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
  [ -n "$inc" ] && [ -f "$inc/Python.h" ] || need+=(python3-dev)
  have gcc || need+=(gcc)
  if is_pi; then
    "$py" -c 'import lgpio' >/dev/null 2>&1 || need+=(python3-lgpio)
  fi
  if [ ${#need[@]} -eq 0 ]; then
    return
  fi
  if [ "$STAGING" -eq 1 ]; then
    would "apt-get install -y --no-install-recommends ${need[*]}"
    return
  fi
  have apt-get || die "missing system packages: ${need[*]}; install them with the package manager and run again"
  say "installing system packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
}

# --- 2. the service user ---------------------------------------------------------------
user() {
  if [ "$STAGING" -eq 1 ]; then
    would "systemd-sysusers /usr/lib/sysusers.d/gate-agent.conf (user $USER_NAME in groups gpio, dialout)"
    return
  fi
  if have systemd-sysusers; then
    systemd-sysusers "$SRC/systemd/gate-agent.sysusers.conf"
  else
    # Without sysusers: the same as the snippet, by hand.
    local g
    for g in gpio dialout; do
      getent group "$g" >/dev/null || groupadd --system "$g"
    done
    if ! getent passwd "$USER_NAME" >/dev/null; then
      useradd --system --user-group --home-dir /var/lib/gate-agent --no-create-home \
        --shell /usr/sbin/nologin --comment "School turnstile gate agent" "$USER_NAME"
    fi
    usermod -a -G gpio,dialout "$USER_NAME"
  fi
}

# --- 3. the agent and its compiled fastpath --------------------------------------------
build() {
  local venv=$ROOT$PREFIX/venv
  if [ "$BUILD" -eq 0 ]; then
    say "--no-build: not building $PREFIX/venv"
    return
  fi
  local py=python3
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "Python 3.11 or newer is needed (found $("$py" -V 2>&1)); use Raspberry Pi OS / Debian 12 or later"
  if [ ! -x "$venv/bin/python" ]; then
    local opts=()
    # lgpio comes from Debian (python3-lgpio): the PyPI one is source-only.
    is_pi && opts+=(--system-site-packages)
    say "creating $PREFIX/venv ${opts[*]:-}"
    "$py" -m venv "${opts[@]}" "$venv"
  fi
  say "building the agent (compiled fastpath) into $PREFIX/venv"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install --quiet --upgrade "$SRC" ||
    die "building the agent failed (see above); it needs gcc, python3-dev and network access to PyPI"
  local impl
  impl=$("$venv/bin/python" -c 'import fastpath; print(fastpath.IMPLEMENTATION)')
  if [ "$impl" = compiled ]; then
    say "fastpath: compiled"
  else
    echo "gate-agent install: WARNING: the compiled fastpath did not build; the pure-Python twin will run" >&2
  fi
}

# --- 4. files ----------------------------------------------------------------------------
files() {
  dir /opt/gate-agent 0755
  put "$SRC/systemd/gate-agent.service" /etc/systemd/system/gate-agent.service 0644
  put "$SRC/systemd/gate-agent-console.service" /etc/systemd/system/gate-agent-console.service 0644
  put "$SRC/systemd/gate-agent.sysusers.conf" /usr/lib/sysusers.d/gate-agent.conf 0644
  put "$SRC/systemd/gate-agent.tmpfiles.conf" /usr/lib/tmpfiles.d/gate-agent.conf 0644
  local p
  dir /usr/share/gate-agent 0755
  dir /usr/share/gate-agent/profiles 0755
  for p in "$SRC"/hardware/profiles/*.toml; do
    put "$p" "/usr/share/gate-agent/profiles/$(basename "$p")" 0644
  done
  put "$SRC/examples/agent.toml" /usr/share/gate-agent/agent.toml.example 0644
  # The technician types `gate-agent ...`, whatever PATH the venv is on.
  dir /usr/local/bin 0755
  if [ "$(readlink "$ROOT/usr/local/bin/gate-agent" 2>/dev/null)" != "$PREFIX/venv/bin/gate-agent" ]; then
    ln -sfn "$PREFIX/venv/bin/gate-agent" "$ROOT/usr/local/bin/gate-agent"
    say "linked /usr/local/bin/gate-agent"
  fi
  dir /usr/share/doc/gate-agent 0755
  put "$SRC/docs/configuration.md" /usr/share/doc/gate-agent/configuration.md 0644
  put "$SRC/docs/console.md" /usr/share/doc/gate-agent/console.md 0644
  # The serial reader's stable name; a technician's edited copy is kept.
  if [ ! -e "$ROOT/etc/udev/rules.d/99-gate-reader.rules" ]; then
    put "$SRC/hardware/99-gate-reader.rules" /etc/udev/rules.d/99-gate-reader.rules 0644
    UDEV_CHANGED=1
  fi
  # Config and secrets: root writes, the service reads.
  dir /etc/gate-agent 0750 root:$USER_NAME
  if [ -e "$ROOT/etc/gate-agent/agent.toml" ]; then
    say "kept /etc/gate-agent/agent.toml"
  else
    put "$SRC/examples/agent.toml" /etc/gate-agent/agent.toml 0640 root:$USER_NAME
    NEW_CONFIG=1
  fi
  # The journal, the gate state and the access list: personal data.
  dir /var/lib/gate-agent 0700 $USER_NAME:$USER_NAME
}

# --- 5. systemd --------------------------------------------------------------------------
enable() {
  if [ "$STAGING" -eq 1 ] || ! systemd_running; then
    local why="staging into $ROOT"
    [ "$STAGING" -eq 1 ] || why="systemd is not running"
    would "systemctl daemon-reload && systemctl enable gate-agent gate-agent-console ($why)"
    return
  fi
  systemd-tmpfiles --create /usr/lib/tmpfiles.d/gate-agent.conf
  if [ "${UDEV_CHANGED:-0}" -eq 1 ] && have udevadm; then
    udevadm control --reload || true
    udevadm trigger --subsystem-match=tty || true
  fi
  systemctl daemon-reload
  systemctl enable gate-agent.service >/dev/null
  # The web console: enabled, it starts only once an account exists (its unit's condition).
  systemctl enable gate-agent-console.service >/dev/null
  if [ -e "$ROOT/var/lib/gate-agent/console-accounts.json" ]; then
    systemctl try-restart gate-agent-console.service || true
  else
    say "web console: off until an account exists: sudo -u gate-agent gate-agent console user add NAME --role technician, then systemctl start gate-agent-console (docs/console.md)"
  fi
  if [ "$START" -eq 0 ]; then
    say "enabled; not started (--no-start)"
  elif systemctl is-active --quiet gate-agent.service; then
    say "restarting the running agent"
    systemctl restart gate-agent.service
  elif [ "${NEW_CONFIG:-0}" -eq 1 ]; then
    say "enabled. Fill in /etc/gate-agent/agent.toml ([site] at least; or gate-agent provision),"
    say "check it with: $PREFIX/venv/bin/gate-agent check-config /etc/gate-agent/agent.toml"
    say "then start it: systemctl start gate-agent"
  else
    say "enabled; starting it"
    systemctl start gate-agent.service || say "it did not start: journalctl -u gate-agent"
  fi
}

NEW_CONFIG=0
UDEV_CHANGED=0
packages
user   # first: the files below are owned by its group
files
build
enable
say "done"
