"""`gate-agent sim`: driving the simulated hardware of a running agent from outside.

With ``hardware.pin_factory = "mock"`` the service opens a Unix socket,
``<state_dir>/sim.sock`` (mode 0600, in the 0700 state directory), and a
``SimServer`` answers on it from its own threads. It does only what the
turnstile and the readers at the other end of the mock pins would do, with
the helpers of agent/simhw.py: a card is a Wiegand pulse train through the
reader's adapter (explicit edge timestamps) or a serial reader's bytes
through its stream decoder; PASS, the fire loop, the buttons, Ready and
tamper are levels on the mock input pins. It never calls the core: the gate
decides exactly as it does for real hardware. On real pins the socket is
never opened.

Protocol: one JSON object per line each way (UTF-8, a request at most
``MAX_REQUEST_BYTES``)::

    {"op": "card", "reader": "entry", "card": "100,60179", "wait": 2}
    {"op": "pass", "side": "A"}                 # or "B"
    {"op": "fire", "loop": "open"}              # or "closed"
    {"op": "fire-reset"}
    {"op": "button", "direction": "in"}         # or "out"
    {"op": "ready", "value": true}
    {"op": "tamper", "value": true}
    {"op": "ping"}

The reply is ``{"ok": true, "op": ..., ...}``; a card's also has
``"decision"``: the ``access.granted`` / ``access.denied`` /
``reader.error`` record the gate committed for it within ``wait`` seconds
(id, type, reason, person...), or null. A refusal is ``{"ok": false,
"error": CODE, "message": "what is wrong and what to do", ...}``; codes:
bad_json, too_long, unknown_op, bad_arg, unknown_reader,
unsupported_reader, bad_card, not_wired, busy, stopping, failed.

Bounded, so a client cannot stop anything: a request over
``MAX_REQUEST_BYTES`` closes its connection; at most ``MAX_CLIENTS``
connections at once and ``CONNECTIONS_PER_S`` new ones a second (more
are told busy); a connection idle for
``IDLE_TIMEOUT_S`` or with ``MAX_BAD_REQUESTS`` refused requests is closed
(the server and these bounds are agent/linesock.py's ``LineServer``, which
the console's socket is too);
at most ``RATE_PER_S`` requests a second are carried out (more are told
busy); frames on one reader are spaced like a real reader's. All of this
runs on the server's threads; the gate thread only hands it committed
decision records (``on_record``: an append under a lock).

``gate-agent sim`` (``add_sim_parser``) is the client: it reads the config
only for the state directory (and refuses unless pin_factory is mock),
sends one request and prints the reply, in Russian with a Russian locale.
``request(path, doc)`` is the same for scripts and tests.

Some 600 lines on purpose: one small protocol, both ends. The server's
operations, the client and the client's wording of each refusal
(``_refusal_text``) sit beside the code that refuses.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.core.cards import CardFormatError, key_mask, parse_card_string
from agent.exits import Exit
from agent.i18n import _
from agent.linesock import (
    CLIENT_FAULTS,
    LineServer,
    RecordWaiter,
    Refused,
    choice,
    encode,
    short_names,
)
from agent.simhw import (
    PASS_OPEN_S,
    SimulatedReader,
    drive_input,
    feed_serial,
    press_input,
    serial_frame,
    wiegand_frame,
)
from agent.tools.words import config_message, reader_error_text, reason_text

log = logging.getLogger(__name__)

__all__ = [
    "OPS",
    "SimServer",
    "SimServerError",
    "add_sim_parser",
    "request",
    "socket_path",
]

SOCKET_NAME = "sim.sock"
MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 65536
MAX_CLIENTS = 8
IDLE_TIMEOUT_S = 30.0
RATE_PER_S = 50.0
DECISION_WAIT_S = 2.0
MAX_WAIT_S = 10.0
# One reader's frames at least this far apart: the longest frame (37 bits, 2 ms apart) plus
# the silence that ends it, so a fast client never runs two frames into one.
FRAME_SPACING_S = 0.13
DECISION_TYPES = ("access.granted", "access.denied", "reader.error")
OPS = ("card", "pass", "fire", "fire-reset", "button", "ready", "tamper", "ping")
# Refusals that are the client's fault: enough of them on one connection closes it.
_CLIENT_FAULTS = CLIENT_FAULTS | {"unknown_reader", "unsupported_reader", "bad_card", "not_wired"}


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the agent with simulated hardware listens: ``<state_dir>/sim.sock``."""
    return Path(state_dir) / SOCKET_NAME


