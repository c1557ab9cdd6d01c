"""The uplink's delivery window, sans-I/O: what is on the wire, what is acknowledged, what to send next.

``agent/uplink/mqtt.py`` owns paho, the thread, the sockets and the journal;
this module owns the bookkeeping between them, in the style of h11 and
``agent/core`` (docs/design.md, principle 4): no threads, clocks, sockets or
paho. The driver calls a method for each thing that happened, with the time
(monotonic seconds) as an argument, and gets back a list of effects to carry
out (``AckOne``, ``AckUpto``, ``Alarm``, ``Log``, ``Error``, ``NeedOldest``);
the same calls give the same effects. Random jitter comes from the
``uniform`` function the driver passes (``random.uniform`` in the uplink;
the default, no jitter, keeps tests exact). Some methods only change state
(``connected``, ``sent``, ``more``...): they return nothing to do.

The rules (docs/contract.md, "Delivery: journal, acknowledgement, resends"):

- Records go out in seq order, at most ``size`` unacknowledged publishes at
  once (the configured window, capped by the broker's Receive Maximum at
  ``connected``); status and reply messages share the slots. The window
  reads the journal only through the driver: ``fetch_after()`` says which
  seq a journal read starts after, ``feed()`` takes what it returned.
- ``ack_mode="ingest"``: a PUBACK only frees its slot; the ingest's
  ``{"journal", "upto"}`` ack acknowledges, clamped to what this run sent
  and the broker accepted (an ack beyond the journal's own records raises
  ``ack_ahead``). Without ack progress for ``resend_after_s`` the window asks
  for the oldest pending seq (``NeedOldest``) and sends again from it; each
  further round that brings no ack waits twice as long as the one before
  (jittered, up to ``RESEND_MAX_S``), and an ack that moves forward, a new
  connection, or any ack after a round the ingest left unanswered (it came
  back, short of what it lost) goes back to ``resend_after_s``. A 0x10 PUBACK
  (nobody subscribed) sends again after a growing backoff.
- ``ack_mode="broker"``: a PUBACK below 0x80 acknowledges its record; 0x10
  raises ``broker_dropped``.
- A PUBACK of 0x80 or more keeps the record pending, raises
  ``publish_refused`` and pauses sending for a growing, jittered backoff;
  the pause outlives a reconnect.
- A new connection or a lost one (``reset``) forgets what was in flight and
  sends everything pending again; a journal switch (``switch_journal``)
  starts the new journal's seqs from nothing.
"""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

ACK_MODES = ("ingest", "broker")
RC_NO_MATCHING_SUBSCRIBERS = 0x10
RC_FIRST_FAILURE = 0x80

# ack_ahead clears after this long without another ack beyond the gate's records.
ACK_AHEAD_QUIET_S = 600.0
# Resend rounds that bring no ack back wait longer each time, up to this: a site broker
# whose link to the region is down still answers PUBACK, but no ingest ack can come,
# and every copy reaches the site's other gates and the bridge's queue (docs/reliability.md).
RESEND_MAX_S = 900.0
# The safety poll: look for records this often even if a wake-up was missed.
POLL_S = 1.0
# How often the drain rate takes a sample, and how far back it looks.
DRAIN_SAMPLE_S = 0.25
DRAIN_SPAN_S = 10.0

# Log levels of ``Log`` effects: the numbers of the logging module, so the driver passes them on.
INFO, WARNING, ERROR = 20, 30, 40


@dataclass(frozen=True)
class AckOne:
    """Acknowledge one record of ``journal`` (broker mode), if that is still the journal."""

    seq: int
    journal: str


@dataclass(frozen=True)
class AckUpto:
    """Acknowledge every record of ``journal`` up to ``upto``; ``ours`` False: the id is
    not this window's journal (the one before a switch may still take it)."""

    journal: str
    upto: int
    ours: bool


@dataclass(frozen=True)
class Alarm:
    """Raise (``active``) or clear an alarm; the driver reports only changes."""

    kind: str
    active: bool
    detail: str


@dataclass(frozen=True)
class Log:
    """A service log line (``level``: INFO, WARNING, ERROR)."""

    level: int
    message: str


@dataclass(frozen=True)
class Error:
    """The uplink's last error, for its stats."""

    message: str


