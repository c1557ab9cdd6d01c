"""Tools for the regional side and the technician: ``acl push``, ``cmd``, ``fleet status``, ``keygen``.

``add_regional_parsers(subparsers)`` adds the four subcommands to the
``gate-agent`` command line (each sets ``func``); ``main(argv)`` runs them
alone (``python -m agent.regional.tools``).

Exit codes: 0 done; 1 refused (a command refused, a list rejected or
dropped by the broker); 2 bad input or no connection; 3 no answer in time
(timeout, or the gate is not subscribed).

Counters: every signed message carries a counter that must grow per key.
The tools use milliseconds since the epoch (``--counter`` overrides), so
several operators signing with one key never collide as long as their
clocks are right; a server with its own persistent sequence should use its
own key.

Some 630 lines on purpose: four small commands (30 to 140 lines each) over
one MQTT ``Session`` and one set of connection and signing options; a module
per command would spread what they share over five files.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract import COMMANDS, TOPIC_ROOT, ContractError, topics
from agent.exits import Exit
from agent.i18n import _

EXIT_OK, EXIT_REFUSED, EXIT_INPUT, EXIT_TIMEOUT = Exit.OK, Exit.FAILED, Exit.USAGE, Exit.UNAVAILABLE
COMMAND_ARG = {"open": "direction", "set_mode": "mode"}  # the one argument each takes
STATUS_COLUMNS = ("site", "gate", "state", "version", "fastpath", "acl_version", "started_at")


class ToolError(Exception):
    """A problem the user must fix (bad file, key, connection); exit 2."""


def _err(prog: str, message: str) -> None:
    print(f"gate-agent {prog}: {message}", file=sys.stderr)


def default_counter() -> int:
    """Milliseconds since the epoch: grows between runs without any stored state."""
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- MQTT session


class Session:
    """A short-lived MQTT 5 client on paho's own thread: connect, subscribe, publish, collect."""

    def __init__(self, host: str, port: int, *, tls: Any = None, username: str | None = None,
                 password: str | None = None, timeout: float = 10.0) -> None:
        import paho.mqtt.client as mqtt

        from agent.mqttclient import new_client

        self._mqtt = mqtt
        self.host, self.port = host, port
        self.client = new_client(f"gate-tools-{secrets.token_hex(6)}", tls=tls, username=username,
                                 password=password)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._connected: Any = None  # reason code once CONNACK came
        self._subacks: dict[int, list] = {}
        self._pubacks: dict[int, int] = {}
        self.messages: list[Any] = []
        self.on_message: Callable[[Any], None] | None = None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_msg
        try:
            self.client.connect(host, port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise ToolError(_("cannot connect to {host}:{port}: {exc}; check --host/--port and "
                              "the TLS options (--tls-ca, --tls-cert, --tls-key)").format(
                host=host, port=port, exc=exc)) from None
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connected is not None, timeout)
        rc = self._connected
        if rc is None or getattr(rc, "is_failure", False):
            self.close()
            why = _("no answer") if rc is None else _("refused ({rc})").format(rc=rc)
            raise ToolError(_("broker {host}:{port}: {why}; check the address, the certificate "
                              "and the broker's ACL for this identity").format(
                host=host, port=port, why=why))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._connected = reason_code
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subacks[mid] = [getattr(rc, "value", rc) for rc in reason_codes]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._pubacks[mid] = int(getattr(reason_code, "value", reason_code) or 0)
            self._cond.notify_all()

    def _on_msg(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()
        if self.on_message is not None:
            self.on_message(message)

    def subscribe(self, topic: str, timeout: float = 10.0) -> int:
        """Subscribe (QoS 1) and wait for the SUBACK; its reason code (>= 0x80: refused)."""
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise ToolError(_("subscribe to {topic} failed: {error}").format(
                topic=topic, error=self._mqtt.error_string(rc)))
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise ToolError(_("no SUBACK for {topic} within {timeout} s").format(
                    topic=topic, timeout=timeout))
            return int(self._subacks[mid][0])

    def publish(self, topic: str, payload: bytes, *, properties: Any = None,
                timeout: float = 10.0) -> int:
        """Publish QoS 1, not retained; the PUBACK reason code (0x10: nobody subscribed)."""
        info = self.client.publish(topic, payload, qos=1, retain=False, properties=properties)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise ToolError(_("publish to {topic} failed: {error}").format(
                topic=topic, error=self._mqtt.error_string(info.rc)))
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._pubacks, timeout):
                raise ToolError(_("no PUBACK for {topic} within {timeout} s").format(
                    topic=topic, timeout=timeout))
            return self._pubacks[info.mid]

    def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(pred, timeout)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def _session(args: argparse.Namespace) -> Session:
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        from agent.mqttclient import BrokerSettingError as UplinkError
        from agent.mqttclient import TlsConfig

        if not args.tls_ca:
            raise ToolError(_("--tls-cert/--tls-key need --tls-ca (the CA of the broker's "
                              "certificate)"))
        tls = TlsConfig(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        try:
            tls.context()
        except UplinkError as exc:
            raise ToolError(str(exc)) from None
    port = args.port if args.port is not None else (8883 if tls is not None else 1883)
    return Session(args.host, port, tls=tls, username=args.username, password=args.password,
                   timeout=args.connect_timeout)


def _props(**values: Any) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    p = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def _signing_key(args: argparse.Namespace) -> Any:
    if args.unsigned:
        return None
    if not args.key or not args.key_id:
        raise ToolError(_("--key PRIVATE_KEY and --key-id ID are needed to sign (gates refuse "
                          "unsigned messages; --unsigned only for a lab gate that allows them)"))
    from agent.downlink.signing import KeyLoadError, load_private_key

    try:
        return load_private_key(args.key)
    except KeyLoadError as exc:
        raise ToolError(str(exc)) from None


def _rc_note(rc: int) -> str:
    if rc == 0x10:
        return _("no subscriber: the gate is offline (not subscribed); the broker dropped the "
                 "message")
    if rc >= 0x80:
        if rc == 0x87:
            return _("refused by the broker (0x{rc:02X}, not authorised); check its ACL").format(
                rc=rc)
        return _("refused by the broker (0x{rc:02X}); check its ACL").format(rc=rc)
    return _("accepted by the broker (0x{rc:02X})").format(rc=rc)


# --------------------------------------------------------------------------- fleet status


def collect_status(session: Session, site: str | None = None, quiet_s: float = 0.5,
                   max_s: float = 5.0) -> list[dict]:
    """The retained status of every gate (of ``site``), as dicts with site and gate added."""
    pattern = f"{TOPIC_ROOT}/{site or '+'}/+/status"
    rc = session.subscribe(pattern)
    if rc >= 0x80:
        raise ToolError(_("the broker refused a subscription to {pattern} (0x{rc:02X}); this "
                          "identity may not read gate status").format(pattern=pattern, rc=rc))
    # Retained messages follow the SUBACK at once; stop after a quiet spell.
    deadline = time.monotonic() + max_s
    seen = -1
    while time.monotonic() < deadline:
        with session._cond:
            n = len(session.messages)
        if n == seen:
            break
        seen = n
        session.wait_for(lambda before=seen: len(session.messages) > before, quiet_s)
    out: dict[tuple[str, str], dict] = {}
    with session._cond:
        messages = list(session.messages)
    for m in messages:
        parts = m.topic.split("/")
        if len(parts) != 5 or parts[4] != "status" or not m.payload:
            continue
        try:
            body = json.loads(m.payload)
        except ValueError:
            body = {"state": "unreadable"}
        if not isinstance(body, dict):
            body = {"state": "unreadable"}
        out[(parts[2], parts[3])] = {"site": parts[2], "gate": parts[3], **body}
    return [out[k] for k in sorted(out)]


def format_table(rows: list[dict], columns: tuple[str, ...] = STATUS_COLUMNS) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cmd_fleet_status(args: argparse.Namespace) -> int:
    try:
        session = _session(args)
    except ToolError as exc:
        _err("fleet status", str(exc))
        return EXIT_INPUT
    try:
        rows = collect_status(session, args.site, max_s=args.wait)
    except ToolError as exc:
        _err("fleet status", str(exc))
        return EXIT_INPUT
    finally:
        session.close()
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False, sort_keys=True))
    else:
        print(format_table(rows))
        online = sum(1 for r in rows if r.get("state") == "online")
        print(_("{n} gate(s), {online} online").format(n=len(rows), online=online))
    return EXIT_OK


