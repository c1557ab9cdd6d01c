"""Turnstile I/O on gpiozero mock pins, and the board profiles behind it.

The mock pins are seeded with the Pi's power-on pulls (BCM 0-8 up, 9-27
down) before any device is built, so a pin's state history starts where a
real board starts, and "no output ever went active" covers power-on too.
"""
from __future__ import annotations

import itertools
import threading
from array import array
from pathlib import Path

import pytest
from gpiozero import DigitalInputDevice
from gpiozero.exc import GPIOPinInUse
from gpiozero.pins.mock import MockFactory

from agent.core import events as ev
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.hw.profiles import (
    INPUT_LINES,
    ProfileError,
    available_profiles,
    boot_drive_levels,
    load_profile,
    parse_profile,
)
from agent.hw.turnstile_io import TurnstileIO
from agent.runtime import GateRuntime
from fastpath import codes
from fastpath.columns import TableColumns
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ["pi4-relay4", "pi-opto"]
# Inputs whose rest is "asserted" (the turnstile is ready); every other rests unasserted.
REST_ASSERTED = {"ready": True}
CARD = 6613779  # "0006613779" = 100,60179


def power_on_level(pin: int) -> bool:
    """docs/design.md#raspberry-pi: BCM 0-8 are pulled up at power-on, 9-27 pulled down."""
    return pin <= 8


def seed_power_on(factory: MockFactory, profile) -> None:
    for out in profile.output_pins().values():
        pin = factory.pin(f"GPIO{out.pin}")
        pin.pull = "up" if power_on_level(out.pin) else "down"
        pin.clear_states()


def drive(factory: MockFactory, profile, name: str, asserted: bool) -> None:
    spec = profile.inputs[name]
    pin = factory.pin(f"GPIO{spec.pin}")
    high = spec.active_high if asserted else not spec.active_high
    pin.drive_high() if high else pin.drive_low()


def rest_inputs(factory: MockFactory, profile) -> None:
    for name in profile.inputs:
        drive(factory, profile, name, REST_ASSERTED.get(name, False))


def output_states(factory: MockFactory, out) -> list[bool]:
    return [s.state for s in factory.pin(f"GPIO{out.pin}").states]


def assert_never_active(factory: MockFactory, profile) -> None:
    for line, out in profile.output_pins().items():
        states = output_states(factory, out)
        active = [s for s in states if s == out.active_high]
        assert not active, f"{line} (BCM {out.pin}) went active: history {states}"


def one_card_table(fp):
    everywhere = b"\xff" * codes.BITMAP_BYTES
    return fp.Table(TableColumns(
        version="v1", card_keys=array("Q", [CARD]), card_person=array("i", [0]),
        card_flags=array("B", [0]), person_ids=["p-1"], person_from=array("q", [codes.NO_START]),
        person_until=array("q", [codes.NO_END]), person_groupset=array("i", [0]),
        person_flags=array("B", [0]), person_max_uses=array("i", [0]),
        gs_entry=[everywhere], gs_entry_holiday=[everywhere], gs_exit=[everywhere],
    ))


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


class Collect(list):
    def __call__(self, event):
        self.append(event)


# --- profiles -------------------------------------------------------------------------


def test_shipped_profiles_load_and_are_listed():
    names = available_profiles()
    for name in PROFILES:
        assert name in names
        p = load_profile(name)
        assert p.name == name
        assert {"unlock_a", "unlock_b", "stop"} <= set(p.outputs)
        assert {"pass_a", "pass_b"} <= set(p.inputs)


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_keep_every_output_off_from_power_on(name):
    p = load_profile(name)
    for line, out in p.output_pins().items():
        assert power_on_level(out.pin) != out.active_high, f"{line} on BCM {out.pin} is active at power-on"


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_use_each_pin_once(name):
    p = load_profile(name)
    uses = [pin for pin in p.pin_uses()]
    assert len(uses) == len(set(uses))
    total = len(p.outputs) + len(p.inputs) + sum(
        2 + (r.led is not None) + (r.beeper is not None) for r in p.readers.values())
    assert len(uses) == total


