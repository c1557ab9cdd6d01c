#!/bin/bash
# gate-agent first boot: install the agent from this bundle, once.
#
# The bundle (made by `gate-agent bundle`) sits on the boot partition of a
# freshly written Raspberry Pi OS card, in the folder gate-agent/ next to
# config.txt. At first boot this script is started by
#   - cloud-init (Raspberry Pi OS from October 2025, Debian 13 "trixie"): the
#     bundle's user-data runs it from runcmd;
#   - systemd.run= on cmdline.txt (Raspberry Pi OS "bookworm"): the line from
#     gate-agent/cmdline.txt.append; the board reboots when it succeeds.
#
# What it does, in order:
#   1. checks every file of the bundle against MANIFEST.sha256 (a bad copy
#      stops here, before anything is installed);
#   2. unpacks the agent's source into /opt/gate-agent/src;
#   3. creates the service user (systemd-sysusers) and moves the gate's
#      config, certificates and trusted keys into /etc/gate-agent:
#      agent.toml 0640 root:gate-agent, gate.key 0600 gate-agent, the
#      certificates and public keys 0644;
#   4. erases the secrets from the boot partition (the private key is
#      overwritten, then every gate file is removed): the card can be read by
#      anyone with a laptop;
#   5. runs install.sh with the bundle's wheels (no network needed when the
#      bundle has them all; else pip falls back to PyPI);
#   6. removes its own systemd.run= from cmdline.txt, enables and (re)starts
#      the agent.
# Everything it says goes to gate-agent/firstrun.log on the boot partition
# (readable from a laptop) and to /var/log/gate-agent-firstrun.log.
#
#     firstrun.sh [--root DIR] [--no-build]
#
# --root DIR stages into DIR instead of / (tests): no chown, no systemctl;
# what it would do is printed as "would: ...". --no-build is passed to install.sh.
set -uo pipefail
umask 022

BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BOOT=$(dirname "$BUNDLE")
ROOT=""
NO_BUILD=""
USER_NAME=gate-agent

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    --no-build) NO_BUILD=--no-build; shift ;;
    -h|--help) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "firstrun.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
STAGING=0
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT="" || STAGING=1
fi

LOG_BOOT="$BUNDLE/firstrun.log"
LOG_SYS="$ROOT/var/log/gate-agent-firstrun.log"

