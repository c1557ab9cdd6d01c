"""The Wiegand edge decoder on pulse trains in virtual time (agent.core.wiegand)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.cards import (
    decode_wiegand,
    encode_keypad,
    encode_w26,
    encode_w34,
    encode_w35,
    encode_w37,
)
from agent.core.wiegand import WiegandDecoder

pytestmark = pytest.mark.core

Edge = tuple[float, int, int]  # (time s, line 0=D0 1=D1, level)


def pulse(t: float, line: int, width: float) -> list[Edge]:
    """One low pulse: falling edge at t, rising edge at t + width."""
    return [(t, line, 0), (t + width, line, 1)]


def train(
    bits: str,
    t0: float = 1.0,
    width: float = 50e-6,
    gap: float = 2e-3,
    widths: list[float] | None = None,
    gaps: list[float] | None = None,
) -> list[Edge]:
    """Edges of a frame: bit 0 pulses D0, bit 1 pulses D1; gap is rising edge to next falling."""
    edges: list[Edge] = []
    t = t0
    for i, b in enumerate(bits):
        w = widths[i] if widths else width
        edges += pulse(t, int(b), w)
        t += w + (gaps[i] if gaps else gap)
    return edges


def feed_all(dec: WiegandDecoder, edges: list[Edge]) -> list:
    out = []
    for t, line, level in edges:
        out += dec.feed(t, line, level)
    return out


def finish(dec: WiegandDecoder) -> list:
    """Poll at the decoder's own deadlines until nothing is due."""
    out = []
    while (d := dec.deadline()) is not None:
        out += dec.poll(d)
    return out


W26 = encode_w26(100, 60179)


def test_frame_completes_after_silence_not_before():
    dec = WiegandDecoder()
    edges = train(W26)
    assert feed_all(dec, edges) == []
    last = edges[-1][0]
    assert dec.deadline() == pytest.approx(last + dec.silence_s)
    assert dec.poll(last + dec.silence_s / 2) == []
    results = dec.poll(dec.deadline())
    assert [r.key for r in results] == [decode_wiegand(W26).key]
    assert results[0].ok and results[0].format == "w26" and results[0].raw == W26
    assert dec.deadline() is None
    assert dec.counters["frames"] == 1 and dec.counters["glitches"] == 0


def test_next_frame_edge_completes_the_previous_frame_without_poll():
    dec = WiegandDecoder()
    first = train(W26, t0=1.0)
    second = train(encode_w26(1, 2), t0=first[-1][0] + 0.1)
    out = feed_all(dec, first + second)
    assert [r.key for r in out] == [decode_wiegand(W26).key]
    assert [r.key for r in finish(dec)] == [decode_wiegand(encode_w26(1, 2)).key]