def test_boot_snippet_carries_every_profiles_gpio_lines():
    snippet = (ROOT / "hardware" / "config.txt.snippet").read_text()
    assert "enable_uart=1" in snippet
    for name in PROFILES:
        for line in load_profile(name).boot_config:
            assert line in snippet, f"{name}: {line} missing from config.txt.snippet"


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(ProfileError) as exc:
        load_profile("pi3-nothing")
    msg = str(exc.value)
    assert "pi3-nothing" in msg
    for name in PROFILES:
        assert name in msg


def _doc(**over):
    doc = {
        "name": "t",
        "outputs": {"unlock_a": {"pin": 4, "active": "low"}, "unlock_b": {"pin": 5, "active": "low"},
                    "stop": {"pin": 6, "active": "low"}},
        "inputs": {"pass_a": {"pin": 17, "active": "high"}, "pass_b": {"pin": 27, "active": "high"}},
    }
    doc.update(over)
    return doc


def test_a_pin_used_twice_is_refused_naming_both_uses():
    doc = _doc(readers={"entry": {"d0": 17, "d1": 21}})
    with pytest.raises(ProfileError) as exc:
        parse_profile(doc, "t.toml")
    msg = str(exc.value)
    assert "readers.entry.d0" in msg and "inputs.pass_a" in msg and "BCM 17" in msg


def test_an_active_low_relay_on_a_pulled_down_pin_is_refused():
    doc = _doc()
    doc["outputs"]["stop"] = {"pin": 22, "active": "low"}
    with pytest.raises(ProfileError) as exc:
        parse_profile(doc, "t.toml")
    assert "outputs.stop" in str(exc.value) and "gpio=" in str(exc.value)


def test_a_boot_gpio_line_driving_the_inactive_level_makes_the_pin_acceptable():
    doc = _doc(boot_config=["gpio=22=op,dh"])
    doc["outputs"]["stop"] = {"pin": 22, "active": "low"}
    assert parse_profile(doc, "t.toml").outputs["stop"].pin == 22


def test_boot_drive_levels_reads_ranges_and_lists():
    assert boot_drive_levels(["gpio=4-6=op,dh", "gpio=17,27=op,dl", "dtoverlay=disable-bt"]) == {
        4: "high", 5: "high", 6: "high", 17: "low", 27: "low"}


def test_every_problem_is_reported_at_once():
    doc = _doc(colour="red")
    doc["outputs"]["unlock_a"] = {"pin": 40, "active": "low"}
    doc["inputs"]["pass_b"] = {"pin": 27, "active": "sideways"}
    del doc["outputs"]["stop"]
    with pytest.raises(ProfileError) as exc:
        parse_profile(doc, "t.toml")
    errors = exc.value.errors
    assert len(errors) >= 4
    text = "\n".join(errors)
    for where in ("colour", "outputs.unlock_a", "inputs.pass_b", "outputs.stop"):
        assert where in text


# --- outputs ----------------------------------------------------------------------------


def run_gate(fp, profile, factory, config=None, events=()):
    """Build I/O and a runtime on the profile, start, feed events, stop, close."""
    sink = SequenceSink()
    holder: list[GateRuntime] = []
    io = TurnstileIO(profile, factory=factory, submit=lambda e: holder[0].submit(e))
    gate = Gate(config or GateConfig(), fp, one_card_table(fp))
    rt = GateRuntime(gate, sink, outputs=io)
    holder.append(rt)
    rest_inputs(factory, profile)
    io.start()
    rt.start()
    for e in events:
        rt.submit(e)
    assert rt.wait_idle(5)
    rt.stop()
    io.close()
    return sink


@pytest.mark.parametrize("name", PROFILES)
def test_no_output_ever_goes_active_on_start_restart_or_shutdown(fp, factory, name):
    profile = load_profile(name)
    seed_power_on(factory, profile)
    quiet = [ev.ReaderStatus("entry", True), ev.Tamper(False), ev.ReadyLine(True)]
    for _ in range(3):  # start, restart, restart: each ends in a shutdown
        sink = run_gate(fp, profile, factory, events=quiet)
        assert sink.records[0]["type"] == "agent.started"
    assert_never_active(factory, profile)
    # Each output pin really was claimed and driven (not just left alone).
    for out in profile.output_pins().values():
        assert factory.pin(f"GPIO{out.pin}").function == "input"  # released on close


