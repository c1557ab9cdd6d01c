"""Simulated hardware on gpiozero mock pins: a turnstile, card readers, a crowd.

The service runs unchanged on ``hardware.pin_factory = "mock"`` (or a
``MockFactory`` passed to ``Service(..., factory=...)``); these classes sit on
the *other* side of the same mock pins, where the turnstile and the readers
would be. They only read the service's output pins and drive its input
pins (the one exception, by choice: a reader may feed its Wiegand adapter
timed edges, see SimulatedReader), so the demo, the crash tests and the real
service exercise exactly the code a Pi runs.

API (all thread-safe; every class has ``close()`` where it runs a thread):

``SimulatedTurnstile(factory, profile, *, walk_s=(0.8, 2.0), rng=None,
witness=None, clock=time.monotonic, pass_open_s=0.25, poll_s=0.005)``
    Starts at once. A small thread polls the profile's turnstile outputs
    (unlock_a, unlock_b, stop, fire_release). Each time an unlock line
    *becomes* active (a pulse, or the start of a held line) one person walks:
    ``walk_s`` later (a (low, high) range, or a callable ``(direction) ->
    seconds | None``; None: nobody walks, the grant times out) the PASS A
    (``in``) / PASS B (``out``) sensor opens for ``pass_open_s``, which the
    service sees as a passage. While the gate is free (fire_release active,
    or both unlock lines held) the people queued with ``enqueue(direction,
    n)`` pass one after another, no card needed (an evacuation).
    ``force(direction)`` turns the arm with no grant (``passage.forced``).
    ``witness``: a file that gets one JSON line, written with O_APPEND then
    fsync'd, for every output change seen: ``{"t": clock(), "line":
    "unlock_a", "active": true}``; when the simulator attaches it first
    writes ``{"t": ..., "attach": PID, "lines": {line: active}}``. The file
    outlives the agent's process: it is what the gate really did. ``t`` is
    when the simulator saw the change (at most about ``poll_s`` after it).
    ``unlocks`` counts unlock lines seen going active.
    A line counts as active only while its pin is an output at the line's
    active level: a pin nobody has claimed yet is a relay with no drive, off.
    Attach it before the service starts to witness the start itself.
    Read back: ``changes`` (list of ``OutputChange``), ``passages``
    ({"in": n, "out": n}), ``is_active(line)``, ``is_free()``,
    ``wait_idle(timeout)``.

``SimulatedReader(factory, profile, reader_name, *, adapter=None,
key_width=24, pulse_s=100e-6, gap_s=(1e-3, 2e-3), frame_gap_s=0.05, rng=None)``
    ``present(card)`` sends a 26-bit Wiegand frame for a card string
    ("100,60179", "0006613779", "hex:...") or an integer key.
    Without ``adapter`` it drives the reader's D0/D1 mock pins for real: a
    low pulse of ``pulse_s`` per bit, timed by a busy wait that keeps the GIL
    (a sleep would give it away, and getting it back can take the 5 ms
    switch interval, which the decoder would call a stuck line), and gaps of
    ``gap_s`` slept. The mock pins stamp each edge with the real monotonic
    clock, so the pulse widths the decoder measures are the real ones (100
    to a few hundred us, well over its 10 us glitch threshold, under its
    5 ms stuck-line limit). With ``adapter`` (the service's
    ``WiegandReader``, ``service.readers[name]``) the same pulse train goes
    through ``adapter.feed_edges`` with explicit timestamps: exact timing,
    immune to a loaded machine (docs/design.md#testing-wiegand-on-mock-pins). The demo may
    use either; tests that assert decisions use the adapter.
    Frames are at least ``frame_gap_s`` apart (more than the decoder's
    25 ms end-of-frame silence), however fast they are asked for.
    ``send_bits(bits)`` sends any bit string (noise, parity errors).
    ``connected``: the service is listening on both lines.

``Crowd(readers, turnstile, *, cards, rate_per_min=30, unknown_ratio=0.05,
blocked_cards=(), blocked_ratio=None, weights=None, directions=None,
rng=None, patient=True, settle_s=0.5)``
    A morning crowd: ``readers`` maps reader name -> SimulatedReader.
    ``step()`` lets one person present a card (a known one from ``cards``,
    an unknown one with ``unknown_ratio``, a blocked one with
    ``blocked_ratio``, default 0.02 when ``blocked_cards`` are given) at a
    reader picked by ``weights`` (reader name -> relative share; default
    equal); while the gate is free the person also joins the turnstile's
    queue and walks through. ``run(duration_s=None, stop_event=None)``
    presents at about ``rate_per_min`` (Poisson arrivals) until the time is
    up or the event is set. ``patient``: wait (up to 10 s) until nobody is
    walking before presenting, and after it up to ``settle_s`` for the
    unlock, as people do at a one-lane turnstile; False gives ``gate_busy``
    refusals under load. ``counts`` and ``history`` say
    what was presented.

Frames: ``wiegand_frame(key, length=None)`` the Wiegand bits carrying a key
(26, 34, 35 or 37 bits: the length a fixed-format reader expects, else the
shortest that holds it); ``serial_frame(key, protocol, number="auto")`` the
bytes an RDM6300 or a line-oriented EM-Marine reader sends for it;
``feed_serial(reader, data)`` hands bytes to the service's ``SerialReader``
as if read from its port: a stream decoder of the reader's protocol, then
the reader's own delivery (repeat filter, counters, submit).

Inputs: ``drive_input(factory, profile, name, asserted)`` sets any
turnstile input to its asserted / rest level; ``drive_fire_loop(factory,
profile, open)`` opens (alarm) or closes the fire loop;
``press_input(factory, profile, name, hold_s=0.15)`` presses and releases a
guard button or the fire-release reset.

Some 770 lines on purpose, 90 of them this description: the other end of
the mock pins as one API. The demo uses the turnstile, the readers and the
crowd together (``gate-agent sim`` and the tests use parts of it), and all
three share the pin and frame helpers at the top.
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from gpiozero.pins.mock import MockPin
from gpiozero.pins.pi import PiPin

from agent.core.cards import (
    CardFormatError,
    encode_rdm6300,
    encode_w26,
    encode_w34,
    encode_w35,
    encode_w37,
    parse_card_string,
)

log = logging.getLogger(__name__)

__all__ = [
    "Crowd",
    "OutputChange",
    "Presentation",
    "SimulatedReader",
    "SimulatedTurnstile",
    "drive_fire_loop",
    "drive_input",
    "feed_serial",
    "press_input",
    "serial_frame",
    "wiegand_frame",
]

WATCHED_LINES = ("unlock_a", "unlock_b", "stop", "fire_release")
UNLOCK_DIRECTION = {"unlock_a": "in", "unlock_b": "out"}
PASS_INPUT = {"in": "pass_a", "out": "pass_b"}
DIRECTIONS = ("in", "out")
PASS_OPEN_S = 0.25  # the sensors open for about 250 ms as the arm passes 60 degrees


# --------------------------------------------------------------------------- inputs


class WirePin(MockPin):
    """A mock pin whose change reaches ``when_changed`` with the time given to ``drive_at``, the
    way lgpio hands over the kernel's stamp of an edge however late its thread calls back.
    Use with ``MockFactory(pin_class=WirePin)``."""

    _stamp: float | None = None

    def drive_at(self, t: float, level: int) -> None:
        self._stamp = t
        try:
            if level:
                self.drive_high()
            else:
                self.drive_low()
        finally:
            self._stamp = None

    def _call_when_changed(self) -> None:
        PiPin._call_when_changed(self, self._last_change if self._stamp is None else self._stamp, self._state)


def _pin(factory: Any, number: int) -> Any:
    return factory.pin(f"GPIO{number}")


def drive_input(factory: Any, profile: Any, name: str, asserted: bool) -> None:
    """Drive a turnstile input (a profile ``inputs`` name) to its asserted or rest level.

    "Asserted" is the profile's meaning (pass_a: the sensor opened; fire_loop:
    the loop is open, alarm; button_in: pressed); the level follows the
    profile's ``active`` setting.
    """
    try:
        spec = profile.inputs[name]
    except KeyError:
        raise ValueError(f"input {name!r} is not wired in hardware profile {profile.name} "
                         f"(it wires: {', '.join(profile.inputs)})") from None
    pin = _pin(factory, spec.pin)
    high = spec.active_high if asserted else not spec.active_high
    if high:
        pin.drive_high()
    else:
        pin.drive_low()


def drive_fire_loop(factory: Any, profile: Any, open: bool) -> None:
    """Open (``open=True``: fire alarm, free passage both ways) or close the fire loop."""
    drive_input(factory, profile, "fire_loop", open)


def press_input(factory: Any, profile: Any, name: str, hold_s: float = 0.15) -> None:
    """Press and release a momentary input (button_in, button_out, fire_reset); blocks hold_s."""
    drive_input(factory, profile, name, True)
    time.sleep(hold_s)
    drive_input(factory, profile, name, False)


# --------------------------------------------------------------------------- frames

# Wiegand frame length -> (data bits, how the key splits into the encoder's two fields).
_WIEGAND_SPLIT: dict[int, tuple[int, Callable[[int], str]]] = {
    26: (24, lambda k: encode_w26(k >> 16, k & 0xFFFF)),
    34: (32, lambda k: encode_w34(k >> 16, k & 0xFFFF)),
    35: (32, lambda k: encode_w35(k >> 20, k & 0xFFFFF)),
    37: (35, lambda k: encode_w37(k >> 19, k & 0x7FFFF)),
}


def wiegand_frame(key: int, length: int | None = None) -> str:
    """The Wiegand frame whose data bits are ``key`` (the decoder gives the key back).

    length: the frame a fixed-format reader sends (26, 34, 35, 37); None: the
    shortest of 26, 34, 37 bits that holds the key.
    """
    if not isinstance(key, int) or key < 0:
        raise CardFormatError(f"key {key!r} is not a non-negative integer")
    lengths = (26, 34, 37) if length is None else (length,)
    for n in lengths:
        if n not in _WIEGAND_SPLIT:
            raise ValueError(f"Wiegand frame of {n} bits: give 26, 34, 35 or 37")
        data_bits, encode = _WIEGAND_SPLIT[n]
        if key < 1 << data_bits:
            return encode(key)
    raise CardFormatError(f"key {key} does not fit the data bits of a {'/'.join(map(str, lengths))}-bit "
                          "Wiegand frame; present a card this reader can carry")


def serial_frame(key: int, protocol: str, number: str = "auto") -> bytes:
    """The bytes a serial reader sends for a card whose key is ``key``.

    protocol "rdm6300": 0x02, 10 hex digits, checksum, 0x03 (the key as the
    40-bit value). "emline": one line, CR LF: the 10-digit decimal print
    (number "auto"/"dec") or 10 hex digits (number "hex", or a key over
    10 decimal digits with "auto").
    """
    if not isinstance(key, int) or not 0 <= key < 1 << 40:
        raise CardFormatError(f"key {key!r} does not fit the 40 bits an EM-Marine reader sends")
    if protocol == "rdm6300":
        return encode_rdm6300(key)
    if protocol == "emline":
        if number == "hex" or (number == "auto" and key >= 10**10):
            text = f"{key:010X}"
        elif key < 10**10:
            text = f"{key:010d}"
        else:
            raise CardFormatError(f"key {key} has more than 10 decimal digits; a reader with "
                                  'number = "dec" cannot send it')
        return text.encode("ascii") + b"\r\n"
    raise ValueError(f"serial protocol {protocol!r}: give rdm6300 or emline")


def feed_serial(reader: Any, data: bytes) -> None:
    """Bytes into a ``SerialReader`` as if read from its port (see the module doc).

    A stream decoder of its own, so bytes from its port thread are never
    interleaved with these; then the reader's delivery, as for its port's frames.
    """
    stream = reader._new_stream()  # the reader's protocol, key width and number setting
    results = stream.feed(bytes(data))
    flush = getattr(stream, "flush", None)
    if flush is not None:  # an RDM6300 frame cut short is garbage now, as when the line goes quiet
        results += flush()
    reader._deliver(results)


# --------------------------------------------------------------------------- turnstile


@dataclass(frozen=True)
class OutputChange:
    """An output line changed, as the simulated turnstile saw it (t: its clock)."""

    t: float
    line: str
    active: bool


class SimulatedTurnstile:
    """The turnstile at the other end of the service's output and PASS pins.

    See the module doc. ``close()`` stops the thread and the witness file.
    """

    def __init__(
        self,
        factory: Any,
        profile: Any,
        *,
        walk_s: tuple[float, float] | Callable[[str], float | None] = (0.8, 2.0),
        rng: random.Random | None = None,
        witness: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pass_open_s: float = PASS_OPEN_S,
        poll_s: float = 0.005,
    ) -> None:
        if not callable(walk_s):
            lo, hi = walk_s
            if not 0 <= lo <= hi:
                raise ValueError(f"walk_s={walk_s!r}: give (low, high) seconds with 0 <= low <= high")
        for name in PASS_INPUT.values():
            if name not in profile.inputs:
                raise ValueError(f"hardware profile {profile.name} wires no {name}; the simulated "
                                 "turnstile needs both passage sensors")
        self.factory = factory
        self.profile = profile
        self.walk_s = walk_s
        self.rng = rng or random.Random()
        self.clock = clock
        self.pass_open_s = float(pass_open_s)
        self.poll_s = float(poll_s)
        self.changes: list[OutputChange] = []
        self.passages: dict[str, int] = {d: 0 for d in DIRECTIONS}
        self.forced: dict[str, int] = {d: 0 for d in DIRECTIONS}
        self.unlocks = 0  # unlock lines seen going active
        self.errors = 0
        self._lock = threading.Lock()
        self._queue: dict[str, int] = {d: 0 for d in DIRECTIONS}
        self._walking: dict[str, int] = {d: 0 for d in DIRECTIONS}  # walks scheduled, sensor not yet closed
        self._actions: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._pins = {line: _pin(factory, spec.pin) for line, spec in profile.outputs.items()
                      if line in WATCHED_LINES}
        self._seen = {line: len(getattr(pin, "states", ())) for line, pin in self._pins.items()}
        self._active = {line: self._level_active(line, pin.state) for line, pin in self._pins.items()}
        self._witness_fd: int | None = None
        if witness is not None:
            self._open_witness(Path(witness))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-turnstile", daemon=True)
        self._thread.start()

    # -- reading the outputs ---------------------------------------------------------

    def _level_active(self, line: str, level: Any) -> bool:
        # A pin that is not an output drives no relay: the line is off, whatever the mock level.
        pin = self._pins[line]
        if getattr(pin, "function", "output") != "output":
            return False
        return bool(level) == self.profile.outputs[line].active_high

    def is_active(self, line: str) -> bool:
        """Whether the output line was active at the last poll."""
        with self._lock:
            return self._active.get(line, False)

    def is_free(self, direction: str | None = None) -> bool:
        """Free passage (fire release, or both unlocks held): both ways, so ``direction``
        changes nothing; it is accepted so callers can ask about the one they mean."""
        with self._lock:
            return self._free_locked(direction)

    def _free_locked(self, direction: str | None = None) -> bool:
        a = self._active
        return a.get("fire_release", False) or (a.get("unlock_a", False) and a.get("unlock_b", False))

    def _poll_outputs(self, now: float) -> list[OutputChange]:
        changes = []
        for line, pin in self._pins.items():
            states = getattr(pin, "states", None)
            if states is None:  # not a mock pin: compare levels
                levels = [pin.state]
            else:
                n = len(states)
                levels = [s.state for s in states[self._seen[line]:n]]
                self._seen[line] = n
            for level in levels:
                active = self._level_active(line, level)
                if active != self._active[line]:
                    self._active[line] = active
                    changes.append(OutputChange(now, line, active))
        return changes

    # -- witness -----------------------------------------------------------------------

    def _open_witness(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._witness_fd = fd
        # A process killed mid-line leaves no newline: start on a fresh line.
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
        self._witness({"t": self.clock(), "attach": os.getpid(), "lines": dict(self._active)})

    def _witness(self, doc: dict) -> None:
        fd = self._witness_fd
        if fd is None:
            return
        os.write(fd, (json.dumps(doc, separators=(",", ":")) + "\n").encode())
        os.fsync(fd)  # the witness must outlive a kill -9 of this very process

    # -- people ------------------------------------------------------------------------

    def enqueue(self, direction: str, n: int = 1) -> None:
        """n people wait at the arm in ``direction``; they pass while the gate is free."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}; use 'in' or 'out'")
        with self._lock:
            self._queue[direction] += int(n)

    def queued(self, direction: str) -> int:
        with self._lock:
            return self._queue[direction]

    def force(self, direction: str) -> None:
        """Someone pushes the arm through with no grant (the service records passage.forced)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}; use 'in' or 'out'")
        with self._lock:
            self.forced[direction] += 1
            self._walk_locked(direction, 0.0, self.clock())

    @property
    def walking(self) -> bool:
        """Someone is walking (a walk scheduled or a sensor open)."""
        with self._lock:
            return any(self._walking.values())

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until nobody walks and no free-passage queue is left; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = any(self._walking.values()) or (self._free_locked() and any(self._queue.values()))
            if not busy:
                return True
            time.sleep(0.01)
        return False

    def _walk_time(self, direction: str) -> float | None:
        if callable(self.walk_s):
            return self.walk_s(direction)
        lo, hi = self.walk_s
        return self.rng.uniform(lo, hi)

    def _walk_locked(self, direction: str, after: float, now: float, *, unless_free: bool = False) -> None:
        """Schedule a walk: the sensor opens ``after`` s from now, closes pass_open_s later.

        unless_free: the walker an unlock called; if the gate is free by the time
        they reach the arm (both unlocks held, seen one poll apart), they are the
        free flow's, not an extra passage.
        """
        self._walking[direction] += 1
        self._schedule(now + after, lambda: self._arm(direction, unless_free))

    def _arm(self, direction: str, unless_free: bool) -> None:
        with self._lock:
            if unless_free and self._free_locked():
                self._walking[direction] -= 1
                return
        self._sensor(direction, True)
        with self._lock:
            self._schedule(self.clock() + self.pass_open_s, lambda: self._sensor(direction, False))

    def _schedule(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._actions, (t, next(self._seq), action))

    def _sensor(self, direction: str, opened: bool) -> None:
        try:
            drive_input(self.factory, self.profile, PASS_INPUT[direction], opened)
        except Exception:  # the service closed its pins (stopping): nobody is watching
            self.errors += 1
            log.debug("simulated turnstile: could not drive %s", PASS_INPUT[direction], exc_info=True)
        with self._lock:
            if opened:
                self.passages[direction] += 1  # the arm passed 60 degrees: what the service counts
            else:
                self._walking[direction] -= 1

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._tick()
            except Exception:  # the simulation must keep going; say why once per failure
                self.errors += 1
                log.exception("simulated turnstile: poll failed")

    def _tick(self) -> None:
        now = self.clock()
        due: list[Callable[[], None]] = []
        with self._lock:
            changes = self._poll_outputs(now)
            self.changes.extend(changes)
            free = self._free_locked()
            for ch in changes:
                direction = UNLOCK_DIRECTION.get(ch.line)
                if direction is not None and ch.active:
                    self.unlocks += 1
                if direction is not None and ch.active and not free:
                    after = self._walk_time(direction)
                    if after is not None:  # None: nobody walks, the grant times out
                        self._walk_locked(direction, after, now, unless_free=True)
            if free:
                for direction in DIRECTIONS:
                    if self._queue[direction] and not self._walking[direction]:
                        self._queue[direction] -= 1
                        after = self._walk_time(direction)
                        self._walk_locked(direction, 0.0 if after is None else after, now)
            while self._actions and self._actions[0][0] <= now:
                due.append(heapq.heappop(self._actions)[2])
        for ch in changes:
            self._witness({"t": ch.t, "line": ch.line, "active": ch.active})
        for action in due:  # outside the lock: driving a pin calls the service back
            action()

    def close(self) -> None:
        """Stop watching; PASS sensors left closed (at rest); the witness file closed."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        with self._lock:
            open_sensors = [d for d in DIRECTIONS if self._walking[d]]
            self._actions.clear()
        for direction in open_sensors:
            try:
                drive_input(self.factory, self.profile, PASS_INPUT[direction], False)
            except Exception:  # noqa: BLE001 - the service closed its pins first: nothing to rest
                log.debug("simulated turnstile: %s not put at rest", PASS_INPUT[direction])
        if self._witness_fd is not None:
            os.close(self._witness_fd)
            self._witness_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- readers


