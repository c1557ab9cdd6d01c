"""OSDP readers: our control panel against libosdp's own peripheral device.

The PD (libosdp's PeripheralDevice, playing the reader) and our OsdpBus
(the control panel) are joined by a pseudo-terminal pair: the bus opens the
slave path with pyserial as it would open the RS-485 adapter, the PD talks
through the master. The offline test joins them by an in-memory link that
can be cut, like a cable. Waits are on conditions with timeouts; nothing
asserts a timing.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.submitted import Events

osdp = pytest.importorskip(
    "osdp", reason="libosdp is not installed (optional extra: pip install 'gate-agent[osdp]')"
)

from agent.core import events as ev
from agent.core.cards import encode_w26, encode_w34, parse_card_string
from agent.hw.osdp_reader import (
    SCBK_DEFAULT,
    FeedbackRouter,
    OsdpBus,
    OsdpConfigError,
    OsdpReaderSpec,
    decode_osdp_card,
    parse_scbk,
)

KEY = bytes.fromhex("8b1f3c00d2a94e57a0b6c1d2e3f40516")
OTHER_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
ADDRESS = 101
CARD = "142,51091"  # the RDM6300 example card of docs/design.md#em-marine-cards-and-the-rdm6300, printed 0009357203
CARD_KEY = parse_card_string(CARD)
PD_CAPS = [(osdp.Capability.LEDControl, 1, 1), (osdp.Capability.AudibleControl, 1, 1)]


def statuses(items) -> list[bool]:
    return [e.online for e in items if isinstance(e, ev.ReaderStatus)]


def cards(items) -> list[ev.CardRead]:
    return [e for e in items if isinstance(e, ev.CardRead)]


class MasterChannel(osdp.Channel):
    """The PD's end of the pty: the master fd, non-blocking."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        os.set_blocking(fd, False)

    def read(self, max_bytes: int) -> bytes:
        try:
            return os.read(self.fd, max_bytes)
        except (BlockingIOError, OSError):
            return b""

    def write(self, buf: bytes) -> int:
        try:
            return os.write(self.fd, buf)
        except OSError:
            return 0

    def flush(self) -> None:
        pass


class Link:
    """A cable between two channel ends that the test can cut and mend."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers = [bytearray(), bytearray()]
        self.up = True

    def cut(self) -> None:
        with self.lock:
            self.up = False
            self.buffers = [bytearray(), bytearray()]

    def mend(self) -> None:
        with self.lock:
            self.up = True


class LinkEnd(osdp.Channel):
    def __init__(self, link: Link, side: int) -> None:
        super().__init__()
        self.link = link
        self.side = side

    def read(self, max_bytes: int) -> bytes:
        with self.link.lock:
            buf = self.link.buffers[self.side]
            out = bytes(buf[:max_bytes])
            del buf[:max_bytes]
            return out

    def write(self, buf: bytes) -> int:
        with self.link.lock:
            if self.link.up:
                self.link.buffers[1 - self.side].extend(buf)
        return len(buf)

    def flush(self) -> None:
        pass


def make_pd(channel, scbk=KEY, enforce=True):
    flags = [osdp.LibFlag.EnforceSecure] if enforce else []
    pd = osdp.PeripheralDevice(
        osdp.PDInfo(ADDRESS, channel, scbk=scbk, flags=flags),
        osdp.PDCapabilities(PD_CAPS),
        log_level=osdp.LogLevel.Emergency,
    )
    pd.start()
    return pd


def wiegand_event(bits: str) -> dict:
    padded = bits + "0" * (-len(bits) % 8)
    data = int(padded, 2).to_bytes(len(padded) // 8, "big")
    return {
        "event": osdp.Event.CardRead,
        "reader_no": 0,
        "direction": 0,
        "format": osdp.CardFormat.Wiegand,
        "length": len(bits),
        "data": data,
    }


def commands_of(pd, n: int, timeout: float = 5.0) -> list[dict]:
    """The next n LED/buzzer commands the PD received (notifications skipped)."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"the reader got only {got}"
        cmd = pd.get_command(timeout=min(left, 0.5))
        if cmd and cmd.get("command") in (osdp.Command.LED, osdp.Command.Buzzer):
            got.append(cmd)
    return got