class SimServerError(OSError):
    """The socket cannot be opened; the message says why and what to do."""


# --------------------------------------------------------------------------- server


class SimServer(LineServer):
    """The simulated hardware's socket (module doc). ``start()``, ``stop()``,
    ``on_record(record)`` from the gate thread.

    factory, profile: the mock pin factory and the board profile the service
    uses. readers: the service's reader adapters by name (WiegandReader,
    SerialReader). reader_settings: the config's readers (name, type,
    format, number). key_width: the site's key width.
    """

    role = "simulated hardware"
    kept = "simulated-hardware socket"
    thread_name = "sim"
    error = SimServerError
    ops = OPS
    client_faults = _CLIENT_FAULTS

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        factory: Any,
        profile: Any,
        readers: Mapping[str, Any],
        reader_settings: Sequence[Any],
        key_width: int = 24,
        site: str = "",
        gate: str = "",
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        rate_per_s: float = RATE_PER_S,
    ) -> None:
        super().__init__(path, clock=clock, max_clients=max_clients, idle_timeout_s=idle_timeout_s,
                         rate_per_s=rate_per_s, max_request_bytes=MAX_REQUEST_BYTES)
        self.factory = factory
        self.profile = profile
        self.readers = readers
        self.key_width = key_width
        self.site, self.gate = site, gate
        self._specs = {r.name: r for r in reader_settings}
        self._reader_locks = {name: threading.Lock() for name in self._specs}
        self._sim_readers: dict[str, SimulatedReader] = {}
        self._sent_at: dict[str, float] = {}
        self._decisions = RecordWaiter(256, clock, self._stopping)

    def wake(self) -> None:
        self._decisions.wake()

    # -- the gate thread -------------------------------------------------------------

    def on_record(self, record: dict) -> None:
        """A committed record (gate thread): decisions are kept for the card replies."""
        if record.get("type") not in DECISION_TYPES:
            return
        self._decisions.put(record)

    # -- requests ----------------------------------------------------------------------

    def _wired(self, name: str) -> None:
        if name not in self.profile.inputs:
            raise Refused("not_wired", f"input {name} is not wired in the board profile {self.profile.name}",
                           input=name, profile=self.profile.name, inputs=sorted(self.profile.inputs))

    def _input(self, name: str, asserted: bool) -> None:
        self._wired(name)
        log.info("simulated hardware: %s %s", name, "asserted" if asserted else "at rest")
        drive_input(self.factory, self.profile, name, asserted)

    def _press(self, name: str) -> None:
        self._wired(name)
        log.info("simulated hardware: %s pressed", name)
        press_input(self.factory, self.profile, name)

    def _op_ping(self, req: dict) -> dict:
        return {"site": self.site, "gate": self.gate,
                "readers": {n: s.type for n, s in self._specs.items()},
                "inputs": sorted(self.profile.inputs)}

    def _op_pass(self, req: dict) -> dict:
        side = choice(req, "side", ("A", "B"))
        name = "pass_a" if side == "A" else "pass_b"
        self._input(name, True)  # the arm passes the sensor...
        time.sleep(PASS_OPEN_S)
        self._input(name, False)  # ...and leaves it
        return {"side": side}

    def _op_fire(self, req: dict) -> dict:
        loop = choice(req, "loop", ("open", "closed"))
        self._input("fire_loop", loop == "open")
        return {"loop": loop}

    def _op_fire_reset(self, req: dict) -> dict:
        self._press("fire_reset")
        return {}

    def _op_button(self, req: dict) -> dict:
        direction = choice(req, "direction", ("in", "out"))
        self._press(f"button_{direction}")
        return {"direction": direction}

    def _op_ready(self, req: dict) -> dict:
        value = _flag(req, "value")
        self._input("ready", value)
        return {"value": value}

    def _op_tamper(self, req: dict) -> dict:
        value = _flag(req, "value")
        self._input("tamper", value)
        return {"value": value}

    def _op_card(self, req: dict) -> dict:
        name = req.get("reader")
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise Refused("unknown_reader", f"reader {str(name)[:40]!r} is not in the agent's config; its "
                           f"readers: {', '.join(self._specs) or 'none'}",
                           reader=str(name)[:40], readers=list(self._specs))
        card = req.get("card")
        key = self._key(card)
        wait = req.get("wait", DECISION_WAIT_S)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT_S:
            raise Refused("bad_arg", f"wait {wait!r}: give seconds from 0 to {MAX_WAIT_S:.0f}", field="wait")
        adapter = self.readers.get(name)
        if spec.type == "osdp" or adapter is None:
            raise Refused("unsupported_reader", f"reader {name} is an OSDP reader: its cards come over the "
                           "OSDP Secure Channel, which sim does not simulate; use a Wiegand or serial reader",
                           reader=name, type=spec.type)
        out: dict[str, Any] = {"reader": name, "card": card, "key": key}
        with self._reader_locks[name]:  # one frame at a time per reader, like the wire
            last = self._sent_at.get(name)
            if last is not None and self.clock() < last + FRAME_SPACING_S:
                time.sleep(last + FRAME_SPACING_S - self.clock())
            mark = self._decisions.mark()
            repeats = None
            try:
                if spec.type == "wiegand":
                    bits = wiegand_frame(key, spec.format)
                    self._sim_reader(name).send_bits(bits)
                    out["wiegand"] = bits
                else:
                    data = serial_frame(key, spec.type, spec.number)
                    repeats = adapter.counters.get("repeats", 0)
                    feed_serial(adapter, data)
                    out["serial"] = data.hex()
            except (CardFormatError, ValueError) as exc:
                raise Refused("bad_card", f"card {str(card)[:40]!r} at reader {name}: {exc}",
                               card=str(card)[:40], reader=name) from None
            self._sent_at[name] = self.clock()
            log.info("simulated hardware: card %s presented at reader %s", key, name)
            out["decision"] = self._decision(name, key, mark, float(wait))
        if out["decision"] is None and repeats is not None and adapter.counters.get("repeats", 0) > repeats:
            out["repeat"] = True  # the reader's repeat filter took it for the same card still in the field
        return out

    def _key(self, card: Any) -> int:
        mask = key_mask(self.key_width)
        if isinstance(card, int) and not isinstance(card, bool):
            if 0 <= card <= mask:
                return card
            raise Refused("bad_card", f"card key {card} does not fit the site's key width "
                           f"{self.key_width} (0..{mask})", card=str(card))
        if isinstance(card, str) and len(card) <= 64:
            try:
                return parse_card_string(card, self.key_width)
            except CardFormatError as exc:
                raise Refused("bad_card", str(exc), card=card) from None
        raise Refused("bad_card", 'card: give a card string ("100,60179", "0006613779", "hex:0A008EC793") '
                       "or its integer key", card=str(card)[:40])

    def _sim_reader(self, name: str) -> SimulatedReader:
        sim = self._sim_readers.get(name)
        if sim is None:
            sim = self._sim_readers[name] = SimulatedReader(
                self.factory, self.profile, name, adapter=self.readers[name], key_width=self.key_width)
        return sim

    def _decision(self, reader: str, key: int, mark: int, wait: float) -> dict | None:
        """The decision record for this card, committed after ``mark``, within ``wait`` s."""
        rec = self._decisions.wait(mark, lambda r: r.get("reader") == reader and (
            r.get("type") == "reader.error" or r.get("card") == key), wait)
        if rec is None:
            return None
        return {k: rec[k] for k in ("id", "type", "direction", "person", "reason", "check",
                                    "warning", "kind", "detail") if k in rec}


