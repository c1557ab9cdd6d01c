"""Wiegand readers on GPIO: pin edges with their timestamps into the decoder.

Each edge of D0/D1 arrives through the pin's ``when_changed(ticks, state)``
callback with the edge's own timestamp: with lgpio the kernel's (its
CLOCK_MONOTONIC nanoseconds, which gpiozero hands over as seconds, the clock
``time.monotonic`` reads; 64 bits, no wrap-around), with the mock pins
``time.monotonic()`` at the change. The decoder times pulses, gaps and a
frame's end from those stamps, never from when a callback happened to run.

A frame of a fixed-format reader is complete at its last bit, in the edge
callback. Any other frame ends after ``silence_s`` of silence, and silence
is only proven by the edges' time: either the next edge comes stamped after
it (callbacks come in order, lgpio's from one thread), or a small per-reader
timer thread finds the clock ``max_lag_s`` past the end of the silence. A
callback can arrive well after its edge (the GIL, a busy CPU, lgpio's
notification thread behind), so the timer may only trust that every edge
stamped before ``now - max_lag_s`` has been delivered: it polls the decoder
at that time, never at ``now``. The price is ``max_lag_s`` more latency for
frames that end by silence; a fixed format pays nothing. An edge that comes
later still (``late_edges``) may cut a frame, which then gives reader
errors (length, most often), and the log a warning to raise
``hardware.wiegand_max_lag_s``.

Results become core events (CardRead, Keypad, ReaderError) through
``submit``. ``feed_edges`` takes explicit (t, line, level) edges for tests
and benchmarks (gpiozero's mock pins make 1 to 4 us pulses, see docs/design.md#testing-wiegand-on-mock-pins).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.core.wiegand import WiegandDecoder

log = logging.getLogger(__name__)

# The longest an edge callback may come after its edge, by default: room for
# the GIL held by other threads and a loaded CPU (bench/bench_latency.py
# measures the lag with a busy loop on every core; docs/readers.md).
# Config: hardware.wiegand_max_lag_s.
DEFAULT_MAX_LAG_S = 0.2
# An edge stamp this far ahead of the clock is not on the clock: its ticks
# are another clock's (the kernel's realtime stamps before Linux 5.7).
_FUTURE_S = 0.5
# With ticks on another clock: an edge this far behind the anchored time,
# between frames, re-anchors (the other clock wrapped or drifted).
_REANCHOR_S = 1.0
_TIMER_SLACK_S = 0.02


class WiegandReader:
    """One Wiegand reader on two GPIO pins.

    name: the reader's name in the gate config (it fixes the direction).
    d0_pin, d1_pin: BCM numbers (after the 5 V to 3.3 V level shifter).
    factory: the gpiozero pin factory. submit: where events go.
    decoder_kwargs: WiegandDecoder options (silence_s, glitch_s, fixed_bits,
    max_bits, key_width). max_lag_s: the longest an edge callback may come
    after its edge; a frame ends by silence only this much after the silence
    is over. timer: run the silence timer thread (False: the caller calls
    ``poll``). clock: the timer's monotonic clock, in the same seconds as the
    edge timestamps (the default, ``time.monotonic``, is the clock of lgpio's
    and the mock pins' stamps; with another clock the pins' ticks are
    anchored to it at the first edge). pull: the pins' pull ("up": idle
    high). Pins may be None to build a reader fed only through ``feed_edges``.
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
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        timer: bool = True,
        clock: Callable[[], float] = time.monotonic,
        pull: str = "up",
    ) -> None:
        self.name = name
        if not (isinstance(max_lag_s, (int, float)) and math.isfinite(max_lag_s) and 0 <= max_lag_s <= 10):
            raise ValueError(f"reader {name}: max_lag_s must be 0 to 10 seconds, got {max_lag_s!r}")
        self.max_lag_s = float(max_lag_s)
        self.decoder = WiegandDecoder(**(decoder_kwargs or {}))
        self._submit = submit
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._timer_until: float | None = None  # what the timer thread sleeps towards
        self._closed = False
        self.adapter_counters: dict[str, int] = {"edges": 0, "cards": 0, "keypad": 0, "errors": 0,
                                                 "bad_stamps": 0}
        self._lag_max = 0.0  # the longest an edge's callback came after the edge (s)
        self._factory = factory
        self._pins: list[Any] = []
        self._pin_numbers = [p for p in (d0_pin, d1_pin) if p is not None]
        self._callbacks: list[Callable[[Any, Any], None]] = []
        # Pin ticks are seconds on the clock (lgpio, mock) unless a test gave
        # another clock or the stamps prove otherwise; then they are anchored.
        self._ticks_on_clock = clock is time.monotonic
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
            try:
                self._edge(ticks, line, 1 if state else 0, ticks=True)
            except Exception:  # never into lgpio's one notification thread: every pin's callbacks would stop
                log.exception("reader %s: edge (%r, %r) failed", self.name, ticks, state)

        return on_edge

    def _edge_time(self, ticks: Any) -> float:
        """The edge's timestamp in the timer clock's seconds (called holding the lock)."""
        if self._ticks_on_clock:
            try:
                t = float(ticks)
            except (TypeError, ValueError, OverflowError):
                t = math.inf  # opaque ticks: another clock's
            if math.isnan(t):
                return t  # a broken stamp, dropped by _edge
            if t <= self._clock() + _FUTURE_S:
                return t
            # Ahead of the clock: these ticks are another clock's.
            self._ticks_on_clock = False
            log.warning("reader %s: edge stamps (%r) are not on the monotonic clock; timing the "
                        "edges from the first one's arrival instead", self.name, ticks)
        # Anchored once: intervals come from the ticks (factory.ticks_diff, which
        # handles a wrap-around); the anchor's error is that edge's callback lag,
        # which only makes every edge look later, so frames end later, never early.
        anchor = self._anchor
        if anchor is not None:
            t = anchor[1] + self._factory.ticks_diff(ticks, anchor[0])
            if t >= self._clock() - _REANCHOR_S or not self.decoder.idle:
                return t  # mid-frame, keep the intervals whatever the lag
        self._anchor = (ticks, self._clock())
        return self._anchor[1]

    # -- edges and frames ----------------------------------------------------------

    def feed_edges(self, edges: Iterable[tuple[float, int, int]]) -> None:
        """Feed explicit edges: (t seconds in the timer clock, line 0=D0/1=D1, level)."""
        for t, line, level in edges:
            self._edge(t, line, level)

    def _edge(self, stamp: Any, line: int, level: int, *, ticks: bool = False) -> None:
        late = 0
        with self._lock:
            t = self._edge_time(stamp) if ticks else stamp
            if not math.isfinite(t):
                # No time, no place in a frame (and a NaN deadline would spin the timer).
                self.adapter_counters["bad_stamps"] += 1
                if self.adapter_counters["bad_stamps"] <= 3:
                    log.warning("reader %s: an edge with no usable timestamp (%r) was dropped", self.name, stamp)
                return
            lag = self._clock() - t
            self._lag_max = max(self._lag_max, lag)
            self.adapter_counters["edges"] += 1
            before = self.decoder.counters["late_edges"]
            results = self.decoder.feed(t, line, level)
            if self.decoder.counters["late_edges"] != before:
                late = self.decoder.counters["late_edges"]
            due = self.decoder.deadline()
            # Wake the timer only when it sleeps with nothing to do, or must act
            # much earlier than planned. A frame's silence deadline only moves
            # later; what comes earlier is the stuck-line check each falling
            # edge sets, and a wake per bit for it is not worth it: a stuck
            # line is reported at most _TIMER_SLACK_S late.
            until = self._timer_until
            if due is not None and (until is None or due + self.max_lag_s < until - _TIMER_SLACK_S):
                self._wake.notify()
        if late and (late <= 3 or late % 100 == 0):
            log.warning("reader %s: an edge came %.0f ms after it happened, later than "
                        "hardware.wiegand_max_lag_s (%g s), so a frame may have been cut "
                        "(late edges so far: %d); if this repeats, raise the setting",
                        self.name, lag * 1000, self.max_lag_s, late)
        if results:
            self._deliver(results)

    def poll(self, t: float | None = None) -> None:
        """Complete frames (and stuck lines) due by time t on the clock (default: now).

        Only edges stamped before ``t - max_lag_s`` are sure to have been
        delivered, so that is the time the decoder is polled at.
        """
        with self._lock:
            now = self._clock() if t is None else t
            results = self.decoder.poll(now - self.max_lag_s)
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
                # Due in edge time; acted on max_lag_s later, when no edge stamped
                # before it can still be on its way (see the module doc).
                until = None if due is None else due + self.max_lag_s
                if until is None or now < until:
                    self._timer_until = until
                    self._wake.wait(None if until is None else until - now)
                    self._timer_until = None
                    continue
                results = self.decoder.poll(now - self.max_lag_s)
            if results:
                self._deliver(results)

    # -- state -------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Frames, parity/length errors, glitches, stuck lines, late edges, edges,
        cards, keypad, errors, bad_stamps (edges dropped for a timestamp that is
        no number), and lag_max_us: the longest an edge's callback came after
        the edge (with stamps on the clock)."""
        with self._lock:
            return {**self.decoder.counters, **self.adapter_counters,
                    "lag_max_us": round(self._lag_max * 1e6)}

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
    max_lag_s: float = DEFAULT_MAX_LAG_S,
) -> dict[str, WiegandReader]:
    """A WiegandReader for each reader of a board profile (agent.hw.profiles).

    decoder_kwargs: reader name -> WiegandDecoder options (e.g. fixed_bits for
    a reader whose format is fixed, key_width). names: only these readers
    (the gate config's), default all the profile wires. max_lag_s: see
    WiegandReader. If one fails to open,
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
                decoder_kwargs=(decoder_kwargs or {}).get(name), pull=pins.pull, max_lag_s=max_lag_s,
            )
    except Exception:
        for reader in out.values():
            reader.close()
        raise
    return out