# --------------------------------------------------------------------------- acl push


# A snapshot above this much JSON goes in the compact form (--form auto): 1 MiB is some
# 15,000 cards; below it the JSON is small and readable on the wire.
COMPACT_ABOVE_BYTES = 1 << 20


def _cmd_acl_push(args: argparse.Namespace) -> int:
    from agent.core.acl import AccessList, AclRejected, check_document

    prog = "acl push"
    try:
        doc = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except OSError as exc:
        _err(prog, _("cannot read {file}: {strerror}").format(
            file=args.file, strerror=_(exc.strerror or "")))
        return EXIT_INPUT
    except ValueError as exc:
        _err(prog, _("{file} is not JSON: {exc}").format(file=args.file, exc=exc))
        return EXIT_INPUT
    if not isinstance(doc, dict) or doc.get("kind") not in ("snapshot", "delta"):
        _err(prog, _('{file} is not an access list ("kind" must be "snapshot" or "delta"); see '
                     'docs/access-list.md').format(file=args.file))
        return EXIT_INPUT
    acl = None
    if doc["kind"] == "snapshot":
        try:
            acl = AccessList.from_snapshot(doc)
            errors = []
        except AclRejected as exc:
            errors = exc.errors
    else:
        errors = check_document(doc)
    if errors:
        _err(prog, _("{file} has {n} error(s); nothing was sent:").format(
            file=args.file, n=len(errors)))
        for e in errors[:20]:
            print(f"  {e}", file=sys.stderr)
        return EXIT_INPUT
    try:
        for g in args.gate or ["any"]:  # site and gate names must be topic levels
            topics(args.site, g)
        key = _signing_key(args)
        session = _session(args)
    except (ToolError, ContractError) as exc:
        _err(prog, str(exc))
        return EXIT_INPUT
    compact = args.form == "compact" or (
        args.form == "auto" and acl is not None
        and Path(args.file).stat().st_size > COMPACT_ABOVE_BYTES)
    if compact and acl is None:
        session.close()
        _err(prog, _("a delta has no compact form; push it as JSON (--form json)"))
        return EXIT_INPUT
    try:
        return _push(session, doc, args, key, prog, acl if compact else None)
    except ToolError as exc:
        _err(prog, str(exc))
        return EXIT_INPUT
    finally:
        session.close()


