"""Wiegand readers on GPIO: pin edges with their timestamps into the decoder.

Each edge of D0/D1 arrives through the pin's ``when_changed(ticks, state)``
callback with the edge's own timestamp (kernel time with lgpio, the
monotonic clock with the mock factory): the decoder times pulses and gaps
from those stamps, never from when the callback happened to run. A frame of
a fixed-format reader is complete at its last bit, in the edge callback; any
other frame ends after silence, found by a small per-reader timer thread
that sleeps until ``decoder.deadline()``.

Results become core events (CardRead, Keypad, ReaderError) through
``submit``. ``feed_edges`` takes explicit (t, line, level) edges for tests
and benchmarks (gpiozero's mock pins make 1 to 4 us pulses, see DESIGN.md).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.core.wiegand import WiegandDecoder

log = logging.getLogger(__name__)

# An edge timestamp more than this far from the timer's clock means the
# edge clock jumped (e.g. a realtime clock stepped): re-anchor it.
_REANCHOR_S = 1.0
_TIMER_SLACK_S = 0.02


class WiegandReader:
    """One Wiegand reader on two GPIO pins.

    name: the reader's name in the gate config (it fixes the direction).
    d0_pin, d1_pin: BCM numbers (after the 5 V to 3.3 V level shifter).
    factory: the gpiozero pin factory. submit: where events go.
    decoder_kwargs: WiegandDecoder options (silence_s, glitch_s, fixed_bits,
    max_bits, key_width). timer: run the silence timer thread (False: the
    caller calls ``poll``). clock: the timer's monotonic clock, in the same
    seconds as the edge timestamps. pull: the pins' pull ("up": idle high).
    Pins may be None to build a reader fed only through ``feed_edges``.
    """

    def __init__(
        self,
        name: str,
        d0_pin: int | None,
        d1_pin: int | None,
        *,
        factory: Any = None,
        submit: Callable[[Any], Any],
        decoder_kwargs: dict | None = None,
        timer: bool = True,
        clock: Callable[[], float] = time.monotonic,
        pull: str = "up",
    ) -> None:
        self.name = name
        self.decoder = WiegandDecoder(**(decoder_kwargs or {}))
        self._submit = submit
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._timer_until: float | None = None  # what the timer thread sleeps towards
        self._closed = False
        self.adapter_counters: dict[str, int] = {"edges": 0, "cards": 0, "keypad": 0, "errors": 0}
        self._factory = factory
        self._pins: list[Any] = []
        self._pin_numbers = [p for p in (d0_pin, d1_pin) if p is not None]
        self._callbacks: list[Callable[[Any, Any], None]] = []
        self._anchor: tuple[Any, float] | None = None  # (edge ticks, clock seconds) pairing
        if (d0_pin is None) != (d1_pin is None):
            raise ValueError(f"reader {name}: give both d0_pin and d1_pin, or neither")
        if d0_pin is not None:
            if factory is None:
                raise ValueError(f"reader {name}: a pin factory is needed to use GPIO pins")
            self._open_pins(d0_pin, d1_pin, pull)
        self._thread: threading.Thread | None = None
        if timer:
            self._thread = threading.Thread(target=self._timer_loop, name=f"wiegand-{name}", daemon=True)
            self._thread.start()

    # -- pins --------------------------------------------------------------------

    def _open_pins(self, d0: int, d1: int, pull: str) -> None:
        # Reserve like a gpiozero device would, so a second user of the pin
        # (another device, the io-test tool) gets GPIOPinInUse, not a silent clash.
        self._factory.reserve_pins(self, f"GPIO{d0}", f"GPIO{d1}")
        try:
            for line, number in enumerate((d0, d1)):
                pin = self._factory.pin(f"GPIO{number}")
                pin.function = "input"
                pin.pull = {"up": "up", "down": "down", "none": "floating"}[pull]
                pin.edges = "both"
                callback = self._make_edge_callback(line)
                self._callbacks.append(callback)  # the pin holds it weakly
                self._pins.append(pin)
                pin.when_changed = callback
        except Exception:
            self.close()
            raise

    def _conflicts_with(self, other: object) -> bool:
        # gpiozero's reservation protocol: any other user conflicts.
        return True

    def _make_edge_callback(self, line: int) -> Callable[[Any, Any], None]:
        def on_edge(ticks: Any, state: Any) -> None:
            self._edge(self._edge_time(ticks), line, 1 if state else 0)

        return on_edge

    def _edge_time(self, ticks: Any) -> float:
        """The edge's timestamp in the timer clock's seconds.

        Intervals come from the pin's ticks (factory.ticks_diff); the ticks
        are anchored once to the timer clock so the silence timer can compare
        them with its own time.
        """
        anchor = self._anchor
        if anchor is not None:
            t = anchor[1] + self._factory.ticks_diff(ticks, anchor[0])
            if abs(self._clock() - t) < _REANCHOR_S:
                return t
        self._anchor = (ticks, self._clock())
        return self._anchor[1]

    # -- edges and frames ----------------------------------------------------------

    def feed_edges(self, edges: Iterable[tuple[float, int, int]]) -> None:
        """Feed explicit edges: (t seconds in the timer clock, line 0=D0/1=D1, level)."""
        for t, line, level in edges:
            self._edge(t, line, level)

    def _edge(self, t: float, line: int, level: int) -> None:
        with self._lock:
            self.adapter_counters["edges"] += 1
            results = self.decoder.feed(t, line, level)
            due = self.decoder.deadline()
            # Wake the timer only when it sleeps with nothing to do, or must act
            # much earlier than planned. A frame's silence deadline only moves
            # later; what comes earlier is the stuck-line check each falling
            # edge sets, and a wake per bit for it is not worth it: a stuck
            # line is reported at most _TIMER_SLACK_S late.
            until = self._timer_until
            if due is not None and (until is None or due < until - _TIMER_SLACK_S):
                self._wake.notify()
        if results:
            self._deliver(results)

    def poll(self, t: float | None = None) -> None:
        """Complete frames (and stuck lines) due at time t (default: the clock's now)."""
        with self._lock:
            results = self.decoder.poll(self._clock() if t is None else t)
        if results:
            self._deliver(results)

    def _deliver(self, results: list) -> None:
        for result in results:
            if result.error is not None:
                self.adapter_counters["errors"] += 1
            elif result.kind == "keypad":
                self.adapter_counters["keypad"] += 1
            else:
                self.adapter_counters["cards"] += 1
            try:
                self._submit(result.as_event(self.name))
            except Exception:  # a failing submit must not kill the pin's callback thread
                log.exception("reader %s: could not submit %r", self.name, result)

    def _timer_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                due = self.decoder.deadline()
                now = self._clock()
                if due is None or now < due:
                    self._timer_until = due
                    self._wake.wait(None if due is None else due - now)
                    self._timer_until = None
                    continue
                results = self.decoder.poll(now)
            if results:
                self._deliver(results)

    # -- state -------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Frames, parity/length errors, glitches, stuck lines, edges, cards, keypad, errors."""
        with self._lock:
            return {**self.decoder.counters, **self.adapter_counters}

    def close(self) -> None:
        """Stop the timer and release the pins."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        for pin in self._pins:
            try:
                pin.when_changed = None
                pin.close()
            except Exception:
                log.exception("reader %s: could not release %r", self.name, pin)
        self._pins.clear()
        self._callbacks.clear()
        if self._factory is not None and self._pin_numbers:
            self._factory.release_pins(self, *(f"GPIO{n}" for n in self._pin_numbers))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)


def readers_from_profile(
    profile: Any,
    *,
    factory: Any,
    submit: Callable[[Any], Any],
    decoder_kwargs: dict[str, dict] | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, WiegandReader]:
    """A WiegandReader for each reader of a board profile (agent.hw.profiles).

    decoder_kwargs: reader name -> WiegandDecoder options (e.g. fixed_bits for
    a reader whose format is fixed, key_width). names: only these readers
    (the gate config's), default all the profile wires. If one fails to open,
    those already opened are closed again.
    """
    wanted = list(profile.readers if names is None else names)
    missing = [n for n in wanted if n not in profile.readers]
    if missing:
        raise ValueError(
            f"reader(s) {', '.join(missing)} are not wired in hardware profile {profile.name} "
            f"(it wires: {', '.join(profile.readers) or 'none'}); rename the readers in the gate "
            "config or pick a profile that wires them"
        )
    out: dict[str, WiegandReader] = {}
    try:
        for name in wanted:
            pins = profile.readers[name]
            out[name] = WiegandReader(
                name, pins.d0, pins.d1, factory=factory, submit=submit,
                decoder_kwargs=(decoder_kwargs or {}).get(name), pull=pins.pull,
            )
    except Exception:
        for reader in out.values():
            reader.close()
        raise
    return out
