"""Serial card readers through a pseudo-terminal pair.

The reader opens the pty's slave path with pyserial, as it would open
/dev/gate-reader; the test writes what a reader would send into the master.
An unplug is a symlink (the udev name) to the slave whose pty is closed and
whose link is removed, then pointed at a new pty. Every wait is on a
condition with a timeout; nothing asserts a timing.
"""

from __future__ import annotations

import os

import pytest

from agent.core import events as ev
from agent.core.cards import encode_rdm6300, parse_card_string
from agent.hw.serial_reader import SerialReader
from tests.submitted import Events

# docs/design.md#em-marine-cards-and-the-rdm6300: 02 "14008EC793" "CE" 03 is the card printed 0009357203, "142,51091".
EXAMPLE_FRAME = b"\x0214008EC793CE\x03"
EXAMPLE_KEY = parse_card_string("142,51091")
OTHER_KEY = parse_card_string("100,60179")


class Pty:
    """A pseudo-terminal pair: the reader opens `path`, the test writes to the master."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def cards(items) -> list[ev.CardRead]:
    return [e for e in items if isinstance(e, ev.CardRead)]


@pytest.fixture
def pty():
    p = Pty()
    yield p
    p.close()


@pytest.fixture
def readers():
    made: list[SerialReader] = []
    yield made
    for r in made:
        r.stop()


def make_reader(readers, path, events, **kw) -> SerialReader:
    kw.setdefault("reopen_min_s", 0.05)
    kw.setdefault("reopen_max_s", 0.2)
    kw.setdefault("read_timeout_s", 0.05)
    reader = SerialReader("entry", path, submit=events, **kw)
    readers.append(reader)
    reader.start()
    events.wait(
        lambda items: any(isinstance(e, ev.ReaderStatus) and e.online for e in items),
        what="the reader to open the port",
    )
    return reader


def test_rdm6300_example_frame_becomes_the_cards_key(pty, readers):
    events = Events()
    make_reader(readers, pty.path, events)
    pty.write(EXAMPLE_FRAME)
    got = events.wait(lambda items: cards(items), what="a card")
    read = cards(got)[0]
    assert (read.reader, read.key, read.format) == ("entry", EXAMPLE_KEY, "rdm6300")


def test_frames_split_across_writes_are_reassembled(pty, readers):
    events = Events()
    reader = make_reader(readers, pty.path, events)
    frame = encode_rdm6300((0x0A << 32) | OTHER_KEY)
    for i in range(0, len(frame), 3):  # torn across several reads
        pty.write(frame[i : i + 3])
    got = events.wait(lambda items: cards(items), what="a card")
    assert [c.key for c in cards(got)] == [OTHER_KEY]
    assert reader.counters["bytes"] == len(frame)


def test_repeats_within_the_window_are_suppressed(pty, readers):
    events = Events()
    clock = Clock()
    reader = make_reader(readers, pty.path, events, clock=clock, repeat_window_s=1.5)
    # The RDM6300 repeats while the card stays in the field: one presentation.
    # Each frame is read before the clock moves on (whatever the machine's speed):
    # 0.5 s apart as the reader sees them, all inside the window.
    for n in (1, 2, 3):
        pty.write(EXAMPLE_FRAME)
        events.wait(lambda items, n=n: reader.counters["frames"] == n, what=f"frame {n}")
        clock.t += 0.5
    assert len(cards(events.items)) == 1
    assert reader.counters["repeats"] == 2
    # Another card in between is not a repeat of the first.
    pty.write(encode_rdm6300(OTHER_KEY | (0x0A << 32)))
    events.wait(lambda items: len(cards(items)) == 2, what="the other card")
    # Card taken away, window passed: the same card is a new presentation.
    clock.t += 1.6
    pty.write(EXAMPLE_FRAME)
    got = events.wait(lambda items: len(cards(items)) == 3, what="the card presented again")
    assert [c.key for c in cards(got)] == [EXAMPLE_KEY, OTHER_KEY, EXAMPLE_KEY]


def test_garbage_torn_frames_and_bad_checksums_are_errors_and_the_stream_resyncs(pty, readers):
    events = Events()
    reader = make_reader(readers, pty.path, events)
    bad_sum = EXAMPLE_FRAME[:11] + b"00" + EXAMPLE_FRAME[13:]
    pty.write(b"\xff\x00noise" + EXAMPLE_FRAME)  # garbage, then a good frame
    pty.write(bad_sum)
    pty.write(EXAMPLE_FRAME[:7])  # a frame cut off by the reader losing power, then silence
    got = events.wait(
        lambda items: len([e for e in items if isinstance(e, ev.ReaderError)]) >= 3,
        what="garbage, checksum and torn-frame errors",
    )
    errors = [e for e in got if isinstance(e, ev.ReaderError)]
    assert sorted(e.kind for e in errors) == ["checksum", "garbage", "garbage"]
    assert all(e.reader == "entry" for e in errors)
    # The garbage never became a card; the good frame after it did.
    assert [c.key for c in cards(got)] == [EXAMPLE_KEY]
    pty.write(encode_rdm6300(OTHER_KEY | (0x0A << 32)))
    got = events.wait(lambda items: len(cards(items)) == 2, what="a card after the torn frame")
    assert cards(got)[-1].key == OTHER_KEY
    c = reader.counters
    assert (c["checksum_errors"], c["garbage_errors"]) == (1, 2)


def test_em_line_reader_decimal_and_hex_lines(pty, readers):
    events = Events()
    make_reader(readers, pty.path, events, protocol="emline")
    pty.write(b"0009357203\r\n")  # the 10-digit print
    pty.write(b"\x020A0064EB13\x03\r\n")  # hex of the full UID, with STX/ETX some readers add
    pty.write(b"not a card\r\n")
    got = events.wait(
        lambda items: len(cards(items)) == 2 and any(isinstance(e, ev.ReaderError) for e in items),
        what="two cards and a garbage line",
    )
    assert [(c.key, c.format) for c in cards(got)] == [
        (EXAMPLE_KEY, "emline"),
        (OTHER_KEY, "emline"),
    ]
    assert [e.kind for e in got if isinstance(e, ev.ReaderError)] == ["garbage"]


def test_unplug_gives_one_disconnected_then_reopens_and_reads_again(tmp_path, readers):
    events = Events()
    first = Pty()
    link = tmp_path / "gate-reader"
    link.symlink_to(first.path)
    reader = make_reader(readers, str(link), events)
    first.write(EXAMPLE_FRAME)
    events.wait(lambda items: len(cards(items)) == 1, what="a card before the unplug")

    # Unplug: the device goes away and udev removes its name.
    first.close()
    link.unlink()
    events.wait(
        lambda items: any(isinstance(e, ev.ReaderStatus) and not e.online for e in items),
        what="the reader to go offline",
    )
    assert not reader.online
    # Several reopen attempts fail while it is away: still one outage reported.
    events.wait(lambda items: reader.counters["open_failures"] >= 3, what="reopen attempts")
    assert len([e for e in events.items if isinstance(e, ev.ReaderError)]) == 1
    err = events.of(ev.ReaderError)[0]
    assert (err.reader, err.kind) == ("entry", "disconnected")
    assert len([e for e in events.items if isinstance(e, ev.ReaderStatus) and not e.online]) == 1

    # Replug: a new device under the same name.
    second = Pty()
    try:
        link.symlink_to(second.path)
        events.wait(
            lambda items: (
                len([e for e in items if isinstance(e, ev.ReaderStatus) and e.online]) == 2
            ),
            what="the reader to come back online",
        )
        assert reader.online
        assert reader.counters["reconnects"] == 1
        second.write(encode_rdm6300(OTHER_KEY | (0x0A << 32)))
        got = events.wait(lambda items: len(cards(items)) == 2, what="a card after the replug")
        assert cards(got)[-1].key == OTHER_KEY
        statuses = [e.online for e in got if isinstance(e, ev.ReaderStatus)]
        assert statuses == [True, False, True]
    finally:
        reader.stop()
        second.close()


def test_a_name_moved_to_another_device_is_followed(tmp_path, readers):
    # A USB adapter replugged fast: udev points the name at the new tty
    # before the old one reports an error.
    events = Events()
    first, second = Pty(), Pty()
    link = tmp_path / "gate-reader"
    link.symlink_to(first.path)
    try:
        reader = make_reader(readers, str(link), events)
        tmp = tmp_path / "gate-reader.new"
        tmp.symlink_to(second.path)
        tmp.replace(link)  # atomic, like udev
        events.wait(
            lambda items: (
                len([e for e in items if isinstance(e, ev.ReaderStatus) and e.online]) == 2
            ),
            what="the reader to follow the name",
        )
        assert [e.kind for e in events.of(ev.ReaderError)] == ["disconnected"]
        second.write(EXAMPLE_FRAME)
        got = events.wait(lambda items: cards(items), what="a card from the new device")
        assert cards(got)[0].key == EXAMPLE_KEY
        assert reader.counters["reconnects"] == 1
    finally:
        for r in readers:
            r.stop()
        first.close()
        second.close()


def test_a_port_missing_at_start_is_reported_once_and_picked_up_later(tmp_path, readers):
    events = Events()
    link = tmp_path / "gate-reader"
    reader = SerialReader(
        "exit", str(link), submit=events, reopen_min_s=0.02, reopen_max_s=0.05, read_timeout_s=0.05
    )
    readers.append(reader)
    reader.start()
    events.wait(lambda items: reader.counters["open_failures"] >= 3, what="failed opens")
    assert [(type(e), getattr(e, "kind", None)) for e in events.items] == [
        (ev.ReaderError, "disconnected"),
        (ev.ReaderStatus, None),
    ]
    assert "cannot open" in events.items[0].detail
    p = Pty()
    try:
        link.symlink_to(p.path)
        events.wait(
            lambda items: any(isinstance(e, ev.ReaderStatus) and e.online for e in items),
            what="the reader to open the port once it exists",
        )
        p.write(EXAMPLE_FRAME)
        got = events.wait(lambda items: cards(items), what="a card")
        assert cards(got)[0].reader == "exit"
    finally:
        reader.stop()
        p.close()


def test_stop_ends_the_thread_and_releases_the_port(pty, readers):
    import serial

    events = Events()
    reader = make_reader(readers, pty.path, events)
    reader.stop()
    assert not reader._thread.is_alive()
    # The exclusive lock is gone: another program may open the port now.
    other = serial.Serial(pty.path, 9600, timeout=0, exclusive=True)
    other.close()


def test_bad_options_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="rdm6300"):
        SerialReader("entry", "/dev/null", protocol="wiegand", submit=lambda e: None)
    with pytest.raises(ValueError, match="number"):
        SerialReader("entry", "/dev/null", protocol="emline", number="octal", submit=lambda e: None)
