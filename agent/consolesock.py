"""The console's local interface: ``<state_dir>/console.sock``, served by the agent.

``gate-agent console`` (the web console, its own process and systemd unit) reads
the gate's state and asks for its few actions through this one Unix socket; it
reads the journal and presence.json itself, never through here. The socket is
opened after READY on any pin factory (the console is for real boards), mode
0600 in the 0700 state directory, and each connection's peer must be the
agent's own user or root (SO_PEERCRED, ``peer_allowed``): anything else is
closed at once and logged.

Protocol: one JSON object per line each way (UTF-8, a request at most
``MAX_REQUEST_BYTES``; over it the connection is closed)::

    {"op": "ping"}
    {"op": "status"}                  -> {"ok": true, "op": "status", "status": STATUS}
    {"op": "watch"}                   -> {"ok": true, "op": "watch"}, then on the same
                                         connection {"record": {...}} per committed record,
                                         {"status": STATUS} every second, and {"gap": N}
                                         where N records were dropped for a slow client
    {"op": "set_mode", "mode": M, "account": A}
    {"op": "open", "direction": "in"|"out", "account": A}
    {"op": "pulse", "line": L, "seconds": S, "account": A}       S 0.1..10, default 0.3
    {"op": "note", "action": "enroll", "account": A, "detail": D}

An action is handed to the gate thread as a core event (``SetMode`` by
``console``, ``ConsoleOpen``, ``ConsolePulse``, ``ConsoleNote``); the core
decides and journals one ``console.action`` record for it (docs/contract.md),
which the reply carries: ``{"ok": true, "op": ..., "result": "done"|"refused",
"reason": R, "record": {...}}``. A refusal of the request itself is ``{"ok":
false, "error": CODE, "message": ...}`` with CODE in bad_json, too_long,
unknown_op, bad_arg, busy, stopping, failed.

Bounded, so a client cannot stop anything: at most ``MAX_CLIENTS`` connections
(and ``CONNECTIONS_PER_S`` new ones a second), ``ACTIONS_PER_S`` actions a
second (more are told busy) and ``REQUESTS_PER_S`` requests, a connection idle
for ``IDLE_TIMEOUT_S`` or with ``MAX_BAD_REQUESTS`` refusals is closed (the
server and these bounds are agent/linesock.py's ``LineServer``, shared with the
simulated hardware's socket); an op that fails unexpectedly is answered
``failed`` and logged. A
watcher has its own queue of ``WATCH_QUEUE`` records; the gate thread only
appends to it under a lock (``on_record``), never waits for a client: a full
queue drops the record and the client is told how many with ``{"gap": N}``.

``request(path, doc)`` and ``watch(path)`` are the client, for the console and tests.

Some 460 lines: one small protocol, both ends. The server and the client share
the operations, the codes and the limits; the server's watchers and action
records share its locks.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.core.events import (
    CONSOLE_ACCOUNT,
    CONSOLE_NOTE_MAX,
    CONSOLE_NOTES,
    PULSE_DEFAULT_S,
    PULSE_MAX_S,
    PULSE_MIN_S,
    ConsoleNote,
    ConsoleOpen,
    ConsolePulse,
    SetMode,
)
from agent.core.turnstile import COMMANDABLE_MODES
from agent.linesock import (
    LineServer,
    RateBudget,
    RecordWaiter,
    Refused,
    choice,
    encode,
    short_names,
)

log = logging.getLogger(__name__)

__all__ = [
    "ACTION_OPS",
    "OPS",
    "ConsoleClientError",
    "ConsoleServer",
    "ConsoleServerError",
    "peer_allowed",
    "peer_uid",
    "request",
    "socket_path",
    "watch",
]

SOCKET_NAME = "console.sock"
MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 1 << 20  # a status with many readers, a record with a long roll-call
MAX_CLIENTS = 8
IDLE_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 10.0  # a watcher that reads nothing this long is closed
ACTIONS_PER_S = 5.0
REQUESTS_PER_S = 50.0
WATCH_QUEUE = 1000
STATUS_EVERY_S = 1.0
ACTION_WAIT_S = 5.0  # for the gate thread to journal an action's console.action record
OPS = ("ping", "status", "watch", "set_mode", "open", "pulse", "note")
ACTION_OPS = ("set_mode", "open", "pulse", "note")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the agent listens for its console: ``<state_dir>/console.sock``."""
    return Path(state_dir) / SOCKET_NAME


