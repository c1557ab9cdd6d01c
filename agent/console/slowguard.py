"""uvicorn's HTTP/1.1 protocol (h11) with the bounds a page on a school network needs.

uvicorn times out an idle keep-alive connection, but not a request whose head
never ends: a few hundred connections each sending a header line now and then
(slowloris) hold every descriptor the console has, and nobody else gets a page
for as long as they go on. ``GuardedH11Protocol`` (given to uvicorn as its
``http`` class) adds:

- ``head_timeout_s``: from the connection (or the end of the last response)
  to the whole head of the next request; a connection slower than that is
  closed;
- ``max_per_address``: open connections from one address (a browser opens a
  few, and each live page holds one): more are closed at once;
- ``max_connections``: in all, well under the process's descriptor limit.

The agent is another process: none of this touches the gate.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("agent.console")

__all__ = ["GuardedH11Protocol"]


class GuardedH11Protocol(H11Protocol):
    head_timeout_s: ClassVar[float] = 10.0
    max_per_address: ClassVar[int] = 32
    max_connections: ClassVar[int] = 512
    _open: ClassVar[dict[str, int]] = {}  # open connections by client address (one event loop)
    _total: ClassVar[list[int]] = [0]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._addr = self.client[0] if self.client else "?"
        self._head_timer: asyncio.TimerHandle | None = None
        self._timed_cycle: Any = None
        opened = self._open.get(self._addr, 0)
        self._open[self._addr] = opened + 1
        self._total[0] += 1
        if opened >= self.max_per_address or self._total[0] > self.max_connections:
            log.warning("connection from %s closed: %d open from it, %d in all (limits %d and %d)",
                        self._addr, opened, self._total[0] - 1, self.max_per_address, self.max_connections)
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timed_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("connection from %s closed: no whole request within %.0f s", self._addr,
                     self.head_timeout_s)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._timed_cycle:  # a new request's head is in: it is being served
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        left = self._open.get(self._addr, 1) - 1
        if left > 0:
            self._open[self._addr] = left
        else:
            self._open.pop(self._addr, None)
        self._total[0] -= 1
        super().connection_lost(exc)