@dataclass(frozen=True)
class NeedOldest:
    """No ack progress for ``resend_after_s``: call ``resend_check()`` with the journal's oldest pending seq."""


Effect = AckOne | AckUpto | Alarm | Log | Error | NeedOldest


def _alarm(kind: str, active: bool, detail: str) -> Alarm:
    # Every alarm kind is raised through a call named *_alarm: the contract test finds them
    # all that way (each must be listed in docs/contract.md).
    return Alarm(kind, active, detail)


def _no_jitter(low: float, high: float) -> float:
    return high


def backoff_s(attempt: int, low: float, high: float, uniform: Callable[[float, float], float]) -> float:
    """The wait before try ``attempt`` + 1 (``attempt`` from 0): ``low`` doubled per
    attempt up to ``high``, then jittered by ``uniform`` between half and all of it,
    so a fleet that lost its broker together does not come back in step."""
    delay = min(high, low * 2 ** min(attempt, 30))
    return uniform(delay / 2, delay)


class Window:
    """The delivery bookkeeping of one uplink; every method runs on the uplink thread."""

    def __init__(
        self,
        journal_id: str,
        *,
        ack_mode: str = "ingest",
        window: int = 20,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 60.0,
        resend_after_s: float = 30.0,
        events_topic: str = "events",
        ack_topic: str = "ack",
        uniform: Callable[[float, float], float] = _no_jitter,
    ) -> None:
        if ack_mode not in ACK_MODES:
            raise ValueError(f"ack_mode {ack_mode!r} is not one of {ACK_MODES}")
        self.journal_id = journal_id  # the journal whose seqs the state below counts
        self.ack_mode = ack_mode
        self.window = window
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.resend_after_s = resend_after_s
        self.events_topic, self.ack_topic = events_topic, ack_topic
        self._uniform = uniform

        self.size = window  # the configured window, capped by the broker's Receive Maximum
        self.inflight: dict[int, int | None] = {}  # mid -> record seq (None: status, replies)
        self._inflight_seqs: set[int] = set()
        self._buffer: deque[dict] = deque()
        self.cursor = 0  # highest seq handed to the client since the last rewind
        self._maybe_more = True
        self._fed_upto: int | None = None  # the last batch's top seq while nothing of it was sent
        self._poll_at = 0.0
        self._retry_at: float | None = None  # rewind and send again at this time
        self.paused_until = 0.0
        self._refusals = 0
        self._drop_backoff = backoff_min_s
        self.acked_upto = 0
        self.sent_upto = 0  # highest seq of this journal the broker accepted from this run
        self._ack_ahead_at: float | None = None  # when an ack last named a seq never made
        self._min_seq_sent: int | None = None
        self._last_ack_progress = 0.0
        self._resend_check_at = 0.0
        self._resend_rounds = 0  # resend rounds since the last ack progress or connect
        self._resend_hold_until = 0.0  # no resend round before this (the backoff)
        self._resend_asked_at = 0.0  # the time of the last NeedOldest
        self._last_round_at = 0.0  # the last resend round
        self._prev_round_at = 0.0  # the one before it (or the ack progress before it)
        self._last_ack_at: float | None = None  # the last ack of this journal, moving or not

        self.published = 0
        self.acked = 0
        self._drain_samples: deque[tuple[float, int]] = deque(maxlen=64)

    # --- the connection ---------------------------------------------------------

    def connected(self, now: float, receive_max: int | None = None) -> None:
        """CONNACK: a fresh session; everything pending is sent again."""
        self.size = min(self.window, receive_max) if receive_max else self.window
        self._last_ack_progress = now
        self._resend_check_at = now + self.resend_after_s
        self._resend_backoff_ends(now)
        # A refusal pause outlives the connection: mosquitto 2.0 drops a client
        # after refusing its publish, and resending at once would loop.
        self._retry_at = None
        self.reset()

    def reset(self) -> None:
        """The connection is gone (or new): nothing is in flight; send from the oldest pending."""
        self.inflight.clear()
        self._inflight_seqs.clear()
        self.rewind()

    def switch_journal(self, journal_id: str, now: float) -> None:
        """The journal switched (a fallback on a read-only card, or back): its
        seqs are another journal's. PUBACKs still due for the old one acknowledge
        nothing, and the new one is sent from its start."""
        self.journal_id = journal_id
        self.inflight = dict.fromkeys(self.inflight)
        self._inflight_seqs.clear()
        self.rewind()
        self.acked_upto = 0
        self.sent_upto = 0
        self._min_seq_sent = None
        self._last_ack_progress = now
        self._last_ack_at = None
        self._resend_backoff_ends(now)

    def rewind(self) -> None:
        """Send again from the oldest pending record (in-flight ones excepted)."""
        self._buffer.clear()
        self.cursor = 0
        self._maybe_more = True
        self._fed_upto = None

    def more(self) -> None:
        """New records may be committed (a wake-up): read the journal again."""
        self._maybe_more = True

    # --- sending ------------------------------------------------------------------

    def has_room(self) -> bool:
        return len(self.inflight) < self.size

    def paused(self, now: float) -> bool:
        """True while a refusal's backoff holds records back (status and replies still go)."""
        return now < self.paused_until

    def fetch_after(self) -> int | None:
        """The seq a journal read starts after when the window needs records, else None."""
        if self._buffer or not self._maybe_more:
            return None
        if self._fed_upto is not None:
            # The whole last batch was still on the wire (a window wider than a batch,
            # after a rewind): read past it, or the same batch would come back forever.
            return max(self.cursor, self._fed_upto)
        return self.cursor

    def feed(self, batch: list[dict], limit: int) -> bool:
        """The pending records a journal read of at most ``limit`` returned (after
        ``fetch_after()``); False when there is nothing to send from it."""
        if len(batch) < limit:
            self._maybe_more = False  # until more(), a rewind or the safety poll
        if batch and not str(batch[0].get("id", "")).startswith(f"{self.journal_id}:"):
            self._maybe_more = True  # switched since the driver looked: it resets next step
            return False
        self._buffer.extend(batch)
        if batch:
            self._fed_upto = batch[-1]["seq"]
        return bool(batch)

    def next_record(self) -> dict | None:
        """The next record to publish from what was fed, or None (fetch, or nothing to send)."""
        while self._buffer:
            rec = self._buffer.popleft()
            if rec["seq"] not in self._inflight_seqs:  # else still on the wire from before a rewind
                return rec
        return None

    def put_back(self, rec: dict) -> None:
        """The client would not take ``rec`` (next_record's last): it goes first next time."""
        self._buffer.appendleft(rec)

    def sent(self, mid: int, rec: dict) -> None:
        """``rec`` was handed to the client as message ``mid``."""
        seq = rec["seq"]
        self.track(mid, seq)
        self.cursor = seq
        self._fed_upto = None
        self.published += 1
        if self._min_seq_sent is None or seq < self._min_seq_sent:
            self._min_seq_sent = seq

    def track(self, mid: int, seq: int | None = None) -> None:
        """A QoS 1 message ``mid`` takes a slot until its PUBACK (seq None: status, replies)."""
        self.inflight[mid] = seq
        if seq is not None:
            self._inflight_seqs.add(seq)

    # --- what comes back -----------------------------------------------------------

    def puback(self, mid: int, rc: int, now: float, reason: str = "") -> list[Effect]:
        """The broker's PUBACK for ``mid`` with reason code ``rc`` (``reason``: its text)."""
        reason = reason or f"0x{rc:02X}"
        seq = self.inflight.pop(mid, None)
        if seq is None:
            if rc >= RC_FIRST_FAILURE:
                return [Log(WARNING, f"broker refused a status/reply publish: {reason}")]
            return []
        self._inflight_seqs.discard(seq)
        if rc >= RC_FIRST_FAILURE:
            return self._refused(seq, now, reason)
        out: list[Effect] = []
        self.sent_upto = max(self.sent_upto, seq)
        if self._refusals:
            self._refusals = 0
            out.append(_alarm("publish_refused", False, "the broker accepts events again"))
        if self.ack_mode == "broker":
            out.append(AckOne(seq, self.journal_id))
            self._count_acked(1, now)
            if rc == RC_NO_MATCHING_SUBSCRIBERS:
                out.append(_alarm("broker_dropped", True,
                                 f"the broker had no subscriber for {self.events_topic} and dropped "
                                 f"event seq {seq} (reason 0x10); ack mode 'broker' counts it as delivered"))
            else:
                out.append(_alarm("broker_dropped", False, ""))
        elif rc == RC_NO_MATCHING_SUBSCRIBERS and self._retry_at is None:
            # Nobody (no ingest) received it: send it again later, backing off.
            self._retry_at = now + self._drop_backoff
            out.append(Log(INFO, f"no subscriber took event seq {seq} (0x10); resending in "
                                 f"{self._drop_backoff:.1f} s"))
            self._drop_backoff = min(self._drop_backoff * 2, self.resend_after_s)
        return out

    def _refused(self, seq: int, now: float, reason: str) -> list[Effect]:
        detail = (f"broker refused event seq {seq} on {self.events_topic}: {reason}; "
                  "the event stays in the journal; check the broker's ACL for this gate")
        out: list[Effect] = [Error(detail), _alarm("publish_refused", True, detail)]
        if now < self.paused_until:
            return out  # the rest of a window refused in one burst: one backoff step, not twenty
        self._refusals += 1
        if self._refusals == 1:
            out.append(Log(ERROR, detail))
        # Pause, then send everything pending again (this seq included).
        self.paused_until = now + backoff_s(self._refusals - 1, self.backoff_min_s, self.backoff_max_s,
                                            self._uniform)
        self._retry_at = self.paused_until
        return out

    def ack_message(self, payload: bytes, now: float, made: int | None) -> list[Effect]:
        """The ingest's ack message; ``made``: the highest seq the journal has handed out."""
        try:
            msg = json.loads(payload)
            journal_id, upto = msg["journal"], msg["upto"]
            if not isinstance(journal_id, str) or not isinstance(upto, int) or isinstance(upto, bool):
                raise TypeError("journal must be a string and upto an integer")
        except (ValueError, KeyError, TypeError) as exc:
            return [Log(WARNING, f"ignoring malformed ack on {self.ack_topic} ({exc}): {payload[:200]!r}")]
        if self.ack_mode != "ingest":
            return []
        if journal_id != self.journal_id:
            # The journal before a switch may still take it (a fallback being folded in);
            # any other id changes nothing, and nothing here waits for it.
            return [AckUpto(journal_id, upto, ours=False)]
        out: list[Effect] = []
        upto = self._clamp_ack(upto, now, made, out)
        out.append(AckUpto(journal_id, upto, ours=True))
        if upto > self.acked_upto:
            # Count only what this run sent (the first ack's baseline is unknown otherwise).
            base = max(self.acked_upto, (self._min_seq_sent or upto + 1) - 1)
            if upto > base:
                self._count_acked(upto - base, now)
            self.acked_upto = upto
            self._last_ack_progress = now
            self._drop_backoff = self.backoff_min_s
            self._resend_backoff_ends(now)
        elif self._resend_rounds and not self._heard_since_prev_round():
            # The ingest said nothing through the last resend round and speaks again, yet
            # moves nothing: it came back having lost what was sent while it was away (its
            # session thrown away). Send again soon, not when the backoff ends. An ingest that
            # answers every round and still moves nothing (a record it never takes) gets no
            # such shortcut: it answered the round before.
            self._resend_backoff_ends(now)
            out.append(Log(INFO, f"the ingest acknowledges again but only up to seq {upto}; "
                                 f"resending within {self.resend_after_s:.0f} s"))
        self._last_ack_at = now
        return out

    def _heard_since_prev_round(self) -> bool:
        """True if an ack of this journal came after the resend round before the last one
        (or, for the first round, after the last ack progress)."""
        return self._last_ack_at is not None and self._last_ack_at > self._prev_round_at

    def _clamp_ack(self, upto: int, now: float, made: int | None, out: list[Effect]) -> int:
        """An ack never reaches past what this run has sent and the broker accepted.

        The ack topic is the ingest's word, but a forger holding this gate's
        certificate can publish records under its journal id with seqs it has
        not reached; the ingest stores and acks them, and an ack taken at its
        word would make the gate forget its own records of those seqs before
        ever sending them. Records sent before a restart are sent again at
        connect anyway, so their ack is only postponed. An ack naming a seq the
        journal never made is proof of such records: alarm ``ack_ahead``."""
        if isinstance(made, int) and upto > made:
            detail = (f"an ack for journal {self.journal_id} up to seq {upto}, but this gate has "
                      f"made only {made}: records under its journal id came from elsewhere (a "
                      "stolen certificate or a cloned SD card); see the ingest's quarantine")
            if self._ack_ahead_at is None:
                out.append(Log(ERROR, detail))
            self._ack_ahead_at = now
            out.append(_alarm("ack_ahead", True, detail))
        return min(upto, self.sent_upto)

    # --- time ---------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Run the timers that are due (the driver calls it each step while connected)."""
        out: list[Effect] = []
        if now >= self._poll_at:
            # Safety net: find records even if a wake-up was missed.
            self._poll_at = now + POLL_S
            self._maybe_more = True
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self.rewind()
        if self._ack_ahead_at is not None and now - self._ack_ahead_at >= ACK_AHEAD_QUIET_S:
            self._ack_ahead_at = None
            out.append(_alarm("ack_ahead", False, f"no ack beyond this gate's records for "
                                                 f"{ACK_AHEAD_QUIET_S:.0f} s"))
        if self.ack_mode == "ingest" and now >= self._resend_check_at:
            due = max(self._last_ack_progress + self.resend_after_s, self._resend_hold_until)
            # Checked again when the ack progress seen now runs out, not a whole period later:
            # an event stalled just after a check waits resend_after_s, never twice that.
            self._resend_check_at = due if now < due else now + self.resend_after_s
            if now >= due:
                self._resend_asked_at = now
                out.append(NeedOldest())
        return out

    def resend_check(self, oldest: int | None) -> list[Effect]:
        """After ``NeedOldest``: the journal's oldest pending seq (None: nothing pending).
        Sent, not on the wire and still not acknowledged: send again from it, and hold
        the next round back for longer than the last (``resend_wait``)."""
        if oldest is not None and oldest <= self.cursor and oldest not in self._inflight_seqs:
            self.rewind()
            now = self._resend_asked_at
            quiet = now - self._last_ack_progress
            self._resend_rounds += 1
            self._prev_round_at = max(self._last_round_at, self._last_ack_progress)
            self._last_round_at = now
            wait = self.resend_wait(self._resend_rounds)
            self._resend_hold_until = self._resend_check_at = now + wait
            return [Log(INFO, f"no ingest ack for {quiet:.0f} s; resending from seq {oldest}; "
                              f"the next resend in {wait:.0f} s unless an ack comes")]
        return []

    def resend_wait(self, rounds: int) -> float:
        """The wait after the ``rounds``-th resend round in a row without ack progress:
        ``resend_after_s`` doubled per round up to ``RESEND_MAX_S``, jittered between half
        and all of it (never under ``resend_after_s``). So an outage of T seconds after the
        last ack costs at most 1 + log2(T / resend_after_s) rounds while the doubled wait
        is under the cap, then one per ``RESEND_MAX_S / 2`` at most."""
        cap = max(RESEND_MAX_S, self.resend_after_s)
        return max(self.resend_after_s, backoff_s(rounds, self.resend_after_s, cap, self._uniform))

    def _resend_backoff_ends(self, now: float) -> None:
        """An ack moved forward, or a new connection or journal: the next resend round
        comes ``resend_after_s`` after it again, not when the backoff would have ended."""
        self._resend_rounds = 0
        self._resend_hold_until = 0.0
        self._resend_check_at = min(self._resend_check_at, now + self.resend_after_s)

    def next_deadline(self, now: float) -> float:
        """When ``tick`` next has something to do (or a paused window opens)."""
        due = [self._poll_at]
        if self.ack_mode == "ingest":
            due.append(self._resend_check_at)
        if self._retry_at is not None:
            due.append(self._retry_at)
        if self.paused_until > now:
            due.append(self.paused_until)
        return min(due)

    # --- figures ------------------------------------------------------------------

    def _count_acked(self, n: int, now: float) -> None:
        self.acked += n
        if not self._drain_samples or now - self._drain_samples[-1][0] >= DRAIN_SAMPLE_S:
            self._drain_samples.append((now, self.acked))

    def drain_rate(self, now: float) -> float:
        """Records acknowledged per second over the last ``DRAIN_SPAN_S`` (or the last sample)."""
        samples = list(self._drain_samples)
        if not samples:
            return 0.0
        recent = [s for s in samples if now - s[0] <= DRAIN_SPAN_S] or samples[-1:]
        t0, n0 = recent[0]
        span = now - t0
        if span <= 0:
            return 0.0
        return round((self.acked - n0) / span, 3)

