"""The downlink: access lists and commands from the regional server.

``Downlink`` is the adapter between the MQTT client (its ``on_message``
callback) and the gate thread (``submit``): it never touches the core's
state. Access lists are checked and compiled on a worker thread of its own,
so neither the uplink's network thread nor the gate thread waits for a large
list; commands are checked on the caller's thread (quick: a signature check
and one small fsync). Before either, ``flood.FloodGuard`` bounds what comes
in (a per-second budget per topic, size caps) and what goes out for refused
messages (the first few recorded, the rest counted). Threads: ``on_message``
(uplink thread), ``on_record`` (gate thread), ``status``, ``stats`` and
``wall_floor`` (any, e.g. telemetry and the gate's clock).

Composition (the service)::

    uplink = Uplink(journal, ...)
    dl = Downlink(site=..., gate=..., fp=fastpath, state_dir=STATE,
                  submit=lambda e: runtime.submit(e), publish=uplink_publisher(uplink),
                  trusted_keys=cfg.keys)
    acl, table = dl.load_persisted()         # before the broker is reachable
    gate = Gate(cfg, fastpath, table)         # the stored list, or none yet
    runtime = GateRuntime(gate, journal, on_record=lambda r: (dl.on_record(r), uplink.wake()))
    uplink.on_message = dl.on_message         # acl and cmd topics (paho's thread)
    clock = Clock(synced, wall=lambda: max(time.time(), dl.wall_floor()))  # see wall_floor
    telemetry["downlink"] = dl.stats()

``publish(topic, payload, props)``: props may hold ``correlation_data``
(bytes) and ``qos``; the uplink maps them to an MQTT 5 publish (``Uplink.reply``).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract import TOPIC_ROOT, topics
from agent.core.acl import AccessList, AclError, AclRejected
from agent.core.events import Report, SiblingRecord, SwapTable
from agent.host import background_thread
from agent.ratelimit import TokenBucket

from .acl_sync import AclSync
from .aclfiles import COUNTERS_FILE, FLOOR_SAVE_S, CounterStore, ensure_state_dir
from .commands import CommandHandler, delivery_from
from .flood import DEFAULT_MAX_LIST_BYTES, MAX_COMMAND_BYTES, FloodGuard
from .signing import load_trusted_keys

log = logging.getLogger("agent.downlink")

__all__ = ["DEFAULT_MAX_LIST_BYTES", "MAX_COMMAND_BYTES", "Downlink", "uplink_publisher"]

_STOP = object()
MAX_QUEUED_LISTS = 4  # lists waiting for the worker; more is a flood (a server sends one at a time)
# The site's other gates' events (docs/site.md): a record is under 1 KiB; four busy
# turnstiles make a few a second; a day's backlog after an outage comes in one burst.
MAX_SITE_EVENT_BYTES = 16 * 1024
SITE_EVENTS_PER_S = 200.0
SITE_EVENTS_BURST = 25_000.0


def uplink_publisher(uplink: Any) -> Callable[[str, bytes, dict], None]:
    """``publish`` for a Downlink over ``agent.uplink.mqtt.Uplink``: its ``reply``, which
    makes ``correlation_data`` the MQTT 5 CorrelationData and ``qos`` the QoS (default 1)."""
    return uplink.reply


class Downlink:
    """Access-list sync and remote commands for one gate (see the module docstring).

    trusted_keys: key_id -> Ed25519 public key (base64 of the raw 32 bytes, or
    PEM); two entries during a key rotation. allow_unsigned: accept unsigned
    commands (and lists): labs only. max_age_s: the longest a command may
    live (see ``commands``). acl_max_age_s: a list applied longer ago than
    this is stale (flagged, ``alarm`` ``acl_stale`` once, a snapshot asked
    for); None: no limit. acl_signed: whether lists must be signed (default:
    ``not allow_unsigned``). status_snapshot: extra fields for the ``status``
    command's reply (mode, backlog...). acl_async: False applies lists on the
    calling thread (tests, tools). max_list_bytes: the largest list message
    read (config ``acl.max_list_mb``); budgets: ``{"cmd"|"acl": (per second,
    burst)}``; flood_interval_s, flood_verbatim: the window of aggregated
    refusals and how many are recorded one by one in each (``flood``);
    monotonic: the clock of budgets, windows and the moving time floor;
    flood_timers: False leaves closing windows to ``flush_flood`` (tests).
    """

    def __init__(
        self,
        *,
        site: str,
        gate: str,
        fp: Any,
        state_dir: Path,
        submit: Callable[[Any], Any],
        publish: Callable[[str, bytes, dict], Any],
        trusted_keys: dict[str, str],
        allow_unsigned: bool = False,
        max_age_s: float = 30.0,
        acl_max_age_s: float | None = None,
        clock_synced: Callable[[], bool] = lambda: True,
        wall: Callable[[], float] = time.time,
        acl_signed: bool | None = None,
        status_snapshot: Callable[[], dict] | None = None,
        acl_async: bool = True,
        max_list_bytes: int = DEFAULT_MAX_LIST_BYTES,
        budgets: dict[str, tuple[float, float]] | None = None,
        flood_interval_s: float = 10.0,
        flood_verbatim: int = 5,
        monotonic: Callable[[], float] = time.monotonic,
        flood_timers: bool = True,
    ) -> None:
        self.topics = topics(site, gate)  # checks site and gate are valid topic levels
        if not (isinstance(max_age_s, (int, float)) and max_age_s > 0):
            raise ValueError(f"max_age_s {max_age_s!r} must be a positive number of seconds (default 30)")
        if acl_max_age_s is not None and not (isinstance(acl_max_age_s, (int, float)) and acl_max_age_s > 0):
            raise ValueError(f"acl_max_age_s {acl_max_age_s!r} must be a positive number of seconds, or unset")
        self.site, self.gate = site, gate
        self._site_prefix = f"{TOPIC_ROOT}/{site}/"
        # The site's other gates' events (docs/site.md): a backlog after an outage arrives
        # at once (the burst), a gate flooding its siblings is held to the rate.
        self._site_bucket = TokenBucket(SITE_EVENTS_PER_S, SITE_EVENTS_BURST, monotonic())
        self._mono = monotonic
        self.site_counts: Counter[str] = Counter()
        self.fp = fp
        self.state_dir = ensure_state_dir(Path(state_dir))
        self._submit_to_gate = submit
        self._backlog: list[Any] = []  # events submit() refused by raising (the runtime not built yet)
        self._backlog_lock = threading.Lock()
        submit = self._submit
        keys = load_trusted_keys(trusted_keys or {})
        if not keys and not allow_unsigned:
            log.warning("no trusted keys configured: every command and list will be refused; "
                        "add the server's public keys to the gate's config")
        if not (isinstance(max_list_bytes, int) and max_list_bytes >= 1024):
            raise ValueError(f"max_list_bytes {max_list_bytes!r} must be an integer of at least 1024")
        self._status_extra = status_snapshot
        self._wall = wall
        self._clock_synced = clock_synced
        self.guard = FloodGuard(
            report=self._report, max_bytes={"cmd": MAX_COMMAND_BYTES, "acl": max_list_bytes},
            budgets=budgets, interval_s=flood_interval_s, verbatim=flood_verbatim,
            monotonic=monotonic, timers=flood_timers)
        self.counters = CounterStore(self.state_dir / COUNTERS_FILE, wall=wall,
                                     report=lambda t, f: self._report(t, f), monotonic=monotonic)
        self.acl = AclSync(
            site=site, gate=gate, fp=fp, state_dir=self.state_dir, submit=submit,
            trusted_keys=keys, counters=self.counters,
            signed=(not allow_unsigned) if acl_signed is None else acl_signed,
            max_age_s=acl_max_age_s, wall=wall, clock_synced=clock_synced, guard=self.guard)
        self.commands = CommandHandler(
            site=site, gate=gate, submit=submit, publish=publish, trusted_keys=keys,
            counters=self.counters, allow_unsigned=allow_unsigned, max_age_s=max_age_s,
            clock_synced=clock_synced, wall=wall, status=self._command_status,
            acl_version=lambda: self.acl.acl.version if self.acl.acl is not None else None,
            guard=self.guard)
        self._acl_async = acl_async
        self._queue: queue.Queue[Any] = queue.Queue()
        self._queued_bytes = 0  # of the lists in _queue (the worker subtracts what it takes)
        self._queued_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    def _submit(self, event: Any) -> Any:
        """submit() to the gate. A record or a table it does not take (it raised or
        returned False) waits and goes first at the next submit or status() call.

        load_persisted() runs before the runtime may exist, and its report of a
        damaged file must not be lost. Actions (open, mode, reset) are never
        kept: a gate must not open later than it was asked to."""
        with self._backlog_lock:
            if self._flush_backlog():
                try:
                    taken = self._submit_to_gate(event)
                except Exception:
                    log.debug("submit of %r failed", event, exc_info=True)
                    taken = False
                if taken is not False:
                    return taken
            if isinstance(event, (Report, SwapTable)) and len(self._backlog) < 100:
                self._backlog.append(event)
            else:
                log.error("the gate did not take %r (queue full or not running); dropped", event)
            return False

    def _flush_backlog(self) -> bool:
        """Submit what waits, in order; True when nothing waits any more."""
        while self._backlog:
            try:
                taken = self._submit_to_gate(self._backlog[0])
            except Exception:
                log.debug("gate submit still failing; %d events wait", len(self._backlog),
                          exc_info=True)
                return False
            if taken is False:
                return False
            self._backlog.pop(0)
        return True

    def _report(self, rtype: str, fields: dict) -> None:
        self._submit(Report(rtype, fields))

    # --- start-up ---------------------------------------------------------------

    def load_persisted(self) -> tuple[AccessList | None, Any]:
        """The applied list kept in state_dir and its compiled table, or (None, None)."""
        return self.acl.load_persisted()

    # --- MQTT thread ------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, properties: Any = None, retain: bool | None = None) -> None:
        """A message on this gate's acl or cmd topic (others are ignored). Never raises.

        properties: paho's MQTT 5 ``Properties`` or a dict; the retain flag
        comes from ``retain`` or, failing that, a ``retain`` entry of a dict.
        The flood guard runs first: a message over its topic's budget is
        dropped and counted with no other work; one over its size cap is
        refused unread.
        """
        try:
            if topic == self.topics["cmd"]:
                name = "cmd"
            elif topic == self.topics["acl"]:
                name = "acl"
            else:
                if topic.startswith(self._site_prefix) and topic.endswith("/events"):
                    self._on_sibling(topic[len(self._site_prefix):-len("/events")], payload)
                return
            verdict = self.guard.admit(name, len(payload))
            if verdict == "over_budget":
                return
            delivery = delivery_from(properties, retain)
            if name == "cmd":
                if verdict == "oversize":
                    self.commands.refuse_oversize(len(payload), self.guard.max_bytes["cmd"], delivery)
                else:
                    self.commands.handle(payload, delivery)
                return
            if delivery.retain:
                # A retained list would come back on every reconnect: take lists as sent.
                self.guard.count("acl", "retained")
                if self.guard.record("acl", "rejected.retained"):
                    log.warning("retained message on %s ignored; publish lists with retain off", topic)
                return
            if verdict == "oversize":
                limit = self.guard.max_bytes["acl"]
                self.acl.rejected(AclRejected([AclError("/", (
                    f"{len(payload)} bytes, over the {limit} bytes this gate reads (acl.max_list_mb "
                    f"{limit / 1048576:g}); not read. Raise acl.max_list_mb if the board has the "
                    "memory, or send fewer cards"))]))
                return
            # A big list comes from paho as the bytearray it was read into
            # (agent.mqttclient): handed on as it is, never copied.
            data = payload if isinstance(payload, (bytes, bytearray)) else bytes(payload)
            if self._acl_async:
                with self._queued_lock:
                    full = self._queue.unfinished_tasks >= MAX_QUEUED_LISTS or (
                        self._queued_bytes and self._queued_bytes + len(payload) > self.guard.max_bytes["acl"])
                    if not full:
                        self._queued_bytes += len(payload)
                if full:
                    self.guard.count("acl", "queue_full")
                    self.acl.rejected(AclRejected([AclError("/", (
                        f"not read: {self._queue.unfinished_tasks} lists already wait for this gate's "
                        "list worker; send one list at a time and wait for acl.applied"))]))
                    return
                self._ensure_worker()
                self._queue.put(data)
            else:
                self.acl.handle(data)
        except Exception:
            log.exception("downlink: message on %s could not be handled", topic)

    def _on_sibling(self, gate: str, payload: bytes) -> None:
        """An event record of another gate of this site, for the core (agent/core/site.py)."""
        if not gate or "/" in gate or gate == self.gate:
            return  # this gate's own events (no_local keeps them away), or another level
        counts = self.site_counts
        counts["received"] += 1
        if not self._site_bucket.take(self._mono()):
            counts["over_budget"] += 1
            if counts["over_budget"] in (1, 100) or counts["over_budget"] % 10000 == 0:
                log.warning("site events: gate %s sends more than %g a second; %d dropped so far",
                            gate[:64], SITE_EVENTS_PER_S, counts["over_budget"])
            return
        if len(payload) > MAX_SITE_EVENT_BYTES:
            counts["oversize"] += 1
            return
        try:
            record = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            counts["malformed"] += 1
            return
        if not isinstance(record, dict):
            counts["malformed"] += 1
            return
        # Not kept for later when the gate does not take it (its lane full, not running).
        taken = self._submit_to_gate(SiblingRecord(gate, record))
        counts["accepted" if taken is not False else "dropped"] += 1

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="downlink-acl", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        background_thread()  # the gate thread first where the CPUs are busy
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self.acl.handle(item)
            except Exception:
                log.exception("downlink: access list could not be handled")
            finally:
                if item is not _STOP:
                    with self._queued_lock:
                        self._queued_bytes -= len(item)
                self._queue.task_done()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every access list received so far was handled; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the lists already queued; record what the flood guard
        counted in its open window; store the time floor."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put(_STOP)
            worker.join(timeout)
        self.guard.close()
        self.counters.save_floor()

    # --- gate thread ------------------------------------------------------------

    def on_record(self, record: dict) -> None:
        """Every committed record; replies to commands whose result the gate recorded."""
        try:
            self.commands.on_record(record)
        except Exception:
            log.exception("downlink: on_record failed for %s", record.get("id"))

    # --- any thread -------------------------------------------------------------

    def status(self) -> dict:
        """{acl_version, acl_age_s, acl_stale}; flags a stale list (once) as a side effect,
        checks the clock against the time floor and stores a floor that moved on."""
        if self._backlog:
            with self._backlog_lock:
                self._flush_backlog()
        try:
            synced = bool(self._clock_synced())
        except Exception:
            log.debug("clock sync check failed; taken as not synchronised", exc_info=True)
            synced = False
        self.commands.note_clock(self._wall(), synced, self.counters.floor())
        self.counters.save_floor(FLOOR_SAVE_S)
        return self.acl.status()

    def stats(self) -> dict:
        """The flood guard's counters since start (for telemetry ``downlink``): per topic
        ``received``, ``accepted``, ``over_budget``, ``oversize`` (lists also ``retained``,
        ``queue_full``), ``refused`` {reason: n} for commands, ``rejected`` {code: n} for
        lists, ``not_recorded``, ``replies_withheld``, ``flood_alarms``, ``flooded``; and
        ``time_floor``: the time floor as epoch seconds, or None."""
        data = self.guard.stats()
        floor = self.counters.floor()
        data["time_floor"] = round(floor, 3) if floor > 0 else None
        return data

    def wall_floor(self) -> float:
        """The time floor now (epoch seconds; 0.0 before any signed ``issued_at``): the
        time was at least this, by the server's signed word plus the monotonic time
        since. Cheap and thread-safe: the gate's clock may take ``max(time.time(),
        wall_floor())`` as its wall time, so no record or decision uses a time the
        server has proven past."""
        return self.counters.floor()

    def flush_flood(self) -> None:
        """Close the flood windows that have ended (their timer does it unless
        ``flood_timers=False``)."""
        self.guard.tick()

    def _command_status(self) -> dict:
        fastpath = getattr(self.fp, "IMPLEMENTATION", None) or (
            "compiled" if getattr(self.fp, "__name__", "").endswith("_compiled") else "pure")
        data: dict[str, Any] = {"site": self.site, "gate": self.gate, "fastpath": fastpath}
        data.update(self.status())
        if self._status_extra is not None:
            data.update(self._status_extra())
        return data