_HANDLERS: dict[str, Callable[[SimServer, dict], dict]] = {
    "card": SimServer._op_card,
    "pass": SimServer._op_pass,
    "fire": SimServer._op_fire,
    "fire-reset": SimServer._op_fire_reset,
    "button": SimServer._op_button,
    "ready": SimServer._op_ready,
    "tamper": SimServer._op_tamper,
    "ping": SimServer._op_ping,
}
SimServer.handlers = _HANDLERS


def _flag(req: dict, field: str) -> bool:
    value = req.get(field)
    if not isinstance(value, bool):
        raise Refused("bad_arg", f"{field} {str(value)[:40]!r}: give true or false", field=field)
    return value


# --------------------------------------------------------------------------- client


class SimClientError(OSError):
    """The agent cannot be reached (not running, no answer)."""


def request(path: str | os.PathLike[str], doc: dict, *, timeout: float = 10.0) -> dict:
    """Send one request to the socket at ``path`` and return the reply (a dict).

    SimClientError when the agent cannot be reached or does not answer in time.
    """
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_names(path.parent) as name:
            sock.connect(name(path.name))
        sock.sendall(encode(doc))
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REPLY_BYTES:
                raise SimClientError(f"reply over {MAX_REPLY_BYTES} bytes")
    finally:
        sock.close()
    line = buf.split(b"\n", 1)[0]
    if not line:
        raise SimClientError("the agent closed the connection without a reply")
    try:
        reply = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SimClientError(f"the reply is not JSON ({exc})") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise SimClientError(f"the reply is not a sim reply: {line[:80]!r}")
    return reply


