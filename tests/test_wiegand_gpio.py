"""Wiegand readers on GPIO: the adapter with explicit edge timestamps, and
through gpiozero's mock pins.

Realistic pulse trains (20 to 100 us pulses, 0.2 to 20 ms gaps) are fed with
explicit timestamps (feed_edges). The mock pins stamp edges with the real
monotonic clock and call back at once, so back-to-back drives make 1 to 4 us
pulses: only the mock-pin tests lower the glitch threshold (docs/design.md#testing-wiegand-on-mock-pins).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from array import array

import pytest
from gpiozero import DigitalInputDevice
from gpiozero.exc import GPIOPinInUse
from gpiozero.pins.mock import MockFactory

from agent.core import events as ev
from agent.core.cards import (
    decode_wiegand,
    encode_keypad,
    encode_w26,
    encode_w34,
    encode_w37,
    parse_card_string,
)
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.hw.profiles import load_profile
from agent.hw.turnstile_io import TurnstileIO
from agent.hw.wiegand_gpio import WiegandReader, readers_from_profile
from agent.runtime import GateRuntime
from agent.simhw import WirePin
from fastpath import codes
from fastpath.columns import TableColumns
from tests.submitted import Events
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

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
    r = readers(submit=got, timer=False, decoder_kwargs={"silence_s": 0.025}, max_lag_s=0.1)
    edges = pulse_train(encode_w34(1, 2), 50.0, random.Random(2))
    r.feed_edges(edges)
    last = edges[-1][0]
    r.poll(last + 0.124)
    assert got.items == []  # silent long enough, but an edge of the frame could still be on its way
    r.poll(last + 0.126)
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
    r.poll(edges[-1][0] + 1.0)
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


# --- callbacks that come late ---------------------------------------------------------------
#
# On a Pi, lgpio stamps each edge in the kernel and one notification thread
# calls the callbacks back in order, late when the GIL or the CPU is busy.
# These tests deliver edges that way: in order, each some time after its
# stamp, while the silence timer fires whenever it likes.


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def late_arrivals(edges, rng: random.Random, max_delay: float) -> list[float]:
    """When each edge's callback comes: up to max_delay after its stamp, never before the one before."""
    out, last = [], float("-inf")
    for t, _line, _level in edges:
        last = max(last, t + rng.uniform(0, max_delay))
        out.append(last)
    return out


def run_late(reader, clock: FakeClock, edges, arrivals, *, poll_every: float = 0.001, tail: float = 1.0) -> None:
    """Deliver edges at their arrival times and poll the reader every poll_every in between, as a
    timer that may fire at any moment would (virtual time: the reader is built with timer=False)."""
    i = 0
    now = min(e[0] for e in edges)
    end = arrivals[-1] + tail
    while now < end:
        while i < len(edges) and arrivals[i] <= now:
            clock.t = arrivals[i]
            reader.feed_edges([edges[i]])
            i += 1
        clock.t = now
        reader.poll()
        now += poll_every


def frames_of(rng: random.Random, n: int) -> list[str]:
    makers = [lambda: encode_w26(rng.randrange(256), rng.randrange(65536)),
              lambda: encode_w34(rng.randrange(65536), rng.randrange(65536)),
              lambda: encode_w37(rng.randrange(65536), rng.randrange(1 << 19)),
              lambda: encode_keypad(str(rng.randrange(10)), 8)]
    return [makers[i % len(makers)]() for i in range(n)]


def expected(frames: list[str], reader: str = "entry") -> list:
    return [decode_wiegand(bits, 24).as_event(reader) for bits in frames]


def schedule(frames: list[str], t0: float, rng: random.Random, *, gap=(0.2e-3, 20e-3), pause=(0.05, 0.4),
             back_to_back: float | None = 0.027) -> list[tuple[float, int, int]]:
    """The frames' edges on the wire; every third frame follows the one before after just over
    the 25 ms silence (back_to_back), the others after a pause."""
    edges: list[tuple[float, int, int]] = []
    t = t0
    for i, bits in enumerate(frames):
        train = pulse_train(bits, t, rng, gap=gap)
        edges += train
        t = train[-1][0] + (back_to_back if back_to_back and i % 3 == 0 else rng.uniform(*pause))
    return edges


