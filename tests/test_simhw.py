"""The simulated hardware (agent/simhw.py) against the real adapters and core.

A rig is the gate's own parts on gpiozero's MockFactory (TurnstileIO, the
Wiegand adapter, GateRuntime, Gate on each fastpath twin) with the simulator
on the other side of the same pins; one test runs the whole Service. What is
checked is what the service saw (its records) and what the pins did (the
mock pins' own state history), never how long anything took.
"""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from agent.core.acl import AccessList, build_table
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.hw.profiles import load_profile
from agent.hw.turnstile_io import TurnstileIO
from agent.hw.wiegand_gpio import WiegandReader
from agent.runtime import GateRuntime
from agent.simhw import (
    Crowd,
    SimulatedReader,
    SimulatedTurnstile,
    drive_fire_loop,
    drive_input,
    press_input,
)
from tests.broker import wait_until
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

CARD = "100,60179"
OTHER = "100,60180"
BLOCKED = "7,1234"
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
PROFILES = ["pi4-relay4", "pi-opto"]  # active-low relays and active-high outputs


def acl_doc() -> dict:
    return {
        "kind": "snapshot", "version": "sim.1", "site": "s1", "timezone": "UTC",
        "schedules": {"always": {"week": ALWAYS}},
        "groups": {"pupils": {"entry": "always", "exit": "always"}},
        "people": [{"id": "p-1", "cards": [CARD], "groups": ["pupils"]},
                   {"id": "p-2", "cards": [OTHER], "groups": ["pupils"]}],
        "blocked": [BLOCKED],
    }


class Sink(SequenceSink):
    """SequenceSink that other threads may read while the gate thread commits."""

    def __init__(self) -> None:
        super().__init__("rig")
        self._lock = threading.Lock()

    def commit(self, records):
        with self._lock:
            return super().commit(records)

    def of(self, rtype: str) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r["type"] == rtype]


# Real pins: the simulated reader drives each bit from the test's thread, a 100 us busy wait
# low and a 1-2 ms sleep between bits. On a busy machine (a parallel run on two cores) that
# thread can be preempted inside a pulse or wake from a gap tens of ms late, which the decoder
# rightly calls a stuck line (over 5 ms low) or the end of the frame (25 ms quiet). A real
# reader is never late, so these tests give the sender room: the decoder's end-of-frame
# silence and stuck-line limit are PIN_SILENCE_S, and frames are twice that apart. The glitch
# limit (10 us) stays as shipped; the 5 ms stuck-line limit is tested on explicit edge stamps
# (tests/test_wiegand.py, tests/test_wiegand_gpio.py), where no scheduler can stretch a pulse.
PIN_SILENCE_S = 0.5
PIN_SLACK = {"silence_s": PIN_SILENCE_S, "stuck_s": PIN_SILENCE_S}


