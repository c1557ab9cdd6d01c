"""The console's actions in the core (agent/core/turnstile.py): SetMode by console,
ConsoleOpen, ConsolePulse, ConsoleNote, each journalled as one console.action record.

Driven directly on both fastpath twins like tests/test_turnstile.py: every record is
checked against the contract's event schema, and every SetOutput must change its line.
"""
from __future__ import annotations

import pytest

from agent import contract
from agent.core import events as ev
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import LINES, Gate
from agent.runtime import GateRuntime
from tests.test_turnstile import K_ALICE, MONO0, at, card, columns

pytestmark = pytest.mark.core

TECH = "tech.ivanova"


class Run:
    """A started gate; checks each step's records against the contract and that every
    output command changes its line (reader feedback lines included)."""

    def __init__(self, fp, **cfg) -> None:
        self.gate = Gate(GateConfig(**cfg), fp, fp.Table(columns()), boot="b-1", implementation="pure")
        self.sink = SequenceSink("test")
        self.records: list[dict] = []
        self.levels = {line: False for line in LINES}
        self.gate.start(at(0))

    def __call__(self, t: float, event=None) -> ev.Step:
        step = self.gate.handle(ev.Tick() if event is None else event, at(t))
        for rec in self.sink.commit(step.records):
            assert contract.validate("event", rec) == [], rec
            self.records.append(rec)
        for cmd in step.commands:
            if isinstance(cmd, ev.SetOutput):
                assert self.levels.get(cmd.line, False) != cmd.active, f"{cmd.line} driven twice to {cmd.active}"
                self.levels[cmd.line] = cmd.active
        assert {**self.gate.outputs, **self.gate.feedback_outputs} == self.levels
        return step


def types(step: ev.Step) -> list[str]:
    return [r["type"] for r in step.records]


def action(step: ev.Step) -> dict:
    (rec,) = [r for r in step.records if r["type"] == "console.action"]
    return rec


def outs(step: ev.Step) -> list[tuple[str, bool]]:
    return [(c.line, c.active) for c in step.commands if isinstance(c, ev.SetOutput)]


# --- set_mode -----------------------------------------------------------------------------------


def test_a_console_mode_change_names_the_console_and_the_account(fp):
    run = Run(fp)
    step = run(1, ev.SetMode("lockdown", by="console", account=TECH))
    assert types(step) == ["mode.changed", "console.action"]
    changed = step.records[0]
    assert (changed["from"], changed["to"], changed["by"], changed["account"]) == ("normal", "lockdown", "console", TECH)
    assert action(step) == {**action(step), "account": TECH, "action": "set_mode", "args": {"mode": "lockdown"},
                            "result": "done"}
    assert "reason" not in action(step)
    assert outs(step) == [("stop", True)]
    again = run(2, ev.SetMode("lockdown", by="console", account=TECH))  # no change: only the action
    assert types(again) == ["console.action"] and action(again)["result"] == "done"


def test_a_console_mode_change_is_refused_during_a_fire_and_the_gate_stays_free(fp):
    run = Run(fp)
    run(1, ev.FireLoop(open=True))
    run(1.5)  # the roll-call, journalled right after the release
    step = run(2, ev.SetMode("normal", by="console", account=TECH))
    assert types(step) == ["console.action"]
    assert (action(step)["result"], action(step)["reason"]) == ("refused", "fire")
    assert run.gate.mode == "fire" and step.commands == []


def test_a_console_mode_outside_the_commandable_ones_is_refused_invalid(fp):
    run = Run(fp)
    step = run(1, ev.SetMode("fire", by="console", account=TECH))
    assert (action(step)["result"], action(step)["reason"]) == ("refused", "invalid")
    assert run.gate.mode == "normal" and not run.gate.faulted


@pytest.mark.parametrize("event", [
    ev.SetMode("lockdown", by="console", account="no spaces"),
    ev.ConsoleOpen("in", ""),
    ev.ConsolePulse("entry.led", 1.0, "x" * 65),
    ev.ConsoleNote("delete", TECH),  # the contract knows no such action
])
def test_a_console_event_its_record_cannot_carry_is_an_illegal_event_and_journals_no_action(fp, event):
    run = Run(fp)
    step = run(1, event)
    assert types(step) == ["turnstile.fault"] and run.gate.mode == "normal"
    assert type(event).__name__ in step.records[0]["detail"]
    assert step.commands == []


# --- open ----------------------------------------------------------------------------------------


def test_a_console_open_is_a_grant_and_a_passage_with_source_console(fp):
    run = Run(fp, wait_s=5.0)
    step = run(1, ev.ConsoleOpen("in", TECH))
    assert types(step) == ["access.granted", "console.action"]
    granted = step.records[0]
    assert (granted["source"], granted["account"], granted["person"], granted["card"]) == ("console", TECH, None, None)
    assert action(step)["args"] == {"direction": "in"} and action(step)["result"] == "done"
    assert ("unlock_a", True) in outs(step)
    passage = run(2, ev.PassSensor("A"))
    assert types(passage) == ["passage"] and passage.records[0]["source"] == "console"


def test_a_console_open_nobody_uses_times_out_with_source_console(fp):
    run = Run(fp, wait_s=5.0)
    run(1, ev.ConsoleOpen("out", TECH))
    timeout = run(6.5)
    assert types(timeout) == ["passage.timeout"] and timeout.records[0]["source"] == "console"


def test_a_console_open_waits_for_the_lane_and_keeps_its_account(fp):
    run = Run(fp, wait_s=5.0)
    run(1, card(K_ALICE))
    step = run(1.5, ev.ConsoleOpen("out", TECH))
    assert types(step) == ["console.action"] and run.gate.waiting == (("out", "console"),)
    later = run(2, ev.PassSensor("A"))  # Alice's passage frees the lane
    assert types(later) == ["passage", "access.granted"]
    assert (later.records[1]["source"], later.records[1]["account"]) == ("console", TECH)


