#!/usr/bin/env bash
# Remove gate-agent from this board:
#
#     sudo ./uninstall.sh           # keeps /etc/gate-agent (config, keys) and
#                                   # /var/lib/gate-agent (journal, state, access list)
#     sudo ./uninstall.sh --purge   # removes those too, and the user gate-agent
#
# The journal may still hold events the regional server has not confirmed:
# --purge asks for confirmation unless --yes is given.
#
#     ./uninstall.sh --root DIR [--purge]
#
# removes a staged install from DIR without touching the host (no systemctl,
# no userdel; what it would do is printed as "would: ...").
set -euo pipefail

ROOT=""
PURGE=0
YES=0
USER_NAME=gate-agent

while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || { echo "uninstall.sh: --root needs a directory" >&2; exit 2; }
            ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    --purge) PURGE=1; shift ;;
    --yes|-y) YES=1; shift ;;
    -h|--help)  # the header comment, whole: from line 2 to the first line that is not a comment
      awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
      echo "Options: --root DIR (a staged install), --purge, --yes/-y (no question), -h/--help"
      exit 0 ;;
    *) echo "uninstall.sh: unknown option $1; see ./uninstall.sh --help" >&2; exit 2 ;;
  esac
done

if [ -n "$ROOT" ]; then
  [ -d "$ROOT" ] || { echo "uninstall.sh: $ROOT is not a directory" >&2; exit 2; }
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT=""
fi
STAGING=0
[ -n "$ROOT" ] && STAGING=1

say() { echo "gate-agent uninstall: $*"; }
would() { echo "would: $*"; }

if [ "$STAGING" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "gate-agent uninstall: run it as root: sudo ./uninstall.sh" >&2
  exit 1
fi

remove() {
  local p
  for p in "$@"; do
    if [ -e "$ROOT$p" ] || [ -L "$ROOT$p" ]; then
      rm -rf -- "$ROOT$p"
      say "removed $p"
    fi
  done
}

if [ "$PURGE" -eq 1 ] && [ "$YES" -eq 0 ] && [ "$STAGING" -eq 0 ]; then
  if [ -t 0 ]; then
    read -r -p "Delete the journal (events not yet confirmed by the server are lost), the config and the keys? [y/N] " answer
    case "$answer" in y|Y|yes) ;; *) echo "nothing removed"; exit 1 ;; esac
  else
    echo "gate-agent uninstall: --purge deletes the journal and the config; add --yes to confirm" >&2
    exit 1
  fi
fi

if [ "$STAGING" -eq 1 ]; then
  would "systemctl disable --now gate-agent-console gate-agent"
elif [ -d /run/systemd/system ]; then
  # Stopping drives every output inactive and publishes the offline status.
  systemctl disable --now gate-agent-console.service 2>/dev/null || true
  systemctl disable --now gate-agent.service 2>/dev/null || true
fi

remove /etc/systemd/system/gate-agent.service \
       /etc/systemd/system/gate-agent-console.service \
       /usr/lib/sysusers.d/gate-agent.conf \
       /usr/lib/tmpfiles.d/gate-agent.conf \
       /usr/share/gate-agent \
       /usr/share/doc/gate-agent \
       /opt/gate-agent
# The command link, only when it still points at our venv.
if [ "$(readlink "$ROOT/usr/local/bin/gate-agent" 2>/dev/null)" = /opt/gate-agent/venv/bin/gate-agent ]; then
  remove /usr/local/bin/gate-agent
fi
# The udev rule only names the reader's port; remove it only when it is still ours.
rules=/etc/udev/rules.d/99-gate-reader.rules
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/hardware/99-gate-reader.rules
if [ -f "$ROOT$rules" ] && [ -f "$src" ] && cmp -s "$src" "$ROOT$rules"; then
  remove "$rules"
elif [ -f "$ROOT$rules" ]; then
  say "kept $rules (edited locally)"
fi

if [ "$PURGE" -eq 1 ]; then
  remove /etc/gate-agent /var/lib/gate-agent
  if [ "$STAGING" -eq 1 ]; then
    would "userdel $USER_NAME"
  elif getent passwd "$USER_NAME" >/dev/null; then
    userdel "$USER_NAME" || say "could not remove the user $USER_NAME; remove it with: userdel $USER_NAME"
  fi
else
  if [ -e "$ROOT/etc/gate-agent" ]; then say "kept /etc/gate-agent (config and keys)"; fi
  if [ -e "$ROOT/var/lib/gate-agent" ]; then
    say "kept /var/lib/gate-agent (journal, state, access list); --purge removes it"
  fi
fi

if [ "$STAGING" -eq 1 ]; then
  would "systemctl daemon-reload"
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
say "done"
