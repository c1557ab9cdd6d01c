#!/usr/bin/env bash
# Build the Debian package: dist/gate-agent_<version>_<arch>.deb (make deb).
#
#     debian/make-deb.sh [--arch ARCH] [--revision REV] [--no-lintian]
#
# The upstream version is pyproject.toml's; the Debian revision is debian/
# changelog's (its top entry must carry the same upstream version).
# --revision REV builds UPSTREAM-REV instead, with a changelog entry added to
# the exported copy only (the upgrade tests build two revisions this way).
#
# The build runs on a Debian 12 (bookworm) machine of the target architecture:
# this one when ARCH is its own, else inside an emulated Debian 12 root of that
# architecture (scripts/debian-root.sh, issue 10 part 1). It installs its own
# build packages (debhelper, python3.11-venv, ...), exports the checkout's
# files (git ls-files) into .cache/deb/build-ARCH, fetches the wheels pinned
# with their hashes in debian/requirements*.txt into .cache/deb/wheels (the
# only step that needs the network), builds with dpkg-buildpackage -b (offline),
# copies the .deb to dist/ and runs lintian (tags explained in
# debian/gate-agent.lintian-overrides).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST_ARCH=$(dpkg --print-architecture)
ARCH=$HOST_ARCH
REVISION=""
LINTIAN=1
CACHE=${GATE_DEB_CACHE:-$SRC/.cache/deb}
OUT=${GATE_DEB_OUT:-$SRC/dist}

say() { echo "make-deb: $*"; }
die() { echo "make-deb: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=${2:?--arch needs an architecture (amd64, arm64)}; shift 2 ;;
    --revision) REVISION=${2:?--revision needs a Debian revision, e.g. 2}; shift 2 ;;
    --no-lintian) LINTIAN=0; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1; see debian/make-deb.sh --help" ;;
  esac
done
case "$REVISION" in
  ""|[0-9]*) ;;
  *) die "--revision $REVISION: a Debian revision starts with a digit (1, 2, 1~test1)" ;;
esac

# --- the packages the build needs, only those missing --------------------------------------
BUILD_PACKAGES=(build-essential debhelper dpkg-dev python3.11-venv python3.11-dev fakeroot)

install_missing() {
  local need=() p
  for p in "$@"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  say "installing packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
}

run_lintian() {
  install_missing lintian
  say "lintian $(basename "$1")"
  lintian --fail-on error,warning --info "$1" || die "lintian found problems (above)"
}

# --- the versions --------------------------------------------------------------------------
upstream_version() {
  /usr/bin/python3.11 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$SRC/pyproject.toml"
}

# --- the checkout's files, exported (nothing untracked-and-ignored: no .venv, no .so) ------------
export_tree() {
  local dest=$1
  rm -rf "$dest"
  mkdir -p "$dest"
  if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
      tar --null -T - -cf -) | tar -xf - -C "$dest"
  else
    tar -C "$SRC" --exclude=./.venv --exclude=./.cache --exclude=./dist --exclude=./build \
      --exclude='*.so' --exclude=__pycache__ -cf - . | tar -xf - -C "$dest"
  fi
}

add_changelog_entry() {
  local dir=$1 version=$2 log=$1/debian/changelog
  local who date
  who=$(dpkg-parsechangelog -l "$log" -S Maintainer)
  # One second after the entry below it: newer, and the same on every build.
  date=$(LC_ALL=C date -u -R -d "@$(( $(dpkg-parsechangelog -l "$log" -S Timestamp) + 1 ))")
  { printf 'gate-agent (%s) bookworm; urgency=medium\n\n  * Build of revision %s (debian/make-deb.sh --revision).\n\n -- %s  %s\n\n' \
      "$version" "${version#*-}" "$who" "$date"; cat "$log"; } > "$log.new"
  mv "$log.new" "$log"
}

# --- the pinned wheels, fetched once: the build itself is offline ---------------------------
fetch_wheels() {
  local wheels=$1 tools=$CACHE/pip-$ARCH
  mkdir -p "$wheels"
  [ -x "$tools/bin/python" ] || /usr/bin/python3.11 -m venv "$tools"
  local req
  for req in requirements-build.txt requirements.txt; do
    "$tools/bin/python" -m pip --isolated --disable-pip-version-check download --quiet \
      --only-binary=:all: --require-hashes --no-deps -d "$wheels" -r "$SRC/debian/$req" ||
      die "fetching the wheels of debian/$req failed (network to PyPI?); see above"
  done
}