class ConsoleServerError(OSError):
    """The socket cannot be opened; the message says why and what to do."""


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    _pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


def peer_allowed(conn: socket.socket, own_uid: int | None = None, *, allow_root: bool = True) -> tuple[bool, int | None]:
    """(allowed, peer uid): the peer runs as ``own_uid`` (default: this process's
    effective uid) or, with ``allow_root``, as root. A peer whose credentials cannot
    be read is refused (uid None)."""
    own = os.geteuid() if own_uid is None else own_uid
    try:
        uid = peer_uid(conn)
    except OSError:
        return False, None
    return (uid == own or (allow_root and uid == 0)), uid


class _Watcher:
    """One watching connection's queue: records and gap markers, bounded."""

    __slots__ = ("dropped", "items")

    def __init__(self) -> None:
        self.items: deque[tuple[str, Any]] = deque()
        self.dropped = 0


# --------------------------------------------------------------------------- server


class ConsoleServer(LineServer):
    """The console socket (module doc). ``start()``, ``stop()``, ``on_record(record)``
    from the gate thread.

    submit: where action events go (GateRuntime.submit; False when its lane is full).
    status: builds the STATUS object (called on the server's threads). lines: every
    output line the board wires ("unlock_a", "entry.led", ...), to tell the core
    whether a line to pulse is wired. uid/allow_root: who may connect (default the
    agent's own user, and root).
    """

    role = "console"
    kept = "console socket"
    thread_name = "console"
    error = ConsoleServerError
    ops = OPS
    stopping_message = "the agent is stopping; try again when it runs"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        submit: Callable[[Any], Any],
        status: Callable[[], dict],
        lines: tuple[str, ...] | frozenset[str] = (),
        clock: Callable[[], float] = time.monotonic,
        uid: int | None = None,
        allow_root: bool = True,
        max_clients: int = MAX_CLIENTS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        actions_per_s: float = ACTIONS_PER_S,
        watch_queue: int = WATCH_QUEUE,
        status_every_s: float = STATUS_EVERY_S,
        action_wait_s: float = ACTION_WAIT_S,
    ) -> None:
        super().__init__(path, clock=clock, max_clients=max_clients, idle_timeout_s=idle_timeout_s,
                         rate_per_s=REQUESTS_PER_S, max_request_bytes=MAX_REQUEST_BYTES)
        self._submit = submit
        self._status = status
        self.lines = frozenset(lines)
        self.uid = os.geteuid() if uid is None else uid
        self.allow_root = allow_root
        self.watch_queue = watch_queue
        self.status_every_s = status_every_s
        self.action_wait_s = action_wait_s
        self._actions = RateBudget(actions_per_s, clock)
        # Watchers and the console.action records, each behind a lock the gate thread
        # holds only to append (on_record).
        self._watch_cond = threading.Condition()
        self._watchers: dict[socket.socket, _Watcher] = {}
        self._action_records = RecordWaiter(64, clock, self._stopping)
        self._action_lock = threading.Lock()  # one action at a time (its record follows it)
        self.counters.update(wrong_peer=0, actions=0, gap_records=0)

    def wake(self) -> None:
        with self._watch_cond:
            self._watch_cond.notify_all()
        self._action_records.wake()

    # -- the gate thread -------------------------------------------------------------

    def on_record(self, record: dict) -> None:
        """A committed record (gate thread): appended to each watcher's queue under a
        lock no client ever holds while it waits; never blocks on a client."""
        if record.get("type") == "console.action":
            self._action_records.put(record)
        with self._watch_cond:
            if not self._watchers:
                return
            for w in self._watchers.values():
                if len(w.items) >= self.watch_queue:
                    w.dropped += 1
                    continue
                if w.dropped:
                    w.items.append(("gap", w.dropped))
                    w.dropped = 0
                w.items.append(("record", record))
            self._watch_cond.notify_all()

    # -- connections -----------------------------------------------------------------

    def admit(self, conn: socket.socket) -> bool:
        allowed, uid = peer_allowed(conn, self.uid, allow_root=self.allow_root)
        if not allowed:
            self.counters["wrong_peer"] += 1
            log.warning("console: a connection from uid %s closed (only uid %d%s may use %s)",
                        uid, self.uid, " or root" if self.allow_root else "", self.path)
        return allowed

    def takeover(self, conn: socket.socket, reply: dict) -> bool:
        if reply.get("ok") and reply.get("op") == "watch":
            self._watch(conn, reply)  # the connection stays a watch until it closes
            return True
        return False

    def _watch(self, conn: socket.socket, reply: dict) -> None:
        """Stream this watcher's queue and a status every second until the client goes."""
        w = _Watcher()
        conn.settimeout(SEND_TIMEOUT_S)  # a client that stops reading is closed, not waited for
        with self._watch_cond:
            self._watchers[conn] = w  # before the reply: every record after it reaches the client
        try:
            conn.sendall(encode(reply))
            next_status = self.clock()
            while not self._stopping.is_set():
                with self._watch_cond:
                    if not w.items and not w.dropped:
                        self._watch_cond.wait(max(0.0, next_status - self.clock()))
                    items = list(w.items)
                    w.items.clear()
                    if not items and w.dropped:  # nothing came after the drop yet: say it now
                        items.append(("gap", w.dropped))
                        w.dropped = 0
                out = bytearray()
                for kind, value in items:
                    if kind == "gap":
                        self.counters["gap_records"] += value
                        out += encode({"gap": value})
                    else:
                        out += encode({"record": value})
                if self.clock() >= next_status:
                    next_status = self.clock() + self.status_every_s
                    status = self._safe_status()
                    if status is not None:
                        out += encode({"status": status})
                if out:
                    conn.sendall(out)
        finally:
            with self._watch_cond:
                self._watchers.pop(conn, None)

    def _safe_status(self) -> dict | None:
        try:
            return self._status()
        except Exception:
            log.exception("console: the status could not be built; the gate is not affected")
            return None

    # -- requests ----------------------------------------------------------------------

    def _op_ping(self, req: dict) -> dict:
        return {}

    def _op_status(self, req: dict) -> dict:
        status = self._safe_status()
        if status is None:
            raise Refused("busy", "the status could not be built; see the agent's log and try again")
        return {"status": status}

    def _op_watch(self, req: dict) -> dict:
        return {}

    def _op_set_mode(self, req: dict) -> dict:
        account = _account(req)
        mode = choice(req, "mode", COMMANDABLE_MODES)
        return self._action(SetMode(mode, by="console", account=account), account, "set_mode", {"mode": mode})

    def _op_open(self, req: dict) -> dict:
        account = _account(req)
        direction = choice(req, "direction", ("in", "out"))
        return self._action(ConsoleOpen(direction, account), account, "open", {"direction": direction})

    def _op_pulse(self, req: dict) -> dict:
        account = _account(req)
        line = req.get("line")
        if not isinstance(line, str) or not 1 <= len(line) <= 80:
            raise Refused("bad_arg", 'line: give an output line\'s name, e.g. "entry.led"', field="line")
        seconds = req.get("seconds", PULSE_DEFAULT_S)
        if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                or not PULSE_MIN_S <= seconds <= PULSE_MAX_S):
            raise Refused("bad_arg", f"seconds {str(seconds)[:40]!r}: give {PULSE_MIN_S:g} to {PULSE_MAX_S:g}",
                           field="seconds")
        seconds = float(seconds)
        return self._action(ConsolePulse(line, seconds, account, wired=line in self.lines), account, "pulse",
                            {"line": line, "seconds": seconds})

    def _op_note(self, req: dict) -> dict:
        account = _account(req)
        action = choice(req, "action", CONSOLE_NOTES)
        detail = req.get("detail", "")
        if not isinstance(detail, str) or len(detail) > CONSOLE_NOTE_MAX:
            raise Refused("bad_arg", f"detail: give a text of at most {CONSOLE_NOTE_MAX} characters", field="detail")
        return self._action(ConsoleNote(action, account, detail), account, action, {"detail": detail})

    def _action(self, event: Any, account: str, action: str, args: dict) -> dict:
        """Hand the event to the gate thread and wait for the console.action record it journals."""
        if not self._actions.take():
            raise Refused("busy", f"over {self._actions.rate:g} console actions a second; try again in a moment")
        with self._action_lock:
            mark = self._action_records.mark()
            if not self._submit(event):
                raise Refused("busy", "the gate's queue is full (or the gate is stopping); try again in a moment")
            self.counters["actions"] += 1
            record = self._wait_record(mark, account, action, args)
        if record is None and self._stopping.is_set():
            raise Refused("stopping", "the agent is stopping; the action may not have been carried out")
        if record is None:
            raise Refused("busy", f"the gate did not journal the action within {self.action_wait_s:g} s; "
                           "see the agent's log (it may still be done)")
        out: dict[str, Any] = {"result": record.get("result")}
        if "reason" in record:
            out["reason"] = record["reason"]
        out["record"] = record
        return out

    def _wait_record(self, mark: int, account: str, action: str, args: dict) -> dict | None:
        return self._action_records.wait(
            mark, lambda r: r.get("account") == account and r.get("action") == action
            and r.get("args") == args, self.action_wait_s)