@pytest.mark.parametrize("name", PROFILES)
def test_outputs_follow_set_and_close_drives_them_inactive(factory, name):
    profile = load_profile(name)
    seed_power_on(factory, profile)
    io = TurnstileIO(profile, factory=factory, submit=Collect())
    try:
        for line in ("unlock_a", "stop"):
            io.set(line, True)
            assert io.outputs[line].is_active
            assert factory.pin(f"GPIO{profile.outputs[line].pin}").state == profile.outputs[line].active_high
    finally:
        io.close()
    for line in ("unlock_a", "stop"):
        out = profile.outputs[line]
        assert output_states(factory, out)[-1] == (not out.active_high)


def test_closing_releases_the_pins_for_a_rebuild(factory):
    profile = load_profile("pi4-relay4")
    io = TurnstileIO(profile, factory=factory, submit=Collect())
    with pytest.raises(GPIOPinInUse):
        DigitalInputDevice(profile.inputs["pass_a"].pin, pin_factory=factory)
    io.close()
    again = TurnstileIO(profile, factory=factory, submit=Collect())
    again.close()


def test_a_pin_taken_half_way_leaves_no_output_claimed_or_active(factory):
    """A device that cannot claim its pin (another program holds it) must not leave the
    relays built before it claimed, or pulse any of them."""
    profile = load_profile("pi4-relay4")
    seed_power_on(factory, profile)
    holder = DigitalInputDevice(profile.inputs["tamper"].pin, pin_factory=factory)
    try:
        with pytest.raises(GPIOPinInUse):
            TurnstileIO(profile, factory=factory, submit=Collect())
    finally:
        holder.close()
    assert_never_active(factory, profile)
    TurnstileIO(profile, factory=factory, submit=Collect()).close()  # every pin was released


def test_an_output_the_board_does_not_wire_is_ignored(factory):
    doc = _doc()
    profile = parse_profile(doc, "t.toml")  # no fire_release relay
    io = TurnstileIO(profile, factory=factory, submit=Collect())
    try:
        io.set("fire_release", True)
        assert io.counters["unwired_outputs"] == 1
        assert "fire_release" not in io.outputs
    finally:
        io.close()


# --- inputs -----------------------------------------------------------------------------


EXPECTED = {
    # input: (event when it becomes asserted, event when it returns to rest)
    "pass_a": (ev.PassSensor("A"), None),
    "pass_b": (ev.PassSensor("B"), None),
    "fire_loop": (ev.FireLoop(open=True), ev.FireLoop(open=False)),
    "fire_reset": (ev.FireReset(by="input"), None),
    "lockdown": (ev.LockdownSwitch(on=True), ev.LockdownSwitch(on=False)),
    "button_in": (ev.Button("in"), None),
    "button_out": (ev.Button("out"), None),
    "tamper": (ev.Tamper(active=True), ev.Tamper(active=False)),
}


def _check_inputs(factory, profile):
    events = Collect()
    io = TurnstileIO(profile, factory=factory, submit=events)
    try:
        rest_inputs(factory, profile)
        io.start()
        assert events == [], "inputs at rest must report nothing at start"
        for name, (on, off) in EXPECTED.items():
            if name not in profile.inputs:
                continue
            events.clear()
            drive(factory, profile, name, True)
            assert io.asserted(name)
            drive(factory, profile, name, False)
            assert events == [e for e in (on, off) if e is not None], name
        events.clear()
        drive(factory, profile, "ready", False)
        drive(factory, profile, "ready", True)
        assert events == [ev.ReadyLine(ok=False), ev.ReadyLine(ok=True)]
        assert io.input_edges["pass_a"] == 2
    finally:
        io.close()


