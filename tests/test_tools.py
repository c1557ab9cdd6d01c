"""Bench tools: enroll (pty serial reader, mock Wiegand pins) and io-test (mock pins).

Wiegand edges are fed through the adapter's feed_edges with explicit
timestamps (gpiozero's mock pins alone make 1 to 4 us pulses, docs/design.md#testing-wiegand-on-mock-pins).
Output histories come from the mock pins' recorded states.
"""

from __future__ import annotations

import argparse
import io
import json
import os

import pytest
import serial
from gpiozero import DigitalInputDevice, DigitalOutputDevice
from gpiozero.pins.mock import MockFactory

from agent.core.cards import encode_w26
from agent.hw.profiles import load_profile
from agent.tools import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_USAGE, is_busy_error
from agent.tools.enroll import SerialSource, WiegandSource, add_enroll_parser, run_enroll
from agent.tools.iotest import add_iotest_parser, run_iotest

EXAMPLE_FRAME = b"\x0214008EC793CE\x03"  # docs/readers.md: "142,51091", printed "0009357203"
STOP_HINT = "sudo systemctl stop gate-agent"


def pulse_train(
    bits: str, t0: float, pulse: float = 50e-6, gap: float = 2e-3
) -> list[tuple[float, int, int]]:
    """Edges (t, line, level) of a Wiegand frame: a low pulse on D0 for 0, on D1 for 1."""
    edges = []
    t = t0
    for b in bits:
        line = 1 if b == "1" else 0
        edges += [(t, line, 0), (t + pulse, line, 1)]
        t += gap
    return edges


class Clock:
    """The Wiegand silence timer's clock, held still while a frame is fed (so the
    timer never sees a half-fed frame as stuck or ended) and then moved on."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def feed_when_ready(frame: bytes, master: int):
    def on_ready(reader) -> None:
        assert reader.wait_online(5.0), "the reader did not open the pty"
        os.write(master, frame)

    return on_ready


# --- enroll -------------------------------------------------------------------------------


def test_enroll_over_a_serial_rdm6300_prints_every_form_of_the_card(pty_pair):
    master, path = pty_pair
    out, err = io.StringIO(), io.StringIO()
    code = run_enroll(
        SerialSource(path),
        out=out,
        err=err,
        count=1,
        timeout=10,
        on_ready=feed_when_ready(EXAMPLE_FRAME, master),
    )
    assert code == EXIT_OK, err.getvalue()
    card_lines = [line for line in out.getvalue().splitlines() if line.startswith("card")]
    assert len(card_lines) == 1
    line = card_lines[0]
    for form in ("142,51091", "0009357203", "key 9357203", "rdm6300", path):
        assert form in line, f"{form!r} missing from {line!r}"


def test_enroll_json_gives_one_object_per_read_with_the_forms(pty_pair):
    master, path = pty_pair
    out = io.StringIO()
    bad = EXAMPLE_FRAME[:11] + b"00" + EXAMPLE_FRAME[13:]  # wrong checksum: shown, not counted
    code = run_enroll(
        SerialSource(path),
        out=out,
        count=1,
        timeout=10,
        json_output=True,
        on_ready=feed_when_ready(bad + EXAMPLE_FRAME, master),
    )
    assert code == EXIT_OK
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    card = next(o for o in objs if o["type"] == "card")
    assert (card["facility_card"], card["em_print"], card["key"]) == (
        "142,51091",
        "0009357203",
        9357203,
    )
    assert card["format"] == "rdm6300"
    assert [o["kind"] for o in objs if o["type"] == "error"] == ["checksum"]


def test_enroll_over_mock_wiegand_pins_prints_the_w26_card():
    factory = MockFactory()
    out = io.StringIO()
    clock = Clock()

    def feed(reader) -> None:
        edges = pulse_train(encode_w26(100, 60179), clock.t)
        reader.feed_edges(edges)
        clock.t = edges[-1][0] + 1.0  # then silence: the timer ends the frame

    code = run_enroll(
        WiegandSource(20, 21, factory, clock=clock), out=out, count=1, timeout=10, on_ready=feed
    )
    assert code == EXIT_OK
    line = next(x for x in out.getvalue().splitlines() if x.startswith("card"))
    for form in ("100,60179", "0006613779", "w26", "GPIO20"):
        assert form in line, f"{form!r} missing from {line!r}"
    # The tool released the pins: the service (or a second run) can claim them.
    DigitalInputDevice(20, pin_factory=factory).close()


def test_enroll_fixed_format_reader_and_json_over_wiegand():
    factory = MockFactory()
    out = io.StringIO()

    clock = Clock()

    def feed(reader) -> None:
        # A fixed-format reader: the frame is complete at its 26th bit, no silence needed.
        reader.feed_edges(pulse_train(encode_w26(142, 51091), clock.t))

    code = run_enroll(
        WiegandSource(20, 21, factory, fixed_bits=26, clock=clock),
        out=out,
        count=1,
        timeout=10,
        json_output=True,
        on_ready=feed,
    )
    assert code == EXIT_OK
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert objs[0]["type"] == "card" and objs[0]["em_print"] == "0009357203"


def test_enroll_says_to_stop_the_service_when_the_serial_port_is_held(pty_pair):
    _master, path = pty_pair
    held = serial.Serial(path, 9600, timeout=0, exclusive=True)  # as the running service holds it
    try:
        err = io.StringIO()
        code = run_enroll(SerialSource(path), out=io.StringIO(), err=err, count=1, timeout=2)
    finally:
        held.close()
    assert code == EXIT_BUSY
    assert STOP_HINT in err.getvalue() and path in err.getvalue()


def test_enroll_says_to_stop_the_service_when_the_wiegand_pins_are_held():
    factory = MockFactory()
    held = DigitalInputDevice(21, pin_factory=factory)
    err = io.StringIO()
    code = run_enroll(
        WiegandSource(20, 21, factory), out=io.StringIO(), err=err, count=1, timeout=2
    )
    held.close()
    assert code == EXIT_BUSY
    assert STOP_HINT in err.getvalue()


def test_enroll_missing_port_is_bad_input_with_what_to_check(tmp_path):
    err = io.StringIO()
    code = run_enroll(
        SerialSource(str(tmp_path / "no-such-tty")), out=io.StringIO(), err=err, timeout=1
    )
    assert code == EXIT_USAGE
    assert "no serial port" in err.getvalue()


def test_enroll_fewer_cards_than_asked_before_the_timeout_fails(pty_pair):
    master, path = pty_pair
    err = io.StringIO()
    code = run_enroll(
        SerialSource(path),
        out=io.StringIO(),
        err=err,
        count=2,
        timeout=1.0,
        on_ready=feed_when_ready(EXAMPLE_FRAME, master),
    )
    assert code == EXIT_FAILED
    assert "1 of 2" in err.getvalue()


# --- io-test ------------------------------------------------------------------------------


def seed_power_on(factory: MockFactory, profile) -> None:
    """Mock output pins start at the Pi's power-on pulls (BCM 0-8 up, 9-27 down)."""
    for out in profile.output_pins().values():
        pin = factory.pin(f"GPIO{out.pin}")
        pin.pull = "up" if out.pin <= 8 else "down"
        pin.clear_states()


