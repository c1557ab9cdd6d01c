"""Serial stream decoders and the repeat filter (agent.core.serialframes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.cards import decode_em_line, decode_rdm6300, encode_rdm6300, parse_card_string
from agent.core.serialframes import EmLineStream, Rdm6300Stream, RepeatFilter

pytestmark = pytest.mark.core

DESIGN_FRAME = b"\x02" + b"14008EC793" + b"CE" + b"\x03"
DESIGN_KEY = parse_card_string("0009357203")
OTHER_FRAME = encode_rdm6300(0x0A00000001)


def feed_chunks(stream, data: bytes, cuts: list[int]) -> list:
    out = []
    prev = 0
    for c in sorted(set(cuts)) + [len(data)]:
        out += stream.feed(data[prev:c])
        prev = c
    return out


def well_formed(results) -> None:
    for r in results:
        assert r.ok == (r.error is None)
        assert (r.key is not None) == r.ok
        if not r.ok:
            assert r.error in ("checksum", "garbage") and r.detail


# --- RDM6300 --------------------------------------------------------------------


def test_rdm6300_one_frame():
    out = Rdm6300Stream().feed(DESIGN_FRAME)
    assert [(r.ok, r.key, r.format) for r in out] == [(True, DESIGN_KEY, "rdm6300")]


def test_rdm6300_frame_torn_byte_by_byte():
    s = Rdm6300Stream()
    for b in DESIGN_FRAME[:-1]:
        assert s.feed(bytes([b])) == []
    assert [r.key for r in s.feed(DESIGN_FRAME[-1:])] == [DESIGN_KEY]


def test_rdm6300_repeats_are_not_suppressed_here():
    out = Rdm6300Stream().feed(DESIGN_FRAME * 3)
    assert [r.key for r in out] == [DESIGN_KEY] * 3


def test_rdm6300_garbage_before_and_between_frames():
    s = Rdm6300Stream()
    out = s.feed(b"\xff\x00noise" + DESIGN_FRAME + b"\r\n\x7f" + OTHER_FRAME)
    assert [r.error for r in out] == ["garbage", None, "garbage", None]
    assert [r.key for r in out if r.ok] == [DESIGN_KEY, decode_rdm6300(OTHER_FRAME).key]


def test_rdm6300_trailing_garbage_reported_on_flush():
    s = Rdm6300Stream()
    out = s.feed(DESIGN_FRAME + b"\x0212345")
    assert [r.key for r in out] == [DESIGN_KEY]
    tail = s.flush()
    assert [r.error for r in tail] == ["garbage"]
    assert s.flush() == []


def test_rdm6300_garbage_inside_a_frame_drops_it():
    s = Rdm6300Stream()
    broken = DESIGN_FRAME[:6] + b"Z" + DESIGN_FRAME[6:]
    out = s.feed(broken + DESIGN_FRAME)
    assert [r.error for r in out] == ["garbage", None]
    assert out[1].key == DESIGN_KEY


def test_rdm6300_start_byte_inside_garbage_starts_a_new_candidate():
    s = Rdm6300Stream()
    out = s.feed(b"\x02" + b"14008E" + DESIGN_FRAME)
    assert [r.error for r in out] == ["garbage", None]


def test_rdm6300_frame_too_long_is_garbage():
    s = Rdm6300Stream()
    out = s.feed(DESIGN_FRAME[:-1] + b"0" + b"\x03" + DESIGN_FRAME)
    assert [r.error for r in out] == ["garbage", None]


def test_rdm6300_bad_checksum_and_all_zero_tag():
    s = Rdm6300Stream()
    out = s.feed(
        b"\x02" + b"14008EC793" + b"CF" + b"\x03" + encode_rdm6300(0x1400000000) + DESIGN_FRAME
    )
    assert [r.error for r in out] == ["checksum", "garbage", None]
    assert "all-zero" in out[1].detail


def test_rdm6300_endless_noise_gives_bounded_reports():
    s = Rdm6300Stream(max_garbage=64)
    out = s.feed(bytes(range(3, 256)) * 4) + s.flush()
    assert out and all(r.error == "garbage" and not r.ok for r in out)
    assert all(len(bytes.fromhex(r.raw)) <= 64 for r in out)
    assert sum(len(bytes.fromhex(r.raw)) for r in out) == 253 * 4


def test_rdm6300_key_width():
    assert Rdm6300Stream(key_width=40).feed(DESIGN_FRAME)[0].key == 0x14008EC793


@settings(max_examples=120, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=20))
def test_rdm6300_random_bytes_never_raise(data, cuts):
    s = Rdm6300Stream()
    out = feed_chunks(s, data, cuts) + s.flush()
    well_formed(out)


tags = st.integers(0, (1 << 40) - 1).filter(lambda v: v & 0xFFFFFFFF)
pieces = st.lists(
    st.one_of(
        st.builds(lambda t: ("frame", t), tags),
        st.builds(lambda g: ("junk", g), st.binary(max_size=40)),
    ),
    max_size=12,
)


@settings(max_examples=120, deadline=None)
@given(pieces, st.lists(st.integers(0, 1000), max_size=30))
def test_rdm6300_finds_every_frame_between_garbage(parts, cuts):
    data = b"".join(encode_rdm6300(p) if kind == "frame" else p for kind, p in parts)
    expected = [decode_rdm6300(encode_rdm6300(p)).key for kind, p in parts if kind == "frame"]
    s = Rdm6300Stream()
    out = feed_chunks(s, data, cuts) + s.flush()
    well_formed(out)
    found = iter(r.key for r in out if r.ok)
    # Every frame is found, in order (garbage could by chance hold a valid frame too).
    assert all(any(k == e for k in found) for e in expected)
    if not any(kind == "junk" and b"\x02" in p for kind, p in parts):
        assert [r.key for r in out if r.ok] == expected


# --- EM-Marine lines --------------------------------------------------------------


def test_em_lines_with_any_line_end():
    s = EmLineStream()
    out = s.feed(b"0006613779\r\n14008EC793\n008EC793\r")
    assert [r.key for r in out] == [parse_card_string("100,60179"), DESIGN_KEY, DESIGN_KEY]
    assert all(r.ok and r.format == "emline" for r in out)


def test_em_line_torn_and_framed():
    s = EmLineStream()
    out = []
    for b in b"\x020006613779\r\n\x03":
        out += s.feed(bytes([b]))
    assert [r.key for r in out] == [parse_card_string("0006613779")]


def test_em_garbage_line_then_good_line():
    s = EmLineStream()
    out = s.feed(b"\xfe\xffjunk\r\n0000000000\r\n0006613779\r\n")
    assert [r.error for r in out] == ["garbage", "garbage", None]


def test_em_overlong_line_reported_once_and_dropped():
    s = EmLineStream(max_line=64)
    out = s.feed(b"7" * 200)
    out += s.feed(b"0006613779" + b"\r\n" + b"0006613779\r\n")
    assert [r.error for r in out] == ["garbage", None]
    assert out[1].key == parse_card_string("0006613779")


@settings(max_examples=120, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=20))
def test_em_random_bytes_never_raise(data, cuts):
    out = feed_chunks(EmLineStream(), data, cuts)
    well_formed(out)
    assert all(r.error == "garbage" for r in out if not r.ok)


lines = st.integers(1, (1 << 24) - 1).map(lambda k: f"{k:010d}".encode())
line_ends = st.sampled_from([b"\r\n", b"\n", b"\r"])
em_pieces = st.lists(
    st.one_of(
        st.builds(lambda ln, end: ("line", ln + end), lines, line_ends),
        st.builds(lambda g: ("junk", g + b"\n"), st.binary(max_size=100)),
    ),
    max_size=12,
)


@settings(max_examples=120, deadline=None)
@given(em_pieces, st.lists(st.integers(0, 1500), max_size=30))
def test_em_finds_every_line_between_garbage(parts, cuts):
    data = b"".join(p for _, p in parts)
    expected = [decode_em_line(p).key for kind, p in parts if kind == "line"]
    out = feed_chunks(EmLineStream(), data, cuts)
    well_formed(out)
    found = iter(r.key for r in out if r.ok)
    assert all(any(k == e for k in found) for e in expected)


def test_bad_stream_settings_are_refused():
    with pytest.raises(ValueError):
        Rdm6300Stream(key_width=12)
    with pytest.raises(ValueError):
        EmLineStream(number="octal")


# --- repeat filter ------------------------------------------------------------------


def test_repeat_within_window_is_suppressed():
    f = RepeatFilter(window_s=1.5)
    assert f.accept(7, 10.0)
    assert not f.accept(7, 11.0)
    assert f.accept(8, 11.0)  # another card is its own sighting


def test_card_held_in_field_is_accepted_once():
    f = RepeatFilter(window_s=1.5)
    accepted = [f.accept(7, 10.0 + 0.5 * i) for i in range(40)]  # RDM6300 repeating for 20 s
    assert accepted == [True] + [False] * 39
    assert f.accept(7, 10.0 + 0.5 * 39 + 1.5)  # taken away, presented again


def test_repeat_after_window_is_accepted():
    f = RepeatFilter(window_s=1.5)
    assert f.accept(7, 0.0)
    assert f.accept(7, 1.6)
    assert not f.accept(7, 2.0)


def test_many_keys_keep_their_windows():
    f = RepeatFilter(window_s=1.5)
    for k in range(200):
        assert f.accept(k, k * 0.005)
    assert not f.accept(199, 1.0)
    assert f.accept(0, 3.0)
    f.reset()
    assert f.accept(199, 1.1)