def _push(session: Session, doc: dict, args: argparse.Namespace, key: Any, prog: str,
          compact: Any = None) -> int:
    """Publish `doc` to each gate; `compact`: its AccessList, sent in the compact
    form (docs/contract.md, "Compact snapshots") instead of JSON."""
    from agent.downlink import aclwire
    from agent.downlink.signing import sign_acl

    gates = list(args.gate or ())
    if not gates:
        gates = [r["gate"] for r in collect_status(session, args.site, max_s=3.0)]
        if not gates:
            raise ToolError(_("no gate of site {site!r} has a retained status on this broker; "
                              "name them with --gate").format(site=args.site))
    version = doc.get("version")
    outcome: dict[str, str] = {}
    lock = threading.Lock()
    if args.wait > 0:
        def watch(message: Any) -> None:
            parts = message.topic.split("/")
            if len(parts) != 5 or parts[4] != "events":
                return
            try:
                rec = json.loads(message.payload)
            except ValueError:
                return
            if not isinstance(rec, dict) or rec.get("version") != version:
                return
            if rec.get("type") == "acl.applied":
                result = "applied"
            elif rec.get("type") == "acl.rejected":
                errs = "; ".join(f"{e.get('path')}: {e.get('message')}" for e in rec.get("errors", [])[:5])
                result = f"rejected ({rec.get('code')}): {errs}"
            else:
                return
            with lock:
                outcome.setdefault(parts[3], result)

        session.on_message = watch
        for g in gates:
            session.subscribe(topics(args.site, g)["events"])
    counter = args.counter if args.counter is not None else default_counter()
    worst = EXIT_OK
    for g in gates:
        # issued_at: this machine's clock, which must be synchronised (the gate refuses a
        # list from more than a minute in its future and takes it as its time floor).
        def sign(lst: dict, g: str = g) -> dict:
            return sign_acl(key, lst, key_id=args.key_id, site=args.site, gate=g, counter=counter,
                            issued_at=time.time())

        if compact is not None:
            data = aclwire.pack(compact, sign if key is not None else None)
        else:
            payload = doc if key is None else sign(doc)
            data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        rc = session.publish(topics(args.site, g)["acl"], data)
        kind = doc["kind"] if compact is None else _("snapshot, compact: {mb:.1f} MB").format(
            mb=len(data) / 1e6)
        print(_("{site}/{gate}: list {version} ({kind}) {note}").format(
            site=args.site, gate=g, version=version, kind=kind, note=_rc_note(rc)))
        if rc == 0x10 or rc >= 0x80:
            worst = max(worst, EXIT_REFUSED)
            with lock:
                outcome[g] = "not delivered"
    if args.wait > 0:
        session.wait_for(lambda: all(g in outcome for g in gates), args.wait)
        for g in gates:
            with lock:
                result = outcome.get(g)
            if result is None:
                print(_("{site}/{g}: no acl.applied for {version} within {wait:g} s").format(
                    site=args.site, g=g, version=version, wait=args.wait))
                worst = max(worst, EXIT_TIMEOUT)
            elif result != "not delivered":
                print(f"{args.site}/{g}: {result}")
                if result != "applied":
                    worst = max(worst, EXIT_REFUSED)
    return worst


