#!/usr/bin/env bash
# Debian 12 (bookworm) roots for amd64 and arm64, built with debootstrap
# (arm64 on an x86_64 host runs under qemu-user-static through binfmt_misc),
# cached, and entered with their mounts set up and always taken down.
#
#   scripts/debian-root.sh ensure ARCH [PKG...]
#       Build the root for ARCH (amd64 or arm64) with PKG... installed, or
#       reuse the cached one (seconds). Prints its path as the only line on
#       stdout; progress goes to stderr. The cache key is ARCH + the sorted
#       package list + this script's RECIPE number:
#       $DEBIAN_ROOT_CACHE/<arch>-<12 hex> (default .cache/roots/ in the
#       repository, git-ignored). Treat a cached root as shared: to install
#       into a root and throw it away, clone it.
#   scripts/debian-root.sh clone ARCH DIR [PKG...]
#       DIR becomes a fresh, disposable copy of that cached root (built first
#       if needed); an existing DIR is removed first (as with `remove`).
#   scripts/debian-root.sh run DIR [--bind HOST:INSIDE]... [--env NAME=VALUE]...
#                              [--cwd INSIDE] [--] CMD [ARG...]
#       Run CMD as root inside DIR (chroot) with a clean environment (PATH,
#       HOME=/root, LANG=C.UTF-8, TERM, the --env values) and these mounts:
#       DIR bound on itself (private propagation, so nothing done inside
#       reaches the host's mount table outside DIR), /proc, /sys, the host's
#       /dev and /dev/pts (loop devices, ptys), a fresh tmpfs on /dev/shm,
#       /tmp and /run, the host's resolv.conf copied in, and each --bind
#       (INSIDE is created). Exits with CMD's status. On any exit (CMD fails,
#       Ctrl-C, TERM) processes still running inside DIR are stopped and every
#       mount under DIR (CMD's own too) is unmounted; `findmnt` must then find
#       none under DIR, else the script says so and exits 1. One `run` at a
#       time per root (a lock next to it); `clone` of a root waits for its run.
#   scripts/debian-root.sh shell DIR            an interactive bash inside (as run)
#   scripts/debian-root.sh umount DIR           stop what runs inside DIR, unmount all under it
#   scripts/debian-root.sh remove DIR           umount, then delete DIR (never across a mount)
#   scripts/debian-root.sh path ARCH [PKG...]   the cache path, built or not
#
# A root is "usable": apt sources for bookworm, bookworm-updates and
# bookworm-security (main contrib non-free non-free-firmware, as on Raspberry
# Pi OS's Debian base), recommends off, a policy-rc.d that lets no service
# start, LANG=C.UTF-8, the host's local CA certificates
# (/usr/local/share/ca-certificates) added to its bundle and pip pointed at
# that bundle (a proxy's CA reaches pip inside), no PostgreSQL cluster made
# at install. Host packages (debootstrap; qemu-user-static and binfmt-support
# for a foreign ARCH) are installed when missing; sudo is used when not root.
# MIRROR (default http://deb.debian.org/debian) and SECURITY_MIRROR
# (http://deb.debian.org/debian-security) choose where packages come from.
# A cached root is not refreshed: delete it to take newer packages.
#
# Example (the Debian package's tests):
#   root=$(scripts/debian-root.sh ensure arm64 systemd)
#   scripts/debian-root.sh clone arm64 /tmp/fresh systemd
#   scripts/debian-root.sh run /tmp/fresh --bind "$PWD/dist:/dist" -- apt-get install -y /dist/x.deb
set -euo pipefail
umask 022

RECIPE=1  # bump when the way a root is made changes: every cached root is rebuilt
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${DEBIAN_ROOT_CACHE:-$(dirname "$HERE")/.cache/roots}
ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "debian-root: $*" >&2; }
die() { say "$*"; exit 1; }
have_cmd() { command -v "$1" >/dev/null 2>&1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

if [ "$(id -u)" -ne 0 ]; then
  # debootstrap, chroot and mount need root.
  have_cmd sudo || die "needs root (debootstrap, chroot, mount); run it as root"
  exec sudo -E -- "${BASH_SOURCE[0]}" "$@"
fi

qemu_name() {  # Debian architecture -> qemu's name, for binfmt_misc
  case "$1" in
    amd64) echo x86_64 ;;
    arm64) echo aarch64 ;;
    *) die "unsupported architecture '$1' (amd64 or arm64)" ;;
  esac
}

foreign() { [ "$1" != "$(dpkg --print-architecture)" ]; }