def test_callbacks_up_to_50_ms_late_lose_no_frame_whenever_the_timer_fires(readers):
    got = Events()
    clock = FakeClock()
    r = readers(submit=got, timer=False, clock=clock)  # the shipped silence (25 ms) and lag bound
    rng = random.Random(21)
    frames = frames_of(rng, 24)
    edges = schedule(frames, 100.0, rng)
    run_late(r, clock, edges, late_arrivals(edges, rng, 0.050))
    assert got.items == expected(frames)
    assert r.counters["length_errors"] == 0 and r.counters["late_edges"] == 0


def test_a_pulse_whose_rising_edge_comes_50_ms_late_is_a_bit_not_a_stuck_line(readers):
    got = Events()
    clock = FakeClock()
    r = readers(submit=got, timer=False, clock=clock, decoder_kwargs={"fixed_bits": 26})
    bits = encode_w26(100, 60179)
    edges = pulse_train(bits, 10.0, random.Random(22), gap=(1e-3, 2e-3))
    # Each rising edge 50 ms after its stamp (and so everything after it), the 5 ms stuck limit ten times over.
    arrivals, last = [], float("-inf")
    for t, _line, level in edges:
        last = max(last, t + (0.050 if level else 0.0))
        arrivals.append(last)
    run_late(r, clock, edges, arrivals)
    assert got.items == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=bits)]
    assert r.counters["stuck"] == 0


def test_noise_still_gives_glitches_and_the_card_reads_with_late_callbacks(readers):
    got = Events()
    clock = FakeClock()
    r = readers(submit=got, timer=False, clock=clock)
    rng = random.Random(23)
    bits = encode_w26(100, 60179)
    edges = pulse_train(bits, 5.0, rng, gap=(1e-3, 2e-3))
    noisy = []
    for i, e in enumerate(edges):
        noisy.append(e)
        if i % 2 == 1 and i < len(edges) - 1:  # a 2 us spike after each bit
            line = rng.randint(0, 1)
            noisy += [(e[0] + 300e-6, line, 0), (e[0] + 302e-6, line, 1)]
    run_late(r, clock, noisy, late_arrivals(noisy, rng, 0.050))
    assert got.items == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=bits)]
    assert r.counters["glitches"] == 25


def test_a_stuck_line_is_reported_once_the_lag_bound_has_passed(readers):
    got = Events()
    clock = FakeClock(1.0)
    r = readers(submit=got, timer=False, clock=clock, max_lag_s=0.1)
    r.feed_edges([(1.0, 1, 0)])  # D1 falls and never rises
    clock.t = 1.0 + 0.005 + 0.099
    r.poll()
    assert got.items == []  # its rising edge could still be on its way
    clock.t = 1.0 + 0.005 + 0.101
    r.poll()
    assert len(got.items) == 1 and got.items[0].kind == "glitch" and "D1" in got.items[0].detail


def test_an_edge_later_than_the_lag_bound_cuts_the_frame_into_reader_errors_and_says_so(readers, caplog):
    got = Events()
    clock = FakeClock()
    r = readers(submit=got, timer=False, clock=clock, max_lag_s=0.1, decoder_kwargs={"fixed_bits": 26})
    bits = encode_w26(100, 60179)
    edges = pulse_train(bits, 10.0, random.Random(24), gap=(1e-3, 2e-3))
    # The delivery thread stalls for 150 ms at bit 14 (beyond the bound), then catches up at once.
    stall_end = edges[26][0] + 0.150
    arrivals = [t if i < 26 else max(t, stall_end) for i, (t, _l, _v) in enumerate(edges)]
    with caplog.at_level(logging.WARNING, logger="agent.hw.wiegand_gpio"):
        run_late(r, clock, edges, arrivals)
    # The first 13 bits ended by the timer, the other 13 by silence: two length errors, no card.
    assert [(type(e), e.kind) for e in got.items] == [(ev.ReaderError, "length")] * 2
    # Late: the edges stamped within the silence the timer had taken as proven.
    assert r.counters["late_edges"] == sum(1 for t, _l, _v in edges[26:] if t < edges[25][0] + 0.025) > 0
    assert "wiegand_max_lag_s" in caplog.text and "cut" in caplog.text