class _LineState:
    """One reader's lines as every SimulatedReader on them sees them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # one frame at a time
        self.last_end = float("-inf")  # when the last frame's last edge was


_LINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LINES_LOCK = threading.Lock()


def _line_state(owner: Any) -> _LineState:
    """The state of the reader behind ``owner`` (the service's reader adapter, or the
    D0 pin), made on first use; a fresh one where there is nothing to share it by."""
    if owner is None:
        return _LineState()
    with _LINES_LOCK:
        state = _LINES.get(owner)
        if state is None:
            state = _LINES[owner] = _LineState()
        return state


class SimulatedReader:
    """A 26-bit Wiegand reader at the other end of the service's D0/D1 pins (module doc)."""

    def __init__(
        self,
        factory: Any,
        profile: Any,
        reader_name: str,
        *,
        adapter: Any = None,
        key_width: int = 24,
        pulse_s: float = 100e-6,
        gap_s: tuple[float, float] = (1e-3, 2e-3),
        frame_gap_s: float = 0.05,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if reader_name not in profile.readers and adapter is None:
            raise ValueError(f"reader {reader_name!r} is not wired in hardware profile {profile.name} "
                             f"(it wires: {', '.join(profile.readers) or 'none'}); use one of those "
                             "names or pass the service's reader as adapter=")
        if not 10e-6 < pulse_s < 2e-3:
            raise ValueError(f"pulse_s={pulse_s!r}: give 20 to 100 us (real readers) and at most 2 ms "
                             "(the decoder calls 5 ms low a stuck line)")
        self.name = reader_name
        self.factory = factory
        self.profile = profile
        self.adapter = adapter
        self.key_width = key_width
        self.pulse_s = float(pulse_s)
        self.gap_s = gap_s
        self.rng = rng or random.Random()
        self.clock = clock
        self.frame_gap_s = float(frame_gap_s)
        self.frames = 0
        pins = profile.readers.get(reader_name)
        self._lines = (None, None) if pins is None else (_pin(factory, pins.d0), _pin(factory, pins.d1))
        # One frame at a time on the lines, and the quiet between frames, shared by every
        # SimulatedReader on the same reader (the demo's crowd and `gate-agent sim card`
        # both present cards on it): two frames overlapping would read as one damaged one.
        self._line = _line_state(adapter if adapter is not None else self._lines[0])

    @property
    def connected(self) -> bool:
        """Whether the service listens: the adapter is given, or both pins have a callback."""
        if self.adapter is not None:
            return True
        return all(p is not None and getattr(p, "when_changed", None) is not None for p in self._lines)

    def bits_for(self, card: str | int) -> str:
        """The W26 frame of a card string or integer key (24 bits at most)."""
        key = card if isinstance(card, int) else parse_card_string(card, self.key_width)
        if not 0 <= key < 1 << 24:
            raise CardFormatError(f"card {card!r} (key {key}) does not fit the 24 bits a 26-bit Wiegand "
                                  "frame carries; present its 24-bit form (facility,card or the print)")
        return encode_w26(key >> 16, key & 0xFFFF)

    def present(self, card: str | int) -> str:
        """Send the card's 26-bit frame; returns the bits sent."""
        bits = self.bits_for(card)
        self.send_bits(bits)
        return bits

    def send_bits(self, bits: str) -> None:
        """Send any bit string as one frame (e.g. a damaged one)."""
        if not bits or set(bits) - {"0", "1"}:
            raise ValueError(f"bits {bits!r}: give a string of 0 and 1")
        line = self._line
        with line.lock:
            if self.adapter is not None:
                self._feed(bits)
            else:
                # A reader is silent between frames; sooner, two frames would read as one.
                wait = line.last_end + self.frame_gap_s - self.clock()
                if wait > 0:
                    time.sleep(wait)
                self._drive(bits)
                line.last_end = self.clock()
            self.frames += 1

    def _gap(self) -> float:
        lo, hi = self.gap_s
        return self.rng.uniform(lo, hi)

    def _feed(self, bits: str) -> None:
        # The train, timed as if it had just ended, so the silence timer completes it at once;
        # never before the last frame's end and the quiet between frames.
        gaps = [self._gap() for _ in bits[1:]]
        length = sum(gaps) + self.pulse_s
        t = max(self.clock() - length - 1e-3, self._line.last_end + self.frame_gap_s)
        self._line.last_end = t + length
        edges = []
        for i, b in enumerate(bits):
            line = int(b)
            edges += [(t, line, 0), (t + self.pulse_s, line, 1)]
            if i < len(gaps):
                t += gaps[i]
        self.adapter.feed_edges(edges)

    def _drive(self, bits: str) -> None:
        for i, b in enumerate(bits):
            if i:
                time.sleep(self._gap())
            pin = self._lines[int(b)]
            pin.drive_low()
            end = time.perf_counter() + self.pulse_s
            while time.perf_counter() < end:  # busy: keep the GIL so the pulse stays short
                pass
            pin.drive_high()


# --------------------------------------------------------------------------- crowd


@dataclass(frozen=True)
class Presentation:
    """One person at a reader: kind is known, unknown or blocked."""

    t: float
    reader: str
    card: str | int
    kind: str


class Crowd:
    """A simulated crowd presenting cards (module doc)."""

    def __init__(
        self,
        readers: Mapping[str, SimulatedReader],
        turnstile: SimulatedTurnstile | None,
        *,
        cards: Sequence[str | int],
        rate_per_min: float = 30,
        unknown_ratio: float = 0.05,
        blocked_cards: Sequence[str | int] = (),
        blocked_ratio: float | None = None,
        weights: Mapping[str, float] | None = None,
        directions: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        patient: bool = True,
        settle_s: float = 0.5,
    ) -> None:
        if not readers:
            raise ValueError("a crowd needs at least one reader")
        if not cards and not blocked_cards and unknown_ratio <= 0:
            raise ValueError("a crowd needs cards to present (cards, blocked_cards or unknown_ratio > 0)")
        if not rate_per_min > 0:
            raise ValueError(f"rate_per_min={rate_per_min!r}: give a positive rate")
        self.readers = dict(readers)
        self.turnstile = turnstile
        self.cards = list(cards)
        self.blocked_cards = list(blocked_cards)
        self.rate_per_min = float(rate_per_min)
        self.unknown_ratio = float(unknown_ratio)
        self.blocked_ratio = (0.02 if self.blocked_cards else 0.0) if blocked_ratio is None else blocked_ratio
        names = list(self.readers)
        w = weights or {}
        self._weights = [float(w.get(n, 0.0 if w else 1.0)) for n in names]
        if not any(self._weights):
            raise ValueError(f"weights {dict(w)!r} give every reader ({', '.join(names)}) a zero share")
        self.directions = dict(directions or {"entry": "in", "exit": "out"})
        self.rng = rng or random.Random()
        self.patient = patient
        self.settle_s = float(settle_s)
        self.counts: dict[str, int] = {"known": 0, "unknown": 0, "blocked": 0, "skipped": 0}
        self.history: deque[Presentation] = deque(maxlen=1000)
        keys = set()
        for c in [*self.cards, *self.blocked_cards]:
            try:
                keys.add(c if isinstance(c, int) else parse_card_string(c))
            except CardFormatError:
                pass
        self._known_keys = keys

    def _unknown_card(self) -> int:
        while True:
            key = self.rng.getrandbits(24)
            if key not in self._known_keys:
                return key

    def step(self) -> Presentation | None:
        """One person presents a card now; None when the picked reader is not connected yet."""
        name = self.rng.choices(list(self.readers), weights=self._weights)[0]
        reader = self.readers[name]
        if not reader.connected:
            self.counts["skipped"] += 1
            return None
        if self.patient and self.turnstile is not None:
            self.turnstile.wait_idle(10.0)
        r = self.rng.random()
        if r < self.unknown_ratio or not (self.cards or self.blocked_cards):
            kind, card = "unknown", self._unknown_card()
        elif self.blocked_cards and (r < self.unknown_ratio + self.blocked_ratio or not self.cards):
            kind, card = "blocked", self.rng.choice(self.blocked_cards)
        else:
            kind, card = "known", self.rng.choice(self.cards)
        direction = self.directions.get(name, "in")
        if self.turnstile is not None and self.turnstile.is_free(direction):
            self.turnstile.enqueue(direction)  # the gate is open: they walk through anyway
        unlocks = self.turnstile.unlocks if self.turnstile is not None else 0
        reader.present(card)
        if self.patient and self.turnstile is not None:
            # Wait for the light: an unlock (then the walk, at the next step) or a refusal.
            deadline = time.monotonic() + self.settle_s
            while self.turnstile.unlocks == unlocks and time.monotonic() < deadline:
                time.sleep(0.005)
        self.counts[kind] += 1
        p = Presentation(time.monotonic(), name, card, kind)
        self.history.append(p)
        return p

    def run(self, duration_s: float | None = None, stop_event: threading.Event | None = None) -> int:
        """Present at about rate_per_min until duration_s passed or stop_event is set; returns
        how many cards were presented."""
        stop = stop_event or threading.Event()
        end = None if duration_s is None else time.monotonic() + duration_s
        n = 0
        while not stop.is_set():
            wait = self.rng.expovariate(self.rate_per_min / 60.0)
            if end is not None:
                wait = min(wait, max(0.0, end - time.monotonic()))
            if stop.wait(wait) or (end is not None and time.monotonic() >= end):
                break
            try:
                if self.step() is not None:
                    n += 1
            except Exception:  # a reader whose pins were closed under it: the service is stopping
                log.debug("crowd: presentation failed", exc_info=True)
        return n