# --------------------------------------------------------------------------- cmd


def send_command(session: Session, *, site: str, gate: str, command: str, args: dict,
                 key: Any, key_id: str | None, counter: int, ttl_s: float,
                 timeout: float) -> tuple[int, dict | None, str]:
    """Send one command and wait for its reply: (exit code, reply or None, note)."""
    from agent.downlink.signing import make_command, sign_command

    t = topics(site, gate)
    fields = make_command(site, gate, command, args, key_id=key_id or "unsigned", counter=counter,
                          now=time.time(), ttl_s=ttl_s)
    if key is None:
        del fields["key_id"]
        msg = fields
    else:
        msg = sign_command(key, fields)
    reply_topic = f"{TOPIC_ROOT}/{site}/{gate}/reply/{secrets.token_hex(8)}"
    correlation = secrets.token_bytes(16)
    rc = session.subscribe(reply_topic)
    if rc >= 0x80:
        raise ToolError(_("the broker refused a subscription to {reply_topic} (0x{rc:02X}); check "
                          "its ACL for this identity").format(reply_topic=reply_topic, rc=rc))
    got: list[dict] = []

    def is_reply(m: Any) -> bool:
        return m.topic == reply_topic and getattr(m.properties, "CorrelationData", None) == correlation

    props = _props(ResponseTopic=reply_topic, CorrelationData=correlation,
                   MessageExpiryInterval=max(1, int(ttl_s)))
    rc = session.publish(t["cmd"], json.dumps(msg, separators=(",", ":")).encode(), properties=props)
    if rc == 0x10 or rc >= 0x80:
        return (EXIT_TIMEOUT if rc == 0x10 else EXIT_INPUT), None, _rc_note(rc)

    def arrived() -> bool:
        for m in session.messages:
            if is_reply(m):
                try:
                    got.append(json.loads(m.payload))
                except ValueError:
                    got.append({"result": "refused", "detail": "unreadable reply"})
                return True
        return False

    if not session.wait_for(arrived, timeout):
        return EXIT_TIMEOUT, None, f"no reply within {timeout:g} s"
    reply = got[0]
    return (EXIT_OK if reply.get("result") == "done" else EXIT_REFUSED), reply, ""


def _cmd_cmd(args: argparse.Namespace) -> int:
    prog = "cmd"
    wanted = COMMAND_ARG.get(args.command)
    if wanted and args.arg is None:
        _err(prog, _("{command} needs its {wanted}, e.g. `gate-agent cmd ... {example}`").format(
            command=args.command, wanted=wanted, example="open in" if args.command == "open" else "set_mode lockdown"))
        return EXIT_INPUT
    if not wanted and args.arg is not None:
        _err(prog, _("{command} takes no argument (got {arg!r})").format(
            command=args.command, arg=args.arg))
        return EXIT_INPUT
    cmd_args = {wanted: args.arg} if wanted else {}
    try:
        topics(args.site, args.gate)
        key = _signing_key(args)
        session = _session(args)
    except (ToolError, ContractError) as exc:
        _err(prog, str(exc))
        return EXIT_INPUT
    try:
        code, reply, note = send_command(
            session, site=args.site, gate=args.gate, command=args.command, args=cmd_args, key=key,
            key_id=args.key_id, counter=args.counter if args.counter is not None else default_counter(),
            ttl_s=args.ttl, timeout=args.timeout)
    except ToolError as exc:
        _err(prog, str(exc))
        return EXIT_INPUT
    finally:
        session.close()
    if reply is not None:
        print(json.dumps(reply, ensure_ascii=False))
    else:
        _err(prog, f"{args.site}/{args.gate}: {note}")
    return code


# --------------------------------------------------------------------------- keygen


