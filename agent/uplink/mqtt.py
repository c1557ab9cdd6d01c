"""The MQTT uplink: sends the journal's pending events, takes the server's acks.

One thread (``Uplink.start()``) owns the paho client and runs its own select
loop over the client's socket and a wake-up socket, with paho's external-loop
API (``loop_read``/``loop_write``/``loop_misc``). Nothing else touches paho or
the journal's uplink methods, so the gate thread never waits for the network:
it commits records and calls ``wake()``, which only writes one byte.

The delivery bookkeeping (what is in flight, what is acknowledged, resend
timers, ack clamping, refusal backoff) is the sans-I/O ``Window`` of
``agent/uplink/window.py``; this module feeds it paho's callbacks, the
journal's records and the time, and carries out what it returns. Some 660
lines on purpose, over the ~500 others keep: the select loop, the
connection's life and paho's callbacks share one client on one thread;
split, each piece would reach into the others' state.

Delivery (docs/contract.md, "Delivery: journal, acknowledgement, resends"):

- Events go out in seq order, one record per message, QoS 1, with at most
  ``window`` unacknowledged publishes on the wire (also capped by the
  broker's Receive Maximum).
- ``ack_mode="ingest"`` (default): an event is done only when the server's
  ``ack`` message ``{"journal", "upto"}`` arrives (``journal.ack_upto``); a
  PUBACK only frees its window slot. Events still pending after a reconnect,
  after ``resend_after_s`` without ack progress (each further round without
  an ack waits twice as long, up to 15 min: ``window.RESEND_MAX_S``), or after
  the broker answered 0x10 (nobody subscribed) are sent again; duplicates keep
  their ``id``.
- ``ack_mode="broker"`` (labs): a PUBACK below 0x80 acknowledges the event
  (``journal.ack_one``); 0x10 also counts but raises the ``broker_dropped``
  alarm, because the broker threw the message away.
- A PUBACK of 0x80 or more (0x87: not authorised by the broker's ACL) keeps
  the event pending, raises ``publish_refused`` and pauses publishing for a
  growing backoff before it retries.

Every connection is a fresh paho client (clean start): on connect the uplink
subscribes to ack, acl and cmd, publishes the retained ``online`` status
and sends everything still pending; the retained ``offline`` will covers an
unclean loss, ``stop()`` publishes ``offline`` itself. Reconnects back off
exponentially with jitter up to ``backoff_max_s``.
"""
from __future__ import annotations

import json
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import CONTRACT_VERSION, __version__
from agent.contract import TOPIC_ROOT, topics
from agent.core.records import rfc3339_ms
from agent.host import boot_id
from agent.mqttclient import BrokerSettingError, TlsConfig, new_client
from agent.uplink import window as w
from agent.uplink.window import ACK_MODES, Window, backoff_s

log = logging.getLogger("agent.uplink")

# The MQTT 5 Maximum Packet Size the uplink may announce (the protocol's own range).
MIN_PACKET_BYTES = 1024
MAX_PACKET_BYTES = 268_435_455

# How many pending records one journal read fetches: big enough that a
# backlog drains without a query per message, small enough to stay cheap.
FETCH_BATCH = 512


# A bad uplink setting (ack mode, window, TLS files): one error for every broker setting.
UplinkError = BrokerSettingError


class JournalForUplink(Protocol):
    """The journal methods the uplink uses, all from its own thread."""

    id: str
    last_seq: int  # the highest seq the journal has handed out

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[dict]: ...
    def ack_upto(self, journal_id: str, seq: int) -> bool: ...
    def ack_one(self, seq: int) -> Any: ...


# A downlink reply's options -> paho's MQTT 5 PUBLISH property names.
_PROPERTY_NAMES = {
    "correlation_data": "CorrelationData",
    "message_expiry_interval": "MessageExpiryInterval",
    "content_type": "ContentType",
    "response_topic": "ResponseTopic",
}


