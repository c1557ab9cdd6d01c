"""OSDP readers with libosdp: the control-panel side on an RS-485 bus.

libosdp (PyPI ``libosdp``, imported as ``osdp``; the optional extra
``pip install 'gate-agent[osdp]'``) runs the OSDP control panel (CP): it
polls each peripheral device (PD, the reader) on the bus, sets up the Secure
Channel and calls us back with events. This adapter only translates:

- card reads become ``CardRead`` events with the same keys as every other
  reader: raw Wiegand bits are decoded like a Wiegand frame
  (``decode_wiegand``: parity checked, the data bits masked to the key
  width), any other card data is its number masked to the key width, so a
  W26 read, an RDM6300 read and an OSDP read of one card agree;
- a reader going online or offline becomes ``ReaderStatus``;
- ``feedback(reader, signal)`` sends OSDP LED and buzzer commands
  (granted: green LED 1 s and one beep; denied: red LED and two beeps;
  error: red/amber blink and three short beeps).

Secure Channel is on and enforced for every reader with a key (its SCBK,
16 bytes, from the config): a reader that cannot prove the key never comes
online, and no card from it is accepted. A reader without a key is refused
unless ``insecure_allow_install_mode=True`` is given explicitly (for
setting a new reader up on the bench), and then the agent logs a warning.

Threads: libosdp's own refresh thread calls ``_on_event`` (it holds the CP
lock there, so the callback only translates and calls ``submit``); one
supervisor thread of ours sends feedback commands (the gate thread only
queues them), watches who is online, retries an offline reader sooner than
libosdp's 300 s, and reopens a serial port that went away.

Some 730 lines on purpose: one protocol's adapter. The reader specs and
their keys, the card decoding, the LED and buzzer patterns, the serial
channel libosdp talks through and the bus with its supervisor are all OSDP;
the service, doctor and enroll take them from this one place, and nothing
here serves another kind of reader.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import serial

from agent.core.cards import CardResult, check_key_width, decode_wiegand, key_mask
from agent.core.events import Keypad, ReaderStatus

log = logging.getLogger(__name__)

# What a serial port raises when it is gone or closed under a read (pyserial
# gives TypeError when the fd was closed by another thread).
_PORT_ERRORS = (serial.SerialException, OSError, TypeError, ValueError)

INSTALL_HINT = "OSDP readers need libosdp: pip install 'gate-agent[osdp]' (PyPI package libosdp)"
# SCBK-D, the key every OSDP reader knows in install mode: no secret at all.
SCBK_DEFAULT = bytes(range(0x30, 0x40))
_HEX_SEPARATORS = re.compile(r"[\s:\-]")
# OSDP keypad data: ASCII digits, 0x7F for "*", 0x0D for "#".
_KEYPAD_SPECIAL = {0x7F: "*", 0x0D: "#"}


class OsdpConfigError(ValueError):
    """An OSDP reader configuration that cannot be used; the message says how to fix it."""


# --- configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class OsdpReaderSpec:
    """One OSDP reader (peripheral device) on the bus.

    name: the reader's name in the gate config (it fixes the direction).
    address: the PD address set on the reader (0..126). scbk: its Secure
    Channel Base Key, 16 bytes or 32 hex digits; None only with
    ``insecure_allow_install_mode``.
    """

    name: str
    address: int
    scbk: bytes | str | None = None


def parse_scbk(value: bytes | str | None, where: str) -> bytes | None:
    """A 16-byte SCBK from bytes or hex text (spaces, ':' and '-' allowed), or None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = _HEX_SEPARATORS.sub("", value)
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise OsdpConfigError(
                f"{where}: scbk is not hex; give the reader's Secure Channel key as 32 hex digits "
                "(make one with: python3 -c 'import secrets; print(secrets.token_hex(16))', and "
                "load the same key into the reader)"
            ) from None
    elif isinstance(value, (bytes, bytearray)):
        key = bytes(value)
    else:
        raise OsdpConfigError(f"{where}: scbk must be 32 hex digits, got {type(value).__name__}")
    if len(key) != 16:
        raise OsdpConfigError(
            f"{where}: scbk is {len(key)} bytes, an OSDP Secure Channel key is 16 bytes (32 hex digits)"
        )
    if key == SCBK_DEFAULT:
        raise OsdpConfigError(
            f"{where}: scbk is SCBK-D, the published install-mode key (30 31 .. 3F): it protects "
            "nothing; generate a random key, load it into the reader and put it here"
        )
    return key


