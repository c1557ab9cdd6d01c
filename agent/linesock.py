"""The agent's local line sockets: one JSON object per line each way, over a Unix socket.

Two sockets speak this way: the simulated hardware's (agent/simctl.py, ``sim.sock``)
and the console's (agent/consolesock.py, ``console.sock``). What they share is
here: the socket file (``listen_unix``: 0600 from the first moment, a stale one
left by a killed agent replaced, another agent's refused; ``remove_unix``), the
path that fits a socket address (``short_names``), and ``LineServer``, the
server both are: an accept thread, a thread per client, and the bounds that
keep a client from stopping anything:

- at most ``max_clients`` connections and ``CONNECTIONS_PER_S`` new ones a
  second (more are told ``busy`` and closed; while it turns clients away the
  accept loop pauses, leaving the rest in the kernel's backlog);
- a request at most ``max_request_bytes`` (over it: ``too_long`` and the
  connection is closed, there is no way to find the next request's start);
- at most ``rate_per_s`` requests a second (more are told ``busy``);
- a connection idle for ``idle_timeout_s`` or with ``MAX_BAD_REQUESTS``
  refusals that are the client's fault is closed.

A subclass names its operations (``ops``, ``handlers``: op -> method taking the
request, returning the reply's fields), may check each connection's peer
(``admit``), take a connection over after a reply (``takeover``: the console's
watch), and wake its own waiters at stop (``wake``). A handler refuses with
``Refused(code, message, **details)``; anything else it raises is logged and
answered ``failed``: the gate is never affected.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from agent.ratelimit import TokenBucket

log = logging.getLogger(__name__)

__all__ = ["LineServer", "RateBudget", "Refused", "choice", "encode", "listen_unix", "remove_unix",
           "short_names"]

CONNECTIONS_PER_S = 50.0
MAX_BAD_REQUESTS = 10
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL
# Refusals that are the client's fault: enough of them on one connection closes it.
CLIENT_FAULTS = frozenset({"bad_json", "too_long", "unknown_op", "bad_arg", "busy"})


class Refused(Exception):
    """A request the server will not carry out (code, English message, details)."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.details = details

    def reply(self, op: str | None = None) -> dict:
        out: dict[str, Any] = {"ok": False, "error": self.code, "message": str(self), **self.details}
        if op is not None:
            out["op"] = op
        return out


def encode(doc: Mapping[str, Any]) -> bytes:
    """One line of the protocol: compact JSON, UTF-8, a newline."""
    return (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def choice(req: dict, field: str, allowed: tuple[str, ...]) -> str:
    """``req[field]`` when it is one of ``allowed``; else Refused bad_arg naming them."""
    value = req.get(field)
    if value not in allowed:
        raise Refused("bad_arg", f"{field} {str(value)[:40]!r}: give {' or '.join(allowed)}", field=field,
                      allowed=list(allowed))
    return value


class RateBudget:
    """A token bucket (``rate`` a second, burst ``rate``) shared by the server's threads."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = float(rate)
        self.clock = clock
        self._bucket = TokenBucket(rate, rate, clock())
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            return self._bucket.take(self.clock())


class RecordWaiter:
    """The last ``keep`` committed records of some kind, numbered, for request threads
    that hand the gate an event and wait for the record it journals: ``mark()`` before
    submitting, then ``wait(mark, match, timeout)``. The gate thread only appends
    (``put``), under a lock no waiter holds while it waits."""

    def __init__(self, keep: int, clock: Callable[[], float], stopping: threading.Event) -> None:
        self.clock = clock
        self._stopping = stopping
        self._cond = threading.Condition()
        self._records: deque[tuple[int, dict]] = deque(maxlen=keep)
        self._n = 0

    def put(self, record: dict) -> None:
        with self._cond:
            self._n += 1
            self._records.append((self._n, record))
            self._cond.notify_all()

    def mark(self) -> int:
        """The number of the last record put: a later wait sees only what comes after."""
        with self._cond:
            return self._n

    def wake(self) -> None:
        """Wake every waiter (the server is stopping: each returns None)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, mark: int, match: Callable[[dict], bool], timeout: float) -> dict | None:
        """The first record after ``mark`` that ``match`` accepts, within ``timeout`` s;
        None when none came or the server is stopping."""
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                for n, rec in self._records:
                    if n > mark and match(rec):
                        return rec
                left = deadline - self.clock()
                if left <= 0 or self._stopping.is_set():
                    return None
                self._cond.wait(left)


# --------------------------------------------------------------------------- the socket file