def reply_options(options: Mapping[str, Any] | Properties | None) -> tuple[int, Properties | None]:
    """(qos, paho Properties or None) from a downlink reply's options (``qos``,
    ``correlation_data``...); paho Properties pass through with QoS 1."""
    if options is None:
        return 1, None
    if not isinstance(options, Mapping):
        return 1, options
    qos = int(options.get("qos", 1))
    wanted = {k: v for k, v in options.items() if k != "qos" and v is not None}
    if not wanted:
        return qos, None
    out = Properties(PacketTypes.PUBLISH)
    for key, value in wanted.items():
        setattr(out, _PROPERTY_NAMES.get(key, key), value)
    return qos, out


def _json(msg: dict) -> bytes:
    # ASCII with escapes: a record carrying text from outside (a command's request id,
    # a bad list's field path) may hold a lone surrogate that UTF-8 cannot encode; one such
    # record must never stop the uplink, and escaped it is still valid JSON.
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _rc_value(reason_code: Any) -> int:
    value = getattr(reason_code, "value", reason_code)
    return int(value) if value is not None else 0


def _rc_text(reason_code: Any) -> str:
    return f"0x{_rc_value(reason_code):02X} {getattr(reason_code, 'getName', lambda: '')()}".strip()


class Uplink:
    """Publishes the journal's events over MQTT 5 from one thread of its own.

    ``start()`` starts the thread, ``stop()`` ends it after publishing the
    retained ``offline`` status. ``wake()`` (any thread, never blocks) says
    new records are committed. ``on_alarm(kind, active, detail)`` and
    ``on_message(topic, payload, properties, retain)`` are called on the uplink
    thread; keep them short (enqueue and return). ``max_packet_bytes``: the
    MQTT 5 Maximum Packet Size announced at connect; the broker drops any
    message to this gate that is bigger, before it is sent (a flood of huge
    messages never reaches the board). None: no limit announced.
    """

    def __init__(
        self,
        journal: JournalForUplink,
        *,
        site: str,
        gate: str,
        host: str,
        port: int = 1883,
        client_id: str | None = None,
        ack_mode: str = "ingest",
        window: int = 20,
        keepalive: int = 30,
        tls: TlsConfig | None = None,
        username: str | None = None,
        password: str | None = None,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 60.0,
        resend_after_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        status_fields: Callable[[], dict] | None = None,
        on_alarm: Callable[[str, bool, str], None] | None = None,
        on_message: Callable[[str, bytes, Any, bool], None] | None = None,
        boot: str | None = None,
        started_at: float | None = None,
        max_packet_bytes: int | None = None,
        site_events: bool = False,
        session_expiry_s: int = 86400,
    ) -> None:
        if ack_mode not in ACK_MODES:
            raise UplinkError(f"ack_mode {ack_mode!r} is not known; use 'ingest' (default) or 'broker' (labs)")
        if not isinstance(window, int) or not 1 <= window <= 65535:
            raise UplinkError(f"window {window!r} must be an integer from 1 to 65535 (default 20)")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise UplinkError(
                f"backoff_min_s {backoff_min_s} and backoff_max_s {backoff_max_s}: "
                "need 0 < backoff_min_s <= backoff_max_s"
            )
        if max_packet_bytes is not None and not MIN_PACKET_BYTES <= max_packet_bytes <= MAX_PACKET_BYTES:
            raise UplinkError(f"max_packet_bytes {max_packet_bytes!r} must be from {MIN_PACKET_BYTES} "
                              f"to {MAX_PACKET_BYTES}")
        self.max_packet_bytes = max_packet_bytes
        # The site's other gates' events (docs/site.md): one more subscription, with
        # no_local, on a session the broker keeps while this gate is away.
        self.site_events = bool(site_events)
        self.session_expiry_s = int(session_expiry_s)
        self.journal = journal
        self.site, self.gate = site, gate
        self.topics = topics(site, gate)
        self.host, self.port = host, port
        self.client_id = client_id or f"gate-{site}-{gate}"
        self.ack_mode = ack_mode
        self.window = window
        self.keepalive = keepalive
        self.tls = tls
        self._ssl_context = tls.context() if tls is not None else None  # bad files fail here, at start-up
        self.username, self.password = username, password
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.resend_after_s = resend_after_s
        self.connect_timeout_s = connect_timeout_s
        self.status_fields = status_fields
        self.on_alarm = on_alarm
        self.on_message = on_message
        self.boot = boot or boot_id()
        self.started_at = time.time() if started_at is None else started_at

        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox: deque[tuple[str, bytes, int, bool, Properties | None]] = deque(maxlen=1000)
        self._status_due = False

        # Connection state, touched only by the uplink thread.
        self._client: mqtt.Client | None = None
        self._connected = False
        self._connect_deadline = 0.0
        self._next_connect_at = 0.0
        self._connect_failures = 0
        # The delivery bookkeeping, touched only by the uplink thread (stats() reads its counters).
        self._window = Window(journal.id, ack_mode=ack_mode, window=window, backoff_min_s=backoff_min_s,
                              backoff_max_s=backoff_max_s, resend_after_s=resend_after_s,
                              events_topic=self.topics["events"], ack_topic=self.topics["ack"],
                              uniform=random.uniform)
        self._alarms: dict[str, bool] = {}
        self._log_quiet = False  # repeated connect failures are logged once per outage

        self._reconnects = 0
        self._last_error: str | None = None

    # --- public API (any thread) -----------------------------------------

    def start(self) -> Uplink:
        if self._thread is not None:
            raise RuntimeError("Uplink.start() called twice; make a new Uplink instead")
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the retained ``offline`` status, disconnect, end the thread."""
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass

    def wake(self) -> None:
        """New records are committed: publish now. Never blocks."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are stopping

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> None:
        """Queue one message (a command reply, say) for the uplink thread.

        Dropped when not connected for QoS 0 (a stale sample is worthless);
        QoS 1 messages wait for the connection (up to 1,000, the oldest
        dropped first)."""
        if qos == 0 and not self._connected:
            return
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        self._outbox.append((topic, data, qos, retain, properties))
        self.wake()

    def reply(self, topic: str, payload: bytes, options: Mapping[str, Any] | Properties | None = None) -> None:
        """A downlink reply (a command's result): ``options`` as the downlink gives
        them (``qos``, ``correlation_data``...), see ``reply_options``."""
        qos, props = reply_options(options)
        self.publish(topic, payload, qos=qos, properties=props)

    def refresh_status(self) -> None:
        """Publish the ``online`` status again (e.g. a new access-list version)."""
        self._status_due = True
        self.wake()

    def publish_telemetry(self, payload: dict) -> None:
        """Telemetry: QoS 0, not retained; a sample lost while offline is not resent."""
        self.publish(self.topics["telemetry"], _json(payload), qos=0)

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> dict:
        win = self._window
        return {
            "connected": self._connected,
            "published": win.published,
            "acked": win.acked,
            "inflight": len(win.inflight),
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "drain_per_s": win.drain_rate(time.monotonic()),
        }

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the uplink thread ------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception as exc:  # never let the thread die: log, drop the link, retry
                log.exception("uplink: unexpected error, reconnecting")
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._drop_client()
                self._schedule_reconnect()
        try:
            self._shutdown()
        except Exception:
            log.exception("uplink: error during shutdown")

    def _step(self) -> None:
        now = time.monotonic()
        if self._client is None:
            if now < self._next_connect_at:
                self._sleep(min(self._next_connect_at - now, 1.0))
                return
            self._connect()
            return
        client = self._client
        if self._connected:
            if self.journal.id != self._window.journal_id:
                self._journal_changed(now)
            self._flush_outbox()
            self._timers(now)
            if not self._window.paused(now):
                self._fill_window()
        elif now > self._connect_deadline:
            self._fail(f"no CONNACK from {self.host}:{self.port} within {self.connect_timeout_s} s")
            return
        if client.want_write():
            client.loop_write()
        sock = client.socket()
        if sock is None:
            self._lost()
            return
        pending_tls = hasattr(sock, "pending") and sock.pending() > 0
        timeout = 0.0 if pending_tls else self._select_timeout(now)
        wlist = [sock] if client.want_write() else []
        readable, writable, _ = select.select([sock, self._wake_r], wlist, [], timeout)
        if self._wake_r in readable:
            self._drain_wake()
        if sock in readable or pending_tls:
            client.loop_read()
        if writable and client.socket() is not None:
            client.loop_write()
        if client.socket() is not None:
            client.loop_misc()
        if client.socket() is None:
            self._lost()

    def _select_timeout(self, now: float) -> float:
        due = [now + 1.0]  # 1 s at most: keepalive checks
        if self._connected:
            due.append(self._window.next_deadline(now))  # timers run only while connected
        else:
            due.append(self._connect_deadline)
        return max(0.0, min(due) - now)

    def _sleep(self, seconds: float) -> None:
        readable, _, _ = select.select([self._wake_r], [], [], seconds)
        if readable:
            self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._window.more()

    # --- connecting ---------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        client = new_client(self.client_id, tls=self._ssl_context, username=self.username,
                            password=self.password)
        client.max_inflight_messages_set(0)  # our own window; paho must not queue
        client.connect_timeout = self.connect_timeout_s
        will = {"v": CONTRACT_VERSION, "state": "offline", "boot": self.boot, "reason": "will"}
        client.will_set(self.topics["status"], _json(will), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self) -> None:
        client = self._new_client()
        self._client = client
        self._connected = False
        self._connect_deadline = time.monotonic() + self.connect_timeout_s
        try:
            rc = client.connect(self.host, self.port, keepalive=self.keepalive,
                                clean_start=not self.site_events,
                                properties=self._connect_properties())
        except ssl.SSLCertVerificationError as exc:
            self._tls_rejected(exc)
            return
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._fail(self._describe_connect_error(exc))
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._fail(f"connect to {self.host}:{self.port} failed: {mqtt.error_string(rc)}")

    def _connect_properties(self) -> Properties | None:
        if self.max_packet_bytes is None and not self.site_events:
            return None
        props = Properties(PacketTypes.CONNECT)
        if self.max_packet_bytes is not None:
            # The broker must not send this client anything bigger (MQTT 5, 3.1.2.11.4):
            # an oversized message never reaches the board's memory.
            props.MaximumPacketSize = self.max_packet_bytes
        if self.site_events:
            # The siblings' events published while this gate is away wait for it.
            props.SessionExpiryInterval = self.session_expiry_s
        return props

    @property
    def site_filter(self) -> str:
        """The subscription to the site's gates' events (site_events)."""
        return f"{TOPIC_ROOT}/{self.site}/+/events"

    def _describe_connect_error(self, exc: BaseException) -> str:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, ConnectionRefusedError):
            return f"broker {where} refused the connection (is it running, is the port right?)"
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve broker host {self.host!r} ({exc}); check the host name and DNS"
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return f"broker {where} did not answer within {self.connect_timeout_s} s (network down?)"
        if isinstance(exc, ssl.SSLError):
            return f"TLS handshake with {where} failed: {exc}; check the CA, client certificate and key"
        return f"cannot connect to broker {where}: {exc}"

    def _tls_rejected(self, exc: ssl.SSLCertVerificationError) -> None:
        reason = getattr(exc, "verify_message", "") or str(exc)
        if "not yet valid" in reason or "expired" in reason:
            # Usually the board's clock, not the certificate: a Pi without RTC after a power cut.
            detail = (
                f"broker certificate rejected: {reason} by this board's clock "
                f"({rfc3339_ms(time.time())}); check the clock (NTP, fake-hwclock). "
                "Events are kept in the journal; retrying with backoff"
            )
        else:
            detail = (
                f"broker certificate rejected: {reason}; check the CA file and "
                "server_name in the uplink's tls settings"
            )
        self._alarm("tls_rejected", True, detail)
        self._fail(detail, level=logging.ERROR)

    def _fail(self, message: str, level: int = logging.WARNING) -> None:
        """A connection attempt failed: log it (once per outage), back off."""
        self._last_error = message
        if self._log_quiet:
            log.debug("uplink: %s", message)
        else:
            log.log(level, "uplink: %s; retrying with backoff, events stay in the journal", message)
            self._log_quiet = True
        self._drop_client()
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay = backoff_s(self._connect_failures, self.backoff_min_s, self.backoff_max_s, random.uniform)
        self._connect_failures += 1
        self._next_connect_at = time.monotonic() + delay

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._connected = False
        self._window.reset()
        sock = client.socket() if client is not None else None
        if sock is not None:
            try:
                sock.close()  # no DISCONNECT packet: a lost link keeps the will armed
            except OSError:
                pass

    def _lost(self) -> None:
        if self._connected:
            log.warning("uplink: connection to %s:%s lost; reconnecting", self.host, self.port)
            self._reconnects += 1
            self._log_quiet = False
        self._fail(self._last_error or "connection closed")

    def _journal_changed(self, now: float) -> None:
        """The journal switched (a fallback on a read-only card, or back): the
        window starts the new one from nothing, and the birth names it."""
        old = self._window.journal_id
        self._window.switch_journal(self.journal.id, now)
        log.warning("uplink: the journal is now %s (was %s); sending it from its start",
                    self.journal.id, old)
        self._status_due = True

    # --- paho callbacks (the uplink thread, inside loop_read) ----------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._last_error = f"broker refused the connection: {_rc_text(reason_code)}"
            if _rc_value(reason_code) in (0x86, 0x87):
                self._last_error += "; check the uplink's username/password and the broker's ACL"
            return  # paho closes the socket; the loop logs once and reconnects with backoff
        self._connected = True
        self._connect_failures = 0
        self._log_quiet = False
        self._alarm("tls_rejected", False, "")
        self._window.connected(time.monotonic(), getattr(properties, "ReceiveMaximum", None))
        log.info("uplink: connected to %s:%s as %s (window %d, ack mode %s)",
                 self.host, self.port, self.client_id, self._window.size, self.ack_mode)
        wanted: list[tuple[str, Any]] = [(self.topics["ack"], 1), (self.topics["acl"], 1),
                                         (self.topics["cmd"], 1)]
        if self.site_events:
            # no_local: this gate's own events do not come back to it.
            wanted.append((self.site_filter, SubscribeOptions(qos=1, noLocal=True)))
        client.subscribe(wanted)
        self._publish_raw(self.topics["status"], _json(self._birth()), qos=1, retain=True)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [c for c in reason_codes if getattr(c, "is_failure", False)]
        if not refused:
            return
        if self.site_events and len(reason_codes) == 4 and reason_codes[3].is_failure \
                and len(refused) == 1:
            log.error("uplink: the broker refused the site's events (%s: %s): this gate works alone, "
                      "without site-wide anti-passback; grant the site read right "
                      "(mosquitto/acl.conf, docs/site.md)", self.site_filter, _rc_text(reason_codes[3]))
            return
        log.error("uplink: the broker refused %d of this gate's subscriptions (%s); check its ACL",
                  len(refused), ", ".join(_rc_text(c) for c in refused))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        # Before CONNACK the refusal itself is the better explanation: keep it.
        if self._connected and not self._stopping:
            self._last_error = f"disconnected: {_rc_text(reason_code)}"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._apply(self._window.puback(mid, _rc_value(reason_code), time.monotonic(), _rc_text(reason_code)))

    def _on_message(self, client, userdata, message) -> None:
        topic = message.topic
        if topic == self.topics["ack"]:
            self._on_ack(message.payload)
            return
        if self.on_message is not None:
            try:
                # The retain flag travels beside the properties: a retained command is never acted on.
                self.on_message(topic, message.payload, message.properties, bool(message.retain))
            except Exception:
                log.exception("uplink: on_message handler failed for %s", topic)

    def _on_ack(self, payload: bytes) -> None:
        made = getattr(self.journal, "last_seq", None)
        self._apply(self._window.ack_message(payload, time.monotonic(), made))

    def _apply(self, effects: list[w.Effect]) -> None:
        """Carry out what the window returned, in order."""
        for effect in effects:
            match effect:
                case w.AckOne(seq, journal_id):
                    if self.journal.id == journal_id:  # else a record of the journal before a switch
                        self.journal.ack_one(seq)
                case w.AckUpto(journal_id, upto, ours):
                    if not self.journal.ack_upto(journal_id, upto) and not ours:
                        log.info("uplink: ack for another journal %s ignored (ours is %s)",
                                 journal_id, self._window.journal_id)
                case w.Alarm(kind, active, detail):
                    self._alarm(kind, active, detail)
                case w.Log(level, message):
                    log.log(level, "uplink: %s", message)
                case w.Error(message):
                    self._last_error = message
                case w.NeedOldest():
                    oldest = self.journal.pending(after_seq=0, limit=1)
                    self._apply(self._window.resend_check(oldest[0]["seq"] if oldest else None))

    # --- publishing -----------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                 properties: Properties | None = None) -> mqtt.MQTTMessageInfo | None:
        """Hand one message to paho; None (and the reason in stats) if it would not take it."""
        assert self._client is not None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._last_error = f"publish failed: {mqtt.error_string(info.rc)}"
            return None
        return info

    def _publish_raw(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                     properties: Properties | None = None) -> bool:
        """A status or reply message: with QoS 1 it takes a window slot until its PUBACK."""
        info = self._publish(topic, payload, qos, retain, properties)
        if info is None:
            return False
        if qos > 0:
            self._window.track(info.mid)
        return True

    def _fill_window(self) -> None:
        topic, win = self.topics["events"], self._window
        while win.has_room():
            rec = win.next_record()
            if rec is None:
                after = win.fetch_after()
                if after is None or not win.feed(self.journal.pending(after_seq=after, limit=FETCH_BATCH),
                                                 FETCH_BATCH):
                    return
                continue
            info = self._publish(topic, _json(rec), 1)
            if info is None:
                win.put_back(rec)
                return
            win.sent(info.mid, rec)

    def _flush_outbox(self) -> None:
        if self._status_due:
            self._status_due = False
            self._publish_raw(self.topics["status"], _json(self._birth()), qos=1, retain=True)
        while self._outbox and self._window.has_room():
            topic, payload, qos, retain, props = self._outbox.popleft()
            if not self._publish_raw(topic, payload, qos, retain, props):
                return

    def _timers(self, now: float) -> None:
        self._apply(self._window.tick(now))

    # --- status, alarms, stats ---------------------------------------------------

    def _birth(self) -> dict:
        birth = {
            "v": CONTRACT_VERSION,
            "state": "online",
            "version": __version__,
            "acl_version": None,
            "started_at": rfc3339_ms(self.started_at),
            "boot": self.boot,
            "journal": self.journal.id,
        }
        if self.status_fields is not None:
            try:
                birth.update(self.status_fields())
            except Exception:
                log.exception("uplink: status_fields() failed; publishing the status without them")
        return birth

    def _alarm(self, kind: str, active: bool, detail: str) -> None:
        """Report an alarm only when it changes state (no flood while it lasts)."""
        if self._alarms.get(kind, False) == active:
            return
        self._alarms[kind] = active
        if self.on_alarm is not None:
            try:
                self.on_alarm(kind, active, detail)
            except Exception:
                log.exception("uplink: on_alarm handler failed for %s", kind)

    def _shutdown(self) -> None:
        client = self._client
        if client is None or not self._connected:
            self._drop_client()
            return
        offline = {"v": CONTRACT_VERSION, "state": "offline", "boot": self.boot, "reason": "shutdown"}
        info = client.publish(self.topics["status"], _json(offline), qos=1, retain=True)
        deadline = time.monotonic() + 2.0
        while client.socket() is not None and not info.is_published() and time.monotonic() < deadline:
            sock = client.socket()
            wlist = [sock] if client.want_write() else []
            readable, writable, _ = select.select([sock], wlist, [], 0.1)
            if readable:
                client.loop_read()
            if writable and client.socket() is not None:
                client.loop_write()
        if client.socket() is not None:
            client.disconnect()  # normal disconnect: the broker drops the will
            if client.want_write() and client.socket() is not None:
                client.loop_write()
        self._drop_client()
        log.info("uplink: stopped (offline status published: %s)", info.is_published())