@pytest.mark.parametrize("name", PROFILES)
def test_each_input_gives_its_event_on_the_profiles_levels(factory, name):
    _check_inputs(factory, load_profile(name))


@pytest.mark.parametrize("pull", ["up", "down", "none"])
@pytest.mark.parametrize("level", ["high", "low"])
def test_input_meaning_follows_the_stated_level_whatever_the_pull(factory, pull, level):
    doc = _doc()
    pins = dict(zip(INPUT_LINES, [17, 27, 22, 23, 24, 25, 12, 16, 26]))
    rest_is_asserted = {"ready"}
    doc["inputs"] = {
        name: {"pin": pin, "pull": pull,
               # ready's rest is asserted; flip it so each input's rest differs from the pull's idle
               "active": level if name not in rest_is_asserted else ("low" if level == "high" else "high")}
        for name, pin in pins.items()
    }
    _check_inputs(factory, parse_profile(doc, "t.toml"))


def test_every_profile_input_has_a_device_kind_that_owns_its_line(factory):
    from agent.hw import devices

    assert set(devices.INPUT_DEVICES) == set(INPUT_LINES)
    profile = load_profile("pi4-relay4")
    io = TurnstileIO(profile, factory=factory, submit=Collect())
    try:
        for name, dev in io.inputs.items():
            assert isinstance(dev, devices.TurnstileInput), name
            assert dev.spec == profile.inputs[name]
            assert dev.pin.info.name == f"GPIO{profile.inputs[name].pin}"
        assert isinstance(io.inputs["fire_loop"], devices.FireLoopContact)
        assert isinstance(io.inputs["pass_b"], devices.PassageSensor) and io.inputs["pass_b"].side == "B"
        assert all(isinstance(dev, devices.Relay) for dev in io.outputs.values())
        for reader, fb in io.readers.items():
            assert set(fb.lines) == set(io.feedback_lines[reader])
            assert all(isinstance(dev, devices.FeedbackLine) for dev in fb.lines.values())
    finally:
        io.close()
    with pytest.raises(ValueError, match="unknown input 'door'"):
        devices.input_device("door", profile.inputs["pass_a"], pin_factory=factory)


def test_a_device_reports_its_own_event_without_the_composition(factory):
    """A device alone (as io-test or a future board would use it) says its line's meaning."""
    from agent.hw.devices import FireLoopContact, GuardButton
    from agent.hw.profiles import InputPin

    loop = FireLoopContact(InputPin(pin=23, pull="up", active_high=True), pin_factory=factory)
    button = GuardButton(InputPin(pin=24, pull="up", active_high=False), direction="out", pin_factory=factory)
    got = Collect()
    try:
        factory.pin("GPIO23").drive_low()  # at rest before watching: the loop closed, the button up
        factory.pin("GPIO24").drive_high()
        loop.watch(got)
        button.watch(got)
        assert loop.event_at_start() is None and not loop.is_asserted
        factory.pin("GPIO23").drive_high()  # loop opens: active high whatever the pull
        assert loop.event_at_start() == ev.FireLoop(open=True)
        factory.pin("GPIO24").drive_low()  # pressed: active low
        factory.pin("GPIO24").drive_high()  # released: no event
        assert got == [ev.FireLoop(open=True), ev.Button("out")]
        assert (loop.edges, button.edges) == (1, 2)
    finally:
        loop.close()
        button.close()


@pytest.mark.parametrize("name", PROFILES)
def test_an_open_fire_loop_at_start_is_reported_first(factory, name):
    profile = load_profile(name)
    events = Collect()
    io = TurnstileIO(profile, factory=factory, submit=events)
    try:
        rest_inputs(factory, profile)
        drive(factory, profile, "fire_loop", True)
        drive(factory, profile, "lockdown", True)
        drive(factory, profile, "ready", False)
        io.start()
        assert events[0] == ev.FireLoop(open=True)
        assert set(events[1:]) == {ev.LockdownSwitch(on=True), ev.ReadyLine(ok=False)}
    finally:
        io.close()


