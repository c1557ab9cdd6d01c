"""The gate thread: one thread owns the core and drives the outputs.

Adapters (gpiozero and paho callbacks, serial readers, the Wiegand timer)
call ``GateRuntime.submit(event)`` from any thread; it only enqueues. Events
wait in four lanes, each bounded on its own, and the gate thread always
takes from the first lane that has something:

1. fire: the fire loop (never dropped);
2. hardware: what the turnstile, the readers and the guard's inputs report
   (cards, PASS, buttons, Ready, tamper, the reset input...);
3. downlink: what comes from the network or the agent's own bookkeeping
   (reports such as refused commands and uplink alarms, list swaps, remote
   commands);
4. site: the other gates' records (docs/site.md), a whole backlog at once
   after a reconnect.

So a flood on the broker can fill only its own lane: it can neither push a
card read out of the queue nor make one wait behind it (a card waits at most
for the one event the gate thread is handling), and the site's backlog never
pushes out a command. For each event taken, or a
``Tick`` when the core's next deadline passes:

1. ``step = gate.handle(event, clock.now())``
2. ``sink.commit(step.records)``: journal first (principle 2)
3. drive ``step.commands``: SetOutput -> outputs.set (all lines first),
   then Feedback -> outputs.feedback
4. ``on_record(record)`` for each committed record (uplink, log)

Failure policy: an exception from the core, the sink, an output or a hook
is logged with the event and counted; it never kills the gate thread. If
the sink's commit raises, the commands are STILL driven: the gate must keep
letting the right people through with a broken disk (principle 1, "the gate
never waits for the disk"); the records that could not be committed are
logged in full at ERROR level, so the system journal keeps them, and the
``sink_errors`` counter tells telemetry.

Stall probe (``StallProbe``, ``GateRuntime.gate_stall``): the gate thread
notes the monotonic time each time it has control (before each event, and
on waking from its wait, which never lasts longer than ``STALL_TICK_S``) and
keeps the longest stretch it was away beyond the wait it chose, which is how
long a card arriving at the worst moment would have found the gate thread
unable to take it. See ``StallProbe`` for what that includes and what not.

The time it gives the core comes from ``Clock`` (``ClockSync`` caches the
clock-sync answer off the gate thread). Some 620 lines on purpose, over the
~500 others keep: the lanes, the loop, the failure policy and the figures
taken on the gate thread (latencies, stalls) share that thread's state.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from agent.core.events import (
    Button,
    CardRead,
    Feedback,
    FireLoop,
    FireReset,
    Keypad,
    LockdownSwitch,
    Now,
    PassSensor,
    ReaderError,
    ReaderStatus,
    ReadyLine,
    SetOutput,
    SiblingRecord,
    Tamper,
    Tick,
)
from agent.core.stats import percentiles

log = logging.getLogger(__name__)

# Every output the core can drive; stop() drives each inactive.
OUTPUT_LINES = ("unlock_a", "unlock_b", "stop", "fire_release")
_TICK = Tick()
CORE_RETRY_S = 0.1  # after a core error, its overdue deadline is retried this much later
# Work beside the gate (aclstore.use_pacer) waits at most this long for one event to be
# done before it goes on (a gate busy for longer than this is not held up by it anyway).
PACE_MAX_WAIT_S = 0.05
# ... and waits no more than this share of its time (per second).
PACE_SHARE = 0.5
# The gate thread waits at most this long at a time, so the stall probe sees a stall that
# happens while it is idle (another thread holding the GIL) to within this much; while cards
# come, a stall is measured from each card's arrival whatever the tick. Its cost: 50 empty
# wakes a second; at 5 ms (200 a second) they took 0.5-0.75 % of one x86 core, some 2-3 % of
# a Pi 4's, for a finer idle figure nobody needs on a board.
STALL_TICK_S = 0.02

# Events that come from the gate's own hardware (the hardware lane).
HARDWARE_EVENTS = (CardRead, ReaderError, ReaderStatus, Keypad, PassSensor, Button,
                   ReadyLine, LockdownSwitch, Tamper)
LANES = ("fire", "hardware", "downlink", "site")


_DEPTH_KEYS = {"hardware": "queue_max", "downlink": "downlink_queue_max", "site": "site_queue_max"}


def lane_of(event: Any) -> str:
    """The queue lane of an event (module docstring). The reset input is
    hardware; a reset by command is downlink traffic like any command."""
    if isinstance(event, FireLoop):
        return "fire"
    if isinstance(event, HARDWARE_EVENTS):
        return "hardware"
    if isinstance(event, FireReset) and event.by == "input":
        return "hardware"
    if isinstance(event, SiblingRecord):
        return "site"  # the other gates' records: last, in a lane of their own (docs/site.md)
    return "downlink"


class OutputDriver(Protocol):
    """Where the gate thread sends commands (agent.hw.turnstile_io.TurnstileIO)."""

    def set(self, line: str, active: bool) -> None: ...

    def feedback(self, reader: str, signal: str) -> None: ...


class RecordSink(Protocol):
    """The journal (agent.uplink.journal) or records.SequenceSink."""

    def commit(self, records: list[dict]) -> list[dict]: ...


class Clock:
    """The time given to the core: monotonic s, UTC epoch s, and whether the
    wall clock is synchronised.

    synced is a callable so the composition root decides how to know (the
    service: ``ClockSync``, the kernel's flag cached and checked off the gate
    thread); it is called once per event, so it must be cheap. monotonic and wall are
    injectable for tests; deadlines are compared with ``monotonic()``.
    """

    def __init__(
        self,
        synced: Callable[[], bool] = lambda: True,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._synced = synced
        self.monotonic = monotonic
        self._wall = wall
        self._synced_failed = False

    def now(self) -> Now:
        try:
            synced = bool(self._synced())
        except Exception:
            # Unknown is not synchronised; say so once, not per event.
            if not self._synced_failed:
                log.exception("clock sync check failed; treating the clock as unsynchronised")
                self._synced_failed = True
            synced = False
        return Now(mono=self.monotonic(), wall=self._wall(), synced=synced)


class ClockSync:
    """A cheap ``() -> bool`` for ``Clock``'s ``synced``: the cached answer of
    ``check`` (the service gives the kernel's flag, agent.host.kernel_clock_synced),
    refreshed by ``refresh()`` off the gate thread (the service's housekeeping).
    Unknown counts as not synchronised."""

    def __init__(self, check: Callable[[], bool | None]) -> None:
        self._check = check
        self._value = False
        self.refresh()

    def refresh(self) -> bool:
        try:
            self._value = bool(self._check())
        except Exception:
            log.exception("clock sync check failed; treating the clock as unsynchronised")
            self._value = False
        return self._value

    def __call__(self) -> bool:
        return self._value


class _Ring:
    """Last N decision latencies (seconds). Writes from the gate thread only;
    readers copy the list (one atomic C-level copy under the GIL)."""

    def __init__(self, size: int) -> None:
        self._buf: list[float] = [0.0] * size
        self._n = 0

    def add(self, value: float) -> None:
        self._buf[self._n % len(self._buf)] = value
        self._n += 1

    def values(self) -> list[float]:
        n = self._n
        buf = self._buf[:]
        return buf if n >= len(buf) else buf[:n]


def percentiles_ms(values: list[float], qs: tuple[float, ...] = (0.5, 0.99, 0.999)) -> dict[str, float]:
    """Nearest-rank percentiles of seconds, in milliseconds: p50_ms, p99_ms, p999_ms."""
    out: dict[str, float] = {}
    for q, value in percentiles(values, qs).items():
        name = "p" + f"{q * 100:g}".replace(".", "")
        out[f"{name}_ms"] = round(value * 1000, 3)
    return out


class StallProbe:
    """The longest the gate thread could not run (the "gate stall"), in seconds.

    The gate thread calls ``ran(now)`` each time it has control between two
    pieces of work (before taking an event or a tick, before it waits) and
    ``woke(now, due)`` when its wait ends, ``due`` being when it asked to
    wake (its timeout, at most ``STALL_TICK_S``, or the enqueue time of the
    first event that came meanwhile, whichever is earlier). A stall is the
    time between two such moments minus the wait the gate thread chose
    itself. So it counts: another thread holding the GIL (a long C call such
    as a table build or a big ``json.loads``, which a gate thread woken by a
    card cannot interrupt), the process not being scheduled or paused, and
    one piece of the gate thread's own work taking long (an event with its
    journal commit and outputs, the idle hook). It does not count: the time
    a card spends before ``submit`` (a reader thread held up by the same
    GIL, though the stall itself is seen here), waiting in a lane behind
    other events (the decision latency shows that), nor stalls shorter than
    the probe can tell apart: one that starts while the gate thread waits is
    seen short by up to the tick (the part before its planned wake is
    idle), so the figure is a lower bound within ``STALL_TICK_S``.

    Cost: one ``time.monotonic()`` and a compare per event. The gate thread
    never waits for a lock here: the interval's maximum is handed to the
    reader under a lock the gate thread only tries (when it is busy, the
    value is kept and handed over at the next moment).
    """

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.max_s = 0.0  # since start: written by the gate thread only
        self._interval_s = 0.0  # since the last take(), under _lock
        self._stash = 0.0  # noted while take() held _lock
        self._lock = threading.Lock()

    def start(self, now: float) -> None:
        self._last = now

    def ran(self, now: float) -> None:
        """The gate thread has control at ``now`` (it was busy since the last moment)."""
        gap = now - self._last
        self._last = now
        if gap > self._interval_s or self._stash:
            self._note(gap)

    def woke(self, now: float, due: float) -> None:
        """The gate thread's wait ended at ``now``; it asked to run again by ``due``."""
        gap = now - due if now > due else 0.0
        self._last = now
        if gap > self._interval_s or self._stash:
            self._note(gap)

    def _note(self, gap: float) -> None:
        self.max_s = max(self.max_s, gap)
        if self._lock.acquire(blocking=False):
            self._interval_s = max(self._interval_s, gap, self._stash)
            self._stash = 0.0
            self._lock.release()
        elif gap > self._stash:
            self._stash = gap

    def take(self) -> float:
        """The longest stall since the previous call (any thread; one reader)."""
        with self._lock:
            value, self._interval_s = self._interval_s, 0.0
        return value


class GateRuntime:
    """One gate thread around a core ``Gate``.

    gate: agent.core.turnstile.Gate. sink: commit(records) -> numbered
    records. outputs: an OutputDriver. clock: a Clock (default: system time,
    always synced). on_record: called with each committed record, after the
    commands were driven. watchdog: called from the gate thread at least
    every ``watchdog_interval_s`` while it is alive and not stuck (systemd's
    WATCHDOG=1), so a hung gate thread gets the agent restarted.
    on_idle(now): called on the gate thread when the queue has drained and
    then every ``idle_interval_s`` while idle, e.g.
    ``lambda now: journal.maintenance(now.wall)``; records it returns (already
    committed) go to on_record. It delays the next event by its duration, so
    it must be short. max_queue: hardware events beyond this many queued are
    dropped and counted; max_downlink_queue: the same for the downlink lane,
    max_site_queue for the site lane (the other gates' records; a reconnect
    brings a whole backlog at once), fire-loop events are never dropped. Each
    lane is bounded on its own, so a full downlink lane never costs a card read
    and the site's backlog never costs a command. stall_tick_s: the longest the
    gate thread waits at a time, the stall probe's resolution while idle.
    """

    def __init__(
        self,
        gate: Any,
        sink: RecordSink,
        *,
        outputs: OutputDriver,
        clock: Clock | None = None,
        on_record: Callable[[dict], Any] | None = None,
        watchdog: Callable[[], Any] | None = None,
        on_idle: Callable[[Now], list[dict] | None] | None = None,
        watchdog_interval_s: float = 1.0,
        idle_interval_s: float = 1.0,
        max_queue: int = 10_000,
        max_downlink_queue: int = 1_000,
        max_site_queue: int = 25_000,
        latency_samples: int = 4096,
        stall_tick_s: float = STALL_TICK_S,
    ) -> None:
        self.gate = gate
        self.sink = sink
        self.outputs = outputs
        self.clock = clock or Clock()
        self._on_record = on_record
        self._watchdog = watchdog
        self._on_idle = on_idle
        self._watchdog_interval = watchdog_interval_s
        self._idle_interval = idle_interval_s
        self._limits = {"fire": None, "hardware": max_queue, "downlink": max_downlink_queue,
                        "site": max_site_queue}
        self._cond = threading.Condition(threading.Lock())
        # In the order the gate thread serves them (LANES).
        self._lanes: dict[str, deque[tuple[Any, float]]] = {name: deque() for name in LANES}
        self._busy = False  # the gate thread holds an event it has not finished
        self._pace_since = 0.0  # yield_to_gate: this second began then ...
        self._pace_waited = 0.0  # ... and it waited this long in it
        self._stopping = False
        self._started = False
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None
        self._drained = False  # processed something since on_idle last ran
        self._next_idle = 0.0
        self._next_pet = 0.0
        self._latency = _Ring(latency_samples)
        self._stall = StallProbe()
        self._stall_tick = stall_tick_s
        self.counters: dict[str, int] = {
            "events": 0,
            "ticks": 0,
            "records": 0,
            "core_errors": 0,
            "sink_errors": 0,
            "output_errors": 0,
            "hook_errors": 0,
            "dropped": 0,  # all lanes
            "dropped_hardware": 0,
            "dropped_downlink": 0,
            "dropped_site": 0,
            "queue_max": 0,  # the hardware lane's deepest
            "downlink_queue_max": 0,
            "site_queue_max": 0,
        }

    # -- any thread ----------------------------------------------------------------

    def submit(self, event: Any) -> bool:
        """Queue an event for the gate thread in its lane; never blocks on the core.

        Returns False when it was dropped (its lane full, or the runtime
        stopped). A FireLoop goes ahead of everything already queued.
        """
        t = time.monotonic()
        lane = lane_of(event)
        with self._cond:
            if self._stopping:
                self.counters["dropped"] += 1
                return False
            q = self._lanes[lane]
            limit = self._limits[lane]
            if limit is not None and len(q) >= limit:
                self._dropped(lane, event)
                return False
            q.append((event, t))
            depth_key = _DEPTH_KEYS.get(lane)
            if depth_key is not None and len(q) > self.counters[depth_key]:
                self.counters[depth_key] = len(q)
            self._cond.notify_all()
        return True

    def _dropped(self, lane: str, event: Any) -> None:
        # Called with the lock held; logs only at 1, 10, 100 and every 1000th.
        self.counters["dropped"] += 1
        key = f"dropped_{lane}"
        self.counters[key] += 1
        n = self.counters[key]
        if n in (1, 10, 100) or n % 1000 == 0:
            if lane == "hardware":
                log.warning("gate queue full (%d hardware events): dropped %d so far, latest %r; "
                            "an input is flooding the agent, check its wiring",
                            self._limits[lane], n, event)
            elif lane == "site":
                log.warning("site lane full (%d records of the other gates): dropped %d so far; they "
                            "come faster than this gate takes them (card decisions go on)",
                            self._limits[lane], n)
            else:
                log.warning("downlink lane full (%d events): dropped %d so far, latest %r; the "
                            "broker is flooding the agent (card decisions go on)",
                            self._limits[lane], n, event)

    def queue_depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._lanes.values())

    def queue_depths(self) -> dict[str, int]:
        """Events waiting in each lane."""
        with self._cond:
            return {name: len(q) for name, q in self._lanes.items()}

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """For telemetry: events waiting per lane, and dropped per bounded lane since start."""
        return {"depth": self.queue_depths(),
                "dropped": {"hardware": self.counters["dropped_hardware"],
                            "downlink": self.counters["dropped_downlink"],
                            "site": self.counters["dropped_site"]}}

    def yield_to_gate(self, max_wait_s: float = PACE_MAX_WAIT_S) -> None:
        """Called by another thread between two chunks of long work (a list being
        checked or built: aclstore.use_pacer): while the gate thread has an event in
        hand or waiting, wait (at most ``max_wait_s``) until it is done. The gate
        thread lets the interpreter lock go several times inside one event (its
        journal commit, its writes); with a busy thread beside it, it would wait for
        the lock again each time. A no-op on the gate thread itself and when the
        gate is idle (no lock taken: two attribute reads)."""
        if not (self._busy or any(self._lanes.values())):
            return
        thread = self._thread
        if thread is None or thread is threading.current_thread() or self._stopping:
            return
        t0 = time.monotonic()
        if t0 - self._pace_since >= 1.0:
            self._pace_since, self._pace_waited = t0, 0.0
        elif self._pace_waited >= PACE_SHARE * (t0 - self._pace_since):
            return  # a gate busy back to back (a flooding input) does not stop the work
        with self._cond:
            self._cond.wait_for(
                lambda: self._stopping or not (self._busy or any(self._lanes.values())), max_wait_s)
        self._pace_waited += time.monotonic() - t0

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was handled; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (self._busy or any(self._lanes.values())), timeout)

    def latency_percentiles(self) -> dict[str, float]:
        """Decision latency (submit -> commands driven) of the fire and hardware
        lanes' events (downlink reports are not decisions) over the last samples:
        n, p50_ms, p99_ms, p999_ms, max_ms; empty values before any event."""
        values = self._latency.values()
        out: dict[str, float] = {"n": len(values)}
        if values:
            out.update(percentiles_ms(values))
            out["max_ms"] = round(max(values) * 1000, 3)
        return out

    def gate_stall(self) -> dict[str, float]:
        """The stall probe (``StallProbe``), in milliseconds: ``interval_ms``, the longest
        the gate thread could not run since the previous call (one caller: telemetry), and
        ``max_ms``, since the gate thread started."""
        return {"interval_ms": round(self._stall.take() * 1000, 3),
                "max_ms": round(self._stall.max_s * 1000, 3)}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Run gate.start (its commands: every line inactive), then the gate thread."""
        if self._started:
            raise RuntimeError("GateRuntime.start() was already called; build a new runtime to restart")
        self._started = True
        step = self.gate.start(self.clock.now())
        self._dispatch(step, "start")
        self._deadline = self.gate.next_deadline()
        now = self.clock.monotonic()
        self._next_idle = now + self._idle_interval
        self._next_pet = now
        self._thread = threading.Thread(target=self._run, name="gate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the gate thread (queued events are not handled), then drive
        every output inactive."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("gate thread did not stop within %.1f s; driving outputs inactive anyway", timeout)
        lines = list(OUTPUT_LINES)
        lines += [line for line in getattr(self.gate, "outputs", {}) if line not in lines]
        # Reader feedback lines the console pulsed (a pulse cut short by the stop ends here).
        lines += [line for line in getattr(self.gate, "feedback_outputs", {}) if line not in lines]
        for line in lines:
            try:
                self.outputs.set(line, False)
            except Exception:
                self.counters["output_errors"] += 1
                log.exception("could not drive %s inactive at stop", line)

    # -- gate thread ----------------------------------------------------------------

    def _run(self) -> None:
        self._stall.start(time.monotonic())
        while True:
            self._stall.ran(time.monotonic())
            self._pet()
            kind, item = self._next()
            if kind == "stop":
                return
            if kind == "idle":
                self._idle()
                continue
            if kind == "pet":
                continue
            event, t_enq = item
            self._process(event, t_enq)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _next(self) -> tuple[str, Any]:
        with self._cond:
            while True:
                for q in self._lanes.values():  # fire, hardware, downlink, then site
                    if q:
                        self._busy = True
                        return "event", q.popleft()
                if self._stopping:
                    return "stop", None
                now = self.clock.monotonic()
                dl = self._deadline
                if dl is not None and now >= dl:
                    self._busy = True
                    return "event", (_TICK, None)
                if self._on_idle is not None and (self._drained or now >= self._next_idle):
                    return "idle", None
                if self._watchdog is not None and now >= self._next_pet:
                    return "pet", None
                waits = [dl - now, self._stall_tick] if dl is not None else [self._stall_tick]
                if self._on_idle is not None:
                    waits.append(self._next_idle - now)
                if self._watchdog is not None:
                    waits.append(self._next_pet - now)
                timeout = max(0.0, min(waits))
                t0 = time.monotonic()
                self._stall.ran(t0)
                self._cond.wait(timeout)
                t1 = time.monotonic()
                due = t0 + timeout
                for q in self._lanes.values():
                    if q and q[0][1] < due:  # a card came before the timeout: run from then on
                        due = max(t0, q[0][1])
                self._stall.woke(t1, due)

    def _pet(self) -> None:
        if self._watchdog is None:
            return
        now = self.clock.monotonic()
        if now < self._next_pet:
            return
        self._next_pet = now + self._watchdog_interval
        try:
            self._watchdog()
        except Exception:
            self.counters["hook_errors"] += 1
            log.exception("watchdog callback failed")

    def _idle(self) -> None:
        self._drained = False
        self._next_idle = self.clock.monotonic() + self._idle_interval
        try:
            committed = self._on_idle(self.clock.now())  # type: ignore[misc]
        except Exception:
            self.counters["hook_errors"] += 1
            log.exception("on_idle callback failed")
            return
        # Records the idle work committed itself (the journal's own alarms and
        # overflow reports) go on to the uplink like any other.
        if committed and self._on_record is not None:
            self.counters["records"] += len(committed)
            for rec in committed:
                try:
                    self._on_record(rec)
                except Exception:
                    self.counters["hook_errors"] += 1
                    log.exception("on_record failed for record %s", rec.get("id"))

    def _process(self, event: Any, t_enq: float | None) -> None:
        if t_enq is None:
            self.counters["ticks"] += 1
        else:
            self.counters["events"] += 1
        failed = False
        try:
            step = self.gate.handle(event, self.clock.now())
        except Exception:
            failed = True
            self.counters["core_errors"] += 1
            log.exception("core failed on %r; event dropped, the gate thread goes on", event)
            step = None
        if step is not None:
            self._dispatch(step, event)
        if t_enq is not None and lane_of(event) != "downlink":
            # Decision latency is the hardware's: a queued report is not a decision.
            self._latency.add(time.monotonic() - t_enq)
        try:
            self._deadline = self.gate.next_deadline()
        except Exception:
            failed = True
            self.counters["core_errors"] += 1
            log.exception("core next_deadline failed; the next event will run its timeouts")
            self._deadline = None
        if failed and self._deadline is not None:
            # A core that keeps failing on its own deadline must not spin the thread.
            self._deadline = max(self._deadline, self.clock.monotonic() + CORE_RETRY_S)
        self._drained = True

    def _drive(self, cmd: Any, event: Any) -> None:
        try:
            if isinstance(cmd, SetOutput):
                self.outputs.set(cmd.line, cmd.active)
            elif isinstance(cmd, Feedback):
                self.outputs.feedback(cmd.reader, cmd.signal)
            else:
                log.error("unknown command %r from the core for %r; ignored", cmd, event)
        except Exception:
            self.counters["output_errors"] += 1
            log.exception("driving %r failed (event %r)", cmd, event)

    def _dispatch(self, step: Any, event: Any) -> None:
        """Records to the sink, then commands to the outputs, then the hooks."""
        committed: list[dict] = []
        if step.records:
            try:
                committed = self.sink.commit(step.records)
                self.counters["records"] += len(committed)
            except Exception:
                self.counters["sink_errors"] += 1
                log.exception("sink commit failed for %r; driving its commands anyway", event)
                for rec in step.records:
                    log.error("uncommitted record: %s", json.dumps(rec, default=str, sort_keys=True))
        # Lines first (in the core's order: releases before activations), reader
        # feedback after: a beep must never delay a relay.
        for cmd in step.commands:
            if isinstance(cmd, SetOutput):
                self._drive(cmd, event)
        for cmd in step.commands:
            if not isinstance(cmd, SetOutput):
                self._drive(cmd, event)
        if self._on_record is not None:
            for rec in committed:
                try:
                    self._on_record(rec)
                except Exception:
                    self.counters["hook_errors"] += 1
                    log.exception("on_record failed for record %s", rec.get("id"))