class Rig:
    """The gate's parts on mock pins, with the simulated turnstile attached first."""

    def __init__(self, fp, tmp_path: Path, profile_name: str = "pi4-relay4", *, walk_s=(0.05, 0.1),
                 relay_mode: str = "pulse", fire_release: bool = True, pin_slack: bool = False) -> None:
        self.factory = MockFactory()
        self.profile = load_profile(profile_name)
        self.witness = tmp_path / "witness.jsonl"
        # The Pi's power-on pulls (BCM 0-8 up, 9-27 down) before anything: each output's
        # history starts where a real board's does, so "never active at start" covers power-on.
        for out in self.profile.output_pins().values():
            pin = self.factory.pin(f"GPIO{out.pin}")
            pin.pull = "up" if out.pin <= 8 else "down"
            pin.clear_states()
        # Attached before the devices claim the pins: the start is witnessed too.
        self.turnstile = SimulatedTurnstile(self.factory, self.profile, walk_s=walk_s,
                                            rng=random.Random(7), witness=self.witness)
        self.sink = Sink()
        cfg = GateConfig(site="s1", gate="g1", pulse_s=0.1, wait_s=1.0, relay_mode=relay_mode,
                         fire_release=fire_release)
        table = build_table(AccessList.from_snapshot(acl_doc()), fp)
        self.gate = Gate(cfg, fp, table)
        self.runtime: GateRuntime | None = None
        self.io = TurnstileIO(self.profile, factory=self.factory, submit=self._submit)
        for name in self.profile.inputs:  # every input at rest: ready, loop closed, sensors closed
            drive_input(self.factory, self.profile, name, name == "ready")
        self.readers = {
            name: WiegandReader(name, pins.d0, pins.d1, factory=self.factory, submit=self._submit,
                                pull=pins.pull,
                                decoder_kwargs=PIN_SLACK if pin_slack else None)
            for name, pins in self.profile.readers.items()
        }
        self.pin_slack = pin_slack
        self.runtime = GateRuntime(self.gate, self.sink, outputs=self.io)
        self.runtime.start()
        self.io.start()

    def _submit(self, event):
        return self.runtime.submit(event) if self.runtime is not None else False

    def reader(self, name: str = "entry", *, pins: bool = False) -> SimulatedReader:
        """pins=False: through the adapter's feed_edges (exact timing); True: the real D0/D1 pins."""
        slack = {"frame_gap_s": 2 * PIN_SILENCE_S} if pins and self.pin_slack else {}
        return SimulatedReader(self.factory, self.profile, name,
                               adapter=None if pins else self.readers[name], rng=random.Random(3), **slack)

    def history(self, line: str) -> list[bool]:
        """The line's activity at each change of its mock pin (pin-level truth, not the simulator's)."""
        spec = self.profile.outputs[line]
        return [s.state == spec.active_high for s in self.factory.pin(f"GPIO{spec.pin}").states]

    def close(self) -> None:
        self.turnstile.close()
        for r in self.readers.values():
            r.close()
        self.runtime.stop()
        self.io.close()
        self.factory.reset()


@pytest.fixture
def rigs(fp, tmp_path):
    made: list[Rig] = []

    def make(*args, **kw) -> Rig:
        rig = Rig(fp, tmp_path, *args, **kw)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


def witness_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def activations(changes: list[bool]) -> int:
    """How many times a line went from inactive to active (history starts inactive)."""
    n, was = 0, False
    for active in changes:
        n += active and not was
        was = active
    return n


# --- the turnstile ----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_a_presented_card_pulses_the_relay_and_the_simulated_walk_is_a_passage(rigs, profile):
    rig = rigs(profile)
    rig.reader("entry").present(CARD)
    wait_until(lambda: rig.sink.of("passage"), what="a passage record")
    granted = rig.sink.of("access.granted")
    assert [g["person"] for g in granted] == ["p-1"]
    passage = rig.sink.of("passage")[0]
    assert passage["direction"] == "in" and passage["source"] == "card" and passage["person"] == "p-1"
    assert activations(rig.history("unlock_a")) == 1
    assert not any(rig.history("unlock_b"))
    assert rig.turnstile.passages == {"in": 1, "out": 0}


def test_the_exit_reader_opens_b_and_the_person_walks_out(rigs):
    rig = rigs()
    rig.reader("exit").present(OTHER)
    wait_until(lambda: rig.sink.of("passage"), what="a passage record")
    assert rig.sink.of("passage")[0]["direction"] == "out"
    assert activations(rig.history("unlock_b")) == 1 and not any(rig.history("unlock_a"))


def test_a_real_pulse_train_on_the_mock_pins_is_decoded(rigs):
    rig = rigs(pin_slack=True)
    reader = rig.reader("entry", pins=True)
    assert reader.connected
    reader.present(CARD)
    wait_until(lambda: rig.sink.of("access.granted") or rig.sink.of("reader.error"), what="the frame")
    assert not rig.sink.of("reader.error"), rig.sink.of("reader.error")
    assert rig.sink.of("access.granted")[0]["person"] == "p-1"
    counters = rig.readers["entry"].counters
    assert counters["glitches"] == 0 and counters["stuck"] == 0


