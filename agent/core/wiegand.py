"""Wiegand edge decoder in virtual time.

The hardware adapter hands over each edge of D0 and D1 with its timestamp
(gpiozero's pin ``when_changed`` gives the kernel's edge time); this decoder
turns the edges into frames and ``cards.decode_wiegand`` results. No clock is
read here: time only comes in as arguments, so tests drive pulse trains in
virtual time.

Line model (docs/design.md#wiegand): both lines idle high; a bit is a low
pulse of 20 to 100 us on D0 (bit 0) or D1 (bit 1), bits 0.2 to 20 ms apart.
A frame ends after silence, or, when the reader's format is fixed, at its
last bit.

Time is the edges' own: a frame ends by silence when ``poll(t)`` is called
with ``t`` at least ``silence_s`` after its last edge, or when the next edge
comes with such a stamp. ``poll(t)`` promises that every edge stamped before
``t`` has been fed; the adapter calls it with the time up to which no edge
can still be on its way (see agent/hw/wiegand_gpio.py). An edge fed later
with an older stamp than a silence or stuck line already decided on is
counted in ``late_edges``: that promise was broken, the frame may be cut.
"""

from __future__ import annotations

from .cards import CardResult, check_key_width, decode_wiegand

LINE_NAMES = ("D0", "D1")


