"""The downlink: access lists and commands from the regional server.

``Downlink`` is the adapter between the MQTT client (its ``on_message``
callback) and the gate thread (``submit``): it never touches the core's
state. Access lists are checked and compiled on a worker thread of its own,
so neither the uplink's network thread nor the gate thread waits for a large
list; commands are checked on the caller's thread (quick: a signature check
and one small fsync). Threads: ``on_message`` (uplink thread),
``on_record`` (gate thread), ``status`` (any, e.g. telemetry).

Composition (the service)::

    uplink = Uplink(journal, ...)
    dl = Downlink(site=..., gate=..., fp=fastpath, state_dir=STATE,
                  submit=lambda e: runtime.submit(e), publish=uplink_publisher(uplink),
                  trusted_keys=cfg.keys)
    acl, table = dl.load_persisted()         # before the broker is reachable
    gate = Gate(cfg, fastpath, table)         # the stored list, or none yet
    runtime = GateRuntime(gate, journal, on_record=lambda r: (dl.on_record(r), uplink.wake()))
    uplink.on_message = dl.on_message         # acl and cmd topics (paho's thread)

``publish(topic, payload, props)``: props may hold ``correlation_data``
(bytes) and ``qos``; the service maps them to an MQTT 5 publish.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract import topics
from agent.core.acl import AccessList
from agent.core.events import Report, SwapTable

from .acl_sync import COUNTERS_FILE, AclSync, CounterStore, ensure_state_dir
from .commands import CommandHandler, delivery_from
from .signing import load_trusted_keys

log = logging.getLogger("agent.downlink")

__all__ = ["Downlink", "uplink_publisher"]

_STOP = object()


def uplink_publisher(uplink: Any) -> Callable[[str, bytes, dict], None]:
    """``publish`` for a Downlink over ``agent.uplink.mqtt.Uplink``: props
    ``correlation_data`` becomes the MQTT 5 CorrelationData, ``qos`` the QoS (default 1)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def publish(topic: str, payload: bytes, props: dict) -> None:
        properties = None
        if props.get("correlation_data") is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = props["correlation_data"]
        uplink.publish(topic, payload, qos=int(props.get("qos", 1)), retain=False,
                       properties=properties)

    return publish


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
    calling thread (tests, tools).
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
    ) -> None:
        self.topics = topics(site, gate)  # checks site and gate are valid topic levels
        if not (isinstance(max_age_s, (int, float)) and max_age_s > 0):
            raise ValueError(f"max_age_s {max_age_s!r} must be a positive number of seconds (default 30)")
        if acl_max_age_s is not None and not (isinstance(acl_max_age_s, (int, float)) and acl_max_age_s > 0):
            raise ValueError(f"acl_max_age_s {acl_max_age_s!r} must be a positive number of seconds, or unset")
        self.site, self.gate = site, gate
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
        self._status_extra = status_snapshot
        self.counters = CounterStore(self.state_dir / COUNTERS_FILE, wall=wall,
                                     report=lambda t, f: self._report(t, f))
        self.acl = AclSync(
            site=site, gate=gate, fp=fp, state_dir=self.state_dir, submit=submit,
            trusted_keys=keys, counters=self.counters,
            signed=(not allow_unsigned) if acl_signed is None else acl_signed,
            max_age_s=acl_max_age_s, wall=wall)
        self.commands = CommandHandler(
            site=site, gate=gate, submit=submit, publish=publish, trusted_keys=keys,
            counters=self.counters, allow_unsigned=allow_unsigned, max_age_s=max_age_s,
            clock_synced=clock_synced, wall=wall, status=self._command_status,
            acl_version=lambda: self.acl.acl.version if self.acl.acl is not None else None)
        self._acl_async = acl_async
        self._queue: queue.Queue[Any] = queue.Queue()
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
        """
        try:
            if topic == self.topics["cmd"]:
                self.commands.handle(payload, delivery_from(properties, retain))
            elif topic == self.topics["acl"]:
                if delivery_from(properties, retain).retain:
                    # A retained list would come back on every reconnect: take lists as sent.
                    log.warning("retained message on %s ignored; publish lists with retain off", topic)
                    return
                if self._acl_async:
                    self._ensure_worker()
                    self._queue.put(bytes(payload))
                else:
                    self.acl.handle(bytes(payload))
        except Exception:
            log.exception("downlink: message on %s could not be handled", topic)

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="downlink-acl", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self.acl.handle(item)
            except Exception:
                log.exception("downlink: access list could not be handled")
            finally:
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
        """Stop the worker after the lists already queued."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put(_STOP)
            worker.join(timeout)

    # --- gate thread ------------------------------------------------------------

    def on_record(self, record: dict) -> None:
        """Every committed record; replies to commands whose result the gate recorded."""
        try:
            self.commands.on_record(record)
        except Exception:
            log.exception("downlink: on_record failed for %s", record.get("id"))

    # --- any thread -------------------------------------------------------------

    def status(self) -> dict:
        """{acl_version, acl_age_s, acl_stale}; flags a stale list (once) as a side effect."""
        if self._backlog:
            with self._backlog_lock:
                self._flush_backlog()
        return self.acl.status()

    def _command_status(self) -> dict:
        fastpath = getattr(self.fp, "IMPLEMENTATION", None) or (
            "compiled" if getattr(self.fp, "__name__", "").endswith("_compiled") else "pure")
        data: dict[str, Any] = {"site": self.site, "gate": self.gate, "fastpath": fastpath}
        data.update(self.status())
        if self._status_extra is not None:
            data.update(self._status_extra())
        return data