def test_a_grant_nobody_walks_through_times_out(rigs):
    rig = rigs(walk_s=lambda direction: None)
    rig.reader("entry").present(CARD)
    wait_until(lambda: rig.sink.of("passage.timeout"), what="passage.timeout")
    assert not rig.sink.of("passage") and rig.turnstile.passages == {"in": 0, "out": 0}


def test_a_pushed_arm_is_a_forced_passage(rigs):
    rig = rigs()
    rig.turnstile.force("out")
    wait_until(lambda: rig.sink.of("passage.forced"), what="passage.forced")
    assert rig.sink.of("passage.forced")[0]["direction"] == "out"
    assert not any(rig.history("unlock_a")) and not any(rig.history("unlock_b"))


def test_potential_mode_holds_the_line_until_the_person_passes(rigs):
    rig = rigs(relay_mode="potential", walk_s=(0.2, 0.2))
    rig.reader("entry").present(CARD)
    wait_until(lambda: rig.sink.of("passage"), what="a passage record")
    wait_until(lambda: not rig.turnstile.is_active("unlock_a"), what="the line dropped")
    assert activations(rig.history("unlock_a")) == 1
    assert rig.turnstile.passages["in"] == 1


# --- fire -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fire_release", [True, False])
def test_an_open_fire_loop_frees_both_ways_for_every_evacuee(rigs, fire_release):
    rig = rigs(fire_release=fire_release)
    drive_fire_loop(rig.factory, rig.profile, True)
    wait_until(lambda: rig.turnstile.is_free(), what="free passage")
    rig.turnstile.enqueue("out", 3)
    rig.turnstile.enqueue("in", 2)
    wait_until(lambda: len(rig.sink.of("passage")) == 5, what="five free passages")
    free = rig.sink.of("passage")
    assert {p["source"] for p in free} == {"free"}
    assert sorted(p["direction"] for p in free) == ["in", "in", "out", "out", "out"]
    assert rig.turnstile.queued("in") == rig.turnstile.queued("out") == 0
    assert [r["active"] for r in rig.sink.of("alarm.fire")] == [True]

    # The loop closes: still fire until the reset; then the gate locks again.
    drive_fire_loop(rig.factory, rig.profile, False)
    wait_until(lambda: len(rig.sink.of("alarm.fire")) == 2, what="alarm.fire false")
    assert rig.turnstile.is_free()
    press_input(rig.factory, rig.profile, "fire_reset", hold_s=0.05)
    wait_until(lambda: not rig.turnstile.is_free(), what="the release dropped")
    assert rig.sink.of("mode.changed")[-1]["to"] == "normal"


# --- the witness ------------------------------------------------------------------------------


def test_the_witness_has_a_line_for_each_output_change_and_starts_inactive(rigs):
    rig = rigs()
    entry = rig.reader("entry")
    for n, card in enumerate((CARD, OTHER), start=1):
        entry.present(card)
        wait_until(lambda n=n: len(rig.sink.of("passage")) == n, what=f"passage {n}")
        wait_until(lambda: not rig.turnstile.walking, what="the walk done")
    drive_fire_loop(rig.factory, rig.profile, True)
    wait_until(lambda: rig.turnstile.is_free(), what="free passage")
    drive_fire_loop(rig.factory, rig.profile, False)
    press_input(rig.factory, rig.profile, "fire_reset", hold_s=0.05)
    wait_until(lambda: not rig.turnstile.is_free(), what="the release dropped")
    rig.turnstile.close()  # flushes nothing: every line was fsync'd as written

    lines = witness_lines(rig.witness)
    attach = lines[0]
    assert "attach" in attach and not any(attach["lines"].values())
    for line in ("unlock_a", "unlock_b", "stop", "fire_release"):
        seen = [w["active"] for w in lines[1:] if w.get("line") == line]
        truth = rig.history(line)
        # The pin's history, collapsed to changes of activity: the witness must match it exactly.
        changes = [a for i, a in enumerate(truth) if (truth[i - 1] if i else False) != a]
        assert seen == changes, f"{line}: witness {seen}, pin {truth}"
    assert [w["active"] for w in lines if w.get("line") == "unlock_a"] == [True, False, True, False]
    assert [w["active"] for w in lines if w.get("line") == "fire_release"] == [True, False]
    ts = [w["t"] for w in lines]
    assert ts == sorted(ts)