EXIT_OK = Exit.OK
EXIT_REFUSED = Exit.FAILED
EXIT_CONFIG = Exit.USAGE
EXIT_UNREACHABLE = Exit.UNAVAILABLE


def _print(text: str) -> None:
    print(text, flush=True)


def _error(text: str) -> None:
    print(f"gate-agent sim: {text}", file=sys.stderr, flush=True)


def _request_doc(args: argparse.Namespace) -> dict:
    action = args.action
    if action == "card":
        return {"op": "card", "reader": args.reader, "card": args.card, "wait": args.wait}
    if action == "pass":
        return {"op": "pass", "side": args.side.upper()}
    if action == "fire":
        return {"op": "fire", "loop": args.loop}
    if action == "button":
        return {"op": "button", "direction": args.direction}
    if action in ("ready", "tamper"):
        return {"op": action, "value": args.value == "true"}
    return {"op": action}  # fire-reset, ping


def _refusal_text(reply: dict) -> str:
    code = reply.get("error")
    d = {k: v for k, v in reply.items() if k not in ("ok", "error")}
    d.setdefault("message", "")
    for k in ("readers", "inputs"):
        if isinstance(d.get(k), list):
            d[k] = ", ".join(map(str, d[k])) or "-"
    texts = {
        "unknown_reader": _("reader {reader} is not in the agent's config; its readers: {readers}"),
        "unsupported_reader": _("reader {reader} is an OSDP reader: gate-agent sim cannot present cards to it "
                                "(they come over the OSDP Secure Channel); simulate with a Wiegand or serial reader"),
        "bad_card": _("the card cannot be presented: {message}"),
        "not_wired": _("input {input} is not wired in the board profile {profile}; it wires: {inputs}"),
        "busy": _("the agent is busy with other sim requests; try again in a moment"),
        "stopping": _("the agent is stopping"),
        "failed": _("the agent could not do it: {message}; see its log"),
    }
    template = texts.get(code, _("the agent refused the request ({code}): {message}"))
    try:
        return template.format(code=code, **d)
    except (KeyError, IndexError, ValueError):
        return _("the agent refused the request ({code}): {message}").format(code=code, message=d["message"])