class WiegandDecoder:
    """Decode the edges of one Wiegand reader.

    silence_s: a frame is complete once no edge came for this long
    (``poll``). glitch_s: a low pulse shorter than this is noise, dropped and
    counted. fixed_bits: the reader's frame length when it is fixed; the
    frame is then complete at its last bit (returned by ``feed`` at once).
    max_bits: longer frames are dropped with error "length". stuck_s: a line
    held low this long is reported once as error "glitch", detail "stuck
    line". key_width: the site's key width (see cards).

    Counters: frames, parity_errors, length_errors, glitches, stuck, and
    late_edges (edges stamped before a silence or a stuck line was decided
    on by ``poll``: they came too late to be part of the frame they belong to).
    """

    def __init__(
        self,
        *,
        silence_s: float = 0.025,
        glitch_s: float = 0.000010,
        fixed_bits: int | None = None,
        max_bits: int = 64,
        key_width: int = 24,
        stuck_s: float = 0.005,
    ) -> None:
        check_key_width(key_width)
        if max_bits < 1:
            raise ValueError(f"max_bits must be at least 1, got {max_bits}")
        if fixed_bits is not None and not 1 <= fixed_bits <= max_bits:
            raise ValueError(
                f"fixed_bits {fixed_bits} must be from 1 to max_bits ({max_bits}); "
                "set it to the reader's frame length (26, 34, 35 or 37) or leave it unset"
            )
        if not 0 < silence_s:
            raise ValueError(f"silence_s must be positive, got {silence_s}")
        if not 0 <= glitch_s < stuck_s:
            raise ValueError(
                f"need 0 <= glitch_s < stuck_s, got glitch_s={glitch_s}, stuck_s={stuck_s}"
            )
        self.silence_s = silence_s
        self.glitch_s = glitch_s
        self.fixed_bits = fixed_bits
        self.max_bits = max_bits
        self.key_width = key_width
        self.stuck_s = stuck_s
        self.counters: dict[str, int] = {
            "frames": 0,
            "parity_errors": 0,
            "length_errors": 0,
            "glitches": 0,
            "stuck": 0,
            "late_edges": 0,
        }
        self._bits: list[str] = []
        self._overflow = 0  # bits beyond max_bits in the current frame
        self._last_edge: float | None = None
        self._fall: list[float | None] = [None, None]  # when each line went low; None: high
        self._spoiled = [False, False]  # the line's current pulse overlapped the other line
        self._stuck = [False, False]  # reported stuck; cleared when the line rises
        # poll() decided that nothing happened on the lines before this time
        # (a frame's silence, a line held low): an edge stamped earlier is late.
        self._quiet_until = float("-inf")

    # -- public ----------------------------------------------------------------

    def feed(self, t: float, line: int, level: int) -> list[CardResult]:
        """One edge: line 0 (D0) or 1 (D1) went to level 0 (low) or 1 (high).

        Returns the frames this edge completed: a frame pending before the
        edge whose silence had already elapsed, and, with fixed_bits, the
        frame whose last bit this edge ends.
        """
        if line not in (0, 1):
            raise ValueError(f"line must be 0 (D0) or 1 (D1), got {line!r}")
        if t < self._quiet_until:
            self.counters["late_edges"] += 1
        out = self.poll(t)
        if level:
            self._rise(t, line, out)
        else:
            self._fall_edge(t, line)
        return out

    def poll(self, t: float) -> list[CardResult]:
        """Complete what is due at time t: a stuck line, a frame after silence.

        The caller promises that every edge stamped before t has been fed.
        """
        out: list[CardResult] = []
        for line in (0, 1):
            fell = self._fall[line]
            if fell is not None and not self._stuck[line] and t >= fell + self.stuck_s:
                self._stuck[line] = True
                self.counters["stuck"] += 1
                self._quiet_until = max(self._quiet_until, fell + self.stuck_s)
                # The frame in progress is broken: report what arrived, then the line.
                self._complete(out)
                out.append(
                    CardResult(
                        ok=False,
                        kind="raw",
                        format="raw",
                        error="glitch",
                        detail=f"stuck line: {LINE_NAMES[line]} held low for over "
                        f"{self.stuck_s * 1000:g} ms; check the reader's wiring and power",
                        raw="",
                    )
                )
        # Same sums as deadline(), so poll(deadline()) always does the work due.
        if (
            self._pending()
            and self._last_edge is not None
            and t >= self._last_edge + self.silence_s
        ):
            self._quiet_until = max(self._quiet_until, self._last_edge + self.silence_s)
            self._complete(out)
        return out

    def deadline(self) -> float | None:
        """When ``poll`` next has something to do, or None."""
        due: list[float] = []
        if self._pending() and self._last_edge is not None:
            due.append(self._last_edge + self.silence_s)
        for line in (0, 1):
            fell = self._fall[line]
            if fell is not None and not self._stuck[line]:
                due.append(fell + self.stuck_s)
        return min(due) if due else None

    @property
    def pending_bits(self) -> int:
        """Bits received in the frame in progress."""
        return len(self._bits) + self._overflow

    @property
    def idle(self) -> bool:
        """Between frames: no bit pending and both lines high."""
        return not self._pending() and self._fall == [None, None]

    # -- edges -------------------------------------------------------------------

    def _fall_edge(self, t: float, line: int) -> None:
        if self._fall[line] is not None:
            return  # already low: a repeated edge report changes nothing
        self._fall[line] = t
        self._touch(t)
        other = 1 - line
        if self._fall[other] is not None:
            # Both lines low at once is no bit: spoil both pulses.
            self._spoiled[line] = self._spoiled[other] = True
            self.counters["glitches"] += 1

    def _rise(self, t: float, line: int, out: list[CardResult]) -> None:
        fell = self._fall[line]
        if fell is None:
            return  # already high: nothing to end
        self._fall[line] = None
        self._touch(t)
        spoiled, self._spoiled[line] = self._spoiled[line], False
        if self._stuck[line]:
            self._stuck[line] = False  # reported already; the long pulse is no bit
            return
        if spoiled:
            return  # counted when the overlap began
        if t - fell < self.glitch_s:
            self.counters["glitches"] += 1
            return
        if len(self._bits) < self.max_bits:
            self._bits.append("1" if line else "0")
        else:
            self._overflow += 1
        if self.fixed_bits is not None and len(self._bits) == self.fixed_bits:
            self._complete(out)

    def _touch(self, t: float) -> None:
        # An edge stamped a little before the one fed last (the two lines read in
        # the other order) must not move the frame's end back.
        last = self._last_edge
        self._last_edge = t if last is None or t > last else last

    # -- frames ------------------------------------------------------------------

    def _pending(self) -> bool:
        return bool(self._bits) or self._overflow > 0

    def _complete(self, out: list[CardResult]) -> None:
        if not self._pending():
            return
        bits = "".join(self._bits)
        overflow = self._overflow
        self._bits = []
        self._overflow = 0
        self.counters["frames"] += 1
        if overflow:
            self.counters["length_errors"] += 1
            n = len(bits) + overflow
            out.append(
                CardResult(
                    ok=False,
                    kind="raw",
                    format="raw",
                    error="length",
                    detail=f"{n}-bit frame is over max_bits ({self.max_bits})",
                    raw=bits,
                )
            )
            return
        result = decode_wiegand(bits, self.key_width)
        if result.error == "parity":
            self.counters["parity_errors"] += 1
        elif result.error == "length":
            self.counters["length_errors"] += 1
        out.append(result)