def test_an_open_fire_loop_at_start_frees_the_gate_with_no_unlock_pulse(fp, factory):
    profile = load_profile("pi4-relay4")
    seed_power_on(factory, profile)
    sink = SequenceSink()
    holder: list[GateRuntime] = []
    io = TurnstileIO(profile, factory=factory, submit=lambda e: holder[0].submit(e))
    rt = GateRuntime(Gate(GateConfig(), fp, one_card_table(fp)), sink, outputs=io)
    holder.append(rt)
    rest_inputs(factory, profile)
    drive(factory, profile, "fire_loop", True)
    try:
        io.start()
        rt.start()
        assert rt.wait_idle(5)
        assert io.outputs["fire_release"].is_active
        # The roll-call follows at once, in the runtime's next call of the core.
        assert [r["type"] for r in sink.records][-3:] == ["alarm.fire", "mode.changed", "rollcall"]
    finally:
        rt.stop()
        io.close()
    for line in ("unlock_a", "unlock_b", "stop"):
        out = profile.outputs[line]
        assert out.active_high not in output_states(factory, out)


# --- feedback ---------------------------------------------------------------------------

FAST = {
    "granted": (("led", 0.02, 0.0, 1), ("beeper", 0.01, 0.0, 1)),
    "denied": (("beeper", 0.01, 0.01, 2),),
    "error": (("beeper", 0.005, 0.005, 3),),
}


def _pulses(factory, out) -> int:
    states = output_states(factory, out)
    return sum(1 for a, b in itertools.pairwise(states) if a != out.active_high and b == out.active_high)


@pytest.mark.parametrize("signal,led,beeps", [("granted", 1, 1), ("denied", 0, 2), ("error", 0, 3)])
def test_feedback_signals_blink_the_readers_led_and_beeper(factory, signal, led, beeps):
    profile = load_profile("pi4-relay4")
    seed_power_on(factory, profile)
    io = TurnstileIO(profile, factory=factory, submit=Collect(), feedback_patterns=FAST)
    try:
        io.feedback("exit", signal)
        assert io.wait_feedback(5)
        r = profile.readers["exit"]
        assert _pulses(factory, r.led) == led
        assert _pulses(factory, r.beeper) == beeps
        # Ends quiet, and the other reader saw nothing.
        assert output_states(factory, r.beeper)[-1] != r.beeper.active_high
        entry = profile.readers["entry"]
        assert _pulses(factory, entry.beeper) == 0
    finally:
        io.close()


def test_default_feedback_patterns_differ_per_signal():
    from agent.hw.turnstile_io import FEEDBACK_PATTERNS

    beeps = {s: sum(n for line, _, _, n in p if line == "beeper") for s, p in FEEDBACK_PATTERNS.items()}
    assert beeps == {"granted": 1, "denied": 2, "error": 3}
    assert any(line == "led" for line, *_ in FEEDBACK_PATTERNS["granted"])


def test_close_stops_a_running_feedback_blink(factory):
    profile = load_profile("pi4-relay4")
    slow = {"granted": (("led", 30.0, 0.0, 1),)}
    io = TurnstileIO(profile, factory=factory, submit=Collect(), feedback_patterns=slow)
    io.feedback("entry", "granted")
    done = threading.Event()
    closer = threading.Thread(target=lambda: (io.close(), done.set()))
    closer.start()
    assert done.wait(5), "close() waited for a 30 s blink"
    led = profile.readers["entry"].led
    assert output_states(factory, led)[-1] != led.active_high


def test_a_burst_of_feedback_never_builds_a_backlog_and_close_leaves_no_blink_behind(factory, monkeypatch):
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    profile = load_profile("pi4-relay4")
    io = TurnstileIO(profile, factory=factory, submit=Collect(), feedback_patterns=FAST)
    for i in range(2000):
        io.feedback("entry" if i % 2 else "exit", ("granted", "denied", "error")[i % 3])
    io.close()
    assert io.counters["feedback"] == 2000
    assert failures == []  # no blink ran on a closed line
    for reader in ("entry", "exit"):
        for out in (profile.readers[reader].led, profile.readers[reader].beeper):
            assert output_states(factory, out)[-1] != out.active_high
