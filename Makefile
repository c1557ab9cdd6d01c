# gate-agent: every target sets itself up on a fresh Debian / Raspberry Pi OS
# machine (system packages, .venv, the compiled fastpath), idempotently.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# On a Raspberry Pi, lgpio comes from Debian (python3-lgpio): the venv must see it.
VENV_FLAGS := $(shell grep -qs Raspberry /proc/device-tree/model && echo --system-site-packages)
# PostgreSQL is the regional side's store: a board neither installs it nor its driver (its
# tests skip and say so there). GATE_POSTGRES=0 leaves it out anywhere, 1 puts it in on a Pi.
GATE_POSTGRES ?= $(shell grep -qs Raspberry /proc/device-tree/model && echo 0 || echo 1)
export GATE_POSTGRES
comma := ,
EXTRAS := $(if $(filter 1,$(GATE_POSTGRES)),test$(comma)postgres,test)
PYTEST_FLAGS ?= -q
# `make test` runs the suite in parallel workers (pytest-xdist): most of its time is waiting on
# brokers, agents in subprocesses and timers, not CPU, so more workers than cores pay off
# (measured on 2 cores shared with other jobs: 6 workers 119-124 s, 4 workers 137-149 s,
# one process ~7 min);
# worksteal and tests/xdist_order.py (the long tests first) even out the load. PYTEST_JOBS=0
# runs it in one process; so does a run under qemu (GATE_EMULATED), where every worker's
# start-up would be emulated too.
PYTEST_JOBS ?= $(if $(GATE_EMULATED),0,6)
XDIST := $(if $(filter-out 0 1,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist worksteal)
# pytest caches the test modules it rewrites only where Python may write bytecode: without the
# cache every worker compiles the whole suite again (about 4 s of CPU each).
TEST_ENV := PYTHONDONTWRITEBYTECODE=
# The core and simulator tests, run once more on the pure twin alone.
PURE_TESTS := tests/test_cards.py tests/test_acl.py tests/test_fastpath.py tests/test_turnstile.py tests/test_simulator.py tests/test_site.py \
	tests/test_turnstile_console.py
SCENARIO ?= examples/scenarios/school-morning.toml

.PHONY: all setup build fastpath-built broker-plugin run simulate test test-pure test-arm64 bench soak chaos fuzz lint clean deb test-deb

all: build

$(STAMP): pyproject.toml setup.py scripts/setup-system.sh
	PYTHON=$(PYTHON) scripts/setup-system.sh
	test -x $(VPY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel "Cython>=3.0" "Babel>=2.12"
	@# The dependencies and the editable install; the fastpath is compiled by its own rule below
	@# (GATE_PUREPYTHON=1 here: a fresh setup compiles it once, not twice).
	GATE_PUREPYTHON=1 $(VPY) -m pip install -q --no-build-isolation -e '.[$(EXTRAS)]'
	@# OSDP readers are optional: where libosdp does not install, its tests skip and say why.
	$(VPY) -m pip install -q 'libosdp>=3.2' || echo "gate-agent: libosdp did not install; OSDP readers unavailable"
	touch $(STAMP)

setup: $(STAMP)

# The compiled fastpath (skipped with GATE_PUREPYTHON=1), the agent's bytecode and the broker
# plugin, each remade only when its sources changed: `make run` twice compiles nothing.
BYTECODE := build/bytecode.stamp
# The message catalogues (.mo, not in git): setup.py's build_py compiles them with Babel in
# pip's build of the package, here the editable install, run again when a .po changes.
CATALOGS := $(patsubst %.po,%.mo,$(wildcard agent/locale/*/LC_MESSAGES/*.po))
$(CATALOGS): %.mo: %.po | $(STAMP)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

build: fastpath-built $(CATALOGS) $(BYTECODE) broker-plugin

# fastpath/_compiled.pyx is compiled through pip (PEP 517, setup.py's Extension) into an editable
# install: the module lands beside its source in fastpath/, importable from the checkout and from
# the venv. Its rule's target is that module; a stamp under build/ with GATE_PUREPYTHON=1 or
# while there is no python3 yet to name the module (setup-system.sh installs it).
PURE := $(filter 1 true yes,$(GATE_PUREPYTHON))
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
FASTPATH := $(if $(PURE),build/fastpath-pure.stamp,$(if $(EXT_SUFFIX),fastpath/_compiled$(EXT_SUFFIX),build/fastpath.stamp))
fastpath-built: $(FASTPATH)
$(FASTPATH): $(STAMP) pyproject.toml setup.py $(wildcard fastpath/*.pyx fastpath/*.pxd)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	$(VPY) -c 'import fastpath; print("fastpath:", fastpath.IMPLEMENTATION)'
	@case $@ in *.stamp) mkdir -p $(@D) && touch $@ ;; \
		*) test -e $@ || { echo "gate-agent: $@ was not built" >&2; exit 1; } ;; esac

# Bytecode as installed boards have it (pip, the .deb's postinst): without it every start
# compiles the agent's sources again where PYTHONDONTWRITEBYTECODE is set (~40 ms, issue 12).
$(BYTECODE): $(shell find agent fastpath bench -name '*.py' 2>/dev/null) | $(STAMP)
	$(VPY) -m compileall -q agent fastpath bench >/dev/null
	@mkdir -p $(@D) && touch $@

# The regional broker's plugin (mosquitto/gate_acl.c, docs/security.md); its headers come from
# mosquitto-dev, libmosquitto-dev and libssl-dev. Without them it is not built and the broker
# tests skip, or fail under GATE_REQUIRE_COMPILED=1 (CI).
BROKER_PLUGIN := mosquitto/gate_acl.so
BROKER_PROBE = $(CC) -E -x c -include mosquitto_broker.h -include openssl/x509.h /dev/null >/dev/null 2>&1
BROKER_HEADERS := $(shell $(BROKER_PROBE) && echo yes)
broker-plugin: $(if $(BROKER_HEADERS),$(BROKER_PLUGIN))
ifeq ($(BROKER_HEADERS),)
	@# Asked again: on a fresh machine setup-system.sh installs the headers after make started.
	@if $(BROKER_PROBE); then $(MAKE) --no-print-directory $(BROKER_PLUGIN); \
	else echo "gate-agent: mosquitto-dev/libssl-dev missing; $(BROKER_PLUGIN) not built"; fi
endif

$(BROKER_PLUGIN): mosquitto/gate_acl.c
	$(CC) -std=c11 -O2 -Wall -Wextra -D_FORTIFY_SOURCE=2 -fstack-protector-strong -fPIC -shared \
		-Wl,-z,relro,-z,now -o $@ $< -lcrypto

# The live demo: the real service on simulated hardware, a local mosquitto, the live view.
run: build
	$(VPY) -m agent.cli demo $(DEMO_FLAGS)

# One scenario in virtual time (SCENARIO=examples/scenarios/fire-drill.toml make simulate).
simulate: build
	$(VPY) -m agent.cli simulate $(SCENARIO) --pretty

test: build
	$(TEST_ENV) $(VPY) -m pytest $(XDIST) $(PYTEST_FLAGS)
	$(MAKE) --no-print-directory test-pure

# Proves the package works where no compiler exists. In one process: its 3 s of CPU-bound
# tests gain nothing from workers that take longer to start.
test-pure: $(STAMP)
	GATE_PUREPYTHON=1 GATE_REQUIRE_COMPILED= $(TEST_ENV) $(VPY) -m pytest $(PYTEST_FLAGS) $(wildcard $(PURE_TESTS))

# The suite on Debian 12 arm64, the boards' system, in a cached debootstrap root (under
# qemu-user-static on x86_64): the fastpath compiled for aarch64, every scenario's --check, the
# whole suite with GATE_REQUIRE_COMPILED=1, then the pure twin's subset (scripts/test-arm64.sh).
# ARM64_TESTS=core: the twins, the core, the simulator and the service only (what .ci/run runs).
test-arm64:
	scripts/test-arm64.sh

bench: build
	$(VPY) -m bench.run

# The field's faults against the real parts, one bounded run (docs/reliability.md):
# one line of figures per fault; CHAOS_FLAGS=--quick for short runs, --only flood,kill9.
chaos: build
	$(VPY) -m bench.chaos $(CHAOS_FLAGS)

soak: build
	$(VPY) -m pytest $(PYTEST_FLAGS) -m soak -o addopts=""

lint: $(STAMP)
	$(VPY) -m ruff check agent fastpath tests bench

# The Debian package, dist/gate-agent_<version>_<arch>.deb (docs/packaging.md): ARCH=arm64
# builds it inside an emulated Debian 12 arm64 root; DEB_FLAGS=--revision 2, --no-lintian.
ARCH ?= $(shell dpkg --print-architecture)
deb:
	debian/make-deb.sh --arch $(ARCH) $(DEB_FLAGS)

# The package in a fresh Debian 12 root (debootstrap, cached in .cache/deb): install, the unit,
# upgrade, remove, purge. Builds its own two revisions; takes minutes.
test-deb: $(STAMP)
	$(VPY) -m pytest $(PYTEST_FLAGS) -m deb -o addopts="" tests/test_deb.py

include Makefile.fuzz
fuzz-hypothesis fuzz-atheris: build

clean:
	rm -rf build fastpath/_compiled.c fastpath/*.so *.egg-info $(BROKER_PLUGIN) $(CATALOGS)