def _check_specs(
    readers: Sequence[OsdpReaderSpec], insecure_allow_install_mode: bool
) -> list[tuple[OsdpReaderSpec, bytes | None]]:
    if not readers:
        raise OsdpConfigError(
            "OSDP bus: no readers configured; list each reader's name, address and scbk"
        )
    out = []
    names: set[str] = set()
    addresses: set[int] = set()
    for spec in readers:
        where = f"OSDP reader {spec.name!r}"
        if (
            not isinstance(spec.address, int)
            or isinstance(spec.address, bool)
            or not 0 <= spec.address <= 126
        ):
            raise OsdpConfigError(
                f"{where}: address {spec.address!r}; an OSDP address is 0 to 126, as set on the reader"
            )
        if spec.name in names:
            raise OsdpConfigError(
                f"{where}: the name is used twice on this bus; give each reader its own"
            )
        if spec.address in addresses:
            raise OsdpConfigError(
                f"{where}: address {spec.address} is used twice on this bus; give each reader its own address"
            )
        names.add(spec.name)
        addresses.add(spec.address)
        key = parse_scbk(spec.scbk, where)
        if key is None and not insecure_allow_install_mode:
            raise OsdpConfigError(
                f"{where}: no scbk. Secure Channel is required: give the reader's 16-byte key as 32 hex "
                "digits (the same key loaded into the reader). Only for setting a reader up on the "
                "bench, insecure_allow_install_mode = true runs it without one"
            )
        out.append((spec, key))
    return out


# --- card data ----------------------------------------------------------------------


def _bits(data: bytes, length: int) -> str:
    return "".join(f"{b:08b}" for b in data)[:length]


def _card_error(error: str, detail: str, raw: str) -> CardResult:
    """A card read from an OSDP reader that is no card: a reader.error of this kind."""
    return CardResult(ok=False, kind="card", format="osdp", error=error, detail=detail, raw=raw)


def decode_osdp_card(fmt: str, data: bytes, length: int | None, key_width: int = 24) -> CardResult:
    """The key of an OSDP card read (pure; the tests and the adapter share it).

    fmt: "wiegand" (raw Wiegand bits), "raw" (raw bits, format unspecified)
    or "ascii". data: the bytes libosdp gives; length: the bit count for the
    raw formats. Raw Wiegand of a known length (26, 34, 35, 37, keypad 4 and
    8) is decoded like a Wiegand frame, parity included; any other raw data
    is the number its bits make, masked to key_width; ASCII is a decimal (or
    else hex) number, masked to key_width. OSDP's own checks (CRC, MAC)
    already guard the transfer, so a length of no Wiegand format is a card
    number, not line noise.
    """
    mask = key_mask(key_width)
    data = bytes(data)
    if fmt in ("wiegand", "raw"):
        n = int(length or 0)
        if n <= 0 or n > len(data) * 8:
            return _card_error("length", f"card data says {n} bits but holds {len(data) * 8}",
                               data.hex().upper())
        bits = _bits(data, n)
        if fmt == "wiegand":
            result = decode_wiegand(bits, key_width)
            if result.kind != "raw":
                return result if result.kind == "keypad" else replace(result, format="osdp")
        value = int(bits, 2)
        raw = bits
    elif fmt == "ascii":
        text = data.decode("ascii", "replace").strip()
        raw = text
        if text.isdigit():
            value = int(text, 10)
        elif text and all(c in "0123456789abcdefABCDEF" for c in text):
            value = int(text, 16)
        else:
            return _card_error("garbage", "ASCII card data is no number", text)
    else:
        return _card_error("garbage", f"card data in an unknown format {fmt!r}", data.hex().upper())
    if value & mask == 0:
        return _card_error("garbage", "all-zero card number", raw)
    return CardResult(ok=True, kind="card", format="osdp", key=value & mask, raw=raw)


def decode_osdp_keys(data: bytes) -> str:
    """OSDP keypad bytes as keys: digits, "*" and "#"."""
    return "".join(_KEYPAD_SPECIAL.get(b, chr(b) if 0x20 <= b < 0x7F else "?") for b in bytes(data))


# --- feedback -------------------------------------------------------------------------


