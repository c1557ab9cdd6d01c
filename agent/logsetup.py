"""The service's logging: one line per message on stderr, in a form journald indexes.

Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with a
``<N>`` syslog priority, which journald stores as the entry's priority; a
traceback stays on its line. ``setup_logging`` puts a queue between the
loggers and stderr (a logging call on the gate thread only enqueues) and a
per-message rate limit (agent/ratelimit.py) in front of it, so a flood of one
message is a few lines and a count, never a full disk. ``gate-agent run``
(agent/service.py) calls it; log lines are English.
"""
from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
from collections.abc import Mapping

from agent.ratelimit import RateLimitFilter

__all__ = ["JournalFormatter", "setup_logging"]

_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class JournalFormatter(logging.Formatter):
    """One line per message; with ``prefix`` a ``<N>`` syslog priority first."""

    def __init__(self, prefix: bool) -> None:
        fmt = "%(name)s: %(message)s" if prefix else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # journald splits on newlines and would lose the priority of the rest:
        # keep a traceback on the same line.
        text = " | ".join(line for line in text.splitlines() if line.strip())
        if self.prefix:
            prio = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
            text = f"<{prio}>{text}"
        return text


def _stderr_is_journal(env: Mapping[str, str]) -> bool:
    """JOURNAL_STREAM is "dev:inode" of the journal stream systemd connected;
    it counts only when it is really our stderr (not inherited by a child)."""
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


_log_listener: logging.handlers.QueueListener | None = None
_log_limit: RateLimitFilter | None = None
LOG_BURST = 10  # lines of one message let through per LOG_INTERVAL_S; the rest are counted
LOG_INTERVAL_S = 10.0


def setup_logging(level: str = "info", env: Mapping[str, str] | None = None) -> None:
    """Log to stderr in a form journald indexes (see module doc).

    Through a queue: a logging call only enqueues, and one listener thread
    writes to stderr, so the gate thread never waits on a stderr that journald
    is slow to drain, nor on a handler lock another thread holds. Rate-limited
    per message (agent.ratelimit): a flood of one message is a few lines and a
    count, never a full disk. Calling it again replaces the previous set-up."""
    global _log_listener, _log_limit
    env = os.environ if env is None else env
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(prefix=_stderr_is_journal(env)))
    first = _log_listener is None
    _stop_logging()
    log_queue: queue.SimpleQueue = queue.SimpleQueue()
    _log_listener = logging.handlers.QueueListener(log_queue, handler)
    _log_listener.start()
    if first:
        atexit.register(_stop_logging)  # flushes what is queued at exit
    queue_handler = logging.handlers.QueueHandler(log_queue)
    _log_limit = RateLimitFilter(LOG_BURST, LOG_INTERVAL_S)
    queue_handler.addFilter(_log_limit)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(queue_handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def _stop_logging() -> None:
    """Write the suppressed counts and what is queued, then stop the writer thread (idempotent)."""
    global _log_listener
    listener, _log_listener = _log_listener, None
    if listener is None:
        return
    if _log_limit is not None:
        _log_limit.flush()
    listener.stop()
