"""Bounds on what the downlink takes: size caps, per-second budgets, aggregated refusals.

A gate must keep deciding cards whatever arrives on its ``cmd`` and ``acl``
topics. The field saw 5,000 junk commands a second each parsed, journalled as
a ``command.result``, answered and logged, until the gate queue overflowed
(docs/contract.md, "Flood limits"). So, on the uplink thread and before any
parsing, every message:

1. takes a token from its topic's bucket (``rate`` per second, up to
   ``burst`` at once); without one it is dropped and only counted;
2. is measured against its topic's size cap (commands 64 KiB, lists
   ``acl.max_list_mb``); a bigger one is refused unread.

What is refused afterwards (by the checks of ``commands`` and ``acl_sync``)
is recorded one by one only for the first ``verbatim`` refusals of each
category in a window of ``interval_s`` seconds; the rest are counted, and the
window ends with one ``alarm`` ``downlink_flood`` record listing the counts.
Replies and log lines follow the same rule: a record made one by one gets
its reply and its log line, a counted one gets neither. The categories keep
refusals of signed messages (a replayed or expired command from the server's
own key) from being hidden by junk nobody signed.

Threads: everything here is called from the uplink thread, the list worker,
a window timer and telemetry; one lock guards the counters.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.ratelimit import TokenBucket

log = logging.getLogger("agent.downlink")

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_MAX_LIST_BYTES",
    "MAX_COMMAND_BYTES",
    "FloodGuard",
]

MAX_COMMAND_BYTES = 64 * 1024  # a signed command is under 1 KiB; 64 KiB leaves room, and no more
# A 1,000,000-card list is 69-76 MB of JSON (synthetic_acl; docs/access-list.md): 128 MiB holds
# it with room for longer ids and second cards, about what the board's memory can build.
DEFAULT_MAX_LIST_BYTES = 128 * 1024 * 1024
# Messages per second and burst, per topic. A person or a server's automation sends a few
# commands a minute; lists come a few a day (a burst of deltas at most).
DEFAULT_BUDGETS: dict[str, tuple[float, float]] = {"cmd": (10.0, 20.0), "acl": (2.0, 10.0)}
INTERVAL_S = 10.0
VERBATIM = 5  # refusals recorded one by one per category and window
TOPICS = ("cmd", "acl")
FLOOD_KIND = "downlink_flood"
_STAT_KEYS = {"cmd": ("received", "accepted", "over_budget", "oversize"),
              "acl": ("received", "accepted", "over_budget", "oversize", "retained", "queue_full")}
_MAX_DETAIL = 1000


class FloodGuard:
    """Budgets, size caps, counters and the window of aggregated refusals for one gate.

    report(rtype, fields): submits a record to the gate (the summary alarm).
    monotonic: the clock for buckets and windows. timers: False leaves the
    closing of windows to ``tick`` (tests with a fake clock).
    """

    def __init__(
        self,
        *,
        report: Callable[[str, dict], Any],
        max_bytes: dict[str, int] | None = None,
        budgets: dict[str, tuple[float, float]] | None = None,
        interval_s: float = INTERVAL_S,
        verbatim: int = VERBATIM,
        monotonic: Callable[[], float] = time.monotonic,
        timers: bool = True,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s {interval_s!r} must be a positive number of seconds")
        self._report = report
        self._mono = monotonic
        self._timers = timers
        self.interval_s = float(interval_s)
        self.verbatim = int(verbatim)
        self.max_bytes = {"cmd": MAX_COMMAND_BYTES, "acl": DEFAULT_MAX_LIST_BYTES, **(max_bytes or {})}
        budgets = {**DEFAULT_BUDGETS, **(budgets or {})}
        now = monotonic()
        self._buckets = {t: TokenBucket(*budgets[t], now) for t in TOPICS}
        self._lock = threading.Lock()
        # Since start (telemetry): per topic, and refusals by what they were.
        self._topic: dict[str, Counter[str]] = {t: Counter() for t in TOPICS}
        self._refused: Counter[str] = Counter()  # commands, by reason
        self._rejected: Counter[str] = Counter()  # lists, by code
        self._totals: Counter[str] = Counter()  # not_recorded, replies_withheld, flood_alarms
        # The open window: its end (None: no window), what it let through and what it counted.
        self._end: float | None = None
        self._start = 0.0
        self._shown: Counter[str] = Counter()  # per category
        self._window: Counter[str] = Counter()  # summary keys -> counts
        self._flooded = False  # a downlink_flood alarm is active
        self._timer: threading.Timer | None = None
        self._closed = False

    # --- before parsing (uplink thread) ---------------------------------------------------

    def admit(self, topic: str, size: int) -> str | None:
        """None when a message of ``size`` bytes on ``topic`` may be read; else why not:
        ``"over_budget"`` (dropped, counted: nothing else to do) or ``"oversize"``
        (counted here; the caller refuses it, through ``record``)."""
        reports: list[tuple[str, dict]] = []
        with self._lock:
            now = self._mono()
            counts = self._topic[topic]
            counts["received"] += 1
            if not self._buckets[topic].take(now):
                counts["over_budget"] += 1
                self._roll(now, reports)
                self._window[f"over_budget.{topic}"] += 1
                self._open(now)
                verdict: str | None = "over_budget"
            elif size > self.max_bytes[topic]:
                counts["oversize"] += 1
                verdict = "oversize"
            else:
                counts["accepted"] += 1
                verdict = None
        self._emit(reports)
        return verdict

    def count(self, topic: str, what: str) -> None:
        """One more of ``what`` (e.g. ``retained``, ``queue_full``) on ``topic``, for telemetry."""
        with self._lock:
            self._topic[topic][what] += 1

    # --- after checking (uplink thread, list worker) ---------------------------------------

    def record(self, category: str, key: str, *, reply: bool = False) -> bool:
        """A refusal: True when it is to be recorded, replied to and logged one by one;
        False when it was only counted (under ``key``) for the window's summary.

        category: ``cmd`` or ``acl``, with ``.signed`` when its signature verified.
        key: the summary's name for it, e.g. ``refused.invalid`` or ``rejected.invalid``.
        reply: a reply was asked for (counted as withheld when it is not sent).
        """
        reports: list[tuple[str, dict]] = []
        with self._lock:
            kind, _, what = key.partition(".")
            (self._refused if kind == "refused" else self._rejected)[what] += 1
            now = self._mono()
            self._roll(now, reports)
            self._open(now)
            shown = self._shown[category] < self.verbatim
            if shown:
                self._shown[category] += 1
                self._window["recorded"] += 1
            else:
                self._window[key] += 1
                self._totals["not_recorded"] += 1
                if reply:
                    self._window["replies_withheld"] += 1
                    self._totals["replies_withheld"] += 1
        self._emit(reports)
        return shown

    # --- windows ---------------------------------------------------------------------------

    def _open(self, now: float) -> None:
        """Start a window at ``now`` if none is open (lock held)."""
        if self._end is None:
            self._start, self._end = now, now + self.interval_s
            self._schedule(self.interval_s)

    def _roll(self, now: float, reports: list) -> None:
        """Close every window that has ended by ``now`` (lock held)."""
        while self._end is not None and now >= self._end:
            ended = self._end
            flooded = any(k != "recorded" for k in self._window)
            if flooded:
                reports.append(self._summary(active=True))
                self._flooded = True
                self._start, self._end = ended, ended + self.interval_s  # watch the next one too
            else:
                if self._flooded:
                    reports.append(self._summary(active=False))
                    self._flooded = False
                self._end = None
            self._window.clear()
            self._shown.clear()

    def _summary(self, *, active: bool) -> tuple[str, dict]:
        self._totals["flood_alarms"] += active
        assert self._end is not None
        span = self._end - self._start
        parts = " ".join(f"{k}={v}" for k, v in sorted(self._window.items()))
        if active:
            text = (f"downlink flood, {span:.0f} s; counted, not recorded one by one: {parts}; "
                    "check who publishes on this gate's cmd and acl topics (broker ACL)")
            log.warning("%s", text)
        else:
            text = f"downlink quiet again; last {span:.0f} s: {parts or 'nothing refused'}"
            log.info("%s", text)
        return "alarm", {"kind": FLOOD_KIND, "active": active, "detail": text[:_MAX_DETAIL]}

    def _schedule(self, delay: float) -> None:
        if not self._timers or self._closed:
            return
        if self._timer is not None and self._timer.is_alive():
            return
        timer = threading.Timer(max(0.01, delay), self._on_timer)
        timer.daemon = True
        timer.name = "downlink-flood"
        self._timer = timer
        timer.start()

    def _on_timer(self) -> None:
        reports: list[tuple[str, dict]] = []
        with self._lock:
            self._timer = None
            now = self._mono()
            self._roll(now, reports)
            if self._end is not None:
                self._schedule(self._end - now)
        self._emit(reports)

    def tick(self) -> None:
        """Close the windows that have ended (the timer does this unless ``timers=False``)."""
        reports: list[tuple[str, dict]] = []
        with self._lock:
            self._roll(self._mono(), reports)
        self._emit(reports)

    def close(self) -> None:
        """Stop the timer and record what the open window counted (nothing is lost at a stop)."""
        reports: list[tuple[str, dict]] = []
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._end is not None and any(k != "recorded" for k in self._window):
                self._end = min(self._end, self._mono())
                reports.append(self._summary(active=True))
                self._flooded = True
            self._end = None
            self._window.clear()
            self._shown.clear()
        self._emit(reports)

    def _emit(self, reports: list[tuple[str, dict]]) -> None:
        for rtype, fields in reports:  # outside the lock: submit may block briefly
            try:
                self._report(rtype, fields)
            except Exception:
                log.exception("could not submit the downlink flood summary")

    # --- telemetry ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters since start: per topic (received, accepted, over_budget, oversize, and
        retained/queue_full for lists), refusals by reason, and what was only counted."""
        with self._lock:
            out: dict[str, Any] = {t: {k: self._topic[t].get(k, 0) for k in _STAT_KEYS[t]}
                                   for t in TOPICS}
            out["refused"] = dict(self._refused)
            out["rejected"] = dict(self._rejected)
            for k in ("not_recorded", "replies_withheld", "flood_alarms"):
                out[k] = self._totals.get(k, 0)
            out["flooded"] = self._flooded
            return out