host_packages() {  # install what is missing on the host, like scripts/setup-system.sh
  local arch=$1 need=()
  have_cmd debootstrap || need+=(debootstrap)
  have_cmd findmnt || need+=(util-linux)
  if foreign "$arch"; then
    [ -e "/usr/libexec/qemu-binfmt/$(qemu_name "$arch")-binfmt-P" ] ||
      have_cmd "qemu-$(qemu_name "$arch")-static" || need+=(qemu-user-static)
    have_cmd update-binfmts || need+=(binfmt-support)
  fi
  [ ${#need[@]} -eq 0 ] && return 0
  have_cmd apt-get || die "missing host packages: ${need[*]}; install them with your package manager"
  say "installing host packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >&2
}

binfmt() {  # a foreign ARCH's binaries run through qemu, also inside a chroot
  local arch=$1 q entry
  foreign "$arch" || return 0
  q=$(qemu_name "$arch")
  entry=/proc/sys/fs/binfmt_misc/qemu-$q
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
      die "cannot mount binfmt_misc (a container without it cannot run $arch binaries)"
  fi
  if [ ! -e "$entry" ]; then
    update-binfmts --enable "qemu-$q" >&2 2>&1 || true
  fi
  if [ ! -e "$entry" ] && [ -f "/usr/lib/binfmt.d/qemu-$q.conf" ]; then
    # Without binfmt-support's service: register the line systemd-binfmt would.
    cat "/usr/lib/binfmt.d/qemu-$q.conf" >/proc/sys/fs/binfmt_misc/register || true
  fi
  [ -e "$entry" ] || die "qemu-$q is not registered in binfmt_misc; install qemu-user-static"
  [ "$(head -n1 "$entry")" = enabled ] || echo 1 >"$entry"
  # F (fix binary): the kernel opens qemu at registration, so it works inside a
  # chroot that has no qemu of its own.
  grep -q '^flags:.*F' "$entry" ||
    die "binfmt entry qemu-$q lacks the F flag (chroots cannot find qemu); re-register it from /usr/lib/binfmt.d/qemu-$q.conf"
}

key_of() {  # arch + sorted packages + recipe -> <arch>-<12 hex>
  local arch=$1; shift
  local list
  list=$(printf '%s\n' "$@" | sed '/^$/d' | sort -u | tr '\n' ' ')
  printf '%s-%s\n' "$arch" "$(printf 'recipe %s\nsuite %s\narch %s\npackages %s\n' \
    "$RECIPE" "$SUITE" "$arch" "$list" | sha256sum | cut -c1-12)"
}

# --- mounts ------------------------------------------------------------------

mounts_under() {  # every mount at or below $1, deepest first
  findmnt -rn -o TARGET | awk -v d="$1" '$0 == d || index($0, d "/") == 1' | sort -r
}

procs_inside() {  # pids whose root directory is $1 or below
  local dir=$1 p r
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    if [ "$r" = "$dir" ] || [ "${r#"$dir"/}" != "$r" ]; then echo "${p#/proc/}"; fi
  done
}

teardown() {  # stop what still runs inside, unmount everything under $1, verify
  local dir=$1 pids left i
  pids=$(procs_inside "$dir")
  if [ -n "$pids" ]; then
    say "stopping processes left inside $dir: $(echo $pids)"
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 50); do
      pids=$(procs_inside "$dir"); [ -z "$pids" ] && break; sleep 0.1
    done
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  fi
  for i in 1 2 3 4 5; do
    [ -z "$(mounts_under "$dir")" ] && break
    umount -R "$dir" 2>/dev/null || mounts_under "$dir" | xargs -r -d '\n' umount 2>/dev/null || true
    [ -z "$(mounts_under "$dir")" ] || sleep 0.5
  done
  if [ -n "$(mounts_under "$dir")" ]; then
    say "unmounting lazily what is still busy under $dir"
    mounts_under "$dir" | xargs -r -d '\n' umount -l 2>/dev/null || true
  fi
  left=$(mounts_under "$dir")
  if [ -n "$left" ]; then
    say "mounts left under $dir (findmnt):"; echo "$left" >&2
    return 1
  fi
}

setup_mounts() {  # $1 = root; then pairs of HOST INSIDE binds
  local dir=$1; shift
  [ -z "$(mounts_under "$dir")" ] || teardown "$dir" || die "cannot clear old mounts under $dir"
  mount --bind "$dir" "$dir"
  mount --make-rprivate "$dir"
  mount -t proc proc "$dir/proc"
  mount -t sysfs sysfs "$dir/sys"
  mount --bind /dev "$dir/dev"
  mount --make-rprivate "$dir/dev"
  mount --bind /dev/pts "$dir/dev/pts"
  mkdir -p "$dir/dev/shm"
  mount -t tmpfs -o mode=1777,nosuid,nodev shm "$dir/dev/shm"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$dir/tmp"
  mount -t tmpfs -o mode=0755,nosuid,nodev run "$dir/run"
  mkdir -p "$dir/run/lock" && chmod 1777 "$dir/run/lock"
  while [ $# -ge 2 ]; do
    [ -e "$1" ] || die "--bind: $1 does not exist"
    if [ -d "$1" ]; then mkdir -p "$dir$2"; else mkdir -p "$(dirname "$dir$2")"; touch "$dir$2"; fi
    mount --bind "$1" "$dir$2"
    shift 2
  done
  rm -f "$dir/etc/resolv.conf"  # may be a dangling link to the host's resolver's run dir
  cp -L /etc/resolv.conf "$dir/etc/resolv.conf"
}

# --- locks ---------------------------------------------------------------------

lock() {  # lock MODE(-s|-x) DIR: held by this shell until it exits
  local fd
  mkdir -p "$(dirname "$2")"
  exec {fd}>"${2%/}.lock"
  flock "$1" "$fd"
  LOCK_FD=$fd
}

# --- building ------------------------------------------------------------------

in_root() {  # in_root DIR CMD...: run CMD in DIR (mounts held by the caller)
  local dir=$1; shift
  chroot "$dir" /usr/bin/env -i PATH="$ROOT_PATH" HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}

configure_root() {  # $1 = root being built; $2... = packages
  local dir=$1; shift
  rm -f "$dir/etc/apt/sources.list"
  cat >"$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$dir/etc/apt/apt.conf.d/90debian-root" <<'EOF'
APT::Install-Recommends "false";
Acquire::Retries "3";
EOF
  # No service starts inside a build root (invoke-rc.d asks this first).
  printf '#!/bin/sh\n# debian-root.sh: no service starts in this root\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
  chmod 755 "$dir/usr/sbin/policy-rc.d"
  echo 'LANG=C.UTF-8' >"$dir/etc/default/locale"
  echo "debian-root" >"$dir/etc/hostname"
  if printf '%s\n' "$@" | grep -q '^postgresql'; then
    # Tests make their own throwaway clusters; a default one is minutes of initdb under qemu.
    mkdir -p "$dir/etc/postgresql-common"
    echo 'create_main_cluster = false' >"$dir/etc/postgresql-common/createcluster.conf"
  fi
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$dir/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
  fi
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$dir/etc/pip.conf"
}

BG_PID=""
bg() {  # run a step in the background, in its own process group, and wait for it
  set -m  # job control: the step and every process it starts get their own group
  "$@" &
  BG_PID=$!
  set +m
  wait "$BG_PID"
}

stop_bg() {  # the step still running when the build is cut short: its whole group
  local i
  [ -n "$BG_PID" ] || return 0
  kill -TERM -- "-$BG_PID" 2>/dev/null || return 0
  for i in $(seq 50); do
    kill -0 -- "-$BG_PID" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$BG_PID" 2>/dev/null || true  # debootstrap finishes what it was doing on TERM
  sleep 0.2
}

build_root() {  # build_root ARCH FINAL_DIR PKG...
  local arch=$1 final=$2; shift 2
  local tmp="$final.tmp" start=$SECONDS
  [ -e "$tmp" ] && remove_root "$tmp"
  say "building a Debian $SUITE $arch root with: ${*:-(base only)}"
  mkdir -p "$tmp"
  touch "$tmp/debian-root.partial"  # lets remove_root delete a build that was cut short
  # On failure or Ctrl-C: nothing mounted is left behind, and the half-made root goes.
  trap "stop_bg; teardown '$tmp' && rm -rf --one-file-system '$tmp'" EXIT
  # A TERM or INT to this script alone (not its children) is acted on at once:
  # each long step runs in the background, and the EXIT trap stops it.
  trap 'exit 130' INT
  trap 'exit 143' TERM
  bg debootstrap --arch="$arch" --variant=minbase --include=ca-certificates \
    "$SUITE" "$tmp" "$MIRROR" >&2 ||
    die "debootstrap failed (see $tmp/debootstrap/debootstrap.log)"
  configure_root "$tmp" "$@"
  setup_mounts "$tmp"
  bg in_root "$tmp" update-ca-certificates >&2
  bg in_root "$tmp" apt-get update -qq >&2
  bg in_root "$tmp" apt-get -y -q -o Dpkg::Use-Pty=0 dist-upgrade >&2
  if [ $# -gt 0 ]; then
    bg in_root "$tmp" apt-get install -y -q -o Dpkg::Use-Pty=0 "$@" >&2
  fi
  bg in_root "$tmp" apt-get clean
  in_root "$tmp" dpkg-query -W -f '${Package} ${Version}\n' >"$tmp/etc/debian-root.packages"
  teardown "$tmp"
  printf 'arch %s\nsuite %s\nrecipe %s\npackages %s\nbuilt %s\n' "$arch" "$SUITE" "$RECIPE" "$*" \
    "$(date -u +%FT%TZ)" >"$tmp/etc/debian-root.info"
  rm "$tmp/debian-root.partial"
  trap - EXIT INT TERM
  mv "$tmp" "$final"
  say "built $final in $((SECONDS - start)) s"
}

remove_root() {  # delete a root, never following a mount into the host
  local dir=$1
  [ -d "$dir" ] || return 0
  # Only what this script made: a finished root, or one debootstrap left half-made.
  [ -f "$dir/etc/debian-root.info" ] || [ -f "$dir/debian-root.partial" ] || [ -z "$(ls -A "$dir")" ] ||
    die "not removing $dir: not a root made by scripts/debian-root.sh"
  teardown "$dir" || die "not removing $dir: mounts remain"
  rm -rf --one-file-system "$dir"
}

ensure() {  # ensure ARCH PKG... -> prints the root's path
  local arch=$1; shift
  qemu_name "$arch" >/dev/null
  local final
  final="$CACHE/$(key_of "$arch" "$@")"
  host_packages "$arch"
  binfmt "$arch"
  if [ ! -f "$final/etc/debian-root.info" ]; then
    lock -x "$final"
    if [ ! -f "$final/etc/debian-root.info" ]; then
      [ -e "$final" ] && remove_root "$final"  # half-made by a killed build
      build_root "$arch" "$final" "$@"
    fi
    eval "exec $LOCK_FD>&-"
  fi
  in_root "$final" /bin/true || die "$final does not run (binfmt/qemu for $arch?)"
  echo "$final"
}

# --- commands ----------------------------------------------------------------------

run_in() {  # run DIR [--bind H:I]... [--env N=V]... [--cwd D] [--] CMD...
  local dir binds=() envs=() cwd=/ status=0
  RUN_FOREGROUND=${RUN_FOREGROUND:-0}
  [ $# -ge 1 ] || usage
  dir=$(realpath -e "$1") || die "no root at $1"; shift
  [ -f "$dir/etc/debian-root.info" ] || die "$dir is not a root made by this script"
  while [ $# -gt 0 ]; do
    case "$1" in
      --bind) [ $# -ge 2 ] && [[ $2 == *:/* ]] || die "--bind HOST:/INSIDE"
              binds+=("$(realpath -e "${2%%:*}")" "${2#*:}") || die "--bind: no ${2%%:*}"; shift 2 ;;
      --env) [ $# -ge 2 ] && [[ $2 == *=* ]] || die "--env NAME=VALUE"; envs+=("$2"); shift 2 ;;
      --cwd) [ $# -ge 2 ] || die "--cwd DIR"; cwd=$2; shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -ge 1 ] || die "run: no command"
  binfmt "$(sed -n 's/^arch //p' "$dir/etc/debian-root.info")"
  lock -x "$dir"
  trap "teardown '$dir'" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  setup_mounts "$dir" ${binds[@]+"${binds[@]}"}
  set -- chroot "$dir" /usr/bin/env -i PATH="$ROOT_PATH" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    ${envs[@]+"${envs[@]}"} /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$cwd" "$@"
  if [ "$RUN_FOREGROUND" = 1 ]; then
    "$@" {LOCK_FD}>&- || status=$?  # an interactive shell owns the terminal and its Ctrl-C
  else
    # In the background so that a TERM or INT to this script alone is acted on at
    # once (bash runs traps only between foreground commands); the trap's
    # teardown then stops what runs inside.
    "$@" <&0 {LOCK_FD}>&- &
    wait $! || status=$?
  fi
  trap - EXIT
  teardown "$dir" || status=1
  exit "$status"
}

cmd=${1:-}; shift || true
case "$cmd" in
  ensure) [ $# -ge 1 ] || usage; ensure "$@" ;;
  path) [ $# -ge 1 ] || usage; qemu_name "$1" >/dev/null; echo "$CACHE/$(key_of "$@")" ;;
  clone)
    [ $# -ge 2 ] || usage
    arch=$1 dest=$2; shift 2
    src=$(ensure "$arch" "$@")
    lock -s "$src"
    remove_root "$dest"
    mkdir -p "$(dirname "$dest")"
    start=$SECONDS
    cp -a --reflink=auto "$src" "$dest"
    say "cloned $src to $dest in $((SECONDS - start)) s"
    echo "$(realpath "$dest")" ;;
  run) run_in "$@" ;;
  shell) [ $# -eq 1 ] || usage; RUN_FOREGROUND=1 run_in "$1" -- /bin/bash -l ;;
  umount) [ $# -eq 1 ] || usage; teardown "$(realpath -e "$1")" ;;
  remove) [ $# -eq 1 ] || usage; remove_root "$(realpath -m "$1")" ;;
  *) usage ;;
esac