@dataclass(frozen=True)
class LedPattern:
    """A temporary LED state: times in 100 ms units (OSDP's), colours by name."""

    on_color: str
    off_color: str
    on_100ms: int
    off_100ms: int
    total_100ms: int


@dataclass(frozen=True)
class BeepPattern:
    """Beeps of the reader's buzzer: times in 100 ms units, count beeps."""

    on_100ms: int
    off_100ms: int
    count: int


FEEDBACK_PATTERNS: dict[str, tuple[LedPattern, BeepPattern]] = {
    # The same three signals as the Wiegand readers' LED and beeper lines.
    "granted": (LedPattern("green", "green", 10, 0, 10), BeepPattern(2, 1, 1)),
    "denied": (LedPattern("red", "red", 10, 0, 10), BeepPattern(2, 2, 2)),
    "error": (LedPattern("red", "amber", 2, 2, 12), BeepPattern(1, 1, 3)),
}
_COLORS = ("black", "red", "green", "amber", "blue", "magenta", "cyan", "white")


def feedback_commands(
    osdp: Any,
    signal: str,
    reader_no: int = 0,
    patterns: Mapping[str, tuple[LedPattern, BeepPattern]] = FEEDBACK_PATTERNS,
) -> list[dict]:
    """libosdp command dicts (LED, then buzzer) for a feedback signal."""
    led, beep = patterns[signal]
    colors = osdp.CommandLEDColor
    return [
        {
            "command": osdp.Command.LED,
            "reader": reader_no,
            "led_number": 0,
            "temporary": True,
            "control_code": 2,  # set the temporary state and start its timer
            "on_color": getattr(colors, led.on_color.capitalize()),
            "off_color": getattr(colors, led.off_color.capitalize()),
            "on_count": led.on_100ms,
            "off_count": led.off_100ms,
            "timer_count": led.total_100ms,
        },
        {
            "command": osdp.Command.Buzzer,
            "reader": reader_no,
            "control_code": 2,  # the default tone
            "on_count": beep.on_100ms,
            "off_count": beep.off_100ms,
            "rep_count": beep.count,
        },
    ]


# --- the channel -------------------------------------------------------------------------


class SerialChannel:
    """libosdp's channel (read, write, flush) over a pyserial port, reopened when lost.

    Reads never block (libosdp polls). A port error marks the channel
    broken and closes it; reads then give nothing and writes are dropped
    until ``reopen()`` succeeds, so libosdp just sees a silent bus.
    """

    def __init__(self, port: str, baudrate: int = 9600, *, exclusive: bool = True) -> None:
        self.port = port
        self.baudrate = baudrate
        self.exclusive = exclusive
        self.id = 0  # libosdp reads a channel id; one bus, one channel
        self._lock = threading.Lock()
        self._serial: Any = None
        self.last_error = ""

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def open(self) -> None:
        """Open the port; raises serial.SerialException / OSError when it cannot."""
        ser = serial.Serial(
            self.port, self.baudrate, timeout=0, write_timeout=0.5, exclusive=self.exclusive
        )
        with self._lock:
            self._serial = ser

    def reopen(self) -> bool:
        self.close()
        try:
            self.open()
        except _PORT_ERRORS as exc:
            self.last_error = f"cannot open {self.port}: {exc}"
            return False
        return True

    def close(self) -> None:
        with self._lock:
            ser, self._serial = self._serial, None
        if ser is not None:
            try:
                ser.close()
            except _PORT_ERRORS:
                log.debug("OSDP bus %s: close failed", self.port, exc_info=True)

    def _broken(self, exc: Exception) -> None:
        self.last_error = f"{self.port}: {exc}"
        log.warning("OSDP bus %s: %s; reopening", self.port, exc)
        ser, self._serial = self._serial, None
        try:
            ser.close()
        except _PORT_ERRORS:
            log.debug("OSDP bus %s: close failed", self.port, exc_info=True)

    def read(self, max_bytes: int) -> bytes:
        with self._lock:
            if self._serial is None:
                return b""
            try:
                return self._serial.read(max_bytes)
            except _PORT_ERRORS as exc:  # must not raise into libosdp's C code
                self._broken(exc)
                return b""

    def write(self, buf: bytes) -> int:
        with self._lock:
            if self._serial is None:
                return len(buf)  # a cut cable: the bytes are lost, libosdp times out
            try:
                return self._serial.write(buf) or 0
            except _PORT_ERRORS as exc:
                self._broken(exc)
                return len(buf)

    def flush(self) -> None:
        # libosdp flushes to drop a half-received packet: discard input.
        with self._lock:
            if self._serial is not None:
                try:
                    self._serial.reset_input_buffer()
                except _PORT_ERRORS as exc:
                    self._broken(exc)