# Real threads and the real mock pins: a pin that carries the wire's time.


@pytest.fixture
def wire_factory():
    f = MockFactory(pin_class=WirePin)
    yield f
    f.reset()


def deliver(factory, plan, arrivals) -> list[float]:
    """One thread, like lgpio's notification thread: each (t, pin, level) of plan driven with its
    stamp t at its arrival time. Returns how late each callback really came (scheduling included)."""
    lags: list[float] = []

    def run() -> None:
        for (t, pin, level), at in zip(plan, arrivals):
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            lags.append(time.monotonic() - t)
            factory.pin(f"GPIO{pin}").drive_at(t, level)

    thread = threading.Thread(target=run, name="lgpio-like-delivery")
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    return lags


def test_mock_pins_with_callbacks_up_to_50_ms_late_read_every_frame_of_both_readers(readers, wire_factory):
    got = Events()
    # A reader ending frames by silence on 20/21 and a fixed-format one on 13/19.
    # The lag bound is wider than the 50 ms injected: the rest is room for a loaded test machine.
    entry = readers("entry", 20, 21, factory=wire_factory, submit=got, max_lag_s=0.3)
    exit_ = readers("exit", 13, 19, factory=wire_factory, submit=got, max_lag_s=0.3,
                    decoder_kwargs={"fixed_bits": 26})
    rng = random.Random(25)
    entry_frames = frames_of(rng, 8)
    exit_frames = [encode_w26(rng.randrange(256), rng.randrange(65536)) for _ in range(8)]
    t0 = time.monotonic() + 0.05
    plan = sorted(
        [(t, (20, 21)[line], lvl) for t, line, lvl in
         schedule(entry_frames, t0, rng, gap=(0.2e-3, 5e-3), pause=(0.05, 0.2))]
        + [(t, (13, 19)[line], lvl) for t, line, lvl in
           schedule(exit_frames, t0 + 0.013, rng, gap=(0.2e-3, 5e-3), pause=(0.05, 0.2), back_to_back=0.003)]
    )
    arrivals = late_arrivals(plan, rng, 0.050)
    arrivals[len(arrivals) // 2] = max(arrivals[len(arrivals) // 2], plan[len(plan) // 2][0] + 0.050)
    arrivals = [max(arrivals[:i + 1]) for i in range(len(arrivals))]
    lags = deliver(wire_factory, plan, arrivals)
    want = expected(entry_frames, "entry") + expected(exit_frames, "exit")
    items = got.wait(lambda items: len(items) >= len(want), timeout=10, what=f"{len(want)} frames")
    assert sorted(items, key=repr) == sorted(want, key=repr), f"callback lags up to {max(lags) * 1000:.0f} ms"
    assert [e for e in items if e.reader == "entry"] == expected(entry_frames, "entry")
    assert entry.counters["length_errors"] == exit_.counters["length_errors"] == 0
    assert entry.counters["lag_max_us"] >= 50_000 or exit_.counters["lag_max_us"] >= 50_000


def test_mock_pins_time_a_frame_by_its_stamps_not_by_when_the_callbacks_come(readers, wire_factory):
    got = Events()
    r = readers("entry", 20, 21, factory=wire_factory, submit=got, timer=False)
    bits = encode_w26(100, 60179)
    edges = pulse_train(bits, time.monotonic() - 1.0, random.Random(26), gap=(1e-3, 2e-3))
    # A 30 ms pause on the wire after bit 13: the frame is cut there, though every callback
    # comes at once; and bits 0.2 ms apart were never cut by callbacks that came slowly.
    edges = edges[:26] + [(t + 0.030, line, lvl) for t, line, lvl in edges[26:]]
    for t, line, lvl in edges:
        wire_factory.pin(f"GPIO{(20, 21)[line]}").drive_at(t, lvl)
    r.poll()
    assert [(type(e), e.kind) for e in got.items] == [(ev.ReaderError, "length")] * 2


def test_mock_pins_with_stamps_on_another_clock_are_timed_from_an_anchor(readers, wire_factory, caplog):
    got = Events()
    readers("entry", 20, 21, factory=wire_factory, submit=got, decoder_kwargs={"fixed_bits": 26})
    bits = encode_w26(100, 60179)
    # Realtime-clock nanoseconds as seconds, as old kernels stamped: far ahead of the monotonic clock.
    with caplog.at_level(logging.WARNING, logger="agent.hw.wiegand_gpio"):
        for t, line, lvl in pulse_train(bits, time.time() + 3e8, random.Random(27), gap=(1e-3, 2e-3)):
            wire_factory.pin(f"GPIO{(20, 21)[line]}").drive_at(t, lvl)
    assert got.items == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=bits)]
    assert "not on the monotonic clock" in caplog.text


