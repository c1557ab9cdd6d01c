"""Wiegand readers on GPIO: the adapter with explicit edge timestamps, and
through gpiozero's mock pins.

Realistic pulse trains (20 to 100 us pulses, 0.2 to 20 ms gaps) are fed with
explicit timestamps (feed_edges). The mock pins stamp edges with the real
monotonic clock and call back at once, so back-to-back drives make 1 to 4 us
pulses: only the mock-pin tests lower the glitch threshold (DESIGN.md).
"""
from __future__ import annotations

import random
import time
from array import array

import pytest
from gpiozero import DigitalInputDevice
from gpiozero.exc import GPIOPinInUse
from gpiozero.pins.mock import MockFactory

from agent.core import events as ev
from agent.core.cards import encode_keypad, encode_w26, encode_w34, parse_card_string
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.hw.profiles import load_profile
from agent.hw.turnstile_io import TurnstileIO
from agent.hw.wiegand_gpio import WiegandReader, readers_from_profile
from agent.runtime import GateRuntime
from fastpath import codes
from fastpath.columns import TableColumns
from tests.submitted import Events

CARD = "100,60179"
KEY = parse_card_string(CARD)


def pulse_train(bits: str, t0: float, rng: random.Random, pulse=(20e-6, 100e-6), gap=(0.2e-3, 20e-3)):
    """Edges (t, line, level) of a frame: a low pulse on D0 for 0, on D1 for 1."""
    edges = []
    t = t0
    for i, b in enumerate(bits):
        if i:
            t += rng.uniform(*gap)
        line = int(b)
        edges.append((t, line, 0))
        edges.append((t + rng.uniform(*pulse), line, 1))
    return edges


@pytest.fixture
def readers():
    made: list[WiegandReader] = []

    def make(name="entry", d0=None, d1=None, **kw):
        r = WiegandReader(name, d0, d1, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


# --- explicit timestamps ------------------------------------------------------------------


def test_fixed_format_frame_is_complete_at_its_last_bit(readers):
    got = Events()
    r = readers(submit=got, timer=False, decoder_kwargs={"fixed_bits": 26})
    edges = pulse_train(encode_w26(100, 60179), 10.0, random.Random(1))
    r.feed_edges(edges[:-1])
    assert got.items == []  # the last bit's pulse has not ended yet
    r.feed_edges(edges[-1:])
    assert got.items == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=encode_w26(100, 60179))]
    assert r.counters["frames"] == 1 and r.counters["cards"] == 1


def test_frame_ends_by_silence_when_the_format_is_not_fixed(readers):
    got = Events()
    r = readers(submit=got, timer=False, decoder_kwargs={"silence_s": 0.025})
    edges = pulse_train(encode_w34(1, 2), 50.0, random.Random(2))
    r.feed_edges(edges)
    last = edges[-1][0]
    r.poll(last + 0.020)
    assert got.items == []  # not silent long enough yet
    r.poll(last + 0.026)
    assert [type(e) for e in got.items] == [ev.CardRead]
    assert got.items[0].format == "w34"
    assert got.items[0].key == parse_card_string("hex:00010002", 32) & 0xFFFFFF


def test_the_timer_thread_ends_a_silent_frame_on_its_own(readers):
    got = Events()
    r = readers(submit=got, decoder_kwargs={"silence_s": 0.025})
    # Stamped in the recent past, as a kernel edge time would be.
    t0 = time.monotonic() - 0.1
    bits = encode_w26(100, 60179)
    edges = pulse_train(bits, t0, random.Random(3), gap=(0.2e-3, 2e-3))
    assert edges[-1][0] < time.monotonic()
    r.feed_edges(edges)
    assert got.wait_for(1) == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=bits)]


def test_a_frame_fed_now_waits_for_its_silence_then_completes(readers):
    got = Events()
    r = readers(submit=got, decoder_kwargs={"silence_s": 0.03})
    bits = encode_w26(7, 77)
    now = time.monotonic()
    edges = pulse_train(bits, now - 0.01, random.Random(4), gap=(0.2e-3, 0.3e-3))
    r.feed_edges(edges)
    assert got.wait_for(1)[0].key == (7 << 16) | 77


def test_parity_error_is_a_reader_error_and_counted(readers):
    got = Events()
    r = readers(submit=got, timer=False, decoder_kwargs={"fixed_bits": 26})
    bits = encode_w26(100, 60179)
    flipped = bits[:5] + ("1" if bits[5] == "0" else "0") + bits[6:]
    r.feed_edges(pulse_train(flipped, 1.0, random.Random(5)))
    assert len(got.items) == 1
    err = got.items[0]
    assert isinstance(err, ev.ReaderError) and err.kind == "parity" and err.reader == "entry"
    assert r.counters["parity_errors"] == 1 and r.counters["errors"] == 1


