"""The gate thread: queue order, journal-before-outputs, timeouts, failures.

A real Gate with a fastpath table runs in every test that decides (the `fp`
fixture runs each on both twins); outputs are gpiozero mock pins through
TurnstileIO, or a recording driver where only the order of calls matters.
"""
from __future__ import annotations

import threading
import time
from array import array

import pytest
from gpiozero.pins.mock import MockFactory

from agent.core import events as ev
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.hw.profiles import load_profile
from agent.hw.turnstile_io import TurnstileIO
from agent.runtime import Clock, GateRuntime, percentiles_ms
from fastpath import codes
from fastpath.columns import TableColumns
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

CARD = 6613779
OTHER = 1234  # not in the table


def one_card_table(fp):
    everywhere = b"\xff" * codes.BITMAP_BYTES
    return fp.Table(TableColumns(
        version="v1", card_keys=array("Q", [CARD]), card_person=array("i", [0]),
        card_flags=array("B", [0]), person_ids=["p-1"], person_from=array("q", [codes.NO_START]),
        person_until=array("q", [codes.NO_END]), person_groupset=array("i", [0]),
        person_flags=array("B", [0]), person_max_uses=array("i", [0]),
        gs_entry=[everywhere], gs_entry_holiday=[everywhere], gs_exit=[everywhere],
    ))


class Log:
    """One ordered log of sink commits and output calls, shared by both."""

    def __init__(self) -> None:
        self.entries: list[tuple] = []
        self.lock = threading.Lock()

    def add(self, *entry) -> None:
        with self.lock:
            self.entries.append(entry)

    def snapshot(self) -> list[tuple]:
        with self.lock:
            return list(self.entries)


class LoggingSink(SequenceSink):
    """SequenceSink that logs each commit; `pause()` makes the next commit wait."""

    def __init__(self, log: Log) -> None:
        super().__init__("t")
        self.log = log
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def pause(self) -> None:
        self.entered.clear()
        self.release.clear()

    def commit(self, records):
        self.entered.set()
        assert self.release.wait(10), "test never released the sink"
        if self.fail:
            raise OSError("disk full")
        out = super().commit(records)
        self.log.add("commit", tuple(r["type"] for r in out))
        return out


class LoggingDriver:
    """Forwards to the real outputs (if any) and logs each call."""

    def __init__(self, log: Log, inner=None) -> None:
        self.log = log
        self.inner = inner
        self.levels: dict[str, bool] = {}

    def set(self, line, active):
        self.levels[line] = active
        self.log.add("set", line, active)
        if self.inner is not None:
            self.inner.set(line, active)

    def feedback(self, reader, signal):
        self.log.add("feedback", reader, signal)
        if self.inner is not None:
            self.inner.feedback(reader, signal)


def wait_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


@pytest.fixture
def runtimes():
    made: list[GateRuntime] = []
    yield made
    for rt in made:
        rt.stop()


def make_runtime(fp, runtimes, *, config=None, sink=None, outputs=None, **kw):
    log = Log()
    sink = sink or LoggingSink(log)
    outputs = outputs or LoggingDriver(log)
    gate = Gate(config or GateConfig(pulse_s=0.1, wait_s=5.0), fp, one_card_table(fp))
    rt = GateRuntime(gate, sink, outputs=outputs, **kw)
    runtimes.append(rt)
    return rt, sink, outputs, log


def rest(factory, profile):
    # At rest: PASS contacts, Ready, fire loop and lid switch closed (low); keys and buttons open.
    for name in ("pass_a", "pass_b", "ready", "fire_loop", "tamper"):
        factory.pin(f"GPIO{profile.inputs[name].pin}").drive_low()
    for name in ("fire_reset", "lockdown", "button_in", "button_out"):
        factory.pin(f"GPIO{profile.inputs[name].pin}").drive_high()


