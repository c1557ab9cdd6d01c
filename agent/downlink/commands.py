"""Remote commands: check, refuse or act, and answer on the MQTT 5 response topic.

Before anything here, the flood guard (``flood``) has bounded what comes in:
a per-second budget and a 64 KiB size cap, on the uplink thread.

Refusals are checked in the order docs/contract.md fixes; the first that
fails names the reason:

1. ``invalid``: a retained message, no MQTT message expiry interval, a
   response topic outside the gate's reply subtree
   (``gate/v1/{site}/{gate}/reply/...``; no reply goes there), not JSON,
   nested deeper than ``MAX_DEPTH``, not an object, or not valid against
   ``cmd.schema.json`` apart from the signature fields;
2. ``unsigned``: no ``sig`` or ``key_id`` (accepted only with
   ``allow_unsigned``, a lab setting);
3. ``bad_signature``: unknown key, or the signature does not verify;
4. ``misaddressed``: ``site``/``gate`` are not this gate's;
5. ``expired``: the MQTT message expiry ran out; ``expires`` is not after
   the time floor or the clock, whichever is later (synchronised or not:
   the floor is signed server time, see ``CounterStore``); ``expires`` is
   more than ``max_age_s`` after ``issued_at`` or (clock synchronised)
   after now; or ``issued_at`` is more than ``FUTURE_SKEW_S`` ahead of a
   synchronised clock. A command accepted with the clock not synchronised
   raises ``alarm`` ``expiry_unchecked``: its expiry was checked against the
   floor only;
6. ``replayed``: the counter is not above the last accepted one for its
   ``key_id``; the new counter (and floor) is stored durably before anything
   is done;
7. ``fire`` (and a fault's ``invalid``) are the gate's own refusals, decided
   by the core on the gate thread.

A verified ``issued_at`` raises the time floor whatever the outcome (a
refused command still proves what time it was at the server).

Refusals 1 to 6 are answered here at once: a ``command.result`` record
(``Report``) and a reply, for the first few of each window; the rest are
counted into one ``alarm`` ``downlink_flood`` (``flood.FloodGuard``).
Accepted ``open``, ``set_mode`` and ``fire_reset`` become core events
carrying the ``request_id``; the gate records their ``command.result`` and
``on_record`` sends the reply once that record is journalled. ``status`` and
``acl_snapshot`` are answered here.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from agent.contract import CONTRACT_VERSION, validate
from agent.core.acl import MAX_DEPTH, nesting_exceeds
from agent.core.events import FireReset, RemoteOpen, Report, SetMode
from agent.core.records import parse_rfc3339

from .acl_sync import FUTURE_SKEW_S, floor_candidate, future_detail
from .aclfiles import CounterStore
from .flood import FloodGuard
from .signing import SignatureError, verify

log = logging.getLogger("agent.downlink")

__all__ = ["Checked", "CommandHandler", "Delivery", "Refusal", "check_command", "delivery_from"]

# Stand-ins for the signature fields while the schema is checked: their
# absence is "unsigned" and their content "bad_signature", never "invalid".
_SIG_PLACEHOLDER = "A" * 86 + "=="
_KEY_PLACEHOLDER = "placeholder"
MAX_PENDING = 1000  # replies awaiting the gate's record
PENDING_TTL_S = 120.0  # a reply the gate never recorded (its journal failed) is dropped after this
_MAX_DETAIL = 1000
CORE_COMMANDS = ("open", "set_mode", "fire_reset")

# Details for the gate's own refusals (the record has no detail field; the reply does).
_GATE_DETAIL = {
    "fire": "fire mode: the gate stays free until the fire loop closes and the release is reset",
    "invalid": "the gate refused it (latched fault or an argument it cannot take); see its events",
}


class Refusal(Exception):
    """A command refused before it reached the gate: ``reason`` as in ``command.result``.

    signed: its signature verified (a refusal of the server's own message);
    floor: the time floor its verified ``issued_at`` may set, or None.
    """

    def __init__(self, reason: str, detail: str, request_id: str = "", command: str = "",
                 *, signed: bool = False, floor: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:_MAX_DETAIL]
        self.request_id = request_id
        self.command = command
        self.signed = signed
        self.floor = floor


@dataclass(frozen=True)
class Delivery:
    """What MQTT said about one message (properties and flags)."""

    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: float | None = None  # remaining message expiry interval; None: none was set
    retain: bool = False
    known: bool = False  # properties were given (an MQTT 5 delivery)


def _prop(properties: Any, attr: str, key: str) -> Any:
    if isinstance(properties, Mapping):
        return properties.get(key, properties.get(attr))
    return getattr(properties, attr, None)


def delivery_from(properties: Any, retain: bool | None = None) -> Delivery:
    """A Delivery from paho's ``Properties``, a dict (``response_topic``,
    ``correlation_data``, ``message_expiry_interval``, ``retain``) or None."""
    if retain is None:
        retain = bool(_prop(properties, "retain", "retain")) if properties is not None else False
    if properties is None:
        return Delivery(retain=bool(retain))
    topic = _prop(properties, "ResponseTopic", "response_topic")
    corr = _prop(properties, "CorrelationData", "correlation_data")
    expiry = _prop(properties, "MessageExpiryInterval", "message_expiry_interval")
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\0" in topic:
        topic = None  # no reply possible to a wildcard or empty topic
    if isinstance(corr, (bytearray, memoryview)):
        corr = bytes(corr)
    elif isinstance(corr, str):
        corr = corr.encode("utf-8")
    elif not isinstance(corr, bytes):
        corr = None
    if not isinstance(expiry, (int, float)) or isinstance(expiry, bool):
        expiry = None
    return Delivery(response_topic=topic, correlation_data=corr, expiry_s=expiry,
                    retain=bool(retain), known=True)


def _ident(msg: Any) -> tuple[str, str]:
    """(request_id, command) as received, when they fit the record; else empty."""
    if not isinstance(msg, dict):
        return "", ""
    rid, cmd = msg.get("request_id"), msg.get("command")
    rid = rid if _plain_text(rid, 128) else ""
    cmd = cmd if _plain_text(cmd, 64) else ""
    return rid, cmd


def _plain_text(value: Any, limit: int) -> bool:
    """A string short enough for the record, printable and encodable as UTF-8
    (JSON accepts lone surrogates; UTF-8 does not)."""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Checked:
    """A command that passed checks 1 to 5 (the replay check needs the counter store)."""

    msg: dict
    request_id: str
    command: str
    args: dict
    key_id: str  # "" for an unsigned command (allow_unsigned)
    counter: int
    expiry_checked: bool  # against a synchronised clock; else against the time floor only
    floor: float | None = None  # the time floor its verified issued_at may set


def reply_topic_allowed(topic: str, site: str, gate: str) -> bool:
    """Whether ``topic`` is in the gate's reply subtree ``gate/v1/{site}/{gate}/reply[/...]``,
    the one place the broker lets a gate write replies (mosquitto/acl.conf)."""
    base = f"gate/v1/{site}/{gate}/reply"
    return topic == base or (topic.startswith(base + "/") and len(topic) > len(base) + 1)


def check_command(
    payload: bytes,
    delivery: Delivery,
    *,
    site: str,
    gate: str,
    trusted_keys: Mapping[str, Any],
    allow_unsigned: bool,
    now: float,
    synced: bool,
    max_age_s: float,
    floor: float = 0.0,
) -> Checked:
    """Checks 1 to 5 (module docstring); raises Refusal. No side effects.

    now: the gate's wall clock; synced: whether it is synchronised; floor: the
    time floor (``CounterStore.floor``), below which no time is believed."""
    try:
        msg = json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise Refusal("invalid", f"nested more than {MAX_DEPTH} levels deep; a command nests 2 "
                      "(send the object of docs/contract.md, \"Commands\")") from None
    except (ValueError, TypeError) as exc:
        raise Refusal("invalid", f"not JSON ({str(exc)[:200]}); send one UTF-8 JSON object") from None
    if nesting_exceeds(msg):
        raise Refusal("invalid", f"nested more than {MAX_DEPTH} levels deep; a command nests 2 "
                      "(send the object of docs/contract.md, \"Commands\")")
    rid, cmd = _ident(msg)
    signed = False
    candidate: float | None = None

    def refuse(reason: str, detail: str) -> Refusal:
        return Refusal(reason, detail, rid, cmd, signed=signed, floor=candidate)

    if not isinstance(msg, dict):
        raise refuse("invalid", f"a command is a JSON object, not {type(msg).__name__}")
    if delivery.retain:
        raise refuse("invalid", "retained command: a gate never acts on retained messages; publish "
                     "commands with retain off and clear the retained one (an empty retained message)")
    if delivery.known and delivery.expiry_s is None:
        raise refuse("invalid", "no MQTT message expiry interval: publish commands with one, so a "
                     "command queued for an offline gate dies in the broker")
    if delivery.response_topic is not None and not reply_topic_allowed(delivery.response_topic,
                                                                       site, gate):
        raise refuse("invalid", f"response topic {delivery.response_topic[:200]!r} is outside this "
                     f"gate's reply subtree gate/v1/{site}/{gate}/reply/...: no reply is sent there "
                     "and nothing is done; use a response topic in that subtree")
    probe = dict(msg)
    probe["sig"], probe["key_id"] = _SIG_PLACEHOLDER, _KEY_PLACEHOLDER
    try:
        errors = validate("cmd", probe)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        errors = [f"$: cannot be checked ({str(exc)[:200]})"]
    if errors:
        raise refuse("invalid", "; ".join(errors)[:_MAX_DETAIL])
    try:
        expires = parse_rfc3339(msg["expires"]).timestamp()
        issued = parse_rfc3339(msg["issued_at"]).timestamp() if "issued_at" in msg else None
    except (ValueError, OverflowError):
        raise refuse("invalid", "expires or issued_at is not an RFC 3339 time with an offset, e.g. "
                     "\"2026-09-01T07:46:00Z\"") from None

    # 2, 3: signature
    key_id = ""
    if "sig" not in msg or "key_id" not in msg:
        if not allow_unsigned:
            raise refuse("unsigned", "no sig or key_id: this gate acts only on commands signed with "
                         "a trusted key (`gate-agent cmd --key ... --key-id ...`)")
    else:
        try:
            key_id = verify(msg, trusted_keys)
        except SignatureError as exc:
            raise refuse(exc.reason, exc.detail) from None
        signed = True
        if issued is not None:
            candidate = floor_candidate(issued, now, synced)  # None: from the future

    # 4: addressing
    if msg["site"] != site or msg["gate"] != gate:
        raise refuse("misaddressed", f"the command is for {msg['site']}/{msg['gate']}, "
                     f"this gate is {site}/{gate}")

    # 5: expiry, against the latest time the gate can vouch for
    if delivery.expiry_s is not None and delivery.expiry_s <= 0:
        raise refuse("expired", "the MQTT message expiry interval ran out")
    if issued is not None:
        if synced and issued > now + FUTURE_SKEW_S:
            raise refuse("expired", future_detail("the command", issued, now))
        if expires - issued > max_age_s:
            raise refuse("expired", f"valid for {expires - issued:.0f} s from issued_at, more than "
                         f"the {max_age_s:g} s a command may live; set expires closer")
    believed = max(now, floor, candidate or 0.0)
    if believed > expires:
        behind = (f"; the gate's clock is {believed - now:.0f} s behind the time floor (the latest "
                  "signed server time)") if believed > now + 1 else ""
        raise refuse("expired", f"expired {believed - expires:.1f} s ago ({msg['expires']}){behind}; "
                     "send a new command (check the server's clock)")
    if synced and expires > now + max_age_s:
        raise refuse("expired", f"expires {expires - now:.0f} s from now, more than the "
                     f"{max_age_s:g} s a command may live; set expires closer (check the "
                     "server's clock)")
    return Checked(msg=msg, request_id=rid, command=cmd, args=dict(msg["args"]),
                   key_id=key_id, counter=msg["counter"], expiry_checked=synced, floor=candidate)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class _Pending:
    topic: str
    correlation_data: bytes | None
    command: str
    since: float


class CommandHandler:
    """Commands for one gate: ``handle`` on the MQTT thread, ``on_record`` on the gate thread."""

    def __init__(
        self,
        *,
        site: str,
        gate: str,
        submit: Callable[[Any], Any],
        publish: Callable[[str, bytes, dict], Any],
        trusted_keys: Mapping[str, Any],
        counters: CounterStore,
        allow_unsigned: bool = False,
        max_age_s: float = 30.0,
        clock_synced: Callable[[], bool] = lambda: True,
        wall: Callable[[], float] = time.time,
        status: Callable[[], dict] = dict,
        acl_version: Callable[[], str | None] = lambda: None,
        guard: FloodGuard | None = None,
    ) -> None:
        self.site, self.gate = site, gate
        self._guard = guard
        self._submit = submit
        self._publish = publish
        self._trusted = trusted_keys
        self._counters = counters
        self.allow_unsigned = allow_unsigned
        self.max_age_s = max_age_s
        self._synced = clock_synced
        self._wall = wall
        self._status = status
        self._acl_version = acl_version
        self._pending: dict[str, deque[_Pending]] = {}
        self._own: Counter[tuple] = Counter()  # command.result records this handler reported
        self._skip_raised = False
        self._behind_raised = False
        self.counts: Counter[str] = Counter()  # done, and refused by reason (for tests and logs)

    # --- MQTT thread -------------------------------------------------------------

    def handle(self, payload: bytes, delivery: Delivery) -> None:
        """One message from the cmd topic. Never raises."""
        try:
            synced = bool(self._synced())
        except Exception:
            log.exception("clock sync check failed; treating the clock as unsynchronised")
            synced = False
        now = self._wall()
        floor = self._counters.floor()
        self.note_clock(now, synced, floor)
        try:
            checked = check_command(
                bytes(payload), delivery, site=self.site, gate=self.gate,
                trusted_keys=self._trusted, allow_unsigned=self.allow_unsigned,
                now=now, synced=synced, max_age_s=self.max_age_s, floor=floor)
        except Refusal as ref:
            if ref.floor is not None:
                self._counters.raise_floor(ref.floor)
            self._refused(ref, self._replyable(delivery))
            return
        try:
            fresh = self._counters.advance("cmd", checked.key_id, checked.counter, checked.floor)
        except OSError as exc:
            # The counter could not be stored: acting now would let a replay through later.
            log.error("could not store the replay counter (%s); command refused", exc)
            self._counters.raise_floor(checked.floor)
            self._refused(Refusal("invalid", f"the gate could not store its replay counter ({exc}); "
                                  "nothing was done", checked.request_id, checked.command,
                                  signed=bool(checked.key_id)), delivery)
            return
        if not fresh:
            self._counters.raise_floor(checked.floor)
            last = self._counters.last("cmd", checked.key_id)
            self._refused(Refusal("replayed", f"counter {checked.counter} is not above {last}, the "
                                  f"last accepted for key {checked.key_id or '(unsigned)'!r}: a replay",
                                  checked.request_id, checked.command,
                                  signed=bool(checked.key_id)), delivery)
            return
        self._note_expiry(checked)
        self._act(checked, delivery)

    def note_clock(self, now: float, synced: bool, floor: float) -> None:
        """Raise (once) or clear ``alarm`` ``clock_behind_floor``: a synchronised clock
        more than FUTURE_SKEW_S behind the time floor (its NTP source is wrong, or a
        server signed with a clock in the future while this one was not synchronised)."""
        behind = synced and floor > now + FUTURE_SKEW_S
        if behind and not self._behind_raised:
            self._behind_raised = True
            detail = (f"the synchronised clock is {floor - now:.0f} s behind the time floor, the "
                      "latest signed server time this gate has seen; commands are checked against "
                      "the floor. Check the NTP source, or the server's clock if it signed from the "
                      "future (docs/contract.md, \"Time floor\")")
            log.error("%s", detail)
            self._submit(Report("alarm", {"kind": "clock_behind_floor", "active": True,
                                          "detail": detail[:_MAX_DETAIL]}))
        elif synced and not behind and self._behind_raised:
            self._behind_raised = False
            self._submit(Report("alarm", {"kind": "clock_behind_floor", "active": False,
                                          "detail": "the synchronised clock has reached the time floor"}))

    def _note_expiry(self, checked: Checked) -> None:
        if not checked.expiry_checked:
            self._skip_raised = True
            self._submit(Report("alarm", {
                "kind": "expiry_unchecked", "active": True,
                "detail": (f"command {checked.request_id} ({checked.command}) accepted with the "
                           "gate's clock not synchronised: its expiry was checked against the time "
                           "floor only (the latest signed server time); the counter still stops "
                           "replays")[:_MAX_DETAIL]}))
        elif self._skip_raised:
            self._skip_raised = False
            self._submit(Report("alarm", {"kind": "expiry_unchecked", "active": False,
                                          "detail": "the clock is synchronised: command expiry "
                                                    "is checked against it again"}))

    def _act(self, c: Checked, delivery: Delivery) -> None:
        log.info("command %s %s (request %s, key %s, counter %d) accepted",
                 c.command, c.args, c.request_id, c.key_id or "(unsigned)", c.counter)
        if c.command in CORE_COMMANDS:
            if c.command == "open":
                event: Any = RemoteOpen(c.args["direction"], request_id=c.request_id)
            elif c.command == "set_mode":
                event = SetMode(c.args["mode"], by="command", request_id=c.request_id)
            else:
                event = FireReset(by="command", request_id=c.request_id)
            if delivery.response_topic is not None:
                self._expect(c.request_id, c.command, delivery)
            if self._submit(event) is False:
                log.error("the gate queue refused %r (full or stopping); no reply will come", event)
            return
        data = None
        if c.command == "status":
            try:
                data = dict(self._status())
            except Exception:
                log.exception("status snapshot failed")
                data = {}
        else:  # acl_snapshot
            self._submit(Report("acl.requested", {"reason": "command", "have": self._acl_version()}))
        self._report(c.request_id, c.command, "done")
        self._reply(delivery, c.request_id, c.command, "done", data=data)

    def _refused(self, ref: Refusal, delivery: Delivery, *, oversize: bool = False) -> None:
        """Record, reply and log a refusal: one by one while the flood guard allows, else
        counted (no record, no reply, no log line) into its window's summary."""
        if self._guard is not None and not self._guard.record(
                "cmd.signed" if ref.signed else "cmd",
                "refused.oversize" if oversize else f"refused.{ref.reason}",
                reply=delivery.response_topic is not None):
            self.counts[ref.reason] += 1
            return
        log.warning("command %r (request %r) refused: %s: %s", ref.command, ref.request_id,
                    ref.reason, ref.detail)
        self._report(ref.request_id, ref.command, "refused", ref.reason)
        self._reply(delivery, ref.request_id, ref.command, "refused", reason=ref.reason,
                    detail=ref.detail)

    def refuse_oversize(self, size: int, limit: int, delivery: Delivery) -> None:
        """A command over the size cap, refused unread (``invalid``, no request id)."""
        self._refused(Refusal("invalid", f"{size} bytes, over the {limit} bytes a command may have; "
                              "a signed command is under 1 KiB"), self._replyable(delivery),
                      oversize=True)

    def _replyable(self, delivery: Delivery) -> Delivery:
        """The delivery without its response topic when that is outside the reply subtree:
        a refusal is never published to a topic the sender chose elsewhere (an amplifier)."""
        if delivery.response_topic is not None and not reply_topic_allowed(
                delivery.response_topic, self.site, self.gate):
            return replace(delivery, response_topic=None)
        return delivery

    def _report(self, request_id: str, command: str, result: str, reason: str | None = None) -> None:
        self.counts[reason or result] += 1
        fields = {"request_id": request_id, "command": command, "result": result}
        if reason is not None:
            fields["reason"] = reason
        if len(self._own) > MAX_PENDING:
            self._own.clear()  # reports whose records never came (a failing journal)
        self._own[(request_id, command, result, reason)] += 1
        self._submit(Report("command.result", fields))

    def _expect(self, request_id: str, command: str, delivery: Delivery) -> None:
        now = time.monotonic()
        total = sum(len(q) for q in self._pending.values())
        for rid in list(self._pending):
            q = self._pending[rid]
            while q and (now - q[0].since > PENDING_TTL_S or total >= MAX_PENDING):
                q.popleft()
                total -= 1
            if not q:
                del self._pending[rid]
        self._pending.setdefault(request_id, deque()).append(
            _Pending(delivery.response_topic or "", delivery.correlation_data, command, now))

    # --- gate thread -----------------------------------------------------------------

    def on_record(self, record: dict) -> None:
        """A committed record: a gate's ``command.result`` answers a command waiting for its reply."""
        if record.get("type") != "command.result":
            return
        rid, cmd = record.get("request_id", ""), record.get("command", "")
        result, reason = record.get("result"), record.get("reason")
        key = (rid, cmd, result, reason)
        if self._own.get(key):
            self._own[key] -= 1  # our own report: its reply has gone already
            if not self._own[key]:
                del self._own[key]
            return
        if result == "done":
            self.counts["done"] += 1
        elif reason:
            self.counts[reason] += 1
        q = self._pending.get(rid)
        if not q:
            return
        p = q.popleft()
        if not q:
            del self._pending[rid]
        self._send(p.topic, p.correlation_data, rid, cmd or p.command, result or "refused",
                   reason=reason, detail=_GATE_DETAIL.get(reason) if reason else None)

    # --- replies ----------------------------------------------------------------------

    def _reply(self, delivery: Delivery, request_id: str, command: str, result: str, *,
               reason: str | None = None, detail: str | None = None, data: dict | None = None) -> None:
        if delivery.response_topic is None:
            return  # no reply asked for; the record is made all the same
        self._send(delivery.response_topic, delivery.correlation_data, request_id, command, result,
                   reason=reason, detail=detail, data=data)

    def _send(self, topic: str, correlation: bytes | None, request_id: str, command: str, result: str,
              *, reason: str | None = None, detail: str | None = None, data: dict | None = None) -> None:
        reply: dict[str, Any] = {"v": CONTRACT_VERSION, "request_id": request_id,
                                 "command": command, "result": result}
        if result == "refused":
            reply["reason"] = reason or "invalid"
        if detail:
            reply["detail"] = detail[:_MAX_DETAIL]
        if data is not None and result == "done":
            reply["data"] = data
        props: dict[str, Any] = {"qos": 1}
        if correlation is not None:
            props["correlation_data"] = correlation
        payload = json.dumps(reply, separators=(",", ":"), ensure_ascii=False, default=str)
        try:
            self._publish(topic, payload.encode("utf-8"), props)
        except Exception:
            log.exception("could not publish the reply to %s for request %s", topic, request_id)