def test_a_witness_cut_mid_line_goes_on_on_a_fresh_line(tmp_path):
    factory = MockFactory()
    profile = load_profile("pi4-relay4")
    path = tmp_path / "w.jsonl"
    path.write_text('{"t": 1.0, "line": "unlock_a", "act')  # a process killed mid-write
    sim = SimulatedTurnstile(factory, profile, witness=path)
    sim.close()
    factory.reset()
    text = path.read_text().splitlines()
    assert text[0].startswith('{"t": 1.0') and json.loads(text[1])["attach"]


# --- readers and the crowd --------------------------------------------------------------------


def test_a_card_too_wide_for_w26_is_refused_with_the_fix():
    reader = SimulatedReader(MockFactory(), load_profile("pi4-relay4"), "entry")
    with pytest.raises(ValueError, match="24 bits"):
        reader.present(1 << 30)
    with pytest.raises(ValueError, match="not wired"):
        SimulatedReader(MockFactory(), load_profile("pi4-relay4"), "side-door")


@pytest.mark.long(6)
def test_the_crowd_presents_known_unknown_and_blocked_cards(rigs):
    rig = rigs(walk_s=(0.01, 0.02))
    entry = rig.reader("entry")
    crowd = Crowd({"entry": entry}, rig.turnstile, cards=[CARD, OTHER], unknown_ratio=0.3,
                  blocked_cards=[BLOCKED], blocked_ratio=0.3, rng=random.Random(5))
    made = [crowd.step() for _ in range(12)]
    kinds = [p.kind for p in made]
    assert {"known", "unknown", "blocked"} <= set(kinds)
    wait_until(lambda: len(rig.sink.of("access.granted")) + len(rig.sink.of("access.denied")) == 12,
               what="twelve decisions")
    wait_until(lambda: not rig.turnstile.walking, what="the last walk done")
    reasons = [d["reason"] for d in rig.sink.of("access.denied")]
    # A patient crowd waits for the walker ahead: every refusal names the card's own reason.
    assert sorted(reasons) == sorted({"unknown": "unknown_card", "blocked": "blocked"}[k]
                                     for k in kinds if k != "known")
    assert len(rig.sink.of("passage")) == kinds.count("known")


def test_the_crowd_runs_until_stopped_and_walks_through_a_free_gate(rigs):
    rig = rigs(walk_s=(0.01, 0.02))
    crowd = Crowd({"entry": rig.reader("entry"), "exit": rig.reader("exit")}, rig.turnstile,
                  cards=[CARD, OTHER], rate_per_min=1200, unknown_ratio=0.0, settle_s=0.05,
                  rng=random.Random(9))
    drive_fire_loop(rig.factory, rig.profile, True)
    wait_until(lambda: rig.turnstile.is_free(), what="free passage")
    stop = threading.Event()
    runner = threading.Thread(target=crowd.run, kwargs={"stop_event": stop})
    runner.start()
    wait_until(lambda: len(rig.sink.of("passage")) >= 5, what="evacuees passing")
    stop.set()
    runner.join(5)
    assert not runner.is_alive()
    # In fire mode a card is recorded with no check (who evacuated), and each walks through free.
    assert all(g["check"] == "none" for g in rig.sink.of("access.granted"))
    assert {p["source"] for p in rig.sink.of("passage")} == {"free"}