def _done_text(args: argparse.Namespace, reply: dict) -> list[str]:
    action = args.action
    if action == "card":
        lines = [_("card {card} presented at reader {reader}").format(card=args.card, reader=args.reader)]
        dec = reply.get("decision")
        if isinstance(dec, dict):
            kind = dec.get("type")
            if kind == "access.granted":
                person = dec.get("person") or _("unknown")
                if dec.get("check") == "none":
                    lines.append(_("decision: access granted without a check (fire mode), person: {person} "
                                   "(record {id})").format(person=person, id=dec.get("id")))
                else:
                    lines.append(_("decision: access granted, person: {person} (record {id})").format(
                        person=person, id=dec.get("id")))
            elif kind == "access.denied":
                lines.append(_("decision: access denied, reason: {reason} (record {id})").format(
                    reason=reason_text(dec.get("reason")), id=dec.get("id")))
            else:
                lines.append(_("reader error: {kind} (record {id})").format(kind=reader_error_text(dec.get("kind")), id=dec.get("id")))
        elif reply.get("repeat"):
            lines.append(_("no decision: the reader took it for the same card still in the field (repeat); "
                           "present it again later"))
        else:
            lines.append(_("no decision seen within {seconds} s; see: gate-agent journal tail").format(
                seconds=f"{args.wait:g}"))
        return lines
    if action == "pass":
        return [_("passage sensor {side} opened and closed").format(side=args.side.upper())]
    if action == "fire":
        if args.loop == "open":
            return [_("fire loop opened: fire alarm, the gate is freed both ways")]
        return [_("fire loop closed: the gate stays free until the fire release is reset "
                  "(gate-agent sim fire-reset)")]
    if action == "fire-reset":
        return [_("fire release reset pressed")]
    if action == "button":
        return [_("button {direction} pressed").format(direction=args.direction)]
    if action == "ready":
        return [_("Ready line: the turnstile is ready") if args.value == "true"
                else _("Ready line: the turnstile is not ready")]
    if action == "tamper":
        return [_("tamper contact: opened (alarm)") if args.value == "true" else _("tamper contact: closed")]
    readers = reply.get("readers") if isinstance(reply.get("readers"), dict) else {}
    return [_("agent {site}/{gate} answers; readers: {readers}; inputs: {inputs}").format(
        site=reply.get("site"), gate=reply.get("gate"),
        readers=", ".join(f"{n} ({t})" for n, t in readers.items()) or "-",
        inputs=", ".join(map(str, reply.get("inputs") or [])) or "-")]