# --- the bus -----------------------------------------------------------------------------


class _Pd:
    """What the adapter keeps per reader."""

    def __init__(self, spec: OsdpReaderSpec, key: bytes | None, retry_min_s: float) -> None:
        self.spec = spec
        self.key = key
        self.online: bool | None = None  # None: never seen yet
        self.retry_delay = retry_min_s
        self.next_retry: float = 0.0


class OsdpBus:
    """An OSDP control panel on one RS-485 port with its readers.

    port: the serial device of the RS-485 adapter, or any object with
    ``read(n)``, ``write(buf)`` and ``flush()`` (tests join two ends of a
    pipe). readers: ``OsdpReaderSpec``s. submit: where events go.
    baudrate: the bus speed set on the readers (9600 default, 115200 common).
    key_width: the site's key width. insecure_allow_install_mode: allow
    readers without a key (bench set-up only). retry_min_s, retry_max_s:
    backoff between attempts to bring an offline reader back (libosdp alone
    waits 300 s). online_timeout_s: a reader not online this long after
    start is reported offline, with what to check. log_level: libosdp's
    own log (it prints to stderr): "error", "warning", "info" or "debug".
    feedback_patterns: signal -> (LedPattern, BeepPattern).
    """

    def __init__(
        self,
        port: str | Any,
        readers: Iterable[OsdpReaderSpec],
        *,
        submit: Callable[[Any], Any],
        baudrate: int = 9600,
        key_width: int = 24,
        insecure_allow_install_mode: bool = False,
        retry_min_s: float = 5.0,
        retry_max_s: float = 30.0,
        online_timeout_s: float = 10.0,
        log_level: str = "warning",
        feedback_patterns: Mapping[str, tuple[LedPattern, BeepPattern]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        specs = list(readers)
        checked = _check_specs(specs, insecure_allow_install_mode)
        self.key_width = check_key_width(key_width)
        try:
            import osdp
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
        self._osdp = osdp
        self._submit = submit
        self._clock = clock
        self._retry_min = retry_min_s
        self._retry_max = retry_max_s
        self._online_timeout = online_timeout_s
        self.feedback_patterns = dict(
            FEEDBACK_PATTERNS if feedback_patterns is None else feedback_patterns
        )
        self.insecure = [spec.name for spec, key in checked if key is None]
        if isinstance(port, str):
            self.port_name = port
            self.channel: Any = SerialChannel(port, baudrate)
        else:
            self.port_name = getattr(port, "port", type(port).__name__)
            self.channel = port
        self._pds = [_Pd(spec, key, retry_min_s) for spec, key in checked]
        self._by_name = {pd.spec.name: pd for pd in self._pds}
        self._formats = {
            osdp.CardFormat.Unspecified: "raw",
            osdp.CardFormat.Wiegand: "wiegand",
            osdp.CardFormat.ASCII: "ascii",
        }
        self._lock = threading.Lock()  # guards counters and online flags
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cp: Any = None
        self._started_at = 0.0
        self._timeout_reported: set[str] = set()
        self.counters: dict[str, int] = {
            "cards": 0,
            "keypad": 0,
            "errors": 0,
            "feedback": 0,
            "feedback_failed": 0,
            "online_changes": 0,
            "retries": 0,
            "port_reopens": 0,
        }
        levels = {
            "error": osdp.LogLevel.Error,
            "warning": osdp.LogLevel.Warning,
            "info": osdp.LogLevel.Info,
            "debug": osdp.LogLevel.Debug,
        }
        if log_level not in levels:
            raise OsdpConfigError(
                f"OSDP bus: log_level {log_level!r}; allowed: {', '.join(levels)}"
            )
        self._log_level = levels[log_level]

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Open the port (retried in the background if it is missing) and start polling."""
        if self._thread is not None:
            raise RuntimeError("OsdpBus.start() was already called")
        osdp = self._osdp
        for name in self.insecure:
            log.warning(
                "OSDP reader %s runs WITHOUT Secure Channel (insecure_allow_install_mode): "
                "anyone on the bus can fake its cards; give it a key before the gate is used",
                name,
            )
        if isinstance(self.channel, SerialChannel) and not self.channel.reopen():
            log.warning("OSDP bus: %s; retrying in the background", self.channel.last_error)
        infos = []
        for pd in self._pds:
            flags = [osdp.LibFlag.EnableNotification]
            if pd.key is not None:
                flags.append(osdp.LibFlag.EnforceSecure)  # no key proof, no card
            infos.append(
                osdp.PDInfo(
                    pd.spec.address, self.channel, scbk=pd.key, name=pd.spec.name, flags=flags
                )
            )
        self._cp = osdp.ControlPanel(infos, log_level=self._log_level, event_handler=self._on_event)
        self._started_at = self._clock()
        for pd in self._pds:
            pd.next_retry = self._started_at + pd.retry_delay
        self._cp.start()
        self._thread = threading.Thread(target=self._supervise, name="osdp-bus", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop polling and close the port."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._cp is not None and self._cp.thread is not None:
            self._cp.stop()
        if isinstance(self.channel, SerialChannel):
            self.channel.close()

    # -- state --------------------------------------------------------------------------

    @property
    def readers(self) -> list[str]:
        return [pd.spec.name for pd in self._pds]

    def is_online(self, reader: str) -> bool:
        with self._lock:
            return bool(self._by_name[reader].online)

    def is_secure(self, reader: str) -> bool:
        """Whether the reader's Secure Channel is up now."""
        if self._cp is None:
            return False
        return bool(self._cp.is_sc_active(self._by_name[reader].spec.address))

    # -- feedback (any thread) ---------------------------------------------------------------

    def feedback(self, reader: str, signal: str) -> bool:
        """Queue LED/buzzer commands for a signal; False when the reader is not on this bus.

        Never waits: the supervisor thread sends the commands.
        """
        if reader not in self._by_name:
            return False
        if signal not in self.feedback_patterns:
            log.warning(
                "unknown feedback signal %r for reader %s; allowed: %s",
                signal,
                reader,
                ", ".join(self.feedback_patterns),
            )
            return True
        self._queue.put((reader, signal))
        return True

    def _send_feedback(self, reader: str, signal: str) -> None:
        pd = self._by_name[reader]
        if not pd.online:
            return  # an offline reader cannot show it; the record already says what happened
        ok = True
        for cmd in feedback_commands(self._osdp, signal, 0, self.feedback_patterns):
            try:
                ok = bool(self._cp.submit_command(pd.spec.address, cmd)) and ok
            except Exception:
                log.exception("OSDP reader %s: could not send feedback %s", reader, signal)
                ok = False
        with self._lock:
            self.counters["feedback" if ok else "feedback_failed"] += 1

    # -- libosdp's thread ----------------------------------------------------------------------

    def _on_event(self, index: int, event: dict) -> int:
        """libosdp's event callback (its refresh thread, CP lock held): translate and submit."""
        try:
            self._handle_event(self._pds[index], event)
        except Exception:
            log.exception("OSDP: could not handle event %r", event)
        return 0

    def _handle_event(self, pd: _Pd, event: dict) -> None:
        osdp = self._osdp
        kind = event.get("event")
        name = pd.spec.name
        if kind == osdp.Event.CardRead:
            fmt = self._formats.get(event.get("format"), f"code {event.get('format')}")
            result = decode_osdp_card(
                fmt, event.get("data", b""), event.get("length"), self.key_width
            )
            with self._lock:
                self.counters[
                    "errors" if result.error else "keypad" if result.kind == "keypad" else "cards"
                ] += 1
            self._emit(result.as_event(name))
        elif kind == osdp.Event.KeyPress:
            with self._lock:
                self.counters["keypad"] += 1
            self._emit(Keypad(reader=name, keys=decode_osdp_keys(event.get("data", b""))))
        elif kind == osdp.Event.Notification:
            if event.get("type") == osdp.EventNotification.PeripheralDeviceStatus:
                self._set_online(pd, bool(event.get("arg0")))
            elif event.get("type") == osdp.EventNotification.Command and not event.get("arg1"):
                with self._lock:
                    self.counters["feedback_failed"] += 1

    def _set_online(self, pd: _Pd, online: bool) -> None:
        with self._lock:
            if pd.online is online or (pd.online is None and not online):
                return  # no change (never-seen readers are reported by the start-up timeout)
            pd.online = online
            self.counters["online_changes"] += 1
            now = self._clock()
            if online:
                pd.retry_delay = self._retry_min
                self._timeout_reported.discard(pd.spec.name)
            else:
                pd.next_retry = now + pd.retry_delay
        if online:
            log.info(
                "OSDP reader %s (address %d) online%s",
                pd.spec.name,
                pd.spec.address,
                "" if pd.key is None else " with Secure Channel",
            )
        else:
            log.warning(
                "OSDP reader %s (address %d) went offline; retrying", pd.spec.name, pd.spec.address
            )
        self._emit(ReaderStatus(reader=pd.spec.name, online=online))

    def _emit(self, event: Any) -> None:
        try:
            self._submit(event)
        except Exception:
            log.exception("OSDP: could not submit %r", event)

    # -- the supervisor thread -------------------------------------------------------------------

    def _supervise(self) -> None:
        port_delay = self._retry_min
        next_port_try = 0.0
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            if self._stop.is_set():
                return
            try:
                if item is not None:
                    self._send_feedback(*item)
                self._drain_library_queue()
                self._check_status()
                now = self._clock()
                ch = self.channel
                if isinstance(ch, SerialChannel) and not ch.is_open and now >= next_port_try:
                    if ch.reopen():
                        port_delay = self._retry_min
                        with self._lock:
                            self.counters["port_reopens"] += 1
                        log.warning("OSDP bus: %s is open again", ch.port)
                    else:
                        next_port_try = now + port_delay
                        port_delay = min(port_delay * 2, self._retry_max)
                self._retry_offline(now)
            except Exception:  # the supervisor must outlive any one failure
                log.exception("OSDP bus supervisor")

    def _drain_library_queue(self) -> None:
        # libosdp's ControlPanel also queues every event for get_event(); nobody reads
        # that queue here, so empty it or it grows for ever.
        for pd in self._pds:
            while self._cp.get_event(pd.spec.address, timeout=-1) is not None:
                pass

    def _check_status(self) -> None:
        """Poll the online bitmask too: a notification lost must not leave a reader's state stale."""
        mask = self._cp.status()
        for i, pd in enumerate(self._pds):
            online = bool(mask & (1 << i))
            if online != bool(pd.online) and (online or pd.online is not None):
                self._set_online(pd, online)
        now = self._clock()
        for pd in self._pds:
            name = pd.spec.name
            if (
                pd.online is None
                and name not in self._timeout_reported
                and now - self._started_at >= self._online_timeout
            ):
                self._timeout_reported.add(name)
                log.warning(
                    "OSDP reader %s (address %d on %s) is not online after %.0f s: check the RS-485 "
                    "wiring (A to A, B to B, common ground), the reader's address and baud rate, and "
                    "that the reader holds the same Secure Channel key as the config",
                    name,
                    pd.spec.address,
                    self.port_name,
                    now - self._started_at,
                )
                self._emit(ReaderStatus(reader=name, online=False))

    def _retry_offline(self, now: float) -> None:
        """Restart the link to a reader offline for a while (libosdp alone waits 300 s)."""
        for pd in self._pds:
            if pd.online or now < pd.next_retry:
                continue
            address = pd.spec.address
            with self._lock:
                self.counters["retries"] += 1
                pd.retry_delay = min(pd.retry_delay * 2, self._retry_max)
                pd.next_retry = now + pd.retry_delay
            # disable_pd takes effect on libosdp's next refresh; enable only after it did.
            self._cp.disable_pd(address)
            deadline = time.monotonic() + 1.0
            while self._cp.is_pd_enabled(address) and time.monotonic() < deadline:
                time.sleep(0.02)
            self._cp.enable_pd(address)


class FeedbackRouter:
    """The runtime's OutputDriver with feedback for OSDP readers sent over OSDP.

    outputs: the turnstile I/O (TurnstileIO); buses: OsdpBus objects. Lines
    go to outputs; feedback goes to the bus holding the reader, else to
    outputs (Wiegand readers' LED and beeper lines).
    """

    def __init__(self, outputs: Any, *buses: OsdpBus) -> None:
        self.outputs = outputs
        self.buses = buses

    def set(self, line: str, active: bool) -> None:
        self.outputs.set(line, active)

    def feedback(self, reader: str, signal: str) -> None:
        for bus in self.buses:
            if bus.feedback(reader, signal):
                return
        self.outputs.feedback(reader, signal)