@pytest.mark.parametrize("mode_event", [ev.FireLoop(open=True), ev.SetMode("free", by="simulator")])
def test_a_console_open_in_a_free_gate_is_done_with_nothing_to_drive(fp, mode_event):
    run = Run(fp)
    run(1, mode_event)
    run(1.5)  # the fire's roll-call, journalled right after the release
    step = run(2, ev.ConsoleOpen("in", TECH))
    assert types(step) == ["console.action"] and action(step)["result"] == "done"
    assert step.commands == [] and run.gate.pending is None


def test_a_console_open_is_refused_while_the_core_fault_is_latched(fp):
    run = Run(fp)
    run(1, ev.Button("sideways"))
    step = run(2, ev.ConsoleOpen("in", TECH))
    assert (action(step)["result"], action(step)["reason"]) == ("refused", "fault")
    assert step.commands == [] and run.gate.pending is None


def test_a_console_open_with_a_bad_direction_is_refused_invalid_without_a_fault(fp):
    run = Run(fp)
    step = run(1, ev.ConsoleOpen("sideways", TECH))
    assert (action(step)["result"], action(step)["reason"]) == ("refused", "invalid")
    assert not run.gate.faulted


# --- pulse ---------------------------------------------------------------------------------------


def test_a_feedback_line_pulse_goes_on_for_its_seconds_then_off(fp):
    run = Run(fp)
    step = run(1, ev.ConsolePulse("entry.led", 0.5, TECH))
    assert action(step)["args"] == {"line": "entry.led", "seconds": 0.5} and action(step)["result"] == "done"
    assert outs(step) == [("entry.led", True)]
    assert run.gate.next_deadline() == pytest.approx(MONO0 + 1.5)
    assert outs(run(1.4)) == []
    assert outs(run(1.5)) == [("entry.led", False)]
    assert run.gate.feedback_outputs == {"entry.led": False} and run.gate.next_deadline() is None


def test_a_second_pulse_on_a_line_still_on_makes_it_longer_without_a_gap(fp):
    run = Run(fp)
    run(1, ev.ConsolePulse("exit.beeper", 1.0, TECH))
    step = run(1.5, ev.ConsolePulse("exit.beeper", 1.0, TECH))
    assert outs(step) == []  # still on: no off-on in between
    assert outs(run(2.1)) == []
    assert outs(run(2.5)) == [("exit.beeper", False)]


@pytest.mark.parametrize("line, wired, reason", [
    ("unlock_a", True, "use_open"),
    ("unlock_b", True, "use_open"),
    ("stop", True, "safety_line"),
    ("fire_release", True, "safety_line"),
    ("entry.horn", True, "unknown_line"),
    ("lobby.led", True, "unknown_line"),  # no such reader at this gate
    ("entry.led", False, "unknown_line"),  # the board does not wire it
])
def test_the_turnstile_lines_and_unknown_lines_are_never_pulsed(fp, line, wired, reason):
    run = Run(fp)
    step = run(1, ev.ConsolePulse(line, 0.3, TECH, wired=wired))
    assert (action(step)["result"], action(step)["reason"]) == ("refused", reason)
    assert step.commands == [] and run.gate.next_deadline() is None


def test_a_pulse_out_of_range_is_refused_invalid(fp):
    run = Run(fp)
    step = run(1, ev.ConsolePulse("entry.led", 20.0, TECH))
    assert (action(step)["reason"], action(step)["args"]) == ("invalid", {"line": "entry.led", "seconds": None})
    assert step.commands == []


def test_the_fire_alarm_cuts_a_pulse_and_a_pulse_in_a_fire_is_refused(fp):
    run = Run(fp)
    run(1, ev.ConsolePulse("entry.led", 10.0, TECH))
    fire = run(2, ev.FireLoop(open=True))
    assert ("entry.led", False) in outs(fire)
    assert [c for c in outs(fire) if c[0] == "entry.led"] == [("entry.led", False)]
    run(2.5)  # the roll-call
    refused = run(3, ev.ConsolePulse("entry.led", 1.0, TECH))
    assert (action(refused)["result"], action(refused)["reason"]) == ("refused", "fire")
    assert refused.commands == []


class _Outputs:
    def __init__(self) -> None:
        self.levels: dict[str, bool] = {}

    def set(self, line: str, active: bool) -> None:
        self.levels[line] = active

    def feedback(self, reader: str, signal: str) -> None:
        pass


def test_the_gate_thread_stop_drives_a_pulsed_feedback_line_inactive(fp):
    gate = Gate(GateConfig(), fp, fp.Table(columns()), boot="b-1")
    outputs = _Outputs()
    runtime = GateRuntime(gate, SequenceSink("t"), outputs=outputs)
    runtime.start()
    try:
        runtime.submit(ev.ConsolePulse("entry.led", 10.0, TECH))
        assert runtime.wait_idle(10)
        assert outputs.levels["entry.led"] is True
    finally:
        runtime.stop()
    assert outputs.levels["entry.led"] is False  # cut at once by the stop, not left on


# --- note ----------------------------------------------------------------------------------------


def test_an_enroll_note_is_only_journalled_and_its_detail_is_cut_to_200(fp):
    run = Run(fp)
    step = run(1, ev.ConsoleNote("enroll", "guard-1", "started " + "x" * 300))
    assert types(step) == ["console.action"] and step.commands == []
    rec = action(step)
    assert (rec["action"], rec["result"], len(rec["args"]["detail"])) == ("enroll", "done", 200)
