"""The console's side of the agent's local socket (``<state_dir>/console.sock``).

The protocol (one JSON object per line each way) is the agent's (agent/consolesock.py):
ping, status, watch, and the actions set_mode, open, pulse and note, each with the account. Two uses here:

* ``AgentLink.request(op, **args)``: one connection per request (status, the
  technician's actions); a down agent is ``AgentUnavailable``, said plainly on
  the page, and the console keeps serving.
* ``Hub``: ONE ``watch`` connection for the whole console, however many browsers
  look: each committed record and the 1 s status come in once and are fanned out
  to every subscriber's bounded queue. A browser that does not read its queue
  loses records (counted as a gap, as the agent does for a slow watcher); the
  hub never waits for one. It reconnects with a growing pause while the agent
  is down or restarting.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from agent.linesock import encode

__all__ = ["AgentLink", "AgentUnavailable", "Hub", "Subscription"]

log = logging.getLogger("agent.console")

MAX_LINE = 1 << 20  # a status of a big board is a few KB; a record under 64 KB
REQUEST_TIMEOUT_S = 5.0
QUEUE = 500  # per browser
RECENT = 200  # records kept for a page opened later (the live page shows them first)


class AgentUnavailable(RuntimeError):
    """The agent does not answer on its socket (not running, restarting, wrong path)."""


class AgentLink:
    def __init__(self, socket_path: str | Path, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.path = str(socket_path)
        self.timeout = timeout

    async def _open(self, timeout: float | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(asyncio.open_unix_connection(self.path, limit=MAX_LINE),
                                          timeout or self.timeout)
        except (TimeoutError, OSError) as exc:
            raise AgentUnavailable(f"the agent does not answer on {self.path} ({exc or type(exc).__name__})") from None

    async def request(self, op: str, *, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request, return the agent's reply (``ok`` false included: the caller
        shows its message). AgentUnavailable when there is no answer within ``timeout``."""
        reader, writer = await self._open(timeout)
        try:
            writer.write(encode({"op": op, **args}))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout or self.timeout)
        except (TimeoutError, OSError, ValueError) as exc:
            raise AgentUnavailable(f"no reply from the agent on {self.path} ({exc or type(exc).__name__})") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        try:
            reply = json.loads(line)
        except ValueError:
            raise AgentUnavailable(f"the agent on {self.path} closed the connection or sent no JSON") from None
        if not isinstance(reply, dict):
            raise AgentUnavailable(f"the agent on {self.path} sent {type(reply).__name__}, not an object")
        return reply

    async def watch(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection turned into a watch (the agent's ok line read)."""
        reader, writer = await self._open()
        try:
            writer.write(b'{"op":"watch"}\n')
            await writer.drain()
            first = json.loads(await asyncio.wait_for(reader.readline(), self.timeout))
            if not first.get("ok"):
                raise AgentUnavailable(f"the agent refused the watch: {first.get('message') or first}")
        except (TimeoutError, OSError, ValueError, AttributeError) as exc:
            writer.close()
            raise AgentUnavailable(f"no watch from the agent on {self.path} ({exc or type(exc).__name__})") from None
        return reader, writer


class Subscription:
    """One browser's feed: ``get()`` waits for the next item ("record", dict) / ("status", dict)
    / ("gap", n) / ("link", bool)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(QUEUE)
        self.dropped = 0

    def put(self, item: tuple[str, Any]) -> None:
        if self.dropped and self.queue.qsize() < QUEUE - 1:
            self.queue.put_nowait(("gap", self.dropped))
            self.dropped = 0
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1

    async def get(self, timeout: float) -> tuple[str, Any] | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.hub.subscribers.discard(self)


class Hub:
    """One upstream watch, fanned out (module doc). ``status``: the last status the
    agent sent and when (monotonic); ``connected``: whether the watch is up."""

    def __init__(self, link: AgentLink) -> None:
        self.link = link
        self.subscribers: set[Subscription] = set()
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self.status: dict | None = None
        self.status_at = 0.0
        self.connected = False
        self.error = ""
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self.subscribers.add(sub)
        return sub

    def _fan(self, item: tuple[str, Any]) -> None:
        for sub in list(self.subscribers):
            sub.put(item)

    def outdated(self) -> None:
        """The gate's state changed (an action was carried out): the next page asks the agent,
        not the last watch status, so it shows the mode just set."""
        self.status_at = 0.0

    def fresh_status(self, max_age_s: float = 3.0) -> dict | None:
        if self.status is not None and self.connected and time.monotonic() - self.status_at <= max_age_s:
            return self.status
        return None

    async def _run(self) -> None:
        pause = 0.5
        while True:
            try:
                reader, writer = await self.link.watch()
            except AgentUnavailable as exc:
                if self.connected or not self.error:
                    log.warning("agent watch unavailable: %s", exc)
                self.error = str(exc)
                self._set_connected(False)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            log.info("agent watch connected on %s", self.link.path)
            pause, self.error = 0.5, ""
            self._set_connected(True)
            try:
                await self._read(reader)
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                self.error = f"the watch ended ({exc})"
            finally:
                writer.close()
            log.warning("agent watch lost: %s", self.error or "the agent closed it")
            self._set_connected(False)
            await asyncio.sleep(pause)

    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            self.connected = up
            self._fan(("link", up))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                self.error = "the agent closed the watch"
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # one bad line is not a reason to drop the feed
            if not isinstance(msg, dict):
                continue
            if isinstance(msg.get("record"), dict):
                self.recent.append(msg["record"])
                self._fan(("record", msg["record"]))
            elif isinstance(msg.get("status"), dict):
                self.status, self.status_at = msg["status"], time.monotonic()
                self._fan(("status", msg["status"]))
            elif "gap" in msg:
                self._fan(("gap", msg["gap"]))