native_build() {
  if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
    die "the package is built on Debian 12 / Raspberry Pi OS bookworm (its python3.11 is the board's); this is $(. /etc/os-release; echo "$PRETTY_NAME")"
  fi
  install_missing "${BUILD_PACKAGES[@]}"
  local upstream changelog version
  upstream=$(upstream_version)
  changelog=$(dpkg-parsechangelog -l "$SRC/debian/changelog" -S Version)
  if [ "${changelog%-*}" != "$upstream" ]; then
    die "debian/changelog's top entry is $changelog but pyproject.toml says $upstream: add an entry 'gate-agent ($upstream-1)' at the top of debian/changelog"
  fi
  version=$changelog
  [ -z "$REVISION" ] || version=$upstream-$REVISION

  local work=$CACHE/build-$ARCH
  local tree=$work/gate-agent-$upstream
  say "gate-agent $version for $ARCH: exporting the tree to $tree"
  export_tree "$tree"
  [ "$version" = "$changelog" ] || add_changelog_entry "$tree" "$version"
  fetch_wheels "$CACHE/wheels"
  rm -f "$work"/gate-agent_*
  say "dpkg-buildpackage (offline, wheels from $CACHE/wheels)"
  (cd "$tree" && GATE_WHEELHOUSE=$CACHE/wheels dpkg-buildpackage -b -us -uc --no-pre-clean) ||
    die "dpkg-buildpackage failed; see above"
  local deb=$work/gate-agent_${version}_$ARCH.deb
  [ -f "$deb" ] || die "dpkg-buildpackage made no $deb"
  mkdir -p "$OUT"
  cp "$deb" "$OUT/"
  say "built $OUT/$(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"
  [ "$LINTIAN" -eq 0 ] || run_lintian "$OUT/$(basename "$deb")"
}

# --- another architecture: the same script inside an emulated Debian 12 root ---------------------
# scripts/debian-root.sh (issue 10 part 1) makes and caches the root (debootstrap,
# qemu-user-static) with the build packages in it, and runs a command inside with
# its mounts always taken down. The tree is exported here, bound in as /src; the
# wheels and the build directory of that architecture live in .cache/deb/ARCH
# (/cache inside); the .deb comes out in dist/ (/out); lintian runs here.
root_build() {
  local tool=$SRC/scripts/debian-root.sh
  [ -x "$tool" ] || die "make deb ARCH=$ARCH builds inside an emulated Debian 12 $ARCH root made by scripts/debian-root.sh (issue 10 part 1), which this checkout does not have yet"
  local root src=$CACHE/src-$ARCH cache=$CACHE/$ARCH upstream version
  upstream=$(upstream_version)
  root=$("$tool" ensure "$ARCH" "${BUILD_PACKAGES[@]}") || die "no Debian 12 $ARCH root (see above)"
  say "building for $ARCH inside $root (emulated: expect several minutes)"
  export_tree "$src"
  mkdir -p "$cache" "$OUT"
  local args=(--arch "$ARCH" --no-lintian)
  [ -z "$REVISION" ] || args+=(--revision "$REVISION")
  "$tool" run "$root" --bind "$src:/src" --bind "$cache:/cache" --bind "$OUT:/out" \
    --env GATE_DEB_CACHE=/cache --env GATE_DEB_OUT=/out -- /src/debian/make-deb.sh "${args[@]}" ||
    die "the build inside the $ARCH root failed (see above)"
  version=$(dpkg-parsechangelog -l "$cache/build-$ARCH/gate-agent-$upstream/debian/changelog" -S Version)
  local deb=$OUT/gate-agent_${version}_$ARCH.deb
  [ -f "$deb" ] || die "the build inside the $ARCH root made no $deb"
  say "built $deb ($(du -k "$deb" | cut -f1) KiB)"
  [ "$LINTIAN" -eq 0 ] || run_lintian "$deb"
}

if [ "$ARCH" = "$HOST_ARCH" ]; then
  native_build
else
  root_build
fi
