"""Shared fixtures.

``fp``: each fastpath twin in turn (pure, compiled). Every test that touches
the fastpath takes it, so one suite tests both. The compiled twin is skipped
with a reason when it was not built, unless GATE_REQUIRE_COMPILED=1, where
its absence fails the run.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.xdist_order import pytest_collection_modifyitems  # noqa: F401  (the long tests first)

PURE_ONLY = os.environ.get("GATE_PUREPYTHON", "") in ("1", "true", "yes")
REQUIRE_COMPILED = os.environ.get("GATE_REQUIRE_COMPILED", "") in ("1", "true", "yes")


def load_twin(name: str):
    """The fastpath twin module `fastpath._pure` or `fastpath._compiled`."""
    if name == "pure":
        return importlib.import_module("fastpath._pure")
    try:
        return importlib.import_module("fastpath._compiled")
    except ImportError as exc:
        if REQUIRE_COMPILED:
            raise
        pytest.skip(f"compiled fastpath not built ({exc}); run `make build`")


TWINS = ["pure"] if PURE_ONLY else ["pure", "compiled"]


@pytest.fixture(params=TWINS)
def fp(request):
    return load_twin(request.param)


def board_twin():
    """The twin a board runs: the compiled one, or the pure one where only it exists
    (GATE_PUREPYTHON=1). Modules whose tests do not differ between the twins take their
    ``fp`` from tests/twins.py (``one_twin``); the core's tests hold the twins together."""
    return load_twin(TWINS[-1])


@pytest.fixture
def fp_pair():
    """(pure, compiled) for property tests comparing the twins."""
    if PURE_ONLY:
        pytest.skip("GATE_PUREPYTHON=1: only the pure twin exists")
    return load_twin("pure"), load_twin("compiled")


@pytest.fixture
def services():
    """``services(config_path, **kw)``: an in-process agent.service.Service started from
    that config (clock synchronised, no systemd); every one is stopped at the end."""
    from agent.config import load_config
    from agent.service import ClockSync, Service

    made: list = []

    def start(config_path, **kw):
        kw.setdefault("clock_sync", ClockSync(lambda: True))
        kw.setdefault("env", {})
        svc = Service(load_config(config_path), **kw)
        made.append(svc)
        svc.start()
        return svc

    yield start
    for svc in made:
        svc.stop()


@pytest.fixture
def pty_pair():
    """A pseudo-terminal: (master fd, slave device path), as a serial reader's port."""
    master, slave = os.openpty()
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)
