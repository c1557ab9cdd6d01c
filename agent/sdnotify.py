"""A tiny sd_notify(3) client: tells systemd READY=1, WATCHDOG=1, STATUS=...

systemd passes the socket in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for
the abstract namespace) to a ``Type=notify`` service. Without the variable
(a terminal, a test, the demo) every call is a no-op, so the service code
calls it unconditionally. Sending never blocks the caller for long and never
raises: a notification that cannot be delivered is logged once, because the
gate must keep working even if systemd is gone.

``watchdog_interval()`` reads ``$WATCHDOG_USEC`` (set with ``WatchdogSec=``)
and returns how often to send WATCHDOG=1 (half the timeout, as sd_watchdog_enabled(3)
advises), or None when systemd does not expect keep-alives for this process.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "watchdog_interval"]


def _address(value: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: a leading NUL byte instead of "@".
    return b"\0" + value[1:].encode() if value.startswith("@") else value


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; a no-op without it.

    env: where to read NOTIFY_SOCKET (default os.environ). Safe to call from
    any thread.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        value = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = _address(value) if value else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(1.0)  # a full systemd queue must not hang the gate thread

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send "KEY=value" lines as one datagram; False when not sent."""
        if self._sock is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", errors="replace")
        with self._lock:
            try:
                self._sock.sendto(data, self.address)  # type: ignore[arg-type]
            except OSError as exc:
                if not self._failed:
                    self._failed = True
                    log.warning("sd_notify to %r failed (%s); systemd may not see the service's state",
                                self.address, exc)
                return False
        if self._failed:
            self._failed = False
            log.info("sd_notify works again")
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 keep-alives (half of WatchdogSec), or None.

    WATCHDOG_PID, when set, names the process systemd watches; another
    process (a child) must not send keep-alives on its behalf.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if wpid and wpid.isdigit() and int(wpid) != (os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1e6 / 2