def test_noise_pulses_are_dropped_and_the_card_still_reads(readers):
    got = Events()
    r = readers(submit=got, timer=False, decoder_kwargs={"fixed_bits": 26, "glitch_s": 10e-6})
    rng = random.Random(6)
    edges = pulse_train(encode_w26(100, 60179), 1.0, rng, gap=(1e-3, 2e-3))
    noisy = []
    for i, e in enumerate(edges):
        noisy.append(e)
        if i % 2 == 1 and i < len(edges) - 1:  # after a bit ends, a 2 us spike on a random line
            t = e[0] + 300e-6
            line = rng.randint(0, 1)
            noisy += [(t, line, 0), (t + 2e-6, line, 1)]
    r.feed_edges(noisy)
    assert next(e for e in got.items if isinstance(e, ev.CardRead)).key == KEY
    assert r.counters["glitches"] == 25


def test_a_missing_bit_gives_a_length_error_after_silence(readers):
    got = Events()
    r = readers(submit=got, timer=False, decoder_kwargs={"fixed_bits": 26})
    edges = pulse_train(encode_w26(100, 60179)[:-1], 1.0, random.Random(7))
    r.feed_edges(edges)
    assert got.items == []  # a fixed-format reader still waits for the 26th bit
    r.poll(edges[-1][0] + 1.0)
    assert len(got.items) == 1 and got.items[0].kind == "length"
    assert r.counters["length_errors"] == 1


def test_a_keypad_burst_is_a_keypad_event(readers):
    got = Events()
    r = readers(submit=got, timer=False)
    edges = pulse_train(encode_keypad("7", 8), 3.0, random.Random(8))
    r.feed_edges(edges)
    r.poll(edges[-1][0] + 0.1)
    assert got.items == [ev.Keypad(reader="entry", keys="7")]
    assert r.counters["keypad"] == 1


def test_a_stuck_line_is_reported_once(readers):
    got = Events()
    r = readers(submit=got, timer=False)
    r.feed_edges([(1.0, 0, 0)])
    r.poll(2.0)
    r.poll(3.0)
    assert len(got.items) == 1
    assert got.items[0].kind == "glitch" and "stuck" in got.items[0].detail
    assert r.counters["stuck"] == 1


def test_the_timer_reports_a_line_stuck_low_with_no_further_edge(readers):
    got = Events()
    r = readers(submit=got)
    r.feed_edges([(time.monotonic() - 0.1, 1, 0)])  # D1 fell and never rose: a shorted line or a dead reader
    err = got.wait_for(1)[0]
    assert isinstance(err, ev.ReaderError) and err.kind == "glitch" and "D1" in err.detail


def test_two_readers_interleaved_each_read_their_own_card(readers):
    got = Events()
    entry = readers("entry", submit=got, timer=False, decoder_kwargs={"fixed_bits": 26})
    exit_ = readers("exit", submit=got, timer=False, decoder_kwargs={"fixed_bits": 26})
    rng = random.Random(9)
    a = [(t, line, lvl, entry) for t, line, lvl in pulse_train(encode_w26(100, 60179), 1.0, rng)]
    b = [(t, line, lvl, exit_) for t, line, lvl in pulse_train(encode_w26(5, 555), 1.0005, rng)]
    for t, line, lvl, reader in sorted(a + b, key=lambda e: e[0]):
        reader.feed_edges([(t, line, lvl)])
    assert sorted((e.reader, e.key) for e in got.items) == [("entry", KEY), ("exit", (5 << 16) | 555)]


# --- mock pins ------------------------------------------------------------------------------


def drive_bits(factory, d0: int, d1: int, bits: str) -> None:
    pins = (factory.pin(f"GPIO{d0}"), factory.pin(f"GPIO{d1}"))
    for b in bits:
        pin = pins[int(b)]
        pin.drive_low()
        pin.drive_high()


# The mock pins make microsecond pulses: drop the glitch threshold for them.
MOCK = {"glitch_s": 0.0}


def test_mock_pins_fixed_format_reads_at_the_last_bit(readers, factory):
    got = Events()
    r = readers("entry", 20, 21, factory=factory, submit=got, decoder_kwargs={**MOCK, "fixed_bits": 26})
    drive_bits(factory, 20, 21, encode_w26(100, 60179))
    assert got.items == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=encode_w26(100, 60179))]
    assert r.counters["edges"] == 52


def test_mock_pins_frame_ends_by_silence(readers, factory):
    got = Events()
    readers("entry", 20, 21, factory=factory, submit=got, decoder_kwargs={**MOCK, "silence_s": 0.02})
    drive_bits(factory, 20, 21, encode_w26(100, 60179))
    assert got.wait_for(1) == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=encode_w26(100, 60179))]


def test_mock_pins_both_readers_at_once(readers, factory):
    got = Events()
    readers("entry", 20, 21, factory=factory, submit=got, decoder_kwargs={**MOCK, "silence_s": 0.02})
    readers("exit", 13, 19, factory=factory, submit=got, decoder_kwargs={**MOCK, "silence_s": 0.02})
    a, b = encode_w26(100, 60179), encode_w26(5, 555)
    e0, e1 = (factory.pin("GPIO20"), factory.pin("GPIO21")), (factory.pin("GPIO13"), factory.pin("GPIO19"))
    for x, y in zip(a, b):
        for pins, bit in ((e0, x), (e1, y)):
            pins[int(bit)].drive_low()
            pins[int(bit)].drive_high()
    items = got.wait_for(2)
    assert sorted((e.reader, e.key) for e in items) == [("entry", KEY), ("exit", (5 << 16) | 555)]