def _cmd_keygen(args: argparse.Namespace) -> int:
    from agent.downlink.signing import generate_keypair, private_key_pem

    out = Path(args.out)
    key, pub = generate_keypair()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(out, flags, 0o600)
    except FileExistsError:
        _err("keygen", _("{out} exists; not overwritten (use --force to replace it)").format(
            out=out))
        return EXIT_INPUT
    except OSError as exc:
        _err("keygen", _("cannot write {out}: {strerror}").format(out=out, strerror=_(exc.strerror or "")))
        return EXIT_INPUT
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
    os.chmod(out, 0o600)  # also when --force reused a file with a wider mode
    pub_path = out.with_name(out.name + ".pub")
    pub_path.write_text(pub + "\n", encoding="ascii")
    key_id = args.key_id or "region-key"
    print(pub)
    print("# " + _("private key: {out} (mode 0600, keep it on the regional side only)").format(
        out=out),
          file=sys.stderr)
    print("# " + _("public key also in {path}; add it to each gate's config as a trusted key:")
          .format(path=pub_path), file=sys.stderr)
    print(f'#   "{key_id}" = "{pub}"', file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------- parsers


def _connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker connection")
    g.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="broker port (default 1883, or 8883 with TLS)")
    g.add_argument("--tls-ca", help="CA certificate (PEM) of the broker; turns TLS on")
    g.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    g.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", help="name to check in the broker's certificate")
    g.add_argument("--username", help="MQTT username (not with certificate identities)")
    g.add_argument("--password", help="MQTT password")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default 10)")


def _signing_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("signing")
    g.add_argument("--key", help="Ed25519 private key (PEM), from `gate-agent keygen`")
    g.add_argument("--key-id", help="the key's id, as the gates' configs name it")
    g.add_argument("--counter", type=int, default=None,
                   help="counter to sign (default: milliseconds since the epoch)")
    g.add_argument("--unsigned", action="store_true",
                   help="send unsigned (only lab gates with allow_unsigned take it)")


def add_regional_parsers(subparsers: Any) -> None:
    """Add ``acl push``, ``cmd``, ``fleet status`` and ``keygen`` to ``gate-agent``."""
    acl = subparsers.add_parser("acl", help="access lists on the regional side")
    acl_sub = acl.add_subparsers(dest="acl_command", required=True)
    push = acl_sub.add_parser(
        "push", help="sign and publish an access list (snapshot or delta) to gates",
        description="Check the list, sign it for each gate and publish it on the gate's acl topic "
        "(QoS 1, not retained). Without --gate: every gate of the site with a retained status.")
    push.add_argument("file", help="access list JSON (docs/access-list.md)")
    push.add_argument("--site", required=True)
    push.add_argument("--gate", action="append", help="a gate of the site (repeat for several)")
    push.add_argument("--wait", type=float, default=0.0,
                      help="seconds to wait for each gate's acl.applied (default: do not wait)")
    push.add_argument("--form", choices=("auto", "json", "compact"), default="auto",
                      help="how a snapshot travels: compact (signed header + compressed columns, "
                      "docs/contract.md), json, or auto: compact above 1 MiB of JSON (default)")
    _signing_options(push)
    _connection_options(push)
    push.set_defaults(func=_cmd_acl_push)

    cmd = subparsers.add_parser(
        "cmd", help="send a signed command to a gate and print its reply",
        description="Commands: open in|out, set_mode normal|entry_only|free|lockdown, fire_reset, "
        "status, acl_snapshot. Exit 0 done, 1 refused, 2 bad input, 3 no reply in time.")
    cmd.add_argument("command", choices=COMMANDS)
    cmd.add_argument("arg", nargs="?", help="direction for open, mode for set_mode")
    cmd.add_argument("--site", required=True)
    cmd.add_argument("--gate", required=True)
    cmd.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    cmd.add_argument("--ttl", type=float, default=20.0,
                     help="seconds the command stays valid (expires and MQTT expiry; gates allow 30)")
    _signing_options(cmd)
    _connection_options(cmd)
    cmd.set_defaults(func=_cmd_cmd)

    fleet = subparsers.add_parser("fleet", help="the fleet as the broker sees it")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    status = fleet_sub.add_parser("status", help="the retained status of every gate, as a table")
    status.add_argument("--site", help="only this site")
    status.add_argument("--json", action="store_true", help="one JSON object per gate")
    status.add_argument("--wait", type=float, default=3.0, help="at most this many seconds")
    _connection_options(status)
    status.set_defaults(func=_cmd_fleet_status)

    keygen = subparsers.add_parser("keygen", help="make an Ed25519 signing key pair")
    keygen.add_argument("out", help="private key file to write (mode 0600); OUT.pub gets the public key")
    keygen.add_argument("--key-id", help="key id to show in the config line")
    keygen.add_argument("--force", action="store_true", help="overwrite OUT")
    keygen.set_defaults(func=_cmd_keygen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gate-agent", description="Regional-side tools")
    add_regional_parsers(p.add_subparsers(dest="tool", required=True))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