def _cmd_sim(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _error(_("config {path} cannot be used: problems: {n}; check it with: gate-agent check-config {path}")
               .format(path=exc.source, n=len(exc.errors)))
        for where, msg in exc.errors[:12]:
            print(f"  {where or exc.source}: {config_message(msg)}", file=sys.stderr)
        return EXIT_CONFIG
    factory = config.hardware.pin_factory
    if factory != "mock":
        _error(_('{path} sets hardware.pin_factory = "{factory}": real pins, there is no simulated hardware '
                 'to drive. gate-agent sim works only with an agent run with hardware.pin_factory = "mock"')
               .format(path=args.config, factory=factory))
        return EXIT_CONFIG
    doc = _request_doc(args)
    if doc["op"] == "card" and not 0 <= args.wait <= MAX_WAIT_S:
        _error(_("--wait {seconds}: give seconds from 0 to {most}").format(seconds=f"{args.wait:g}",
                                                                         most=f"{MAX_WAIT_S:g}"))
        return EXIT_CONFIG
    if doc["op"] == "card":
        try:  # checked here too, so the message is the technician's language
            parse_card_string(args.card, config.key_width)
        except CardFormatError:
            _error(_('card {card} is not a card string: give "facility,card" (100,60179), the printed '
                     "number (0006613779) or hex:UID (hex:0A008EC793)").format(card=args.card))
            return EXIT_CONFIG
    path = socket_path(config.service.state_dir)
    wait = doc.get("wait", 0.0)
    try:
        reply = request(path, doc, timeout=args.timeout + wait)
    except (FileNotFoundError, ConnectionRefusedError):
        _error(_("no agent with simulated hardware answers on {socket}; start one: "
                 "gate-agent run --config {path}").format(path=args.config, socket=path))
        return EXIT_UNREACHABLE
    except TimeoutError:
        _error(_("the agent did not answer within {seconds} s").format(seconds=f"{args.timeout + wait:g}"))
        return EXIT_UNREACHABLE
    except OSError as exc:
        _error(_("cannot reach the agent at {socket}: {error}").format(socket=path, error=exc))
        return EXIT_UNREACHABLE
    if args.json:
        _print(json.dumps(reply, ensure_ascii=False, separators=(",", ":")))
        return EXIT_OK if reply["ok"] else EXIT_REFUSED
    if not reply["ok"]:
        _error(_refusal_text(reply))
        return EXIT_REFUSED
    for line in _done_text(args, reply):
        _print(line)
    return EXIT_OK


def add_sim_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `sim [--config FILE] [--json] ACTION ...` to a `gate-agent` subparsers object."""
    from agent.config import DEFAULT_PATH

    p = subparsers.add_parser(
        "sim",
        help="drive the simulated hardware of a running agent (pin_factory = \"mock\" only)",
        description="Act on the simulated hardware of an agent running with hardware.pin_factory = "
        "\"mock\": present a card at a reader, open a passage sensor, open or close the fire loop, "
        "press the fire reset or a button, set the Ready line or the tamper contact. The gate decides "
        "as it does for real hardware. Exit codes: 0 done, 1 refused by the agent, 2 the config cannot "
        "be used for sim (real pins, or invalid), 3 no agent answers.",
    )
    p.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE",
                   help=f"the agent's config file (default {DEFAULT_PATH})")
    p.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="how long to wait for the agent")
    p.set_defaults(func=_cmd_sim)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_text, description=help_text)
        # Also accepted after the action; SUPPRESS keeps the value given before it.
        a.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help="the agent's config file")
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the reply as JSON")
        return a

    card = action("card", "present a card at a reader (Wiegand frame or serial reader bytes)")
    card.add_argument("reader", help="the reader's name in the config (entry, exit...)")
    card.add_argument("card", help='the card: "facility,card" (100,60179), the printed number (0006613779) '
                      "or hex:UID")
    card.add_argument("--wait", type=float, default=DECISION_WAIT_S, metavar="S",
                      help=f"wait this long for the decision (0 to {MAX_WAIT_S:.0f}; default {DECISION_WAIT_S:g})")
    side = action("pass", "the arm turns past passage sensor A (in) or B (out)")
    side.add_argument("side", choices=("A", "B", "a", "b"), metavar="A|B")
    fire = action("fire", "open (fire alarm) or close the fire loop")
    fire.add_argument("loop", choices=("open", "closed"))
    action("fire-reset", "press the fire release reset")
    button = action("button", "press the guard's button for a passage in or out")
    button.add_argument("direction", choices=("in", "out"))
    ready = action("ready", "set the turnstile's Ready line")
    ready.add_argument("value", choices=("true", "false"))
    tamper = action("tamper", "open (true) or close (false) the tamper contact")
    tamper.add_argument("value", choices=("true", "false"))
    action("ping", "ask the agent which readers and inputs it simulates")
    return p