def test_reader_pins_are_reserved_until_closed(factory):
    r = WiegandReader("entry", 20, 21, factory=factory, submit=Events(), timer=False)
    with pytest.raises(GPIOPinInUse):
        DigitalInputDevice(20, pin_factory=factory)
    r.close()
    DigitalInputDevice(20, pin_factory=factory).close()


def test_reader_needs_both_pins():
    with pytest.raises(ValueError, match="d0_pin and d1_pin"):
        WiegandReader("entry", 20, None, factory=MockFactory(), submit=Events(), timer=False)


def test_a_failing_submit_does_not_break_the_reader(readers):
    calls = []

    def submit(event):
        calls.append(event)
        raise RuntimeError("queue gone")

    r = readers(submit=submit, timer=False, decoder_kwargs={"fixed_bits": 26})
    for t0 in (1.0, 2.0):
        r.feed_edges(pulse_train(encode_w26(100, 60179), t0, random.Random(10)))
    assert len(calls) == 2


# --- through the gate thread ----------------------------------------------------------------


def one_card_table(fp):
    everywhere = b"\xff" * codes.BITMAP_BYTES
    return fp.Table(TableColumns(
        version="v1", card_keys=array("Q", [KEY]), card_person=array("i", [0]),
        card_flags=array("B", [0]), person_ids=["p-1"], person_from=array("q", [codes.NO_START]),
        person_until=array("q", [codes.NO_END]), person_groupset=array("i", [0]),
        person_flags=array("B", [0]), person_max_uses=array("i", [0]),
        gs_entry=[everywhere], gs_entry_holiday=[everywhere], gs_exit=[everywhere],
    ))


def test_a_pulse_train_on_the_entry_readers_mock_pins_opens_unlock_a_and_pass_a_completes_it(fp, factory):
    profile = load_profile("pi4-relay4")
    sink = SequenceSink()
    holder: list[GateRuntime] = []

    def submit(e):
        holder[0].submit(e)

    io = TurnstileIO(profile, factory=factory, submit=submit)
    pins = profile.readers["entry"]
    reader = WiegandReader("entry", pins.d0, pins.d1, factory=factory, submit=submit,
                           decoder_kwargs={**MOCK, "fixed_bits": 26})
    cfg = GateConfig(pulse_s=0.1, wait_s=5.0)
    rt = GateRuntime(Gate(cfg, fp, one_card_table(fp)), sink, outputs=io)
    holder.append(rt)
    # At rest: PASS contacts, Ready, the fire loop and the lid switch are closed
    # (low, to GND); the buttons and key switches are open (pulled up).
    for name in ("pass_a", "pass_b", "ready", "fire_loop", "tamper"):
        factory.pin(f"GPIO{profile.inputs[name].pin}").drive_low()
    pass_a = factory.pin(f"GPIO{profile.inputs['pass_a'].pin}")
    try:
        io.start()
        rt.start()
        unlock = factory.pin(f"GPIO{profile.outputs['unlock_a'].pin}")
        unlock.clear_states()
        drive_bits(factory, pins.d0, pins.d1, encode_w26(100, 60179))
        assert rt.wait_idle(5)
        assert io.outputs["unlock_a"].is_active
        pass_a.drive_high()  # the arm turns
        pass_a.drive_low()
        assert rt.wait_idle(5)
        types = [r["type"] for r in sink.records]
        assert types[-2:] == ["access.granted", "passage"]
        passage = sink.records[-1]
        assert passage["source"] == "card" and passage["person"] == "p-1" and passage["card"] == KEY
        # unlock_a went active once, and dropped again at the end of its pulse.
        deadline = time.monotonic() + 5
        while io.outputs["unlock_a"].is_active and time.monotonic() < deadline:
            time.sleep(0.01)
        active_level = profile.outputs["unlock_a"].active_high
        assert [s.state for s in unlock.states] == [not active_level, active_level, not active_level]
    finally:
        rt.stop()
        reader.close()
        io.close()


def test_readers_from_profile_open_each_wired_reader_on_its_pins(factory):
    profile = load_profile("pi-opto")
    got = Events()
    readers = readers_from_profile(profile, factory=factory, submit=got,
                                   decoder_kwargs={name: {**MOCK, "fixed_bits": 26} for name in profile.readers})
    try:
        assert set(readers) == {"entry", "exit"}
        pins = profile.readers["exit"]
        drive_bits(factory, pins.d0, pins.d1, encode_w26(100, 60179))
        assert got.items == [ev.CardRead(reader="exit", key=KEY, format="w26", raw=encode_w26(100, 60179))]
    finally:
        for r in readers.values():
            r.close()


def test_readers_from_profile_names_a_reader_the_board_does_not_wire(factory):
    with pytest.raises(ValueError, match="lobby.*pi4-relay4"):
        readers_from_profile(load_profile("pi4-relay4"), factory=factory, submit=Events(), names=["lobby"])