say() { echo "gate-agent firstrun: $*"; }
would() { echo "would: $*"; }
fail() {
  say "FAILED: $*"
  say "the card still holds the bundle; fix the cause, copy the bundle again and reboot"
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
own() {  # own OWNER:GROUP PATH (in the target root)
  if [ "$STAGING" -eq 1 ]; then would "chown $1 ${2#$ROOT}"; else chown "$1" "$2"; fi
}

main() {
say "started $(date -u +%Y-%m-%dT%H:%M:%SZ) from $BUNDLE${ROOT:+ (staging into $ROOT)}"
if [ "$STAGING" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  fail "must run as root (cloud-init and systemd.run do)"
fi
if [ -e "$BUNDLE/INSTALLED" ]; then
  say "already installed on $(cat "$BUNDLE/INSTALLED"); nothing to do"
  exit 0
fi

# --- 1. the bundle is whole -------------------------------------------------------------
[ -f "$BUNDLE/MANIFEST.sha256" ] || fail "MANIFEST.sha256 is missing: the bundle was not copied whole"
(cd "$BUNDLE" && sha256sum --quiet -c MANIFEST.sha256) ||
  fail "some files differ from MANIFEST.sha256: the copy onto the card is damaged"
say "bundle verified"

# --- 2. the source ----------------------------------------------------------------------
SRC_TGZ=$(ls "$BUNDLE"/src/gate-agent-*.tar.gz 2>/dev/null | head -n 1)
[ -n "$SRC_TGZ" ] || fail "no src/gate-agent-*.tar.gz in the bundle"
SRC="$ROOT/opt/gate-agent/src"
rm -rf "$SRC.new"
mkdir -p "$SRC.new"
tar -xzf "$SRC_TGZ" -C "$SRC.new" --strip-components=1 || fail "cannot unpack $SRC_TGZ"
rm -rf "$SRC"
mv "$SRC.new" "$SRC"
say "source unpacked into ${SRC#$ROOT}"

# --- 3. the user, then the gate's files into /etc/gate-agent ------------------------------
if [ "$STAGING" -eq 1 ]; then
  would "systemd-sysusers $SRC/systemd/gate-agent.sysusers.conf"
elif have systemd-sysusers; then
  systemd-sysusers "$SRC/systemd/gate-agent.sysusers.conf" || say "systemd-sysusers failed; install.sh tries again"
fi
GATE="$BUNDLE/gate"
ETC="$ROOT/etc/gate-agent"
[ -f "$GATE/agent.toml" ] || fail "gate/agent.toml is missing from the bundle"
install -d -m 0750 "$ETC"
own "root:$USER_NAME" "$ETC"
if [ -f "$ETC/agent.toml" ]; then
  cp -p "$ETC/agent.toml" "$ETC/agent.toml.bak"
  say "kept the previous config as /etc/gate-agent/agent.toml.bak"
fi
install -m 0640 "$GATE/agent.toml" "$ETC/agent.toml"
own "root:$USER_NAME" "$ETC/agent.toml"
for f in ca.pem gate.pem; do
  if [ -f "$GATE/$f" ]; then
    install -m 0644 "$GATE/$f" "$ETC/$f"
  fi
done
if [ -f "$GATE/gate.key" ]; then
  install -m 0600 "$GATE/gate.key" "$ETC/gate.key"
  own "$USER_NAME:$USER_NAME" "$ETC/gate.key"  # the service reads it, nobody else
fi
if [ -d "$GATE/keys" ]; then
  install -d -m 0755 "$ETC/keys"
  for k in "$GATE"/keys/*; do
    [ -f "$k" ] && install -m 0644 "$k" "$ETC/keys/$(basename "$k")"
  done
fi
say "config, certificates and keys installed in /etc/gate-agent"

# --- 4. no secret stays on the boot partition ----------------------------------------------
erase() {
  local f=$1
  [ -f "$f" ] || return 0
  if have shred; then
    shred -u -z "$f"
  else
    dd if=/dev/zero of="$f" bs=1k count=$(( ($(stat -c %s "$f") + 1023) / 1024 )) conv=notrunc 2>/dev/null
    sync "$f" 2>/dev/null || sync
    rm -f "$f"
  fi
}
erase "$GATE/gate.key"
for f in "$GATE"/*.key "$GATE"/*password*; do erase "$f"; done
rm -rf "$GATE"
# The checksums of the secrets go too: they would let anyone test a guess.
sed -i '/ gate\//d' "$BUNDLE/MANIFEST.sha256"
sync
[ -e "$GATE" ] && fail "could not remove $GATE from the boot partition"
say "secrets erased from the boot partition"

# --- 5. install ------------------------------------------------------------------------------
WHEELS="$BUNDLE/wheels"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  export PIP_FIND_LINKS="$WHEELS"
  if [ -f "$WHEELS/MISSING.txt" ]; then
    say "some wheels are not in the bundle (wheels/MISSING.txt): pip fetches them from the network"
  else
    export PIP_NO_INDEX=1  # everything is here: no network needed
  fi
else
  say "no wheels in the bundle: pip fetches the dependencies from the network"
fi
ARGS=(--no-start)  # started below, without waiting for the network
[ "$STAGING" -eq 1 ] && ARGS+=(--root "$ROOT")
[ -n "$NO_BUILD" ] && ARGS+=("$NO_BUILD")
bash "$SRC/install.sh" "${ARGS[@]}" || fail "install.sh failed (see above)"
# install.sh created the user if sysusers could not: owners once more.
own "root:$USER_NAME" "$ETC"
own "root:$USER_NAME" "$ETC/agent.toml"
[ -f "$ETC/gate.key" ] && own "$USER_NAME:$USER_NAME" "$ETC/gate.key"

# --- 6. never again, and start -----------------------------------------------------------------
CMDLINE="$BOOT/cmdline.txt"
if [ -f "$CMDLINE" ] && grep -q "gate-agent/firstrun.sh" "$CMDLINE"; then
  sed -i -E 's# ?systemd\.run=[^ ]*gate-agent/firstrun\.sh##' "$CMDLINE"
  if ! grep -q "systemd\.run=" "$CMDLINE"; then
    sed -i -E 's# ?systemd\.run_success_action=[^ ]*##; s# ?systemd\.unit=kernel-command-line\.target##' "$CMDLINE"
  fi
  say "removed the first-boot entry from cmdline.txt"
fi
date -u +%Y-%m-%dT%H:%M:%SZ > "$BUNDLE/INSTALLED"
if [ "$STAGING" -eq 1 ]; then
  would "systemctl enable gate-agent && systemctl restart gate-agent"
elif [ -d /run/systemd/system ]; then
  systemctl enable gate-agent.service >/dev/null 2>&1 || true
  # --no-block: under systemd.run the network may not be up yet; the unit starts when it can.
  systemctl restart --no-block gate-agent.service || say "the agent did not start: journalctl -u gate-agent"
fi
say "done. Check the gate with: sudo gate-agent doctor"
return 0
}

mkdir -p "$(dirname "$LOG_SYS")"
# Everything said goes to both logs; the exit status is main's, not tee's.
main 2>&1 | tee -a "$LOG_BOOT" "$LOG_SYS"
exit "${PIPESTATUS[0]}"