frames = st.one_of(
    st.builds(encode_w26, st.integers(0, 255), st.integers(0, 65535)),
    st.builds(encode_w34, st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(encode_w35, st.integers(0, 4095), st.integers(0, (1 << 20) - 1)),
    st.builds(encode_w37, st.integers(0, 65535), st.integers(0, (1 << 19) - 1)),
)


@settings(max_examples=60, deadline=None)
@given(frames, st.data())
def test_realistic_timing_decodes_every_format(bits, data):
    n = len(bits)
    widths = data.draw(st.lists(st.floats(20e-6, 100e-6), min_size=n, max_size=n))
    gaps = data.draw(st.lists(st.floats(0.2e-3, 20e-3), min_size=n, max_size=n))
    dec = WiegandDecoder(key_width=40)
    out = feed_all(dec, train(bits, t0=data.draw(st.floats(0, 1e5)), widths=widths, gaps=gaps))
    out += finish(dec)
    assert len(out) == 1
    assert out[0].ok and out[0].raw == bits
    assert out[0].key == decode_wiegand(bits, 40).key


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_noise_pulses_are_dropped_and_counted(data):
    edges = train(W26, gap=1e-3)
    # Insert 1-5 us noise pulses on either line inside gaps, away from real pulses.
    starts = sorted(t for t, _, lvl in edges if lvl == 0)
    slots = data.draw(
        st.lists(st.integers(0, len(starts) - 2), min_size=1, max_size=8, unique=True)
    )
    noisy = list(edges)
    for i in slots:
        t = starts[i] + 300e-6
        noisy += pulse(t, data.draw(st.integers(0, 1)), data.draw(st.floats(1e-6, 5e-6)))
    noisy.sort()
    dec = WiegandDecoder()
    out = feed_all(dec, noisy) + finish(dec)
    assert [r.key for r in out] == [decode_wiegand(W26).key]
    assert dec.counters["glitches"] == len(slots)


def test_missing_bit_is_a_length_error_not_a_card():
    dec = WiegandDecoder()
    edges = train(W26[:10] + W26[11:])
    out = feed_all(dec, edges) + finish(dec)
    assert len(out) == 1
    assert (
        not out[0].ok and out[0].kind == "raw" and out[0].error == "length" and out[0].key is None
    )
    assert dec.counters["length_errors"] == 1


def test_flipped_bit_on_the_wire_is_a_parity_error():
    bad = W26[:5] + ("1" if W26[5] == "0" else "0") + W26[6:]
    dec = WiegandDecoder()
    out = feed_all(dec, train(bad)) + finish(dec)
    assert len(out) == 1 and out[0].error == "parity" and not out[0].ok
    assert dec.counters["parity_errors"] == 1


def test_entry_and_exit_readers_interleaved():
    entry, exit_ = WiegandDecoder(), WiegandDecoder()
    a, b = encode_w26(10, 111), encode_w26(20, 222)
    # Two trains at once, offset and with different gaps, merged in time order.
    merged = sorted(
        [(t, "entry", line, level) for t, line, level in train(a, t0=5.0, gap=1.1e-3)]
        + [(t, "exit", line, level) for t, line, level in train(b, t0=5.0003, gap=0.9e-3)]
    )
    names = [m[1] for m in merged]
    assert names.index("exit") < len(names) - 1 - names[::-1].index("entry")  # really interleaved
    got: dict[str, list] = {"entry": [], "exit": []}
    decoders = {"entry": entry, "exit": exit_}
    for t, name, line, level in merged:
        got[name] += decoders[name].feed(t, line, level)
    got["entry"] += finish(entry)
    got["exit"] += finish(exit_)
    assert [r.key for r in got["entry"]] == [decode_wiegand(a).key]
    assert [r.key for r in got["exit"]] == [decode_wiegand(b).key]


def test_fixed_format_completes_at_its_last_bit():
    edges = train(W26)
    dec = WiegandDecoder(fixed_bits=26)
    out = []
    for i, (t, line, level) in enumerate(edges):
        got = dec.feed(t, line, level)
        if i < len(edges) - 1:
            assert got == []
        out += got
    assert [r.key for r in out] == [decode_wiegand(W26).key]
    assert dec.deadline() is None
    # Without a fixed format the same edges wait for silence.
    free = WiegandDecoder()
    assert feed_all(free, edges) == []
    assert [r.key for r in finish(free)] == [decode_wiegand(W26).key]


def test_fixed_format_short_frame_still_ends_on_silence():
    dec = WiegandDecoder(fixed_bits=26)
    out = feed_all(dec, train(W26[:20]))
    assert out == []
    out = finish(dec)
    assert len(out) == 1 and out[0].error == "length"


def test_fixed_format_back_to_back_frames_with_short_gap():
    # With a fixed format two frames need no silence between them.
    a, b = encode_w26(1, 1), encode_w26(2, 2)
    dec = WiegandDecoder(fixed_bits=26)
    out = feed_all(dec, train(a + b, gap=1e-3))
    assert [r.key for r in out] == [decode_wiegand(a).key, decode_wiegand(b).key]


def test_keypad_burst():
    dec = WiegandDecoder()
    out = feed_all(dec, train(encode_keypad("#", 4))) + finish(dec)
    assert len(out) == 1 and out[0].kind == "keypad" and out[0].keys == "#"
    out = feed_all(dec, train(encode_keypad("7", 8), t0=10.0)) + finish(dec)
    assert len(out) == 1 and out[0].kind == "keypad" and out[0].keys == "7"


def test_stuck_line_reported_once():
    dec = WiegandDecoder(stuck_s=0.005)
    assert dec.feed(1.0, 0, 0) == []
    assert dec.deadline() == pytest.approx(1.005)
    assert dec.poll(1.004) == []
    out = dec.poll(1.006)
    assert (
        len(out) == 1
        and out[0].error == "glitch"
        and "stuck" in out[0].detail
        and "D0" in out[0].detail
    )
    assert not out[0].ok and out[0].key is None
    for t in (1.01, 1.5, 3.0, 60.0):
        assert dec.poll(t) == []
    # The line comes back: the long pulse is no bit, and a frame then decodes.
    assert dec.feed(61.0, 0, 1) == []
    assert dec.pending_bits == 0
    out = feed_all(dec, train(W26, t0=62.0)) + finish(dec)
    assert [r.key for r in out] == [decode_wiegand(W26).key]


def test_stuck_line_is_reported_even_when_only_edges_arrive():
    # No poll at all: the rising edge after 6 ms still reports the stuck line.
    dec = WiegandDecoder(stuck_s=0.005)
    dec.feed(1.0, 1, 0)
    out = dec.feed(1.006, 1, 1)
    assert len(out) == 1 and "stuck" in out[0].detail and "D1" in out[0].detail
    assert dec.pending_bits == 0


def test_stuck_mid_frame_reports_the_broken_frame_and_the_line():
    dec = WiegandDecoder()
    edges = train(W26[:12])
    feed_all(dec, edges)
    t = edges[-1][0] + 1e-3
    dec.feed(t, 1, 0)  # D1 goes low and stays
    out = dec.poll(t + 0.006)
    assert [r.error for r in out] == ["length", "glitch"]
    assert out[0].raw == W26[:12]


def test_both_lines_low_is_a_glitch_and_no_bit():
    dec = WiegandDecoder()
    edges = train("0101")
    t = edges[-1][0] + 1e-3
    # D0 and D1 pulses overlapping.
    edges += [(t, 0, 0), (t + 20e-6, 1, 0), (t + 50e-6, 0, 1), (t + 70e-6, 1, 1)]
    out = feed_all(dec, edges) + finish(dec)
    assert dec.counters["glitches"] == 1
    assert len(out) == 1 and out[0].raw == "0101"


def test_overlong_frame_is_a_length_error():
    dec = WiegandDecoder(max_bits=64)
    out = feed_all(dec, train("1" * 70, gap=0.3e-3)) + finish(dec)
    assert (
        len(out) == 1
        and out[0].error == "length"
        and out[0].kind == "raw"
        and "70" in out[0].detail
    )
    assert dec.counters["length_errors"] == 1 and dec.counters["frames"] == 1


def test_repeated_level_reports_change_nothing():
    dec = WiegandDecoder()
    edges = []
    for t, line, level in train(W26):
        edges += [(t, line, level), (t + 1e-7, line, level)]
    # A rise while already high, then every edge reported twice.
    out = feed_all(dec, [(1.0 - 1e-3, 0, 1)] + edges) + finish(dec)
    assert [r.key for r in out] == [decode_wiegand(W26).key]


def test_an_edge_stamped_inside_a_silence_already_decided_is_counted_late():
    dec = WiegandDecoder()
    first = train(W26[:13])
    feed_all(dec, first)
    last = first[-1][0]
    cut = dec.poll(last + dec.silence_s)  # the caller promised every edge before this was fed
    assert [r.error for r in cut] == ["length"]
    # ...but the rest of the frame comes afterwards, stamped before the silence ended.
    rest = train(W26[13:], t0=last + 2e-3)
    feed_all(dec, rest)
    assert dec.counters["late_edges"] == sum(1 for t, _l, _v in rest if t < last + dec.silence_s) > 0
    # An edge after the decided silence is a new frame's, not late.
    feed_all(dec, train("1", t0=rest[-1][0] + 1.0))
    assert dec.counters["late_edges"] == sum(1 for t, _l, _v in rest if t < last + dec.silence_s)


def test_an_edge_after_a_decided_silence_is_never_late():
    dec = WiegandDecoder()
    first = train(W26)
    feed_all(dec, first)
    last = first[-1][0]
    assert len(dec.poll(last + 0.3)) == 1  # polled well past the silence
    # The next frame began 30 ms after the last edge, before the poll's time: on time all the same.
    out = feed_all(dec, train(W26, t0=last + 0.030)) + finish(dec)
    assert [r.key for r in out] == [decode_wiegand(W26).key]
    assert dec.counters["late_edges"] == 0


def test_a_stuck_line_decided_makes_its_own_rise_late():
    dec = WiegandDecoder(stuck_s=0.005)
    dec.feed(1.0, 0, 0)
    assert [r.error for r in dec.poll(1.006)] == ["glitch"]
    dec.feed(1.0001, 0, 1)  # the 100 us pulse's rise, fed after the line was called stuck
    assert dec.counters["late_edges"] == 1


def test_an_edge_stamped_before_the_last_one_never_moves_the_frame_end_back():
    dec = WiegandDecoder()
    edges = train(W26)
    feed_all(dec, edges)
    t_end = edges[-1][0]
    # A pulse on the other line fed after the last edge, stamped before it (read out of order).
    other = 1 - edges[-1][1]
    dec.feed(t_end - 400e-6, other, 0)
    dec.feed(t_end - 300e-6, other, 1)
    assert dec.deadline() == pytest.approx(t_end + dec.silence_s, abs=1e-9)


def test_idle_is_between_frames_with_both_lines_high():
    dec = WiegandDecoder()
    assert dec.idle
    dec.feed(1.0, 0, 0)
    assert not dec.idle  # a pulse in progress
    dec.feed(1.0001, 0, 1)
    assert not dec.idle  # a bit pending
    dec.poll(2.0)
    assert dec.idle


@pytest.mark.parametrize(
    "kwargs",
    [{"fixed_bits": 80}, {"fixed_bits": 0}, {"max_bits": 0}, {"key_width": 8}, {"silence_s": 0}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        WiegandDecoder(**kwargs)


def test_bad_line_is_refused():
    with pytest.raises(ValueError, match="D0"):
        WiegandDecoder().feed(0.0, 2, 0)
