"""Stream decoders for serial card readers, and a repeat filter.

The serial adapter hands over whatever bytes the port gave (any chunking,
frames torn across reads, line noise); these decoders find the frames and
return ``cards.CardResult``s, one shape for every reader. They keep no time:
suppressing a card that stays in the field is ``RepeatFilter``'s job, with
the time given by the caller.
"""

from __future__ import annotations

from .cards import (
    ETX,
    RDM6300_FRAME_LEN,
    STX,
    CardResult,
    check_key_width,
    decode_em_line,
    decode_rdm6300,
)

_HEX = frozenset(b"0123456789ABCDEFabcdef")


def _garbage(fmt: str, data: bytes | bytearray, detail: str) -> CardResult:
    return CardResult(
        ok=False,
        kind="card",
        format=fmt,
        error="garbage",
        detail=detail,
        raw=bytes(data).hex().upper(),
    )


class Rdm6300Stream:
    """Frames of an RDM6300 reader from an arbitrary byte stream.

    A 0x02 always starts a new candidate frame (it cannot occur inside one);
    a candidate that breaks the frame shape (non-hex byte, no 0x03 at byte 14)
    becomes garbage. Bytes outside frames are collected into one "garbage"
    result per run, reported when the next frame starts, when the run
    reaches ``max_garbage`` bytes, or on ``flush()``.
    """

    def __init__(self, key_width: int = 24, max_garbage: int = 64) -> None:
        self.key_width = check_key_width(key_width)
        self.max_garbage = max_garbage
        self._frame = bytearray()  # candidate, starts with STX; empty: hunting
        self._junk = bytearray()  # the current garbage run

    def feed(self, data: bytes) -> list[CardResult]:
        """Bytes as read; returns the card, checksum and garbage results they complete."""
        out: list[CardResult] = []
        for b in bytes(data):
            if b == STX:
                if self._frame:
                    self._junk += self._frame  # a frame cut short by a new one
                self._report_junk(out, "bytes outside a frame")
                self._frame = bytearray((STX,))
            elif self._frame:
                self._frame.append(b)
                if len(self._frame) == RDM6300_FRAME_LEN:
                    if b == ETX:
                        out.append(decode_rdm6300(bytes(self._frame), self.key_width))
                    else:
                        self._junk += self._frame  # too long: no 0x03 where it belongs
                    self._frame = bytearray()
                elif b not in _HEX:
                    self._junk += self._frame  # a frame holds only hex digits
                    self._frame = bytearray()
            else:
                self._junk.append(b)
            if len(self._junk) >= self.max_garbage:
                self._report_junk(out, "bytes outside a frame")
        return out

    def flush(self) -> list[CardResult]:
        """Report the garbage and torn frame held so far (e.g. when the line goes quiet)."""
        out: list[CardResult] = []
        self._junk += self._frame
        self._frame = bytearray()
        self._report_junk(out, "bytes outside a frame")
        return out

    def _report_junk(self, out: list[CardResult], detail: str) -> None:
        if self._junk:
            out.append(_garbage("rdm6300", self._junk, f"{len(self._junk)} {detail}"))
            self._junk = bytearray()


class EmLineStream:
    """Lines of a line-oriented EM-Marine reader from an arbitrary byte stream.

    A line ends at CR or LF (empty lines are skipped, so CRLF is one end);
    0x02 and 0x03 framing bytes some readers add are ignored. Each line is
    decoded by ``cards.decode_em_line``. A line longer than ``max_line``
    bytes without an end is one "garbage" result, and the rest of it up to
    the next line end is dropped.
    """

    def __init__(self, key_width: int = 24, max_line: int = 64, number: str = "auto") -> None:
        self.key_width = check_key_width(key_width)
        self.max_line = max_line
        self.number = number
        decode_em_line("1", key_width, number)  # checks `number` now, not on the first read
        self._line = bytearray()
        self._skipping = False  # inside an overlong line already reported

    def feed(self, data: bytes) -> list[CardResult]:
        """Bytes as read; returns the results of the lines they complete."""
        out: list[CardResult] = []
        for b in bytes(data):
            if b in (0x0D, 0x0A):
                if not self._skipping and self._line.strip():
                    out.append(self._decode(self._line))
                self._line = bytearray()
                self._skipping = False
            elif b in (STX, ETX) or self._skipping:
                continue
            else:
                self._line.append(b)
                if len(self._line) > self.max_line:
                    out.append(
                        _garbage(
                            "emline", self._line, f"line over {self.max_line} bytes without CR/LF"
                        )
                    )
                    self._line = bytearray()
                    self._skipping = True
        return out

    def _decode(self, line: bytes | bytearray) -> CardResult:
        return decode_em_line(bytes(line), self.key_width, self.number)


class RepeatFilter:
    """Suppress a key seen again within ``window_s`` of its last sighting.

    A card held in the field keeps refreshing its window, so it is accepted
    once however long it stays. The caller gives the (monotonic) time.
    """

    def __init__(self, window_s: float = 1.5) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.window_s = window_s
        self._seen: dict[int, float] = {}

    def accept(self, key: int, t: float) -> bool:
        """True when the key is a new presentation, False for a repeat."""
        last = self._seen.get(key)
        self._seen[key] = t
        if len(self._seen) > 64:
            # Forget keys whose window has passed, so memory stays small.
            self._seen = {k: s for k, s in self._seen.items() if t - s < self.window_s or k == key}
        return last is None or t - last >= self.window_s

    def reset(self) -> None:
        self._seen.clear()
