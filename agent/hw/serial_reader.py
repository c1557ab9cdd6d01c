"""Serial card readers with pyserial: RDM6300 frames and line-oriented EM-Marine readers.

One thread per reader reads the port with a short timeout (so ``stop()`` is
prompt), feeds the bytes to the pure stream decoder
(``agent.core.serialframes``), suppresses a card that stays in the field
(``RepeatFilter``) and hands core events to ``submit``: ``CardRead`` for a
good frame, ``ReaderError`` for a bad one (checksum, garbage).

A port that disappears (a read raising ``SerialException``/``OSError``, or
the device path vanishing or now naming another device, as when a USB
adapter is replugged and udev moves ``/dev/gate-reader``) gives
``ReaderError(kind="disconnected")`` and ``ReaderStatus(online=False)``
once per outage; the thread then reopens the path with exponential backoff,
without restarting the agent, and gives ``ReaderStatus(online=True)`` when
the reader is back. The port is opened with an exclusive lock, so a second
program (the ``enroll`` bench tool while the service runs) is told the port
is busy instead of stealing half the bytes.

Wiring: RDM6300 TX to the Pi's RXD (GPIO15) at 9600 8N1 (the module runs
on 5 V; its TX is 5 V TTL, so use a divider or level shifter), or any
reader through a USB serial adapter. See docs/readers.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import serial

from agent.core.cards import CardResult, check_key_width
from agent.core.events import ReaderError, ReaderStatus
from agent.core.serialframes import EmLineStream, Rdm6300Stream, RepeatFilter

log = logging.getLogger(__name__)

PROTOCOLS = ("rdm6300", "emline")
# Errors that mean "the port is gone or unusable", as opposed to a bad frame.
_PORT_ERRORS = (serial.SerialException, OSError)


class SerialReader:
    """One serial card reader on one port.

    name: the reader's name in the gate config (it fixes the direction).
    port: the device path, ideally the stable udev name (/dev/gate-reader).
    protocol: "rdm6300" (0x02 + 12 hex digits + 0x03 frames) or "emline"
    (one card per CR/LF-terminated line; ``number`` says how the line is read:
    "auto", "dec" or "hex"). baudrate: 9600 for the RDM6300.
    submit: where events go (GateRuntime.submit). repeat_window_s: a card
    seen again within this time of its last sighting is a repeat, not a new
    presentation. key_width: the site's key width. reopen_min_s,
    reopen_max_s: backoff between attempts to reopen a lost port.
    clock: monotonic seconds for the repeat filter. read_timeout_s: how long
    one read waits; also the silence after which a torn frame is reported.
    """

    def __init__(
        self,
        name: str,
        port: str,
        *,
        protocol: str = "rdm6300",
        baudrate: int = 9600,
        submit: Callable[[Any], Any],
        repeat_window_s: float = 1.5,
        key_width: int = 24,
        reopen_min_s: float = 0.5,
        reopen_max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        read_timeout_s: float = 0.1,
        number: str = "auto",
        exclusive: bool = True,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(
                f"reader {name}: protocol {protocol!r} is not supported; use one of "
                f"{', '.join(PROTOCOLS)} (rdm6300 for 0x02...0x03 frames, emline for one card per line)"
            )
        if not 0 < reopen_min_s <= reopen_max_s:
            raise ValueError(
                f"reader {name}: need 0 < reopen_min_s <= reopen_max_s, got {reopen_min_s} and {reopen_max_s}"
            )
        if read_timeout_s <= 0:
            raise ValueError(f"reader {name}: read_timeout_s must be > 0, got {read_timeout_s}")
        self.name = name
        self.port = port
        self.protocol = protocol
        self.baudrate = baudrate
        self.key_width = check_key_width(key_width)
        self.number = number
        self._submit = submit
        self._filter = RepeatFilter(repeat_window_s)
        self._clock = clock
        self._reopen_min = reopen_min_s
        self._reopen_max = reopen_max_s
        self._read_timeout = read_timeout_s
        self._exclusive = exclusive
        self._stream = self._new_stream()  # checks `number` now, not in the thread
        self._serial: serial.Serial | None = None
        self._rdev: int | None = None  # the device the open port is, to notice a moved path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards counters and the online flag
        self._online: bool | None = None  # None: not opened yet
        self._ever_open = False
        self.last_error: str = ""  # why the port was last lost or could not be opened
        self._counters: dict[str, int] = {
            "bytes": 0,
            "frames": 0,  # good card frames, repeats included
            "cards": 0,  # card reads submitted
            "repeats": 0,  # suppressed repeats
            "reconnects": 0,  # reopened after an outage
            "open_failures": 0,
            "checksum_errors": 0,
            "garbage_errors": 0,
            "disconnected_errors": 0,  # outages, each counted once
        }

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader thread; it opens the port (retrying with backoff)."""
        if self._thread is not None:
            raise RuntimeError(f"reader {self.name}: start() was already called")
        self._thread = threading.Thread(target=self._run, name=f"serial-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the port (within about one read timeout)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._close_port()

    @property
    def online(self) -> bool:
        """Whether the port is open and reading."""
        with self._lock:
            return bool(self._online)

    @property
    def counters(self) -> dict[str, int]:
        """bytes, frames, cards, repeats, reconnects, open_failures, and <kind>_errors."""
        with self._lock:
            return dict(self._counters)

    def wait_online(self, timeout: float) -> bool:
        """Wait until the port is open (tests, the enroll tool)."""
        deadline = time.monotonic() + timeout
        while not self.online:
            if self._stop.is_set() or time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._reopen_min
        while not self._stop.is_set():
            if self._serial is None:
                if self._open():
                    delay = self._reopen_min
                else:
                    self._stop.wait(delay)
                    delay = min(delay * 2, self._reopen_max)
                continue
            try:
                data = self._serial.read(max(1, self._serial.in_waiting))
            except _PORT_ERRORS as exc:
                self._lost(f"read failed: {exc}")
                continue
            except TypeError as exc:  # pyserial when the fd was closed under it
                self._lost(f"read failed: {exc}")
                continue
            if data:
                with self._lock:
                    self._counters["bytes"] += len(data)
                self._deliver(self._stream.feed(data))
            else:
                # A quiet line: a frame cut short is garbage now, not when the next card comes.
                self._flush_stream()
                moved = self._path_changed()
                if moved:
                    self._lost(moved)
        self._flush_stream()

    def _open(self) -> bool:
        try:
            ser = serial.Serial(
                self.port,
                self.baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=self._read_timeout,
                exclusive=self._exclusive,
            )
        except _PORT_ERRORS as exc:
            with self._lock:
                self._counters["open_failures"] += 1
            self._went_offline(f"cannot open {self.port}: {exc}")
            return False
        try:
            self._rdev = os.fstat(ser.fileno()).st_rdev
        except (OSError, AttributeError, serial.SerialException):
            self._rdev = None
        self._serial = ser
        self._stream = self._new_stream()
        with self._lock:
            back = self._ever_open
            if back:
                self._counters["reconnects"] += 1
            self._ever_open = True
            self._online = True
        if back:
            log.warning("reader %s: %s is back", self.name, self.port)
        else:
            log.info(
                "reader %s: reading %s (%s, %d baud)",
                self.name,
                self.port,
                self.protocol,
                self.baudrate,
            )
        self._emit(ReaderStatus(reader=self.name, online=True))
        return True

    def _lost(self, why: str) -> None:
        self._flush_stream()
        self._close_port()
        self._went_offline(why)

    def _went_offline(self, why: str) -> None:
        """Report an outage once: the first failure after being online (or at start)."""
        self.last_error = why
        with self._lock:
            first = self._online is not False
            self._online = False
            if first:
                self._counters["disconnected_errors"] += 1
        if not first:
            return
        log.warning(
            "reader %s: %s; reopening with backoff (up to every %.0f s)",
            self.name,
            why,
            self._reopen_max,
        )
        self._emit(
            ReaderError(
                reader=self.name,
                kind="disconnected",
                detail=f"{why}; check the reader's cable and power, the agent reopens the port by itself",
            )
        )
        self._emit(ReaderStatus(reader=self.name, online=False))

    def _path_changed(self) -> str | None:
        """Why the open port is no longer the device at its path, or None."""
        try:
            st = os.stat(self.port)
        except FileNotFoundError:
            return f"{self.port} vanished"
        except OSError:
            return None
        if self._rdev is not None and st.st_rdev != self._rdev:
            return f"{self.port} now names another device"
        return None

    def _close_port(self) -> None:
        ser, self._serial = self._serial, None
        if ser is not None:
            try:
                ser.close()
            except Exception:  # closing a vanished device may fail; it is gone either way
                log.debug("reader %s: closing %s failed", self.name, self.port, exc_info=True)

    # -- frames ------------------------------------------------------------------------

    def _new_stream(self) -> Rdm6300Stream | EmLineStream:
        if self.protocol == "rdm6300":
            return Rdm6300Stream(self.key_width)
        return EmLineStream(self.key_width, number=self.number)

    def _flush_stream(self) -> None:
        if isinstance(self._stream, Rdm6300Stream):
            self._deliver(self._stream.flush())

    def _deliver(self, results: list[CardResult]) -> None:
        for result in results:
            if result.error is not None:
                with self._lock:
                    key = f"{result.error}_errors"
                    self._counters[key] = self._counters.get(key, 0) + 1
                self._emit(result.as_event(self.name))
                continue
            with self._lock:
                self._counters["frames"] += 1
            if result.key is not None and not self._filter.accept(result.key, self._clock()):
                with self._lock:
                    self._counters["repeats"] += 1
                continue
            with self._lock:
                self._counters["cards"] += 1
            self._emit(result.as_event(self.name))

    def _emit(self, event: Any) -> None:
        try:
            self._submit(event)
        except Exception:  # a failing submit must not end the reader thread
            log.exception("reader %s: could not submit %r", self.name, event)