def levels(factory: MockFactory, pin: int) -> list[bool]:
    """The pin's level history with repeats folded."""
    out: list[bool] = []
    for s in factory.pin(f"GPIO{pin}").states:
        if not out or out[-1] != bool(s.state):
            out.append(bool(s.state))
    return out


@pytest.mark.parametrize("name", ["pi4-relay4", "pi-opto"])
def test_iotest_pulse_drives_the_relay_active_then_inactive_and_nothing_else(name):
    profile = load_profile(name)
    factory = MockFactory()
    seed_power_on(factory, profile)
    out = io.StringIO()
    code = run_iotest(profile, factory=factory, commands=["pulse unlock_a 0.2"], out=out)
    assert code == EXIT_OK
    spec = profile.outputs["unlock_a"]
    active, inactive = spec.active_high, not spec.active_high
    assert levels(factory, spec.pin) == [inactive, active, inactive]
    for line, other in profile.output_pins().items():
        if line != "unlock_a":
            assert other.active_high not in levels(factory, other.pin), f"{line} went active"
    assert "unlock_a" in out.getvalue()


def test_iotest_prints_input_changes_live():
    profile = load_profile("pi4-relay4")
    factory = MockFactory()
    pass_a = profile.inputs["pass_a"]
    fire = profile.inputs["fire_loop"]

    def drive(spec, asserted: bool) -> None:
        pin = factory.pin(f"GPIO{spec.pin}")
        pin.drive_high() if spec.active_high == asserted else pin.drive_low()

    def script():
        drive(pass_a, False)
        drive(fire, False)
        yield "wait 0.01"
        mark.append(len(out.getvalue()))
        drive(pass_a, True)  # the arm turns
        drive(pass_a, False)
        drive(fire, True)  # the fire panel opens the loop
        yield "wait 0.01"

    mark: list[int] = []
    out = io.StringIO()
    assert run_iotest(profile, factory=factory, commands=script(), out=out) == EXIT_OK
    live = [x for x in out.getvalue()[mark[0] :].splitlines() if x.startswith("input")]
    assert len(live) == 3, live
    assert "pass_a" in live[0] and "ASSERTED" in live[0] and f"GPIO{pass_a.pin}" in live[0]
    assert "pass_a" in live[1] and "rest" in live[1]
    assert "fire_loop" in live[2] and "ASSERTED" in live[2] and "fire-alarm loop is open" in live[2]


def test_iotest_ends_with_every_output_inactive_even_when_interrupted():
    profile = load_profile("pi4-relay4")
    factory = MockFactory()
    seed_power_on(factory, profile)

    def script():
        yield "on stop"
        yield "on unlock_b"
        raise KeyboardInterrupt  # Ctrl+C while lines are held

    assert run_iotest(profile, factory=factory, commands=script(), out=io.StringIO()) == EXIT_OK
    for line in ("stop", "unlock_b"):
        spec = profile.outputs[line]
        assert levels(factory, spec.pin) == [
            not spec.active_high,
            spec.active_high,
            not spec.active_high,
        ]


