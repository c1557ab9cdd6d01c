"""The gate-stall probe (agent.runtime.StallProbe): the longest the gate thread
could not run, in telemetry as ``gate_stall_max_ms``.

The gate thread is blocked on purpose, two ways: inside an event (a sink
commit that holds it, as a slow journal would) and from outside while it is
idle (another thread holding the GIL in one long C call, as a table build or
a big ``json.loads`` does). The probe must report at least what it was made
to miss; an idle gate must not count its own waits as stalls. No speed is
asserted: each bound is what the probe must see, with the machine's own
delays only ever making the figure larger.
"""
from __future__ import annotations

import threading
import time

import pytest

from agent.contract import validate
from agent.core import events as ev
from agent.runtime import STALL_TICK_S, GateRuntime, StallProbe
from agent.uplink.telemetry import build_telemetry
from tests.test_runtime import CARD, make_runtime
from tests.test_service import write_config
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)


@pytest.fixture
def runtimes():
    made: list[GateRuntime] = []
    yield made
    for rt in made:
        rt.stop()


class _NoJournal:
    def backlog(self) -> int:
        return 0

    def oldest_pending_age_s(self, now_wall: float) -> None:
        return None


def test_an_event_that_holds_the_gate_thread_is_reported_at_least_as_long(fp, runtimes):
    rt, sink, _outputs, _log = make_runtime(fp, runtimes)
    rt.start()
    assert rt.wait_idle(5)
    rt.gate_stall()  # start a fresh interval
    sink.pause()
    assert rt.submit(ev.CardRead("entry", CARD))
    assert sink.entered.wait(5), "the card never reached the sink"
    held_from = time.monotonic()  # the gate thread is inside commit from before this ...
    time.sleep(0.3)
    held = time.monotonic() - held_from
    sink.release.set()  # ... until after this
    assert rt.wait_idle(5)
    stall = rt.gate_stall()
    assert stall["interval_ms"] >= held * 1000
    assert stall["max_ms"] >= held * 1000
    # The interval restarts at each reading; the maximum since start stays.
    again = rt.gate_stall()
    assert again["max_ms"] >= held * 1000
    assert again["interval_ms"] < held * 1000


def _hold_the_gil(n: int) -> float:
    """Sum a range in one C call (no bytecode runs, so the GIL is never handed over);
    returns how long it held the GIL, measured from inside."""
    t0 = time.monotonic()
    sum(range(n))
    return time.monotonic() - t0


def _calibrated(seconds: float) -> int:
    """A range length whose sum holds the GIL for about ``seconds`` on this machine."""
    n = 2_000_000
    while _hold_the_gil(n) < 0.05:
        n *= 2
    return n * max(1, round(seconds / _hold_the_gil(n)))


def test_another_thread_holding_the_gil_stalls_an_idle_gate_and_the_probe_sees_it(fp, runtimes):
    rt, _sink, _outputs, _log = make_runtime(fp, runtimes)
    rt.start()
    assert rt.wait_idle(5)
    n = _calibrated(0.3)
    time.sleep(0.05)
    rt.gate_stall()
    held: list[float] = []
    t = threading.Thread(target=lambda: held.append(_hold_the_gil(n)))
    t.start()
    t.join(30)
    assert held and held[0] > 0.1
    time.sleep(0.05)  # the gate thread's next wake, after the GIL came back
    stall = rt.gate_stall()
    # The hold may begin while the gate thread waits its tick: that part was idle anyway.
    assert stall["interval_ms"] >= (held[0] - STALL_TICK_S) * 1000
    assert stall["max_ms"] >= (held[0] - STALL_TICK_S) * 1000


def test_an_idle_gate_does_not_count_its_own_waits(fp, runtimes):
    # Waits of half a second at a time: a probe counting them would report about 500 ms.
    rt, _sink, _outputs, _log = make_runtime(fp, runtimes, stall_tick_s=0.5, idle_interval_s=0.5,
                                             on_idle=lambda now: None)
    rt.start()
    assert rt.wait_idle(5)
    time.sleep(1.6)  # three waits or more
    stall = rt.gate_stall()
    assert stall["max_ms"] < 500 and stall["interval_ms"] < 500


def test_a_card_arriving_mid_wait_is_due_at_once_not_at_the_end_of_the_wait(fp, runtimes):
    # The gate thread waits 30 s at a time here. A card comes, and the thread that queued it
    # keeps the GIL: the gate thread, woken, cannot run. It was due when the card came, so
    # that is a stall, though its own timeout was far off.
    rt, _sink, _outputs, _log = make_runtime(fp, runtimes, stall_tick_s=30.0)
    rt.start()
    assert rt.wait_idle(5)
    n = _calibrated(0.3)
    time.sleep(0.1)
    rt.gate_stall()
    held: list[float] = []

    def card_then_hold() -> None:
        rt.submit(ev.CardRead("entry", CARD))
        held.append(_hold_the_gil(n))

    t = threading.Thread(target=card_then_hold)
    t.start()
    t.join(30)
    assert rt.wait_idle(5)
    assert rt.counters["events"] == 1
    # The holder's own end stamp may come after the gate thread's turn (the GIL goes to the
    # waiting gate thread as soon as the sum returns), so half is asked: a probe that took
    # the 30 s timeout as the moment it was due would report nothing at all.
    assert held and rt.gate_stall()["interval_ms"] >= held[0] * 1000 / 2


def test_the_probe_hands_over_a_stall_noted_while_the_reader_held_its_lock():
    probe = StallProbe()
    probe.start(100.0)
    with probe._lock:  # the telemetry thread is reading just now
        probe.ran(100.25)  # the gate thread must not wait: it keeps the value
    assert probe.max_s == 0.25
    probe.ran(100.251)  # the next moment hands it over
    assert probe.take() == 0.25
    assert probe.take() == 0.0
    probe.woke(100.300, due=100.400)  # woke before it was due: no stall
    probe.woke(100.500, due=100.420)
    assert round(probe.take(), 6) == 0.08


def test_telemetry_carries_the_interval_and_since_start_maxima(fp, runtimes):
    rt, sink, _outputs, _log = make_runtime(fp, runtimes)
    rt.start()
    sink.pause()
    rt.submit(ev.CardRead("entry", CARD))
    assert sink.entered.wait(5)
    time.sleep(0.1)
    sink.release.set()
    assert rt.wait_idle(5)
    tel = build_telemetry(_NoJournal(), {"boot": "b", "gate_stall": rt.gate_stall()}, time.time())
    assert validate("telemetry", tel) == []
    assert tel["gate_stall_max_ms"] >= 100 and tel["gate_stall_since_start_ms"] >= 100
    tel = build_telemetry(_NoJournal(), {"boot": "b", "gate_stall": rt.gate_stall()}, time.time())
    assert tel["gate_stall_since_start_ms"] >= 100
    assert validate("telemetry", tel) == []


def test_the_services_telemetry_has_the_gate_stall(tmp_path, services):
    svc = services(write_config(tmp_path))
    tel = svc.telemetry()
    assert validate("telemetry", tel) == []
    assert tel["gate_stall_max_ms"] >= 0 and tel["gate_stall_since_start_ms"] >= tel["gate_stall_max_ms"]
