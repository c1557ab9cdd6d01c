"""Presence on disk: ``presence.json`` in the state directory (docs/presence.md).

The service keeps the gate's presence and roll-call (agent/core/presence.py)
here, so a restart keeps who is inside and an open roll-call, and so the
guard's tools (``gate-agent presence``, ``gate-agent rollcall``) and a future
web console can read it without the service: they only read the file.

Written like the gate state (agent/statefile.py): atomically (agent/fileio.py),
mode 0600 (pseudonymous ids are still personal data), from the gate thread's
idle hook at most every ``interval_s`` and only when presence changed, the
fsync on a writer thread so the gate thread never waits for the disk; an
opened or closed roll-call is handed on at once. A file that cannot be read
at start is moved aside (``.corrupt-<n>``) and presence starts empty: an
empty presence refuses nobody.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from agent.core.events import Now
from agent.core.presence import Presence
from agent.fileio import LatestWriter, set_aside, write_atomic

log = logging.getLogger(__name__)

__all__ = ["PRESENCE_FILE", "PresenceFile"]

PRESENCE_FILE = "presence.json"


class PresenceFile:
    """Load and save a ``Presence`` as JSON at ``path``; ``site``/``gate`` name it in the file."""

    def __init__(self, path: str | os.PathLike[str], *, site: str = "", gate: str = "",
                 interval_s: float = 5.0) -> None:
        self.path = Path(path)
        self.site = site
        self.gate = gate
        self.interval_s = interval_s
        self.errors = 0
        self._revision: int | None = None  # the presence revision last handed on
        self._last_at: float | None = None
        # A failed write tries again at the next idle call.
        self._writer = LatestWriter(self._write, name="presence-writer",
                                    failed=lambda: setattr(self, "_revision", None))

    def load(self, reset: str) -> Presence:
        """The saved presence (with the configured nightly ``reset``), or an empty one."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Presence(reset)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("presence %s cannot be read (%s); starting with nobody inside", self.path, exc)
            return Presence(reset)
        try:
            presence = Presence.from_dict(json.loads(text), reset)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            aside = set_aside(self.path)
            log.error("presence %s is damaged (%s); moved to %s, starting with nobody inside",
                      self.path, str(exc)[:200], aside)
            return Presence(reset)
        self._revision = presence.revision
        return presence

    def _snapshot(self, presence: Presence, wall: float) -> bytes | None:
        try:
            doc: dict[str, Any] = {"site": self.site, "gate": self.gate, "saved": round(wall, 3),
                                   **presence.to_dict()}
            return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()
        except Exception:
            self.errors += 1
            log.exception("presence could not be serialised; not saved")
            return None

    def maybe_save(self, presence: Presence, now: Now) -> bool:
        """On the gate thread: when presence changed and the last save is interval_s old (at
        once when the roll-call opened or closed), hand a snapshot to the writer thread."""
        if presence.revision == self._revision:
            return False
        urgent = presence.urgent
        if not urgent and self._last_at is not None and now.mono - self._last_at < self.interval_s:
            return False
        body = self._snapshot(presence, now.wall)
        self._last_at = now.mono
        self._revision = presence.revision
        presence.urgent = False
        if body is None:
            return False
        self._writer.put(body)
        return True

    def save(self, presence: Presence, wall: float) -> bool:
        """Write now (at stop, after close()); True when written. Never raises."""
        body = self._snapshot(presence, wall)
        return body is not None and self._write(body)

    def _write(self, body: bytes) -> bool:
        try:
            write_atomic(self.path, body)
        except OSError as exc:
            self.errors += 1
            if self.errors in (1, 10) or self.errors % 1000 == 0:
                log.error("presence %s could not be saved (%s; %d failures); the gate goes on, "
                          "the guard's lists are from the last save", self.path, exc, self.errors)
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the writer thread."""
        self._writer.close(timeout)