def test_iotest_bad_commands_are_explained_and_fail_a_script():
    profile = load_profile("pi4-relay4")
    factory = MockFactory()
    out = io.StringIO()
    code = run_iotest(
        profile,
        factory=factory,
        commands=["pulse unlock_q", "pulse unlock_a 0.01", "jump"],
        out=out,
    )
    assert code == EXIT_FAILED
    text = out.getvalue()
    assert "no output 'unlock_q'" in text and "unlock_a" in text
    assert "at least 0.1 s" in text
    assert "unknown command" in text
    assert (
        levels(factory, profile.outputs["unlock_a"].pin)[-1]
        != profile.outputs["unlock_a"].active_high
    )


def test_iotest_reader_feedback_lines_can_be_pulsed():
    profile = load_profile("pi4-relay4")
    factory = MockFactory()
    seed_power_on(factory, profile)
    assert (
        run_iotest(profile, factory=factory, commands=["pulse entry.beeper 0.1"], out=io.StringIO())
        == EXIT_OK
    )
    spec = profile.readers["entry"].beeper
    assert levels(factory, spec.pin) == [
        not spec.active_high,
        spec.active_high,
        not spec.active_high,
    ]


def test_iotest_a_pin_in_use_gives_the_plain_message_and_a_nonzero_exit():
    profile = load_profile("pi4-relay4")
    factory = MockFactory()
    held = DigitalOutputDevice(
        profile.outputs["unlock_a"].pin, active_high=False, initial_value=False, pin_factory=factory
    )
    err = io.StringIO()
    code = run_iotest(
        profile, factory=factory, commands=["pulse unlock_a"], out=io.StringIO(), err=err
    )
    held.close()
    assert code == EXIT_BUSY
    assert STOP_HINT in err.getvalue()
    # Nothing was left claimed: the tool runs once the pin is free.
    assert run_iotest(profile, factory=factory, commands=["show"], out=io.StringIO()) == EXIT_OK


def test_iotest_reads_commands_from_input_until_quit():
    profile = load_profile("pi4-relay4")
    factory = MockFactory()
    out = io.StringIO()
    stdin = io.StringIO("help\nshow\nquit\npulse unlock_a\n")
    assert run_iotest(profile, factory=factory, out=out, input_stream=stdin) == EXIT_OK
    assert "pulse LINE" in out.getvalue()
    assert (
        len(factory.pin(f"GPIO{profile.outputs['unlock_a'].pin}").states) <= 2
    )  # never pulsed after quit


def test_lgpio_busy_counts_as_busy():
    class error(Exception):  # lgpio's exception class is lgpio.error
        pass

    assert is_busy_error(error("'GPIO busy'"))
    assert not is_busy_error(ValueError("pin 99 does not exist"))


# --- command line -----------------------------------------------------------------------------


def test_subcommands_parse_and_point_at_their_functions():
    parser = argparse.ArgumentParser(prog="gate-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_enroll_parser(sub)
    add_iotest_parser(sub)
    args = parser.parse_args(
        ["enroll", "--serial", "/dev/gate-reader", "--protocol", "emline", "--json", "--count", "3"]
    )
    assert (args.serial, args.protocol, args.json, args.count) == (
        "/dev/gate-reader",
        "emline",
        True,
        3,
    )
    assert callable(args.func)
    args = parser.parse_args(
        ["io-test", "--profile", "pi-opto", "-c", "pulse unlock_b 0.5", "-c", "show"]
    )
    assert args.commands == ["pulse unlock_b 0.5", "show"] and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["enroll", "--serial", "/dev/x", "--wiegand", "20,21"])


def test_enroll_command_line_for_a_profile_reader_on_mock_pins(capsys):
    parser = argparse.ArgumentParser(prog="gate-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_enroll_parser(sub)
    args = parser.parse_args(
        [
            "enroll",
            "--reader",
            "entry",
            "--profile",
            "pi4-relay4",
            "--pin-factory",
            "mock",
            "--count",
            "1",
            "--timeout",
            "0.2",
        ]
    )
    assert args.func(args) == EXIT_FAILED  # nobody presented a card
    captured = capsys.readouterr()
    pins = load_profile("pi4-relay4").readers["entry"]
    assert f"entry: wiegand on D0=GPIO{pins.d0} D1=GPIO{pins.d1}" in captured.out
    assert "0 of 1" in captured.err
    args = parser.parse_args(
        ["enroll", "--reader", "nowhere", "--profile", "pi4-relay4", "--pin-factory", "mock"]
    )
    assert args.func(args) == EXIT_USAGE
    assert "not wired" in capsys.readouterr().err


def test_iotest_command_line_with_the_mock_factory(capsys):
    parser = argparse.ArgumentParser(prog="gate-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_iotest_parser(sub)
    args = parser.parse_args(
        ["io-test", "--profile", "pi4-relay4", "--pin-factory", "mock", "-c", "show"]
    )
    assert args.func(args) == EXIT_OK
    assert "unlock_a" in capsys.readouterr().out