@contextmanager
def short_names(directory: Path) -> Iterator[Callable[[str], str]]:
    """``name(basename)``: a path to basename in directory that fits a socket address.

    The plain path when it is short enough; else ``/proc/self/fd/N/basename``
    through a descriptor of the directory (Linux resolves it like the long
    path), so a deep state directory still works.
    """
    fd: int | None = None

    def name(base: str) -> str:
        nonlocal fd
        full = str(directory / base)
        if len(os.fsencode(full)) <= _SUN_PATH_MAX:
            return full
        if fd is None:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{fd}/{base}"

    try:
        yield name
    finally:
        if fd is not None:
            os.close(fd)


def listen_unix(path: Path, backlog: int, *, error: type[OSError], role: str,
                kept: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket at ``path``, mode 0600, and its (st_dev, st_ino).

    Bound under a temporary name, made 0600, then renamed over the old one: nobody
    ever sees it with a wider mode, and a stale socket left by a killed agent goes in
    one step. ``error`` (with the fix in its message) when it cannot: ``path`` is not
    a socket, another agent answers on it, or the directory refuses. ``role`` names
    the socket in the log ("simulated hardware"), ``kept`` in the messages.
    """
    directory = path.parent
    tmp = f".{path.name}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_names(directory) as name:
            _check_existing(path, name(path.name), error=error, role=role, kept=kept)
            try:
                os.unlink(name(tmp))
            except FileNotFoundError:
                pass
            sock.bind(name(tmp))
            try:
                os.chmod(name(tmp), 0o600)
                sock.listen(backlog)
                os.replace(name(tmp), name(path.name))
            except BaseException:
                try:
                    os.unlink(name(tmp))
                except OSError:
                    pass
                raise
            st = os.stat(name(path.name))
    except error:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise error(f"cannot open {path}: {exc.strerror or exc}; check the state "
                    "directory's owner and mode") from exc
    return sock, (st.st_dev, st.st_ino)


def _check_existing(path: Path, name: str, *, error: type[OSError], role: str, kept: str) -> None:
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise error(f"{path} exists and is not a socket; move it away (the agent keeps "
                    f"its {kept} there)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(name)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("%s: replacing the stale socket %s of an agent that did not stop", role, path)
        return
    except OSError as exc:
        raise error(f"{path} is a socket that cannot be probed ({exc}); another agent may "
                    "use this state directory") from exc
    finally:
        probe.close()
    raise error(f"another agent answers on {path}: two agents share the state directory "
                "(service.state_dir); stop the other one")


def remove_unix(path: Path, inode: tuple[int, int], *, role: str) -> None:
    """Remove the socket at ``path`` if it is still the one opened (``inode``), not a newer agent's."""
    with short_names(path.parent) as name:
        try:
            st = os.stat(name(path.name))
            if (st.st_dev, st.st_ino) == inode:
                os.unlink(name(path.name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: socket %s not removed (%s)", role, path, exc)


# --------------------------------------------------------------------------- the server


class LineServer:
    """One line socket's server (module doc). ``start()``, ``stop()``; subclasses set
    the class attributes below and their handlers."""

    role: ClassVar[str] = "line socket"  # names the socket in the log
    kept: ClassVar[str] = "socket"  # names it in listen_unix's messages
    thread_name: ClassVar[str] = "line"
    error: ClassVar[type[OSError]] = OSError
    ops: ClassVar[tuple[str, ...]] = ()
    handlers: ClassVar[Mapping[str, Callable[[Any, dict], dict]]] = {}
    client_faults: ClassVar[frozenset[str]] = CLIENT_FAULTS
    stopping_message: ClassVar[str] = "the agent is stopping"

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float], max_clients: int,
                 idle_timeout_s: float, rate_per_s: float, max_request_bytes: int) -> None:
        self.path = Path(path)
        self.clock = clock
        self.max_clients = max_clients
        self.idle_timeout_s = idle_timeout_s
        self.max_request_bytes = max_request_bytes
        self._requests = RateBudget(rate_per_s, clock)
        self._accepts = RateBudget(CONNECTIONS_PER_S, clock)  # a connect/close loop spawns no threads
        self._lock = threading.Lock()  # clients and threads
        self._clients: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._sock: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self.counters: dict[str, int] = {"connections": 0, "requests": 0, "refused": 0, "turned_away": 0}

    # -- what a subclass may add ---------------------------------------------------------

    def admit(self, conn: socket.socket) -> bool:
        """Whether this connection's peer may talk here (closed at once when not)."""
        return True

    def takeover(self, conn: socket.socket, reply: dict) -> bool:
        """True when ``reply`` turns the connection into something else that has been
        served to its end here (the console's watch); the connection then closes."""
        return False

    def wake(self) -> None:
        """At stop: wake whatever the client threads wait on."""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Open the socket (0600; a stale one left by a killed agent is replaced) and
        start answering; ``error`` when it cannot (the gate works without it)."""
        sock, self._inode = listen_unix(self.path, self.max_clients, error=self.error, role=self.role,
                                        kept=self.kept)
        sock.settimeout(0.5)  # the accept loop also looks at the stop flag this often
        self._sock = sock
        self._accepter = threading.Thread(target=self._accept_loop, name=f"{self.thread_name}-accept",
                                          daemon=True)
        self._accepter.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop answering, close every connection, remove the socket (if it is still ours)."""
        self._stopping.set()
        self.wake()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            sock.close()
        if self._accepter is not None and self._accepter is not threading.current_thread():
            self._accepter.join(timeout)
        with self._lock:
            clients = list(self._clients)
            threads = list(self._threads)
        for conn in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv() or send()
            except OSError:
                pass
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)
        if self._inode is not None:
            remove_unix(self.path, self._inode, role=self.role)
            self._inode = None

    # -- connections -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _addr = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("%s: accept failed; going on", self.role)
                time.sleep(0.1)
                continue
            if not self.admit(conn):
                conn.close()
                continue
            with self._lock:
                full = len(self._clients) >= self.max_clients or not self._accepts.take()
                if not full:
                    self._clients.add(conn)
                    self.counters["connections"] += 1
            if full:
                self.counters["turned_away"] += 1
                self._turn_away(conn)
                # Back-pressure: while turning clients away, leave the rest in the kernel's backlog
                # (a full backlog refuses them there) instead of spending the agent's CPU on them.
                self._stopping.wait(0.02)
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name=f"{self.thread_name}-client",
                                 daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    def _turn_away(self, conn: socket.socket) -> None:
        reply = Refused("busy", f"{self.max_clients} clients are connected already, or more than "
                        f"{CONNECTIONS_PER_S:.0f} connected in a second; try again in a moment").reply()
        try:
            conn.setblocking(False)
            conn.send(encode(reply))
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        bad = 0
        buf = b""
        limit = self.max_request_bytes
        try:
            conn.settimeout(self.idle_timeout_s)
            while not self._stopping.is_set():
                nl = buf.find(b"\n")
                if nl < 0 and len(buf) <= limit:
                    try:
                        chunk = conn.recv(4096)
                    except TimeoutError:
                        return  # idle: the slot goes to someone else
                    if not chunk:
                        return
                    buf += chunk
                    continue
                if nl < 0 or nl > limit:
                    # No way to find the next request's start: answer and hang up.
                    self.counters["refused"] += 1
                    log.warning("%s: a request over %d bytes; connection closed", self.role, limit)
                    conn.sendall(encode(Refused(
                        "too_long", f"a request is one JSON object on one line of at most {limit} "
                        "bytes; connection closed").reply()))
                    return
                line, buf = buf[:nl], buf[nl + 1:]
                if not line.strip():
                    continue
                reply = self._reply(line)
                if self.takeover(conn, reply):
                    return
                if not reply["ok"] and reply.get("error") in self.client_faults:
                    bad += 1
                conn.sendall(encode(reply))
                if bad >= MAX_BAD_REQUESTS:
                    log.warning("%s: %d refused requests on one connection; closed", self.role, bad)
                    return
        except OSError:
            pass  # the client went away, or stop() shut the connection
        except Exception:
            log.exception("%s: a connection failed; the gate is not affected", self.role)
        finally:
            with self._lock:
                self._clients.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    # -- requests --------------------------------------------------------------------------

    def _reply(self, line: bytes) -> dict:
        op: Any = None
        known = None
        try:
            try:
                req = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
                raise Refused("bad_json", 'a request is one JSON object per line, e.g. {"op": "ping"}') from None
            if not isinstance(req, dict):
                raise Refused("bad_json", 'a request is one JSON object per line, e.g. {"op": "ping"}')
            op = req.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Refused("unknown_op", f"op {str(op)[:40]!r} is not known; ops: {', '.join(self.ops)}",
                              ops=list(self.ops))
            known = op
            if self._stopping.is_set():
                raise Refused("stopping", self.stopping_message)
            if not self._requests.take():
                raise Refused("busy", f"over {self._requests.rate:.0f} requests a second; slow down")
            self.counters["requests"] += 1
            return {"ok": True, "op": op, **handler(self, req)}
        except Refused as exc:
            self.counters["refused"] += 1
            log.info("%s: refused %s: %s", self.role, exc.code, exc)
            return exc.reply(known)
        except Exception as exc:
            log.exception("%s: %s failed; the gate is not affected", self.role, op)
            return Refused("failed", f"{type(exc).__name__}: {exc}"[:300]).reply(known)