@pytest.fixture
def pty_bus():
    """(bus, pd, events): our CP on the pty slave, libosdp's PD on the master, Secure Channel up."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    events = Events()
    bus = OsdpBus(
        path, [OsdpReaderSpec("entry", ADDRESS, KEY.hex())], submit=events, log_level="error"
    )
    pd = make_pd(MasterChannel(master))
    bus.start()
    try:
        events.wait(lambda items: statuses(items) == [True], what="the reader to come online")
        assert bus.is_online("entry")
        assert bus.is_secure("entry")
        yield bus, pd, events
    finally:
        bus.stop()
        pd.teardown()
        os.close(master)
        os.close(slave)


def test_card_read_over_secure_channel_gives_the_same_key_as_a_w26_reader(pty_bus):
    bus, pd, events = pty_bus
    facility, card = (int(x) for x in CARD.split(","))
    pd.submit_event(wiegand_event(encode_w26(facility, card)))
    got = events.wait(lambda items: cards(items), what="a card read")
    read = cards(got)[0]
    assert (read.reader, read.key, read.format) == ("entry", CARD_KEY, "osdp")
    assert bus.counters["cards"] == 1


def test_raw_em_marine_uid_gives_the_same_key_as_an_rdm6300_read(pty_bus):
    _bus, pd, events = pty_bus
    uid = 0x14008EC793  # the RDM6300 example frame's 40 bits
    pd.submit_event(
        {
            "event": osdp.Event.CardRead,
            "reader_no": 0,
            "direction": 0,
            "format": osdp.CardFormat.Unspecified,
            "length": 40,
            "data": uid.to_bytes(5, "big"),
        }
    )
    got = events.wait(lambda items: cards(items), what="a card read")
    assert cards(got)[0].key == CARD_KEY


def test_bad_parity_over_osdp_is_a_reader_error_not_a_card(pty_bus):
    _bus, pd, events = pty_bus
    bits = encode_w26(142, 51091)
    flipped = bits[:5] + ("1" if bits[5] == "0" else "0") + bits[6:]
    pd.submit_event(wiegand_event(flipped))
    got = events.wait(
        lambda items: any(isinstance(e, ev.ReaderError) for e in items), what="an error"
    )
    err = next(e for e in got if isinstance(e, ev.ReaderError))
    assert (err.reader, err.kind) == ("entry", "parity")
    assert not cards(got)


@pytest.mark.parametrize(
    ("signal", "colors", "beeps"),
    [
        ("granted", {osdp.CommandLEDColor.Green}, 1),
        ("denied", {osdp.CommandLEDColor.Red}, 2),
        ("error", {osdp.CommandLEDColor.Red, osdp.CommandLEDColor.Amber}, 3),
    ],
)
def test_feedback_signals_reach_the_reader_as_led_and_buzzer_commands(
    pty_bus, signal, colors, beeps
):
    bus, pd, _events = pty_bus
    assert bus.feedback("entry", signal)
    led, buzzer = sorted(commands_of(pd, 2), key=lambda c: c["command"] != osdp.Command.LED)
    assert led["command"] == osdp.Command.LED and buzzer["command"] == osdp.Command.Buzzer
    assert led["temporary"] is True  # the reader returns to its idle colour by itself
    assert {led["on_color"], led["off_color"]} == colors
    assert led["on_count"] > 0 and led["timer_count"] > 0
    if signal == "granted":
        assert led["timer_count"] == 10  # 1 s in OSDP's 100 ms units
    if signal == "error":
        assert led["off_count"] > 0  # a blink, not a steady light
    assert buzzer["rep_count"] == beeps and buzzer["on_count"] > 0


def test_feedback_for_another_reader_is_not_taken():
    class Outputs:
        def __init__(self):
            self.calls = []

        def set(self, line, active):
            self.calls.append(("set", line, active))

        def feedback(self, reader, signal):
            self.calls.append(("feedback", reader, signal))

    events = Events()
    bus = OsdpBus(LinkEnd(Link(), 0), [OsdpReaderSpec("entry", ADDRESS, KEY)], submit=events)
    outputs = Outputs()
    router = FeedbackRouter(outputs, bus)
    assert not bus.feedback("exit", "granted")
    router.feedback("exit", "denied")  # a Wiegand reader: its LED/beeper lines
    router.set("unlock_a", True)
    assert outputs.calls == [("feedback", "exit", "denied"), ("set", "unlock_a", True)]


@pytest.mark.parametrize(
    ("pd_key", "pd_enforce"),
    [(None, False), (OTHER_KEY, True), (OTHER_KEY, False)],
    ids=["no-key", "other-key-enforced", "other-key-not-enforced"],
)
def test_a_reader_without_the_right_key_never_comes_online_and_its_cards_are_ignored(
    pd_key, pd_enforce
):
    link = Link()
    events = Events()
    bus = OsdpBus(
        LinkEnd(link, 0),
        [OsdpReaderSpec("entry", ADDRESS, KEY)],
        submit=events,
        online_timeout_s=1.0,
        log_level="error",
    )
    pd = make_pd(LinkEnd(link, 1), scbk=pd_key, enforce=pd_enforce)
    bus.start()
    try:
        events.wait(lambda items: statuses(items) == [False], what="the start-up timeout")
        pd.submit_event(wiegand_event(encode_w26(142, 51091)))
        time.sleep(0.5)  # give a forged read the chance to get through (it must not)
        assert not cards(events.items)
        assert not bus.is_online("entry")
        assert statuses(events.items) == [False]
    finally:
        bus.stop()
        pd.teardown()


@pytest.mark.long(10)  # libosdp calls a silent reader offline after about 8 s
def test_offline_reader_is_reported_and_brought_back_without_a_restart():
    link = Link()
    events = Events()
    bus = OsdpBus(
        LinkEnd(link, 0),
        [OsdpReaderSpec("exit", ADDRESS, KEY)],
        submit=events,
        retry_min_s=0.5,
        retry_max_s=1.0,
        log_level="error",
    )
    pd = make_pd(LinkEnd(link, 1))
    bus.start()
    try:
        events.wait(lambda items: statuses(items) == [True], what="online")
        link.cut()
        pd.teardown()  # the reader unplugged: silent bus
        events.wait(lambda items: statuses(items) == [True, False], timeout=20, what="offline")
        link.mend()
        pd = make_pd(LinkEnd(link, 1))  # plugged back in: a fresh reader
        events.wait(
            lambda items: statuses(items) == [True, False, True], timeout=15, what="back online"
        )
        assert bus.is_secure("exit")
        pd.submit_event(wiegand_event(encode_w34(CARD_KEY >> 16, CARD_KEY & 0xFFFF)))
        got = events.wait(lambda items: cards(items), what="a card after the reconnect")
        assert cards(got)[0].key == CARD_KEY
    finally:
        bus.stop()
        pd.teardown()


def test_install_mode_without_a_key_only_when_asked():
    spec = OsdpReaderSpec("entry", ADDRESS, None)
    with pytest.raises(OsdpConfigError, match="Secure Channel is required"):
        OsdpBus(LinkEnd(Link(), 0), [spec], submit=lambda e: None)
    link = Link()
    events = Events()
    bus = OsdpBus(
        LinkEnd(link, 0), [spec], submit=events, insecure_allow_install_mode=True, log_level="error"
    )
    pd = make_pd(LinkEnd(link, 1), scbk=None, enforce=False)
    bus.start()
    try:
        events.wait(lambda items: statuses(items) == [True], what="online without a key")
        assert not bus.is_secure("entry")
        assert bus.insecure == ["entry"]
    finally:
        bus.stop()
        pd.teardown()


@pytest.mark.parametrize(
    ("scbk", "message"),
    [
        ("0011", "16 bytes"),
        ("zz" * 16, "not hex"),
        (SCBK_DEFAULT, "SCBK-D"),
        (SCBK_DEFAULT.hex(), "SCBK-D"),
    ],
)
def test_unusable_keys_are_refused_with_what_to_do(scbk, message):
    with pytest.raises(OsdpConfigError, match=message):
        OsdpBus(LinkEnd(Link(), 0), [OsdpReaderSpec("entry", ADDRESS, scbk)], submit=lambda e: None)


@pytest.mark.parametrize(
    "text",
    [
        ":".join(f"{b:02x}" for b in KEY),
        "-".join(f"{b:02X}" for b in KEY),
        " ".join(KEY.hex()[i : i + 4] for i in range(0, 32, 4)),
    ],
    ids=["colons", "dashes-upper", "spaces"],
)
def test_keys_in_config_may_carry_separators(text):
    """A key written with separators is the same key: the reader holding the plain KEY proves
    it and its Secure Channel comes up (a key parsed wrong would leave it offline)."""
    assert parse_scbk(text, "entry") == KEY
    link = Link()
    events = Events()
    bus = OsdpBus(
        LinkEnd(link, 0), [OsdpReaderSpec("entry", ADDRESS, text)], submit=events, log_level="error"
    )
    pd = make_pd(LinkEnd(link, 1))  # the reader holds KEY, Secure Channel enforced
    bus.start()
    try:
        events.wait(lambda items: statuses(items), 20, "the reader's first status")
        assert statuses(events.items) == [True], "the reader did not come online with the key"
        assert bus.is_secure("entry")
    finally:
        bus.stop()
        pd.teardown()


def test_addresses_and_names_must_be_unique_and_in_range():
    ch = LinkEnd(Link(), 0)
    with pytest.raises(OsdpConfigError, match="0 to 126"):
        OsdpBus(ch, [OsdpReaderSpec("entry", 127, KEY)], submit=lambda e: None)
    with pytest.raises(OsdpConfigError, match="used twice"):
        OsdpBus(
            ch,
            [OsdpReaderSpec("entry", 1, KEY), OsdpReaderSpec("exit", 1, OTHER_KEY)],
            submit=lambda e: None,
        )


# --- card data, without a bus -----------------------------------------------------------


def test_wiegand_bits_of_unknown_length_are_a_card_number():
    # Many OSDP readers send a 32-bit card serial as "raw Wiegand" with no parity.
    serial = 0xA1B2C3D4
    result = decode_osdp_card("wiegand", serial.to_bytes(4, "big"), 32, key_width=32)
    assert result.ok and result.key == serial


def test_ascii_card_numbers_decimal_and_hex():
    assert decode_osdp_card("ascii", b"0009357203", None).key == CARD_KEY
    assert decode_osdp_card("ascii", b"14008EC793", None).key == CARD_KEY
    assert decode_osdp_card("ascii", b"n/a", None).error == "garbage"


def test_card_data_shorter_than_its_bit_count_is_a_length_error():
    result = decode_osdp_card("wiegand", b"\xff", 26)
    assert (result.ok, result.error) == (False, "length")


def test_w34_over_osdp_masks_to_the_key_width():
    bits = encode_w34(0x1234, 0x5678)
    padded = bits + "0" * (-len(bits) % 8)
    data = int(padded, 2).to_bytes(len(padded) // 8, "big")
    assert decode_osdp_card("wiegand", data, 34, key_width=24).key == 0x345678
    assert decode_osdp_card("wiegand", data, 34, key_width=32).key == 0x12345678