def with_io(fp, runtimes, factory, config=None, **kw):
    """A runtime on real TurnstileIO (pi4-relay4 on mock pins), inputs at rest."""
    profile = load_profile("pi4-relay4")
    holder: list[GateRuntime] = []
    io = TurnstileIO(profile, factory=factory, submit=lambda e: holder[0].submit(e))
    rest(factory, profile)
    log = Log()
    driver = LoggingDriver(log, io)
    rt, sink, _, _ = make_runtime(fp, runtimes, config=config, sink=LoggingSink(log), outputs=driver, **kw)
    holder.append(rt)
    io.start()
    return rt, sink, io, profile, log


def records_of(sink, rtype):
    return [r for r in sink.records if r["type"] == rtype]


# --- the happy path -------------------------------------------------------------------------


def test_a_card_opens_unlock_a_for_its_pulse_and_pass_a_gives_a_passage(fp, runtimes, factory):
    cfg = GateConfig(pulse_s=0.1, wait_s=5.0)
    rt, sink, io, profile, _log = with_io(fp, runtimes, factory, config=cfg)
    try:
        rt.start()
        unlock = factory.pin(f"GPIO{profile.outputs['unlock_a'].pin}")
        unlock.clear_states()
        rt.submit(ev.CardRead("entry", CARD, "w26"))
        assert rt.wait_idle(5)
        assert io.outputs["unlock_a"].is_active
        assert records_of(sink, "access.granted")[0]["person"] == "p-1"
        # The pulse ends on the core's deadline, with no other event (a Tick).
        assert wait_until(lambda: not io.outputs["unlock_a"].is_active)
        assert rt.counters["ticks"] >= 1 and rt.counters["events"] == 1
        active = profile.outputs["unlock_a"].active_high
        assert [s.state for s in unlock.states] == [not active, active, not active]
        pass_a = factory.pin(f"GPIO{profile.inputs['pass_a'].pin}")
        pass_a.drive_high()
        pass_a.drive_low()
        assert rt.wait_idle(5)
        passage = records_of(sink, "passage")
        assert len(passage) == 1
        assert passage[0]["direction"] == "in" and passage[0]["source"] == "card"
        assert passage[0]["card"] == CARD and passage[0]["person"] == "p-1"
        assert isinstance(passage[0]["after_ms"], int) and passage[0]["after_ms"] >= 0
    finally:
        rt.stop()
        io.close()


def test_records_are_committed_before_their_commands_are_driven(fp, runtimes):
    rt, _sink, _driver, log = make_runtime(fp, runtimes)
    rt.start()
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert rt.wait_idle(5)
    entries = log.snapshot()
    grant = entries.index(("commit", ("access.granted",)))
    unlock = entries.index(("set", "unlock_a", True))
    feedback = entries.index(("feedback", "entry", "granted"))
    assert grant < unlock and grant < feedback


def test_start_drives_every_line_inactive_and_nothing_active(fp, runtimes):
    rt, sink, _driver, log = make_runtime(fp, runtimes)
    rt.start()
    sets = [e for e in log.snapshot() if e[0] == "set"]
    assert {line for _, line, _ in sets} >= {"unlock_a", "unlock_b", "stop", "fire_release"}
    assert all(active is False for _, _, active in sets)
    assert sink.records[0]["type"] == "agent.started"


def test_a_grant_with_no_passage_times_out_on_the_cores_deadline(fp, runtimes):
    rt, sink, _driver, _log = make_runtime(fp, runtimes, config=GateConfig(pulse_s=0.1, wait_s=0.2))
    rt.start()
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert wait_until(lambda: records_of(sink, "passage.timeout"))
    timeout = records_of(sink, "passage.timeout")[0]
    assert timeout["card"] == CARD and timeout["waited_ms"] >= 200


def test_records_reach_on_record_numbered_and_in_order(fp, runtimes):
    seen: list[dict] = []
    rt, sink, _driver, _log = make_runtime(fp, runtimes, on_record=seen.append)
    rt.start()
    for key in (OTHER, OTHER + 1):
        rt.submit(ev.CardRead("exit", key, "w26"))
    assert rt.wait_idle(5)
    assert [r["seq"] for r in seen] == list(range(1, len(seen) + 1))
    assert [r["type"] for r in seen][-2:] == ["access.denied", "access.denied"]
    assert seen == sink.records