def test_a_broken_stamp_or_a_failing_edge_never_stops_the_pins_callbacks(readers, wire_factory, caplog):
    got = Events()
    # A lag bound far beyond how slowly any machine feeds these edges: however slow
    # (an emulated CPU, a loaded one), no edge is late and no line looks held low,
    # so only the stamps decide.
    r = readers("entry", 20, 21, factory=wire_factory, submit=got, max_lag_s=5.0,
                decoder_kwargs={"fixed_bits": 26})
    with caplog.at_level(logging.WARNING, logger="agent.hw.wiegand_gpio"):
        wire_factory.pin("GPIO20").drive_at(float("nan"), 0)  # a pin driver's broken stamp
        wire_factory.pin("GPIO20").drive_at(float("nan"), 1)
    assert r.counters["bad_stamps"] == 2 and r.decoder.idle
    # The reader still reads with stamps on the clock, and its timer did not spin on a NaN deadline.
    bits = encode_w26(100, 60179)
    for t, line, lvl in pulse_train(bits, time.monotonic() - 0.05, random.Random(28), gap=(1e-3, 2e-3)):
        wire_factory.pin(f"GPIO{(20, 21)[line]}").drive_at(t, lvl)
    assert got.items == [ev.CardRead(reader="entry", key=KEY, format="w26", raw=bits)]
    assert "no usable timestamp" in caplog.text

    def boom(*args):
        raise RuntimeError("submit target gone wrong")

    r._edge = boom  # whatever fails inside, the callback returns
    wire_factory.pin("GPIO21").drive_at(time.monotonic(), 0)
    assert "edge" in caplog.text and "failed" in caplog.text


def test_bad_lag_bound_is_refused():
    with pytest.raises(ValueError, match="max_lag_s"):
        WiegandReader("entry", None, None, submit=Events(), timer=False, max_lag_s=-1)


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


def test_the_service_gives_its_wiegand_readers_the_configured_lag_bound(tmp_path):
    from agent.config import load_config
    from agent.service import ClockSync, Service

    (tmp_path / "agent.toml").write_text(
        '[site]\nid = "s1"\ngate = "g1"\n[hardware]\npin_factory = "mock"\nwiegand_max_lag_s = 0.3\n'
        '[journal]\npath = "data/journal.db"\n[service]\nstate_dir = "state"\n')
    (tmp_path / "state").mkdir(mode=0o700)
    svc = Service(load_config(tmp_path / "agent.toml"), factory=MockFactory(), clock_sync=ClockSync(lambda: True),
                  env={})
    svc.start()
    try:
        assert {name: r.max_lag_s for name, r in svc.readers.items()} == {"entry": 0.3, "exit": 0.3}
    finally:
        svc.stop()