def test_a_crowd_skips_readers_nobody_listens_to():
    factory = MockFactory()
    reader = SimulatedReader(factory, load_profile("pi4-relay4"), "entry")
    crowd = Crowd({"entry": reader}, None, cards=[CARD], rng=random.Random(1))
    assert not reader.connected and crowd.step() is None and crowd.counts["skipped"] == 1
    factory.reset()


# --- the whole service ------------------------------------------------------------------------


def test_the_service_on_mock_pins_lets_the_crowd_through(tmp_path):
    from agent.config import load_config
    from agent.downlink.aclfiles import ACL_FILE, store_list
    from agent.service import ClockSync, Service

    (tmp_path / "agent.toml").write_text(
        '[site]\nid = "s1"\ngate = "g1"\n[gate]\npulse_s = 0.1\nwait_s = 1.0\n'
        '[hardware]\npin_factory = "mock"\n[journal]\npath = "data/journal.db"\n'
        '[service]\nstate_dir = "state"\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store_list(state / ACL_FILE, AccessList.from_snapshot(acl_doc()), applied_at=time.time())
    config = load_config(tmp_path / "agent.toml")
    factory = MockFactory()
    board = config.hardware.board
    turnstile = SimulatedTurnstile(factory, board, walk_s=(0.02, 0.05), witness=tmp_path / "w.jsonl")
    svc = Service(config, factory=factory, clock_sync=ClockSync(lambda: True), env={})
    svc.start()
    try:
        readers = {n: SimulatedReader(factory, board, n, adapter=svc.readers[n]) for n in svc.readers}
        crowd = Crowd(readers, turnstile, cards=[CARD, OTHER], unknown_ratio=0.0, rng=random.Random(2))
        for _ in range(4):
            crowd.step()
        wait_until(lambda: turnstile.passages["in"] + turnstile.passages["out"] == 4, what="four passages")
        assert svc.runtime.wait_idle(5)
    finally:
        turnstile.close()
        svc.stop()
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "journal.db") as db:
        types = [t for (t,) in db.execute("SELECT type FROM events ORDER BY seq")]
    assert types.count("access.granted") == 4 and types.count("passage") == 4
    unlocks = [w for w in witness_lines(tmp_path / "w.jsonl") if w.get("line", "").startswith("unlock")]
    assert sum(w["active"] for w in unlocks) == 4


@pytest.mark.parametrize("pins", [False, True])
def test_cards_presented_back_to_back_are_two_frames_not_one(rigs, pins):
    rig = rigs(walk_s=lambda direction: None, pin_slack=pins)
    reader = rig.reader("exit", pins=pins)
    reader.present(BLOCKED)
    reader.present(CARD)  # asked for at once: the reader keeps its quiet between frames
    wait_until(lambda: len(rig.sink.of("access.denied")) + len(rig.sink.of("access.granted")) == 2,
               what="two decisions")
    assert not rig.sink.of("reader.error")
    assert rig.sink.of("access.denied")[0]["reason"] == "blocked"
    assert rig.sink.of("access.granted")[0]["person"] == "p-1"


@pytest.mark.parametrize("pins", [False, True])
def test_two_simulated_readers_on_one_reader_take_turns(rigs, pins):
    """The demo's crowd and `gate-agent sim card` each hold a SimulatedReader on the same
    reader: frames sent from both at once must not overlap (one damaged frame)."""
    rig = rigs(walk_s=lambda direction: None, pin_slack=pins)
    crowd, sim = rig.reader("exit", pins=pins), rig.reader("exit", pins=pins)
    threads = [threading.Thread(target=r.present, args=(card,)) for r, card in ((crowd, BLOCKED), (sim, CARD))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    wait_until(lambda: len(rig.sink.of("access.denied")) + len(rig.sink.of("access.granted")) == 2,
               what="two decisions")
    assert not rig.sink.of("reader.error")
    assert [r["reason"] for r in rig.sink.of("access.denied")] == ["blocked"]
    assert rig.sink.of("access.granted")[0]["person"] == "p-1"