# --- fire first ----------------------------------------------------------------------------


@pytest.mark.parametrize("fire_release", [True, False])
def test_an_opening_fire_loop_frees_both_ways_before_a_thousand_queued_events(
        fp, runtimes, factory, fire_release):
    cfg = GateConfig(pulse_s=0.1, wait_s=5.0, fire_release=fire_release)
    rt, sink, io, profile, log = with_io(fp, runtimes, factory, config=cfg)
    try:
        rt.start()
        sink.pause()
        rt.submit(ev.ReaderStatus("entry", online=True))  # the gate thread now waits in the sink
        assert sink.entered.wait(5)
        for i in range(1000):
            rt.submit(ev.CardRead("entry" if i % 2 else "exit", OTHER, "w26") if i % 3 else ev.PassSensor("A"))
        factory.pin(f"GPIO{profile.inputs['fire_loop'].pin}").drive_high()  # the loop opens
        assert rt.queue_depth() == 1001
        mark = len(log.snapshot())
        sink.release.set()
        assert rt.wait_idle(10)
        after = log.snapshot()[mark:]
        # One pass of the gate thread: the blocked event finishes, then the fire
        # loop's records, then the lines that free both directions, before any
        # of the thousand queued events is even decided.
        assert after[0] == ("commit", ("reader.status",))
        assert after[1] == ("commit", ("alarm.fire", "mode.changed"))
        freeing = {("set", "fire_release", True)} if fire_release else {
            ("set", "unlock_a", True), ("set", "unlock_b", True)}
        n = len(freeing)
        assert set(after[2:2 + n]) == freeing
        assert after[2 + n][0] == "commit"  # only now the queued events
        if fire_release:
            assert io.outputs["fire_release"].is_active
        else:
            assert io.outputs["unlock_a"].is_active and io.outputs["unlock_b"].is_active
        assert rt.counters["events"] == 1002
        assert sink.records[-1]["type"] in ("access.granted", "passage")  # fire: no check, free passage
    finally:
        rt.stop()
        io.close()


# --- the guard's controls work with no uplink ------------------------------------------------


def test_lockdown_switch_and_guard_buttons_work_with_no_uplink(fp, runtimes, factory):
    # No on_record hook, no MQTT client anywhere: only the local sink.
    rt, sink, io, profile, _log = with_io(fp, runtimes, factory)
    pin = {name: factory.pin(f"GPIO{spec.pin}") for name, spec in profile.inputs.items()}
    try:
        rt.start()
        pin["lockdown"].drive_low()  # key switch on
        assert rt.wait_idle(5)
        assert io.outputs["stop"].is_active
        assert records_of(sink, "mode.changed")[-1]["to"] == "lockdown"
        rt.submit(ev.CardRead("entry", CARD, "w26"))
        assert rt.wait_idle(5)
        assert records_of(sink, "access.denied")[-1]["reason"] == "lockdown"
        pin["button_out"].drive_low()  # the guard lets someone out
        pin["button_out"].drive_high()
        assert rt.wait_idle(5)
        assert io.outputs["unlock_b"].is_active or records_of(sink, "passage.timeout") == []
        pin["pass_b"].drive_high()
        pin["pass_b"].drive_low()
        assert rt.wait_idle(5)
        passage = records_of(sink, "passage")[-1]
        assert passage["source"] == "button" and passage["direction"] == "out" and passage["person"] is None
        pin["lockdown"].drive_high()  # key switch off
        assert rt.wait_idle(5)
        assert records_of(sink, "mode.changed")[-1]["to"] == "normal"
        assert not io.outputs["stop"].is_active
    finally:
        rt.stop()
        io.close()


# --- failures never stop the gate ------------------------------------------------------------


