#!/usr/bin/env bash
# make test-arm64: the suite on Debian 12 arm64, the boards' system, in a root
# made by scripts/debian-root.sh (under qemu-user-static on an x86_64 host).
#
#   scripts/test-arm64.sh            on the host: root, copy, then the steps below inside
#   scripts/test-arm64.sh --inside   inside the root, in the copied tree (the host part runs it)
#
# The tree copied in is what git would commit (tracked and untracked files,
# not the ignored ones: no .venv, no .cache, no built .so); it lives on the
# host in .cache/work/arm64/gate-agent (bound on /build inside), where its
# aarch64 .venv is kept between runs. Inside: `make build` (the venv, the
# Cython fastpath compiled for aarch64, the broker plugin), a check that this
# is aarch64 and the compiled twin, every example scenario's
# `gate-agent simulate --check`, the whole suite with GATE_REQUIRE_COMPILED=1,
# then the pure twin's subset (make test-pure). GATE_EMULATED=1 is set when
# the root runs under qemu. Figures: .cache/work/arm64/timings.txt; the whole
# log: .cache/work/arm64/test-arm64.log. PYTEST_FLAGS passes through.
#
# ARM64_TESTS=core (what .ci/run runs, to stay inside its time) runs, instead
# of the whole suite, the tests in CORE_TESTS below: both fastpath twins with
# the Hypothesis differential tests, the core (cards, lists, state machine,
# Wiegand and serial decoders, purity), the simulator, and the real service
# (`gate-agent run` on mock pins against mosquitto: ready, a card through to
# the ingest, a clean stop with every output inactive).
set -euo pipefail

CORE_TESTS=(tests/test_fastpath.py tests/test_fastpath_props.py tests/test_cards.py tests/test_acl.py
            tests/test_turnstile.py tests/test_wiegand.py tests/test_serialframes.py
            tests/test_core_purity.py tests/test_simulator.py tests/test_service.py)

# The system packages the suite needs on the board's Debian (scripts/setup-system.sh's list).
PACKAGES=(gcc make libc6-dev python3-dev python3-venv mosquitto mosquitto-dev libmosquitto-dev
          libssl-dev openssl sqlite3 systemd postgresql e2fsprogs)

stamp() { printf '%-34s %6d s\n' "$1" "$2" | tee -a "$TIMINGS"; }

inside() {
  TIMINGS=/build/timings.txt  # the host's .cache/work/arm64/timings.txt
  local t
  t=$SECONDS; make build; stamp "make build (venv, fastpath, plugin)" $((SECONDS - t))
  .venv/bin/python - <<'EOF'
import platform

import fastpath

print("machine:", platform.machine(), "| fastpath:", fastpath.IMPLEMENTATION)
assert platform.machine() == "aarch64", platform.machine()
assert fastpath.IMPLEMENTATION == "compiled", fastpath.IMPLEMENTATION
EOF
  t=$SECONDS
  for scenario in examples/scenarios/*.toml; do
    .venv/bin/gate-agent simulate --check "$scenario" >/dev/null ||
      { echo "test-arm64: simulate --check $scenario failed" >&2; return 1; }
    echo "simulate --check $scenario: ok"
  done
  stamp "simulate --check (every scenario)" $((SECONDS - t))
  t=$SECONDS
  local selection=() what="whole suite"
  case "${ARM64_TESTS:-all}" in
    all) ;;
    core) selection=("${CORE_TESTS[@]}"); what="core tests" ;;
    *) echo "test-arm64: ARM64_TESTS is 'all' (the default) or 'core'" >&2; return 2 ;;
  esac
  # shellcheck disable=SC2086 # PYTEST_FLAGS is a list of flags
  .venv/bin/python -m pytest ${PYTEST_FLAGS:--q} -p no:cacheprovider -rs --durations=15 \
    ${selection[@]+"${selection[@]}"}
  stamp "pytest, $what" $((SECONDS - t))
  t=$SECONDS
  make --no-print-directory test-pure PYTEST_FLAGS="${PYTEST_FLAGS:--q} -p no:cacheprovider"
  stamp "make test-pure" $((SECONDS - t))
}

if [ "${1:-}" = --inside ]; then
  inside
  exit
fi

cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$REPO/.cache/work/arm64
TREE=$WORK/gate-agent
mkdir -p "$WORK"
TIMINGS=$WORK/timings.txt
: >"$TIMINGS"
exec > >(tee "$WORK/test-arm64.log") 2>&1
start=$SECONDS

t=$SECONDS
ROOT=$(scripts/debian-root.sh ensure arm64 "${PACKAGES[@]}")
stamp "the arm64 root (built or cached)" $((SECONDS - t))

t=$SECONDS
# A fresh copy of the tree each run; only the ignored .venv (aarch64) stays.
mkdir -p "$TREE"
find "$TREE" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$TREE"
stamp "copy the tree in" $((SECONDS - t))

emulated=()
[ "$(dpkg --print-architecture)" = arm64 ] || emulated=(--env GATE_EMULATED=1)
status=0
scripts/debian-root.sh run "$ROOT" --bind "$WORK:/build" --cwd /build/gate-agent \
  --env GATE_REQUIRE_COMPILED=1 ${emulated[@]+"${emulated[@]}"} \
  --env "PYTEST_FLAGS=${PYTEST_FLAGS:--q}" --env "ARM64_TESTS=${ARM64_TESTS:-all}" \
  -- scripts/test-arm64.sh --inside || status=$?
stamp "make test-arm64, end to end" $((SECONDS - start))
echo "test-arm64: figures in $TIMINGS, log in $WORK/test-arm64.log"
exit "$status"
