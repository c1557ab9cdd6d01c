"""The turnstile state machine (agent.core.turnstile.Gate) and its GateConfig.

Driven directly, no mocks (the h11 way): events and times in, records and
commands out. Every test runs on both fastpath twins (the `fp` fixture). The
runner checks two invariants on every step: each record is valid against the
event schema of the contract, and each SetOutput after start() changes its
line (outputs only on change, so nothing pulses by accident).
"""
from __future__ import annotations

from array import array
from datetime import UTC, datetime

import pytest

from agent import contract
from agent.core import events as ev
from agent.core.gateconfig import GateConfig, GateConfigError
from agent.core.records import SequenceSink
from agent.core.turnstile import FAULT, IDLE, LINES, PENDING, TRANSITIONS, Gate
from fastpath import codes
from fastpath.columns import TableColumns

pytestmark = pytest.mark.core

MONO0 = 1000.0
WALL0 = datetime(2026, 9, 7, 8, 0, tzinfo=UTC).timestamp()  # a Monday, 08:00 UTC
DAY0 = datetime(2026, 9, 7).toordinal()

ONES = b"\xff" * codes.BITMAP_BYTES
NONE = bytes(codes.BITMAP_BYTES)


def week_window(start_min: int, end_min: int) -> bytes:
    """A schedule open for minutes [start, end) of the week; byte-aligned so the
    test does not depend on the bit order inside a byte."""
    assert start_min % 8 == 0 and end_min % 8 == 0
    b = bytearray(codes.BITMAP_BYTES)
    b[start_min // 8 : end_min // 8] = b"\xff" * ((end_min - start_min) // 8)
    return bytes(b)


ALICE, BOB, GUEST, CAROL = "p-alice", "p-bob", "g-visitor", "p-carol"
K_ALICE, K_BOB, K_GUEST, K_BLOCKED, K_CAROL, K_UNKNOWN = 100, 200, 300, 400, 500, 999


def columns(version: str = "v1", *, guest_uses: int = 1) -> TableColumns:
    """Four people: Alice and Carol may pass any time; Bob (a junior) may enter on
    Monday 08:00-09:04 only and never leave alone; a guest with `guest_uses`
    entries. Card 400 is blocked and belongs to nobody."""
    return TableColumns(
        version=version,
        card_keys=array("Q", [K_ALICE, K_BOB, K_GUEST, K_BLOCKED, K_CAROL]),
        card_person=array("i", [0, 1, 2, -1, 3]),
        card_flags=array("B", [0, 0, 0, codes.CARD_BLOCKED, 0]),
        person_ids=[ALICE, BOB, GUEST, CAROL],
        person_from=array("q", [codes.NO_START] * 4),
        person_until=array("q", [codes.NO_END] * 4),
        person_groupset=array("i", [0, 1, 0, 0]),
        person_flags=array("B", [0, 0, codes.PERSON_GUEST, 0]),
        person_max_uses=array("i", [0, 0, guest_uses, 0]),
        gs_entry=[ONES, week_window(8 * 60, 9 * 60 + 4)],
        gs_entry_holiday=[NONE, NONE],
        gs_exit=[ONES, NONE],
    )


def at(t: float, synced: bool = True) -> ev.Now:
    return ev.Now(mono=MONO0 + t, wall=WALL0 + t, synced=synced)


def types(step: ev.Step) -> list[str]:
    return [r["type"] for r in step.records]


def outs(step: ev.Step) -> list[tuple[str, bool]]:
    return [(c.line, c.active) for c in step.commands if isinstance(c, ev.SetOutput)]


def feedback(step: ev.Step) -> list[tuple[str, str]]:
    return [(c.reader, c.signal) for c in step.commands if isinstance(c, ev.Feedback)]


def only(step: ev.Step, rtype: str) -> dict:
    recs = [r for r in step.records if r["type"] == rtype]
    assert len(recs) == 1, f"expected one {rtype} in {types(step)}"
    return recs[0]


class Run:
    """A gate plus the bookkeeping every test wants: feed (t, event), collect
    everything, check the invariants."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.sink = SequenceSink("test")
        self.levels: dict[str, bool] | None = None
        self.records: list[dict] = []

    def start(self, t: float = 0.0, synced: bool = True) -> ev.Step:
        step = self.gate.start(at(t, synced))
        self.levels = {line: False for line in LINES}
        started = [(c.line, c.active) for c in step.commands if isinstance(c, ev.SetOutput)]
        assert started[: len(LINES)] == [(line, False) for line in LINES]
        self._check(step, started[len(LINES):])
        return step

    def __call__(self, t: float, event=None, synced: bool = True) -> ev.Step:
        step = self.gate.handle(ev.Tick() if event is None else event, at(t, synced))
        self._check(step, outs(step))
        return step

    def tick_deadline(self) -> ev.Step:
        deadline = self.gate.next_deadline()
        assert deadline is not None
        return self(deadline - MONO0)

    def _check(self, step: ev.Step, changes: list[tuple[str, bool]]) -> None:
        for rec in self.sink.commit(step.records):
            errors = contract.validate("event", rec)
            assert not errors, f"{rec['type']} breaks the contract: {errors}"
            self.records.append(rec)
        for line, active in changes:
            assert self.levels[line] != active, f"{line} driven to {active} twice (outputs only on change)"
            self.levels[line] = active
        assert self.levels == self.gate.outputs


def make(fp, *, table: bool | TableColumns = True, start: bool = True, **cfg) -> Run:
    cols = table if isinstance(table, TableColumns) else (columns() if table else None)
    gate = Gate(GateConfig(**cfg), fp, fp.Table(cols) if cols is not None else None, boot="b-1",
                implementation="pure")
    run = Run(gate)
    if start:
        run.start()
    return run


def card(key: int, reader: str = "entry") -> ev.CardRead:
    return ev.CardRead(reader=reader, key=key, format="w26")


# --- GateConfig -----------------------------------------------------------------------------


def test_config_defaults_are_a_safe_pulse_gate():
    c = GateConfig()
    assert (c.relay_mode, c.pulse_s, c.wait_s, c.apb, c.fire_release, c.initial_mode) == (
        "pulse", 0.3, 5.0, "off", True, "normal")
    assert dict(c.readers) == {"entry": "in", "exit": "out"}
    assert c.direction_of("exit") == "out" and c.direction_of("nope") is None


def test_config_error_lists_every_bad_field_with_what_is_allowed():
    with pytest.raises(GateConfigError) as info:
        GateConfig(site="a/b", readers={"entry": "up"}, relay_mode="toggle", pulse_s=0.05, wait_s=-1,
                   apb="strict", apb_window_min=-3, fire_release="yes", timezone="Mars/Olympus",
                   initial_mode="fire")
    err = info.value
    assert isinstance(err, ValueError)
    fields = {name for name, _ in err.errors}
    assert fields == {"site", "readers.entry", "relay_mode", "pulse_s", "wait_s", "apb", "apb_window_min",
                      "fire_release", "timezone", "initial_mode"}
    text = str(err)
    for allowed in ('"pulse", "potential"', "0.1", "off, soft, hard, timed", "normal, entry_only"):
        assert allowed in text


def test_config_needs_a_window_for_timed_antipassback_and_a_pulse_within_the_wait():
    with pytest.raises(GateConfigError, match="apb_window_min"):
        GateConfig(apb="timed")
    with pytest.raises(GateConfigError, match="pulse_s"):
        GateConfig(pulse_s=6.0, wait_s=5.0)
    assert GateConfig(apb="timed", apb_window_min=10, wait_s=8.0).apb_window_s == 600


def test_config_readers_cannot_be_changed_after_construction():
    readers = {"entry": "in"}
    c = GateConfig(readers=readers)
    readers["exit"] = "out"
    assert dict(c.readers) == {"entry": "in"}
    with pytest.raises(TypeError):
        c.readers["x"] = "in"


# --- start ------------------------------------------------------------------------------------


def test_start_drives_every_output_inactive_and_none_active(fp):
    run = make(fp, start=False)
    step = run.start()
    assert outs(step) == [(line, False) for line in ("unlock_a", "unlock_b", "stop", "fire_release")]
    assert not any(active for _, active in outs(step))
    started = only(step, "agent.started")
    assert (started["version"], started["fastpath"], started["acl_version"], started["mode"]) == (
        Gate.__init__.__kwdefaults__["version"], "pure", "v1", "normal")
    assert types(step) == ["agent.started"]
    assert run.gate.next_deadline() is None


def test_start_in_configured_lockdown_holds_stop_but_never_an_unlock(fp):
    run = make(fp, start=False, initial_mode="lockdown")
    step = run.start()
    assert outs(step)[:4] == [(line, False) for line in LINES]
    assert outs(step)[4:] == [("stop", True)]
    assert only(step, "agent.started")["mode"] == "lockdown"


def test_no_table_raises_acl_missing_asks_for_a_snapshot_and_refuses_cards(fp):
    run = make(fp, table=False, start=False)
    step = run.start()
    assert types(step) == ["agent.started", "alarm", "acl.requested"]
    assert only(step, "agent.started")["acl_version"] is None
    alarm = only(step, "alarm")
    assert (alarm["kind"], alarm["active"]) == ("acl_missing", True)
    req = only(step, "acl.requested")
    assert (req["reason"], req["have"]) == ("missing", None)

    denied = run(1, card(K_ALICE))
    assert only(denied, "access.denied")["reason"] == "unknown_card"
    # Buttons still work with no list.
    run(2, ev.Button("in"))
    assert run.gate.pending == ("in", "button")
    run(3, ev.PassSensor("A"))

    swapped = run(4, ev.SwapTable(table=fp.Table(columns("v7")), kind="snapshot"))
    assert types(swapped) == ["acl.applied", "alarm"]
    applied = only(swapped, "acl.applied")
    assert (applied["version"], applied["kind"], applied["base"], applied["cards"], applied["people"]) == (
        "v7", "snapshot", None, 5, 4)
    assert (only(swapped, "alarm")["kind"], only(swapped, "alarm")["active"]) == ("acl_missing", False)
    assert types(run(5, card(K_ALICE))) == ["access.granted"]


def test_swap_table_replaces_the_list_and_keeps_a_pending_passage(fp):
    run = make(fp)
    run(1, card(K_ALICE))
    fewer = TableColumns(version="v2")  # Alice removed
    step = run(2, ev.SwapTable(table=fp.Table(fewer), kind="delta", base="v1"))
    applied = only(step, "acl.applied")
    assert (applied["kind"], applied["base"], applied["cards"]) == ("delta", "v1", 0)
    assert run.gate.table.version == "v2"
    passage = only(run(3, ev.PassSensor("A")), "passage")
    assert passage["person"] == ALICE
    assert only(run(10, card(K_ALICE)), "access.denied")["reason"] == "unknown_card"


def test_clock_unsynced_alarm_raised_cleared_and_raised_again(fp):
    run = make(fp, start=False)
    step = run.start(synced=False)
    assert types(step) == ["agent.started", "alarm"]
    alarm = only(step, "alarm")
    assert (alarm["kind"], alarm["active"]) == ("clock_unsynced", True)
    assert all(r["clock_synced"] is False for r in step.records)
    assert types(run(1, synced=False)) == []  # raised once, not on every call
    cleared = run(2, synced=True)
    assert [(r["kind"], r["active"]) for r in cleared.records] == [("clock_unsynced", False)]
    again = run(3, card(K_ALICE), synced=False)
    assert types(again) == ["alarm", "access.granted"]  # decided anyway, with the best time there is
    assert again.records[1]["clock_synced"] is False


# --- the transition table: one case per row ------------------------------------------------------


def _setup(run: Run, state: str) -> None:
    if state == PENDING:
        run(1, card(K_ALICE))
    elif state == FAULT:
        run(1, ev.Button("sideways"))
    assert run.gate.lane == state


def _outputs(**want):
    return lambda gate, step: all(gate.outputs[k] == v for k, v in want.items())


# (state, event factory, record types expected, extra check on the gate)
ROWS = [
    (IDLE, lambda fp: card(K_ALICE), ["access.granted"], lambda g, s: g.pending == ("in", "card")),
    (PENDING, lambda fp: card(K_CAROL, "exit"), ["access.denied"],
     lambda g, s: only(s, "access.denied")["reason"] == "gate_busy"),
    (FAULT, lambda fp: card(K_ALICE), ["access.denied"],
     lambda g, s: only(s, "access.denied")["reason"] == "gate_busy" and g.pending is None),
    (IDLE, lambda fp: ev.PassSensor("A"), ["passage.forced"], None),
    (PENDING, lambda fp: ev.PassSensor("A"), ["passage"], lambda g, s: g.pending is None),
    (FAULT, lambda fp: ev.PassSensor("B"), ["passage.forced"], None),
    (IDLE, lambda fp: ev.Button("out"), ["access.granted"],
     lambda g, s: g.pending == ("out", "button") and only(s, "access.granted")["source"] == "button"),
    (PENDING, lambda fp: ev.Button("out"), [], lambda g, s: g.waiting == (("out", "button"),)),
    (FAULT, lambda fp: ev.Button("in"), [], lambda g, s: g.pending is None and not g.waiting and s.commands == []),
    (IDLE, lambda fp: ev.RemoteOpen("in", "r-1"), ["command.result", "access.granted"],
     lambda g, s: g.pending == ("in", "remote") and only(s, "command.result")["result"] == "done"),
    (PENDING, lambda fp: ev.RemoteOpen("out", "r-1"), ["command.result"],
     lambda g, s: g.waiting == (("out", "remote"),)),
    (FAULT, lambda fp: ev.RemoteOpen("in", "r-1"), ["command.result"],
     lambda g, s: only(s, "command.result")["result"] == "refused" and g.pending is None),
    (IDLE, lambda fp: ev.ConsoleOpen("in", "tech"), ["access.granted", "console.action"],
     lambda g, s: g.pending == ("in", "console") and only(s, "access.granted")["account"] == "tech"),
    (PENDING, lambda fp: ev.ConsoleOpen("out", "tech"), ["console.action"],
     lambda g, s: g.waiting == (("out", "console"),)),
    (FAULT, lambda fp: ev.ConsoleOpen("in", "tech"), ["console.action"],
     lambda g, s: only(s, "console.action")["reason"] == "fault" and g.pending is None),
    (IDLE, lambda fp: ev.ResetFault(), [], lambda g, s: g.lane == IDLE),
    (PENDING, lambda fp: ev.ResetFault(), [], lambda g, s: g.lane == PENDING),
    (FAULT, lambda fp: ev.ResetFault(), ["turnstile.ready"],
     lambda g, s: not g.faulted and only(s, "turnstile.ready")["kind"] == "core_reset"),
]
for _state in (IDLE, PENDING, FAULT):
    ROWS += [
        (_state, lambda fp: ev.Tick(), [], None),
        (_state, lambda fp: ev.ReaderError("exit", "parity", "bad parity", "1011"), ["reader.error"],
         lambda g, s: feedback(s) == [("exit", "error")]),
        (_state, lambda fp: ev.ReaderStatus("exit", False), ["reader.status"], None),
        (_state, lambda fp: ev.Keypad("entry", "12#"), [], lambda g, s: s.commands == []),
        (_state, lambda fp: ev.FireLoop(open=True),
         ["alarm.fire", "mode.changed"] + (["passage.timeout"] if _state == PENDING else []),
         _outputs(fire_release=True, stop=False, unlock_a=False, unlock_b=False)),
        (_state, lambda fp: ev.FireReset(by="command", request_id="r-2"), ["command.result"], None),
        (_state, lambda fp: ev.SetMode("entry_only", request_id="r-3"), ["mode.changed", "command.result"],
         lambda g, s: g.mode == "entry_only"),
        (_state, lambda fp: ev.LockdownSwitch(on=True), ["mode.changed"], _outputs(stop=True)),
        (_state, lambda fp: ev.ConsolePulse("unlock_a", 0.3, "tech"), ["console.action"],
         lambda g, s: only(s, "console.action")["reason"] == "use_open" and s.commands == []),
        (_state, lambda fp: ev.ConsoleNote("enroll", "tech", "started"), ["console.action"],
         lambda g, s: only(s, "console.action")["result"] == "done" and s.commands == []),
        (_state, lambda fp: ev.ReadyLine(ok=False), ["turnstile.fault"],
         lambda g, s: only(s, "turnstile.fault")["kind"] == "ready_lost"),
        (_state, lambda fp: ev.Tamper(active=True), ["alarm"], lambda g, s: only(s, "alarm")["kind"] == "tamper"),
        (_state, lambda fp: ev.SwapTable(table=fp.Table(columns("v2"))), ["acl.applied"],
         lambda g, s: g.table.version == "v2"),
        (_state, lambda fp: ev.Report("alarm", {"kind": "publish_refused", "active": True, "detail": "0x87"}),
         ["alarm"], lambda g, s: only(s, "alarm")["kind"] == "publish_refused" and s.commands == []),
        (_state, lambda fp: ev.SiblingRecord("north", {
            "id": "n:1", "type": "access.granted", "person": ALICE, "direction": "in",
            "ts": "2026-09-07T08:00:01.000Z"}), [],
         lambda g, s: g.site.grants == {ALICE: "north"} and s.commands == []),
    ]


def test_every_row_of_the_transition_table_has_a_case():
    covered = set()
    for state, make_event, _, _ in ROWS:
        event = make_event(_FakeFp)
        covered.add((state, type(event)))
    assert covered == set(TRANSITIONS)


class _FakeFp:
    """Only for listing the rows' event types without building a table."""

    @staticmethod
    def Table(cols):
        return cols


@pytest.mark.parametrize("state, make_event, expected, check", ROWS,
                         ids=[f"{r[0]}-{type(r[1](_FakeFp)).__name__}" for r in ROWS])
def test_transition_row(fp, state, make_event, expected, check):
    run = make(fp)
    _setup(run, state)
    step = run(1.1, make_event(fp))  # within the pulse of a pending grant
    assert types(step) == expected
    if check is not None:
        assert check(run.gate, step)
    # A legal event never latches a fault by itself.
    assert run.gate.faulted == (state == FAULT and not isinstance(make_event(fp), ev.ResetFault))


# --- relay modes, timeouts and deadlines -----------------------------------------------------------


def test_pulse_mode_drives_one_pulse_of_pulse_s_and_waits_wait_s(fp):
    run = make(fp, pulse_s=0.5, wait_s=8.0)
    step = run(10, card(K_ALICE))
    assert feedback(step) == [("entry", "granted")]
    assert outs(step) == [("unlock_a", True)]
    assert run.gate.next_deadline() == pytest.approx(MONO0 + 10.5)
    end = run.tick_deadline()
    assert outs(end) == [("unlock_a", False)] and types(end) == []
    assert run.gate.pending == ("in", "card")  # still waiting for the passage
    passage = only(run(13, ev.PassSensor("A")), "passage")
    assert (passage["direction"], passage["source"], passage["person"], passage["card"], passage["after_ms"]) == (
        "in", "card", ALICE, K_ALICE, 3000)


def test_pulse_mode_times_out_after_wait_s_and_frees_the_lane(fp):
    run = make(fp, wait_s=8.0)
    run(0, card(K_CAROL, "exit"))
    run.tick_deadline()  # pulse end
    while run.gate.pending is not None:
        last = run.tick_deadline()
    timeout = only(last, "passage.timeout")
    assert (timeout["direction"], timeout["source"], timeout["person"], timeout["card"], timeout["waited_ms"]) == (
        "out", "card", CAROL, K_CAROL, 8000)
    assert "cancelled" not in timeout
    assert outs(last) == []  # the pulse ended long ago
    assert run.gate.next_deadline() is None or run.gate.pending is None
    assert types(run(9, card(K_ALICE))) == ["access.granted"]


def test_potential_mode_holds_the_line_until_the_passage(fp):
    run = make(fp, relay_mode="potential")
    assert outs(run(1, card(K_CAROL, "exit"))) == [("unlock_b", True)]
    assert run.gate.next_deadline() == pytest.approx(MONO0 + 1 + 5.0)  # only the wait, no pulse end
    assert outs(run(3)) == []  # still held
    step = run(3.5, ev.PassSensor("B"))
    assert outs(step) == [("unlock_b", False)]
    assert only(step, "passage")["after_ms"] == 2500
    assert run.gate.next_deadline() is None


def test_potential_mode_drops_the_line_when_the_wait_ends(fp):
    run = make(fp, relay_mode="potential", wait_s=8.0)
    run(1, card(K_ALICE))
    step = run.tick_deadline()
    assert outs(step) == [("unlock_a", False)]
    assert only(step, "passage.timeout")["waited_ms"] == 8000


def test_a_late_event_runs_the_passed_deadlines_first(fp):
    run = make(fp, relay_mode="potential")
    run(1, card(K_ALICE))
    step = run(7, ev.PassSensor("A"))  # no Tick at 6: the wait ended before the arm turned
    assert types(step) == ["passage.timeout", "passage.forced"]
    assert outs(step) == [("unlock_a", False)]


def test_next_deadline_is_none_when_nothing_waits(fp):
    run = make(fp)
    assert run.gate.next_deadline() is None
    run(1, ev.Button("in"))
    assert run.gate.next_deadline() is not None
    run(1.2, ev.PassSensor("A"))
    while run.gate.next_deadline() is not None:
        run.tick_deadline()
    assert run.gate.outputs == {line: False for line in LINES}


# --- one lane: gate_busy, waiting buttons, forced passages ----------------------------------------------


def test_card_while_a_passage_is_pending_is_gate_busy_unless_it_has_its_own_reason(fp):
    run = make(fp)
    run(1, card(K_ALICE))
    busy = run(1.1, card(K_CAROL, "exit"))
    assert only(busy, "access.denied")["reason"] == "gate_busy"
    assert only(busy, "access.denied")["person"] == CAROL
    assert feedback(busy) == [("exit", "denied")] and outs(busy) == []
    assert only(run(2.1, card(K_UNKNOWN)), "access.denied")["reason"] == "unknown_card"
    assert only(run(2.2, card(K_BLOCKED)), "access.denied")["reason"] == "blocked"
    assert only(run(2.3, card(K_BOB, "exit")), "access.denied")["reason"] == "exit_restricted"
    run(3, ev.PassSensor("A"))
    assert types(run(4, card(K_CAROL, "exit"))) == ["access.granted"]


def test_button_waits_for_the_pending_passage_then_opens(fp):
    run = make(fp)
    run(1, card(K_ALICE))
    assert outs(run(1.1, ev.Button("out"))) == []
    run(2.5, ev.Button("out"))  # a second press does not queue a second passage
    assert run.gate.waiting == (("out", "button"),)
    step = run(3, ev.PassSensor("A"))
    # The waiting button's open is journalled before its unlock is driven.
    assert types(step) == ["passage", "access.granted"]
    manual = only(step, "access.granted")
    assert (manual["source"], manual["direction"], manual["person"], manual["card"]) == ("button", "out", None, None)
    assert outs(step) == [("unlock_b", True)]
    assert run.gate.pending == ("out", "button")
    passage = only(run(5, ev.PassSensor("B")), "passage")
    assert (passage["source"], passage["person"], passage["card"], passage["after_ms"]) == ("button", None, None, 2000)
    assert run.gate.waiting == ()


def test_a_waiting_button_starts_when_the_wait_times_out(fp):
    run = make(fp, relay_mode="potential")
    run(1, card(K_ALICE))
    run(2, ev.Button("out"))
    step = run.tick_deadline()
    assert types(step) == ["passage.timeout", "access.granted"]
    assert only(step, "access.granted")["source"] == "button"
    assert outs(step) == [("unlock_a", False), ("unlock_b", True)]
    assert run.gate.pending == ("out", "button")


def test_a_new_pulse_on_the_same_line_never_merges_with_the_last(fp):
    run = make(fp, pulse_s=0.3)
    run(1, card(K_ALICE))
    run(1.2, ev.PassSensor("A"))  # quick pupil: passage before the pulse ended
    assert outs(run(1.25, ev.Button("in"))) == []  # waits: the line is still pulsing
    assert outs(run.tick_deadline()) == [("unlock_a", False)]  # pulse end at 1.3
    assert run.gate.waiting == (("in", "button"),)
    step = run.tick_deadline()  # the line rested, then the button's own pulse
    assert outs(step) == [("unlock_a", True)]
    assert run.gate.pending == ("in", "button")


def test_a_passage_with_no_grant_is_forced_and_a_grant_the_other_way_stays_pending(fp):
    run = make(fp)
    assert only(run(1, ev.PassSensor("B")), "passage.forced")["direction"] == "out"
    run(2, card(K_ALICE))
    step = run(3, ev.PassSensor("B"))
    assert types(step) == ["passage.forced"]
    assert run.gate.pending == ("in", "card")
    assert only(run(4, ev.PassSensor("A")), "passage")["person"] == ALICE


def test_remote_open_answers_its_command_and_opens_like_a_button(fp):
    run = make(fp)
    step = run(1, ev.RemoteOpen("out", request_id="r-9"))
    res = only(step, "command.result")
    assert (res["request_id"], res["command"], res["result"]) == ("r-9", "open", "done")
    assert outs(step) == [("unlock_b", True)]
    assert only(step, "access.granted")["source"] == "remote"
    assert only(run(3, ev.PassSensor("B")), "passage")["source"] == "remote"
    assert types(run(4, ev.RemoteOpen("in"))) == ["access.granted"]  # no request id: nothing to answer
    assert run.gate.pending == ("in", "remote")


# --- fire ------------------------------------------------------------------------------------------


def test_fire_drill_frees_both_ways_at_once_whatever_is_pending(fp):
    run = make(fp)
    run(1, card(K_ALICE))
    run(1.1, ev.Button("out"))
    step = run(1.5, ev.FireLoop(open=True))
    assert types(step) == ["alarm.fire", "mode.changed", "passage.timeout"]
    assert only(step, "alarm.fire")["active"] is True
    changed = only(step, "mode.changed")
    assert (changed["from"], changed["to"], changed["by"]) == ("normal", "fire", "fire_loop")
    cancelled = only(step, "passage.timeout")
    assert (cancelled["cancelled"], cancelled["person"], cancelled["waited_ms"]) == ("fire", ALICE, 500)
    assert run.gate.outputs == {"unlock_a": False, "unlock_b": False, "stop": False, "fire_release": True}
    assert run.gate.pending is None and run.gate.waiting == ()
    # The roll-call is journalled by the next call, due at once (after the release is driven).
    assert run.gate.next_deadline() == 1001.5 and types(run(1.5, ev.Tick())) == ["rollcall"]
    assert run.gate.next_deadline() is None

    # Cards are recorded with no check (who evacuated), passages are free, buttons do nothing.
    for key, reader in ((K_BOB, "exit"), (K_UNKNOWN, "exit"), (K_BLOCKED, "entry")):
        rec_step = run(2, card(key, reader))
        granted = only(rec_step, "access.granted")
        assert granted["check"] == "none" and outs(rec_step) == []
        assert feedback(rec_step) == [(reader, "granted")]
    assert only(run(2, card(K_BOB, "exit")), "access.granted")["person"] == BOB
    assert only(run(2, card(K_UNKNOWN, "exit")), "access.granted")["person"] is None
    assert run.gate.pending is None
    for side, direction in (("A", "in"), ("B", "out")):
        p = only(run(3, ev.PassSensor(side)), "passage")
        assert (p["direction"], p["source"], p["after_ms"]) == (direction, "free", None)
    assert run(4, ev.Button("in")).commands == [] and run.gate.pending is None
    assert only(run(4, ev.RemoteOpen("in", "r-5")), "command.result")["result"] == "done"

    # A mode command and a reset during fire are refused while the loop is open.
    refused = only(run(5, ev.SetMode("normal", request_id="r-6")), "command.result")
    assert (refused["result"], refused["reason"]) == ("refused", "fire")
    refused = only(run(5, ev.FireReset(by="command", request_id="r-7")), "command.result")
    assert (refused["command"], refused["result"], refused["reason"]) == ("fire_reset", "refused", "fire")
    assert types(run(5, ev.FireReset(by="input"))) == []
    assert run.gate.mode == "fire"

    closed = run(6, ev.FireLoop(open=False))
    assert [(r["type"], r["active"]) for r in closed.records] == [("alarm.fire", False)]
    assert run.gate.mode == "fire" and outs(closed) == []  # stays fire until the reset

    reset = run(7, ev.FireReset(by="input"))
    changed = only(reset, "mode.changed")
    assert (changed["from"], changed["to"], changed["by"]) == ("fire", "normal", "fire_reset")
    assert outs(reset) == [("fire_release", False)]
    assert types(run(8, card(K_ALICE))) == ["access.granted"]


def test_a_blocked_card_read_in_fire_names_nobody_even_when_it_is_still_listed_on_someone(fp):
    """The evacuation record is who went out; a lost (blocked) card carried out says nothing of
    its holder, so it is recorded with no person, as a blocked card of nobody is."""
    cols = columns()
    flags = array("B", cols.card_flags)
    flags[1] = codes.CARD_BLOCKED  # Bob's card is blocked (lost) but still listed on him
    run = make(fp, table=TableColumns(**{**cols.__dict__, "card_flags": flags}))
    assert only(run(1, card(K_BOB)), "access.denied")["reason"] == "blocked"
    run(1.5, ev.FireLoop(open=True))
    for key in (K_BOB, K_BLOCKED):
        granted = only(run(2, card(key, "exit")), "access.granted")
        assert granted["check"] == "none" and granted["person"] is None
    assert only(run(2, card(K_ALICE, "exit")), "access.granted")["person"] == ALICE


def test_fire_overrides_lockdown_and_the_reset_returns_to_it(fp):
    run = make(fp)
    run(1, ev.LockdownSwitch(on=True))
    step = run(2, ev.FireLoop(open=True))
    assert only(step, "mode.changed")["from"] == "lockdown"
    assert outs(step) == [("stop", False), ("fire_release", True)]  # stop released before the release
    run(3, ev.FireLoop(open=False))
    reset = run(4, ev.FireReset(by="command", request_id="r-1"))
    assert types(reset) == ["mode.changed", "command.result"]
    assert only(reset, "mode.changed")["to"] == "lockdown"
    assert outs(reset) == [("fire_release", False), ("stop", True)]


def test_lockdown_switch_under_fire_is_remembered_for_the_reset(fp):
    run = make(fp)
    run(1, ev.SetMode("entry_only", by="simulator"))
    run(2, ev.FireLoop(open=True))
    run(2, ev.Tick())  # the roll-call
    assert types(run(3, ev.LockdownSwitch(on=True))) == []
    run(4, ev.FireLoop(open=False))
    assert only(run(5, ev.FireReset()), "mode.changed")["to"] == "lockdown"
    assert only(run(6, ev.LockdownSwitch(on=False)), "mode.changed")["to"] == "entry_only"


def test_fire_without_a_release_relay_holds_both_unlocks(fp):
    run = make(fp, fire_release=False)
    step = run(1, ev.FireLoop(open=True))
    assert sorted(outs(step)) == [("unlock_a", True), ("unlock_b", True)]
    assert run.gate.outputs["fire_release"] is False


def test_fire_in_potential_mode_holds_both_unlocks_and_the_release(fp):
    run = make(fp, relay_mode="potential")
    run(1, card(K_ALICE))
    step = run(2, ev.FireLoop(open=True))
    assert run.gate.outputs == {"unlock_a": True, "unlock_b": True, "stop": False, "fire_release": True}
    assert ("unlock_a", False) not in outs(step)  # never drops a line fire wants held


def test_fire_loop_repeats_record_nothing_new(fp):
    run = make(fp)
    assert types(run(1, ev.FireLoop(open=False))) == []  # loop already closed
    run(2, ev.FireLoop(open=True))
    run(2, ev.Tick())  # the roll-call
    assert types(run(3, ev.FireLoop(open=True))) == []
    run(4, ev.FireLoop(open=False))
    again = run(5, ev.FireLoop(open=True))  # opens again before the reset: no new mode change
    assert types(again) == ["alarm.fire"]


def restarted(fp, **cfg) -> Run:
    """A gate started again with the fire latch kept on disk (fire_latched=True)."""
    gate = Gate(GateConfig(**cfg), fp, fp.Table(columns()), boot="b-2", implementation="pure",
                fire_latched=True)
    return Run(gate)


def test_a_fire_latch_kept_over_a_restart_starts_the_gate_free_until_the_reset(fp):
    run = restarted(fp)
    step = run.start()
    assert types(step) == ["agent.started", "mode.changed"]
    assert only(step, "agent.started")["mode"] == "normal"  # the mode under the latch
    changed = only(step, "mode.changed")
    assert (changed["from"], changed["to"], changed["by"]) == ("normal", "fire", "restored")
    assert outs(step)[len(LINES):] == [("fire_release", True)]  # free at once, after all went off
    assert run.gate.mode == "fire" and run.gate.fire_latched
    # Fire mode as before the restart: cards recorded unchecked, commands refused.
    assert only(run(1, card(K_UNKNOWN)), "access.granted")["check"] == "none"
    refused = only(run(2, ev.SetMode("normal", request_id="r-1")), "command.result")
    assert (refused["result"], refused["reason"]) == ("refused", "fire")
    # The loop is closed (no FireLoop came): the reset ends it, as it would have before.
    reset = run(3, ev.FireReset(by="command", request_id="r-2"))
    assert types(reset) == ["mode.changed", "command.result"]
    changed = only(reset, "mode.changed")
    assert (changed["from"], changed["to"], changed["by"]) == ("fire", "normal", "fire_reset")
    assert outs(reset) == [("fire_release", False)]
    assert not run.gate.fire_latched
    assert types(run(4, card(K_ALICE))) == ["access.granted"] and run.gate.pending == ("in", "card")


def test_a_restored_fire_latch_with_the_loop_still_open_records_one_mode_change(fp):
    run = restarted(fp)
    run.start()
    opened = run(0.01, ev.FireLoop(open=True))  # the input's level, reported at start
    assert [(r["type"], r["active"]) for r in opened.records] == [("alarm.fire", True)]
    assert outs(opened) == []
    assert types(run(1, ev.FireReset(by="input"))) == []  # loop open: the reset does nothing
    assert run.gate.mode == "fire"
    run(2, ev.FireLoop(open=False))
    assert run.gate.mode == "fire" and run.gate.fire_latched
    run(3, ev.FireReset(by="input"))
    assert [(r["from"], r["to"], r["by"]) for r in run.records if r["type"] == "mode.changed"] == [
        ("normal", "fire", "restored"), ("fire", "normal", "fire_reset")]


def test_a_restored_fire_latch_overrides_a_commanded_lockdown_and_the_reset_returns_to_it(fp):
    run = restarted(fp, initial_mode="lockdown")
    step = run.start()
    assert only(step, "agent.started")["mode"] == "lockdown"
    assert only(step, "mode.changed")["from"] == "lockdown"
    assert run.gate.outputs == {"unlock_a": False, "unlock_b": False, "stop": False, "fire_release": True}
    reset = run(1, ev.FireReset(by="input"))
    assert only(reset, "mode.changed")["to"] == "lockdown"
    assert outs(reset) == [("fire_release", False), ("stop", True)]


def test_the_fire_latch_is_readable_from_the_loop_opening_to_its_reset(fp):
    run = make(fp)
    assert not run.gate.fire_latched
    run(1, ev.FireLoop(open=True))
    run(2, ev.FireLoop(open=False))
    assert run.gate.fire_latched  # what the service saves: closed, not yet reset
    run(3, ev.FireReset(by="input"))
    assert not run.gate.fire_latched


# --- modes ------------------------------------------------------------------------------------------


def test_lockdown_refuses_cards_both_ways_and_holds_stop(fp):
    run = make(fp)
    step = run(1, ev.SetMode("lockdown", request_id="r-1"))
    assert types(step) == ["mode.changed", "command.result"]
    assert outs(step) == [("stop", True)]
    for key, reader in ((K_ALICE, "entry"), (K_CAROL, "exit"), (K_UNKNOWN, "entry")):
        denied = run(2, card(key, reader))
        assert only(denied, "access.denied")["reason"] == "lockdown"
        assert outs(denied) == []


def test_button_in_lockdown_drops_stop_for_its_passage_and_reasserts_it_after(fp):
    run = make(fp, initial_mode="lockdown", start=False)
    run.start()
    step = run(1, ev.Button("in"))
    assert outs(step) == [("stop", False), ("unlock_a", True)]
    run.tick_deadline()  # pulse end
    after = run(3, ev.PassSensor("A"))
    assert only(after, "passage")["source"] == "button"
    assert outs(after) == [("stop", True)]
    # The same after a timeout.
    run(4, ev.RemoteOpen("out", "r-1"))
    assert run.gate.outputs["stop"] is False
    run.tick_deadline()
    timeout = run.tick_deadline()
    assert types(timeout) == ["passage.timeout"]
    assert outs(timeout) == [("stop", True)]


def test_entry_only_refuses_exits_but_the_exit_button_works(fp):
    run = make(fp)
    run(1, ev.SetMode("entry_only", by="simulator"))
    assert only(run(2, card(K_CAROL, "exit")), "access.denied")["reason"] == "wrong_direction"
    assert types(run(3, card(K_CAROL))) == ["access.granted"]
    run(4, ev.PassSensor("A"))
    run(5, ev.Button("out"))
    assert run.gate.pending == ("out", "button")


def test_free_mode_pairs_a_grant_with_the_next_pass_without_driving_an_unlock(fp):
    run = make(fp)
    step = run(1, ev.SetMode("free", request_id="r-1"))
    assert outs(step) == [("fire_release", True)]
    granted = run(2, card(K_ALICE))
    assert types(granted) == ["access.granted"] and outs(granted) == []
    assert run.gate.pending == ("in", "card")
    assert only(run(2.5, card(K_CAROL, "exit")), "access.denied")["reason"] == "gate_busy"
    passage = only(run(3, ev.PassSensor("A")), "passage")
    assert (passage["source"], passage["person"]) == ("card", ALICE)
    free = only(run(4, ev.PassSensor("B")), "passage")
    assert (free["source"], free["person"], free["after_ms"]) == ("free", None, None)
    assert run(5, ev.Button("in")).commands == [] and run.gate.pending is None
    back = run(6, ev.SetMode("normal", request_id="r-2"))
    assert outs(back) == [("fire_release", False)]


def test_free_mode_without_a_release_relay_holds_both_unlocks(fp):
    run = make(fp, fire_release=False)
    assert sorted(outs(run(1, ev.SetMode("free", by="simulator")))) == [("unlock_a", True), ("unlock_b", True)]


def test_set_mode_refuses_fire_and_unknown_modes_and_repeats_change_nothing(fp):
    run = make(fp)
    for bad in ("fire", "party"):
        res = only(run(1, ev.SetMode(bad, request_id="r-1")), "command.result")
        assert (res["command"], res["result"], res["reason"]) == ("set_mode", "refused", "invalid")
    assert run.gate.mode == "normal" and not run.gate.faulted
    run(2, ev.SetMode("free", request_id="r-2"))
    same = run(3, ev.SetMode("free", request_id="r-3"))
    assert types(same) == ["command.result"] and outs(same) == []


def test_lockdown_switch_wins_over_the_commanded_mode(fp):
    run = make(fp)
    changed = only(run(1, ev.LockdownSwitch(on=True)), "mode.changed")
    assert (changed["from"], changed["to"], changed["by"]) == ("normal", "lockdown", "switch")
    step = run(2, ev.SetMode("free", request_id="r-1"))
    assert types(step) == ["command.result"] and run.gate.mode == "lockdown"
    back = run(3, ev.LockdownSwitch(on=False))
    assert only(back, "mode.changed")["to"] == "free"
    assert outs(back) == [("stop", False), ("fire_release", True)]


# --- status inputs -------------------------------------------------------------------------------------


def test_ready_line_and_tamper_are_recorded_on_change_only(fp):
    run = make(fp)
    assert types(run(1, ev.ReadyLine(ok=True))) == []
    lost = only(run(2, ev.ReadyLine(ok=False)), "turnstile.fault")
    assert lost["kind"] == "ready_lost" and lost["detail"]
    assert types(run(3, ev.ReadyLine(ok=False))) == []
    assert only(run(4, ev.ReadyLine(ok=True)), "turnstile.ready")["kind"] == "ready_restored"
    assert not run.gate.faulted  # the turnstile's fault is not the core's
    assert [(r["kind"], r["active"]) for r in run(5, ev.Tamper(True)).records] == [("tamper", True)]
    assert types(run(6, ev.Tamper(True))) == []
    assert [(r["kind"], r["active"]) for r in run(7, ev.Tamper(False)).records] == [("tamper", False)]


def test_reader_error_and_status_are_recorded_and_the_keypad_ignored(fp):
    run = make(fp)
    step = run(1, ev.ReaderError("entry", "checksum", "xor mismatch", "02..03"))
    rec = only(step, "reader.error")
    assert (rec["reader"], rec["kind"], rec["detail"], rec["raw"]) == ("entry", "checksum", "xor mismatch", "02..03")
    assert feedback(step) == [("entry", "error")]
    status = only(run(2, ev.ReaderStatus("entry", online=False)), "reader.status")
    assert (status["reader"], status["online"]) == ("entry", False)
    assert run(3, ev.Keypad("entry", "1234")).records == []


# --- illegal events and the latched fault -----------------------------------------------------------------


@pytest.mark.parametrize("event", [
    ev.CardRead(reader="garage", key=K_ALICE),
    ev.ReaderError(reader="garage", kind="parity"),
    ev.Button("up"),
    ev.RemoteOpen("sideways", "r-1"),
    ev.PassSensor("C"),
    ev.SetOutput("unlock_a", True),  # a command fed back as an event
    object(),
    ev.SetMode("party", by="simulator"),
    ev.CardRead(reader="entry", key=-5),
], ids=lambda e: type(e).__name__)
def test_illegal_event_latches_fault_and_drops_the_unlock_lines(fp, event):
    run = make(fp, relay_mode="potential")
    run(1, card(K_ALICE))
    assert run.gate.outputs["unlock_a"] is True
    step = run(2, event)
    fault = only(step, "turnstile.fault")
    assert fault["kind"] == "core" and fault["detail"]
    assert ("unlock_a", False) in outs(step)
    assert run.gate.faulted and run.gate.pending is None and run.gate.next_deadline() is None


def test_time_going_backwards_latches_fault_but_the_event_is_still_handled(fp):
    run = make(fp)
    run(10, ev.Tick())
    step = run(5, ev.FireLoop(open=True))
    assert types(step) == ["turnstile.fault", "alarm.fire", "mode.changed"]
    assert "backwards" in step.records[0]["detail"]
    assert run.gate.faulted and run.gate.outputs["fire_release"] is True


def test_fault_refuses_cards_ignores_buttons_and_reset_clears_it(fp):
    run = make(fp)
    run(1, ev.PassSensor("Z"))
    assert feedback(run(2, card(K_ALICE))) == [("entry", "denied")]
    assert only(run(2, card(K_UNKNOWN)), "access.denied")["reason"] == "unknown_card"
    assert run(3, ev.Button("in")).commands == []
    # fire still frees the gate in FAULT, and stays after the reset
    assert outs(run(4, ev.FireLoop(open=True))) == [("fire_release", True)]
    run(5, ev.FireLoop(open=False))
    run(6, ev.FireReset())
    reset = run(7, ev.ResetFault())
    assert types(reset) == ["turnstile.ready"] and not run.gate.faulted
    assert types(run(8, card(K_ALICE))) == ["access.granted"]


# --- anti-passback and guests through GateState ------------------------------------------------------------


def _enter(run: Run, t: float, key: int = K_ALICE) -> None:
    assert types(run(t, card(key))) == ["access.granted"]
    assert types(run(t + 1, ev.PassSensor("A"))) == ["passage"]


def test_hard_antipassback_counts_card_passages_not_grants(fp):
    run = make(fp, apb="hard")
    run(1, card(K_ALICE))
    assert types(run.tick_deadline()) == []  # pulse end
    assert types(run.tick_deadline()) == ["passage.timeout"]
    assert run.gate.state.position(ALICE, DAY0) == codes.POS_UNKNOWN  # timed out: moved nobody
    _enter(run, 10)
    assert run.gate.state.position(ALICE, DAY0) == codes.POS_IN
    assert only(run(20, card(K_ALICE)), "access.denied")["reason"] == "antipassback"
    assert types(run(21, card(K_ALICE, "exit"))) == ["access.granted"]


def test_button_passages_move_nobody(fp):
    run = make(fp, apb="hard")
    run(1, ev.Button("in"))
    run(2, ev.PassSensor("A"))
    assert run.gate.state.position(ALICE, DAY0) == codes.POS_UNKNOWN
    assert run.gate.state.to_dict()["positions"] == {}


def test_soft_antipassback_grants_with_a_warning(fp):
    run = make(fp, apb="soft")
    _enter(run, 1)
    granted = only(run(10, card(K_ALICE)), "access.granted")
    assert granted["warning"] == "antipassback"


def test_timed_antipassback_refuses_a_second_entry_within_the_window(fp):
    run = make(fp, apb="timed", apb_window_min=10)
    _enter(run, 1)
    assert only(run(60, card(K_ALICE)), "access.denied")["reason"] == "antipassback"
    assert types(run(61, card(K_ALICE, "exit"))) == ["access.granted"]
    run(62, ev.PassSensor("B"))
    assert types(run(1 + 11 * 60, card(K_ALICE))) == ["access.granted"]


def test_a_guest_use_is_spent_by_the_entry_passage_not_the_grant(fp):
    run = make(fp)
    run(1, card(K_GUEST))
    run(6, ev.Tick())  # timed out: no use spent
    assert run.gate.state.uses(GUEST) == 0
    _enter(run, 10, K_GUEST)
    assert run.gate.state.uses(GUEST) == 1
    assert only(run(20, card(K_GUEST)), "access.denied")["reason"] == "expired"
    assert types(run(21, card(K_GUEST, "exit"))) == ["access.granted"]  # a guest can always leave
    run(22, ev.PassSensor("B"))
    assert run.gate.state.uses(GUEST) == 1


# --- schedules and time zones --------------------------------------------------------------------------------


def test_schedules_are_read_in_local_time_of_the_lists_zone(fp):
    # Bob may enter Monday 08:00-09:04; it is 08:00 UTC = 15:00 in Novosibirsk (UTC+7).
    run = make(fp)
    assert types(run(30, card(K_BOB))) == ["access.granted"]
    run(31, ev.PassSensor("A"))
    run.gate.set_timezone("Asia/Novosibirsk")
    assert run.gate.timezone == "Asia/Novosibirsk"
    assert only(run(40, card(K_BOB)), "access.denied")["reason"] == "outside_schedule"
    run.gate.timezone = None  # back to the config's zone
    assert run.gate.timezone == "UTC"
    assert types(run(41, card(K_BOB))) == ["access.granted"]
    # 09:04 UTC: the window has closed
    assert only(run(42, ev.PassSensor("A")), "passage")["person"] == BOB
    assert only(run(64 * 60, card(K_BOB)), "access.denied")["reason"] == "outside_schedule"


def test_config_timezone_is_used_when_the_list_names_none(fp):
    run = make(fp, timezone="America/New_York")  # 04:00 local: Bob's window is closed
    assert only(run(1, card(K_BOB)), "access.denied")["reason"] == "outside_schedule"


def test_set_timezone_rejects_an_unknown_zone_with_a_useful_message(fp):
    run = make(fp)
    with pytest.raises(ValueError, match="IANA"):
        run.gate.set_timezone("Nowhere/Special")
    assert run.gate.timezone == "UTC"


# --- outputs only on change --------------------------------------------------------------------------------


def test_a_busy_morning_never_drives_a_line_to_the_level_it_has(fp):
    # The runner asserts every SetOutput changes its line; this sequence mixes everything.
    run = make(fp, relay_mode="potential", fire_release=False)
    t = 1.0
    for i in range(6):
        run(t, card(K_ALICE if i % 2 == 0 else K_CAROL, "entry" if i % 2 == 0 else "exit"))
        run(t + 0.1, ev.Button("out" if i % 2 == 0 else "in"))
        run(t + 1.0, ev.PassSensor("A" if i % 2 == 0 else "B"))
        run.tick_deadline()
        t += 12
    run(t, ev.SetMode("free", request_id="r-1"))
    run(t + 1, ev.SetMode("free", request_id="r-2"))
    run(t + 2, ev.FireLoop(open=True))
    run(t + 3, ev.FireLoop(open=False))
    run(t + 4, ev.FireReset())
    assert run.gate.mode == "free"
    assert run.gate.outputs == {"unlock_a": True, "unlock_b": True, "stop": False, "fire_release": False}


def test_swap_table_carries_the_lists_time_zone(fp):
    run = make(fp, timezone="UTC")
    assert run.gate.timezone == "UTC"
    run(1.0, ev.SwapTable(table=fp.Table(columns("v2")), kind="snapshot", timezone="Asia/Tomsk"))
    assert run.gate.timezone == "Asia/Tomsk"
    assert run.records[-1]["type"] == "acl.applied"


def test_swap_table_with_an_unknown_time_zone_is_illegal_and_keeps_the_old_table(fp):
    run = make(fp)
    old = run.gate.table
    run(1.0, ev.SwapTable(table=fp.Table(columns("v2")), kind="snapshot", timezone="Mars/Olympus"))
    assert run.gate.faulted and run.gate.table is old
    assert run.records[-1]["type"] == "turnstile.fault"