def test_a_failing_sink_still_drives_the_commands_and_the_thread_goes_on(fp, runtimes, caplog):
    rt, sink, driver, _log = make_runtime(fp, runtimes)
    rt.start()
    sink.fail = True
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert rt.wait_idle(5)
    assert driver.levels["unlock_a"] is True  # the gate still opened for the right card
    assert rt.counters["sink_errors"] == 1
    assert "uncommitted record" in caplog.text and "access.granted" in caplog.text
    sink.fail = False
    rt.submit(ev.ReaderStatus("exit", online=False))
    assert rt.wait_idle(5)
    assert records_of(sink, "reader.status")
    assert rt.running


def test_a_core_exception_is_logged_counted_and_survived(fp, runtimes, caplog):
    rt, sink, _driver, _log = make_runtime(fp, runtimes)
    real = rt.gate.handle

    def handle(event, now):
        if getattr(event, "keys", None) == "5":  # the Keypad below
            raise RuntimeError("bug in the core")
        return real(event, now)

    rt.gate.handle = handle
    rt.start()
    rt.submit(ev.Keypad("entry", "5"))
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert rt.wait_idle(5)
    assert rt.counters["core_errors"] == 1
    assert "Keypad" in caplog.text
    assert records_of(sink, "access.granted")
    assert rt.running


def test_failing_outputs_and_hooks_are_counted_and_survived(fp, runtimes):
    class BrokenDriver:
        def set(self, line, active):
            if active:
                raise OSError("pin gone")

        def feedback(self, reader, signal):
            raise OSError("pin gone")

    def on_record(rec):
        raise ValueError("uplink bug")

    rt, sink, _driver, _log = make_runtime(fp, runtimes, outputs=BrokenDriver(), on_record=on_record)
    rt.start()
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    rt.submit(ev.ReaderStatus("entry", online=True))
    assert rt.wait_idle(5)
    assert rt.counters["output_errors"] == 2  # unlock_a and the feedback
    assert rt.counters["hook_errors"] >= 2
    assert records_of(sink, "reader.status") and rt.running