_HANDLERS: dict[str, Callable[[ConsoleServer, dict], dict]] = {
    "ping": ConsoleServer._op_ping,
    "status": ConsoleServer._op_status,
    "watch": ConsoleServer._op_watch,
    "set_mode": ConsoleServer._op_set_mode,
    "open": ConsoleServer._op_open,
    "pulse": ConsoleServer._op_pulse,
    "note": ConsoleServer._op_note,
}
ConsoleServer.handlers = _HANDLERS


def _account(req: dict) -> str:
    account = req.get("account")
    if not isinstance(account, str) or not CONSOLE_ACCOUNT.fullmatch(account):
        raise Refused("bad_arg", "account: give the console account's name, 1 to 64 of A-Z a-z 0-9 . _ @ -",
                       field="account")
    return account


# --------------------------------------------------------------------------- client


class ConsoleClientError(OSError):
    """The agent cannot be reached, or its answer is not one of this protocol's."""


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_names(path.parent) as name:
            sock.connect(name(path.name))
    except BaseException:
        sock.close()
        raise
    return sock


def _lines(sock: socket.socket) -> Iterator[dict]:
    buf = b""
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_REPLY_BYTES:
                raise ConsoleClientError(f"a line over {MAX_REPLY_BYTES} bytes from the agent")
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
            continue
        line, buf = buf[:nl], buf[nl + 1:]
        try:
            doc = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConsoleClientError(f"the agent's line is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ConsoleClientError(f"the agent's line is not an object: {line[:80]!r}")
        yield doc


def request(path: str | os.PathLike[str], doc: dict, timeout: float = 10.0) -> dict:
    """Send one request to the console socket at ``path`` and return the reply.

    OSError (FileNotFoundError, ConnectionRefusedError, TimeoutError...) when the
    agent cannot be reached; ConsoleClientError when it closes without a reply.
    """
    sock = _connect(Path(path), timeout)
    try:
        sock.sendall(encode(doc))
        for reply in _lines(sock):
            if not isinstance(reply.get("ok"), bool):
                raise ConsoleClientError(f"not a console reply: {str(reply)[:80]}")
            return reply
    finally:
        sock.close()
    raise ConsoleClientError("the agent closed the connection without a reply")


def watch(path: str | os.PathLike[str], timeout: float = 10.0) -> Iterator[dict]:
    """Watch the gate: yields each line after the agent's ``{"ok": true, "op": "watch"}``:
    ``{"record": ...}``, ``{"status": ...}``, ``{"gap": N}``. Ends when the agent closes;
    OSError when it cannot be reached or says nothing for ``timeout`` s (a status comes
    every second). Close the generator to hang up."""
    sock = _connect(Path(path), timeout)
    try:
        sock.sendall(encode({"op": "watch"}))
        lines = _lines(sock)
        first = next(lines, None)
        if first is None:
            raise ConsoleClientError("the agent closed the connection without a reply")
        if first.get("ok") is not True:
            raise ConsoleClientError(f"watch refused: {first.get('error')}: {first.get('message')}")
        yield from lines
    finally:
        sock.close()
