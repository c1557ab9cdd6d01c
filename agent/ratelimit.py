"""Rate limits: a token bucket, and rate-limited logging.

``TokenBucket``: ``rate`` tokens a second, at most ``burst`` saved up (the
downlink's per-second budgets, the sim socket's request budget).

``RateLimitFilter``: a flood of one log message becomes a few lines and a count.

A broker flooding the agent with junk, a reader spewing noise or a failing
disk can each make the same log line thousands of times a second; written
out they would fill the SD card and journald, and cost the CPU the gate
needs. ``RateLimitFilter`` lets through the first ``burst`` records of each
message (its logger, level and format string, not its arguments) per
``interval_s``; it drops the rest and counts them, and the next record of
that message after the interval carries the count ("... [42 similar
messages suppressed in the last 10 s]"). A count is never lost, only
postponed to the next line of its kind; ``flush()`` emits the counts still
waiting (at stop).

The filter runs on the logging caller's thread (it is attached to the queue
handler), so dropped records never reach the queue: a flood costs a dict
lookup per call, not a formatted line.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimitFilter", "TokenBucket"]

MAX_KEYS = 4096  # distinct messages tracked; beyond it the oldest windows are forgotten


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; not thread-safe by itself."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"a budget needs rate > 0 and burst >= 1, not {rate!r}/{burst!r}")
        self.rate, self.burst = float(rate), float(burst)
        self._tokens = self.burst
        self._at = now

    def take(self, now: float) -> bool:
        """One token if there is one (True); else False and nothing changes."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False



class _Window:
    __slots__ = ("passed", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.passed = 0
        self.suppressed = 0


class RateLimitFilter(logging.Filter):
    """At most ``burst`` records per message per ``interval_s`` (module doc)."""

    def __init__(self, burst: int = 10, interval_s: float = 10.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if burst < 1 or interval_s <= 0:
            raise ValueError("burst must be at least 1 and interval_s positive")
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple, _Window] = {}
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.msg if isinstance(record.msg, str) else repr(record.msg))
        now = self._clock()
        forgotten: list[tuple[tuple, int]] = []
        with self._lock:
            w = self._windows.get(key)
            if w is None:
                if len(self._windows) >= MAX_KEYS:
                    forgotten = self._forget_old(now)
                w = self._windows[key] = _Window(now)
            elif now - w.start >= self.interval_s:
                carried = w.suppressed
                w.start, w.passed, w.suppressed = now, 0, 0
                if carried:
                    self._annotate(record, carried)
            if w.passed < self.burst:
                w.passed += 1
                allowed = True
            else:
                w.suppressed += 1
                self.suppressed_total += 1
                allowed = False
        self._report(forgotten)  # outside the lock: these records pass through this filter too
        return allowed

    def _annotate(self, record: logging.LogRecord, n: int) -> None:
        # Only the format string grows (the note holds no "%"); formatting stays the handler's.
        note = f" [{n} similar message(s) suppressed in the last {self.interval_s:g} s]"
        record.msg = (record.msg if isinstance(record.msg, str) else repr(record.msg)) + note

    def _forget_old(self, now: float) -> list[tuple[tuple, int]]:
        # Called with the lock held: drop finished windows with nothing to report,
        # then, if still full, the oldest half; returns the counts those held.
        for key in [k for k, w in self._windows.items()
                    if now - w.start >= self.interval_s and not w.suppressed]:
            del self._windows[key]
        forgotten: list[tuple[tuple, int]] = []
        if len(self._windows) >= MAX_KEYS:
            for key, w in sorted(self._windows.items(), key=lambda kv: kv[1].start)[: MAX_KEYS // 2]:
                if w.suppressed:
                    forgotten.append((key, w.suppressed))
                del self._windows[key]
        return forgotten

    @staticmethod
    def _report(counts: list[tuple[tuple, int]]) -> None:
        for (name, level, msg), n in counts:
            logging.getLogger(name).log(level, "%d message(s) like %r suppressed", n, msg[:200])

    def flush(self) -> list[tuple[str, int, str, int]]:
        """Log the counts still waiting, once each; returns them as (logger, level, message, count)."""
        with self._lock:
            waiting = [(k, w.suppressed) for k, w in self._windows.items() if w.suppressed]
            for w in self._windows.values():
                w.suppressed = 0
        self._report(waiting)
        return [(k[0], k[1], k[2], n) for k, n in waiting]