def test_a_full_queue_drops_ordinary_events_but_never_a_fire_loop(fp, runtimes):
    rt, sink, _driver, _log = make_runtime(fp, runtimes, max_queue=5)
    # Not started: nothing is taken off the queue.
    accepted = [rt.submit(ev.PassSensor("A")) for _ in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert rt.submit(ev.FireLoop(open=True))
    assert rt.counters["dropped"] == 3
    rt.start()
    assert rt.wait_idle(5)
    assert records_of(sink, "alarm.fire")


def test_a_full_downlink_lane_never_costs_a_card_read(fp, runtimes):
    rt, sink, driver, _log = make_runtime(fp, runtimes, max_queue=5, max_downlink_queue=10)
    # Not started: a broker flood fills the downlink lane...
    flood = [rt.submit(ev.Report("command.result", {"request_id": f"j{i}", "command": "",
                                                    "result": "refused", "reason": "invalid"}))
             for i in range(1000)]
    assert flood.count(True) == 10
    # ...and the card read still gets in, and is the first thing decided.
    assert rt.submit(ev.CardRead("entry", CARD, "w26")) is True
    assert rt.counters["dropped_downlink"] == 990 and rt.counters["dropped_hardware"] == 0
    assert rt.queue_depths() == {"fire": 0, "hardware": 1, "downlink": 10, "site": 0}
    rt.start()
    assert rt.wait_idle(5)
    types = [r["type"] for r in sink.records]
    first_refusal = types.index("command.result")
    assert types.index("access.granted") < first_refusal
    assert types.count("command.result") == 10
    assert driver.levels["unlock_a"] is True


def test_hardware_events_queued_behind_downlink_traffic_are_taken_first(fp, runtimes):
    rt, sink, _driver, log = make_runtime(fp, runtimes)
    rt.start()
    sink.pause()
    rt.submit(ev.ReaderStatus("entry", online=True))  # the gate thread now waits in the sink
    assert sink.entered.wait(5)
    for i in range(200):
        rt.submit(ev.Report("alarm", {"kind": "publish_refused", "active": i % 2 == 0}))
    rt.submit(ev.FireReset(by="command"))  # a command: downlink lane
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    rt.submit(ev.FireReset(by="input"))  # the guard's reset key: hardware lane
    mark = len(log.snapshot())
    sink.release.set()
    assert rt.wait_idle(10)
    commits = [e[1] for e in log.snapshot()[mark:] if e[0] == "commit"]
    assert commits[0] == ("reader.status",)  # the event the thread was holding
    assert commits[1][0] == "access.granted"  # then the card, ahead of 200 queued reports
    assert sum(1 for c in commits if c == ("alarm",)) == 200


# --- lifecycle and hooks -----------------------------------------------------------------------


def test_stop_drives_every_output_inactive_and_refuses_later_events(fp, runtimes):
    cfg = GateConfig(relay_mode="potential", wait_s=30.0, pulse_s=0.1)
    rt, _sink, driver, _log = make_runtime(fp, runtimes, config=cfg)
    rt.start()
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert rt.wait_idle(5)
    assert driver.levels["unlock_a"] is True  # held open, waiting for the passage
    rt.stop()
    assert not rt.running
    assert all(active is False for active in driver.levels.values())
    assert set(driver.levels) >= {"unlock_a", "unlock_b", "stop", "fire_release"}
    assert rt.submit(ev.PassSensor("A")) is False


def test_start_twice_is_refused_with_a_hint(fp, runtimes):
    rt, *_ = make_runtime(fp, runtimes)
    rt.start()
    with pytest.raises(RuntimeError, match="new runtime"):
        rt.start()


def test_on_idle_runs_when_the_queue_drains_and_the_watchdog_is_fed(fp, runtimes):
    idle = threading.Event()
    pets = threading.Event()
    threads: set[str] = set()

    seen: list[dict] = []
    own = {"id": "t:99", "seq": 99, "type": "journal.overflow", "dropped": 1, "kinds": {"reader.status": 1}}

    def on_idle(now):
        threads.add(threading.current_thread().name)
        assert isinstance(now, ev.Now)
        idle.set()
        return [own]  # what the journal's maintenance committed itself

    rt, _sink, _driver, _log = make_runtime(fp, runtimes, on_idle=on_idle, watchdog=pets.set,
                                         on_record=seen.append, idle_interval_s=10.0,
                                         watchdog_interval_s=10.0)
    rt.start()
    assert pets.wait(5)
    rt.submit(ev.ReaderStatus("entry", online=True))
    assert idle.wait(5)
    assert threads == {"gate"}  # on the gate thread, never concurrently with the core
    assert wait_until(lambda: own in seen)  # the idle work's own records reach the uplink


def test_latency_percentiles_cover_handled_events(fp, runtimes):
    rt, *_ = make_runtime(fp, runtimes)
    assert rt.latency_percentiles() == {"n": 0}
    rt.start()
    for _ in range(20):
        rt.submit(ev.ReaderStatus("entry", online=True))
    assert rt.wait_idle(5)
    lat = rt.latency_percentiles()
    assert lat["n"] == 20
    assert 0 <= lat["p50_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]


def test_percentiles_are_nearest_rank():
    values = [i / 1000 for i in range(1, 1001)]  # 1..1000 ms
    assert percentiles_ms(values) == {"p50_ms": 500.0, "p99_ms": 990.0, "p999_ms": 999.0}
    assert percentiles_ms([]) == {}


def test_clock_gives_monotonic_wall_and_sync_state():
    def broken():
        raise OSError("timedatectl missing")

    now = Clock(lambda: False, monotonic=lambda: 12.5, wall=lambda: 1.7e9).now()
    assert (now.mono, now.wall, now.synced) == (12.5, 1.7e9, False)
    assert Clock().now().synced is True
    assert Clock(broken).now().synced is False  # unknown is not synchronised


def test_an_unsynced_clock_marks_records(fp, runtimes):
    rt, sink, *_ = make_runtime(fp, runtimes, clock=Clock(lambda: False))
    rt.start()
    assert all(r["clock_synced"] is False for r in sink.records)
    assert any(r["type"] == "alarm" and r["kind"] == "clock_unsynced" for r in sink.records)


def test_decision_latency_counts_decisions_not_downlink_reports(fp, runtimes):
    rt, _sink, _driver, _log = make_runtime(fp, runtimes)
    rt.start()
    for i in range(50):
        rt.submit(ev.Report("alarm", {"kind": "publish_refused", "active": i % 2 == 0}))
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert rt.wait_idle(5)
    assert rt.latency_percentiles()["n"] == 1


# --- work beside the gate waits for its events (aclstore.use_pacer) -------------------------


def test_work_beside_the_gate_waits_while_it_holds_an_event_and_goes_on_when_done(fp, runtimes):
    rt, sink, _driver, _log = make_runtime(fp, runtimes)
    rt.start()
    assert rt.wait_idle(5)
    # Idle gate: no wait at all.
    t0 = time.monotonic()
    rt.yield_to_gate(max_wait_s=5.0)
    assert time.monotonic() - t0 < 1.0
    # The gate thread holds a card read (its journal commit paused): the worker waits ...
    sink.pause()
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert sink.entered.wait(5)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (rt.yield_to_gate(max_wait_s=10.0), done.set()))
    worker.start()
    assert not done.wait(0.3), "the worker went on while the gate thread held an event"
    # ... until the gate thread is done with it.
    sink.release.set()
    assert done.wait(5)
    worker.join(5)
    assert records_of(sink, "access.granted")


def test_a_gate_busy_back_to_back_holds_the_work_beside_it_up_to_a_share_only(fp, runtimes):
    rt, sink, _driver, _log = make_runtime(fp, runtimes)
    rt.start()
    sink.pause()
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert sink.entered.wait(5)
    try:
        # A gate that stays busy: each call waits at most max_wait_s, and once the
        # waits fill the allowed share of the second, calls return at once.
        t0 = time.monotonic()
        for _ in range(40):
            rt.yield_to_gate(max_wait_s=0.05)
        spent = time.monotonic() - t0
        assert spent < 40 * 0.05 * 0.9, f"{spent:.2f} s waited for a gate that never got done"
    finally:
        sink.release.set()


def test_the_gate_thread_itself_never_waits_for_itself(fp, runtimes):
    waited: list[float] = []
    rt, _sink, _driver, _log = make_runtime(fp, runtimes)

    def on_record(record):
        t0 = time.monotonic()
        rt.yield_to_gate(max_wait_s=5.0)  # on the gate thread, inside an event
        waited.append(time.monotonic() - t0)

    rt._on_record = on_record
    rt.start()
    rt.submit(ev.CardRead("entry", CARD, "w26"))
    assert rt.wait_idle(10)
    assert waited and max(waited) < 1.0


def test_the_other_gates_backlog_never_pushes_out_a_command(fp, runtimes):
    """A reconnect brings the site's backlog at once (docs/site.md): it waits in a lane of its
    own, after every other, so a full downlink lane is not its doing and a command still
    gets in and is taken before it."""
    rt, sink, _driver, _log = make_runtime(fp, runtimes, max_downlink_queue=5, max_site_queue=50)
    backlog = [rt.submit(ev.SiblingRecord("north", {"id": f"n:{i}", "type": "telemetry"}))
               for i in range(60)]
    assert backlog.count(True) == 50 and rt.counters["dropped_site"] == 10
    assert rt.submit(ev.SetMode("lockdown", request_id="r-1")) is True
    assert rt.queue_depths() == {"fire": 0, "hardware": 0, "downlink": 1, "site": 50}
    assert rt.queue_stats()["dropped"] == {"hardware": 0, "downlink": 0, "site": 10}
    rt.start()
    assert rt.wait_idle(10)
    assert [r["type"] for r in sink.records][:3] == ["agent.started", "mode.changed", "command.result"]
