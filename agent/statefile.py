"""The gate state on disk: anti-passback positions and guest uses.

A small JSON file in the state directory, written atomically (a temporary
file in the same directory, fsync, rename over the old one, fsync of the
directory), so a power cut leaves either the old state or the new one, never
a torn file. Mode 0600: positions are personal data (docs/design.md, principle 6).

It also keeps the mode last commanded (``normal``, ``entry_only``, ``free``,
``lockdown``), so a remote lockdown survives a restart, and the fire latch
(``"fire": true`` while fire mode waits for its reset), so a restart after
the loop closed cannot end fire mode without the reset. A change of either
is handed on at the next ``maybe_save``, whatever the interval; at start
``start_config`` applies the kept mode to the gate's config.

``StateFile.maybe_save`` runs on the gate thread from the runtime's idle hook,
at most every ``interval_s`` and only when something changed: it only takes a
snapshot (JSON text) and hands it to a writer thread, so the gate thread never
waits for an fsync (docs/design.md, principle 1). ``close()`` writes the last
snapshot and stops the writer; ``save`` writes at once (at stop). A file
that cannot be read at start is moved aside (``.corrupt-<n>``) and the gate
starts with no positions: an unknown position is allowed (docs/design.md#anti-passback).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from agent.core.gateconfig import GateConfig
from agent.core.turnstile import COMMANDABLE_MODES
from agent.fileio import LatestWriter, set_aside, write_atomic

log = logging.getLogger(__name__)

__all__ = ["StateFile", "write_atomic"]

FORMAT = 1


class StateFile:
    """Load and save a fastpath ``GateState`` as JSON at ``path``.

    fp: the fastpath module (or a twin) whose ``GateState`` to build.
    interval_s: ``maybe_save`` writes at most this often.
    """

    def __init__(self, path: str | os.PathLike[str], fp: Any, *, interval_s: float = 5.0) -> None:
        self.path = Path(path)
        self.fp = fp
        self.interval_s = interval_s
        self._last_saved: str | None = None  # the JSON last written or handed on (skip unchanged saves)
        self._last_at: float | None = None
        self.errors = 0
        self.mode: str | None = None  # the commanded mode found at load
        self.fire: bool = False  # the fire latch found at load
        self._last_modes: tuple[str | None, bool] | None = None  # (mode, fire) last handed on
        # A failed write tries again at the next snapshot.
        self._writer = LatestWriter(self._write, name="state-writer",
                                    failed=lambda: setattr(self, "_last_saved", None))

    def load(self) -> Any:
        """The saved GateState, or a new empty one (no file, or an unreadable one moved aside)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self.fp.GateState()
        except OSError as exc:
            log.error("gate state %s cannot be read (%s); starting with no anti-passback positions. "
                      "Check the owner and mode of the state directory", self.path, exc)
            return self.fp.GateState()
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}")
            state = self.fp.GateState.from_dict(doc["state"])
        except (ValueError, KeyError, TypeError) as exc:
            aside = set_aside(self.path)
            log.error("gate state %s is damaged (%s); moved to %s, starting with no anti-passback "
                      "positions (an unknown position is allowed)", self.path, exc, aside)
            return self.fp.GateState()
        mode = doc.get("mode")
        self.mode = mode if isinstance(mode, str) else None
        self.fire = doc.get("fire") is True
        self._last_modes = (self.mode, self.fire)
        self._last_saved = self._body(doc["state"], self.mode, self.fire)
        return state

    def start_config(self, configured: GateConfig) -> GateConfig:
        """The gate config to start with, after ``load``: a mode commanded before the
        restart (a remote lockdown) holds over the configured ``initial_mode`` until
        commanded again. Logs it, and a fire latch kept from before the restart."""
        start = configured
        if self.mode in COMMANDABLE_MODES and self.mode != configured.initial_mode:
            log.warning("mode %s was commanded before this start; it holds (configured: %s)",
                        self.mode, configured.initial_mode)
            start = dataclasses.replace(configured, initial_mode=self.mode)
        if self.fire:
            log.warning("fire mode was latched before this start and not reset: the gate starts free "
                        "(fire mode) until the fire release is reset with the loop closed")
        return start

    @staticmethod
    def _body(state_dict: dict, mode: str | None, fire: bool = False) -> str:
        doc: dict[str, Any] = {"format": FORMAT, "state": state_dict}
        if mode is not None:
            doc["mode"] = mode
        if fire:
            doc["fire"] = True  # absent when not latched: files of earlier versions read the same
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def _snapshot(self, state: Any, mode: str | None, fire: bool = False) -> str | None:
        try:
            return self._body(state.to_dict(), mode, fire)
        except Exception:
            self.errors += 1
            log.exception("gate state could not be serialised; not saved")
            return None

    def save(self, state: Any, now_mono: float | None = None, mode: str | None = None,
             fire: bool = False) -> bool:
        """Write the state (the commanded mode, the fire latch) now if it changed;
        True when written. Never raises. At stop; the gate thread uses maybe_save."""
        body = self._snapshot(state, mode, fire)
        self._last_at = now_mono
        self._last_modes = (mode, bool(fire))
        if body is None or body == self._last_saved:
            return False
        return self._write(body)

    def _write(self, body: str) -> bool:
        try:
            write_atomic(self.path, (body + "\n").encode())
        except OSError as exc:
            self.errors += 1
            if self.errors in (1, 10) or self.errors % 1000 == 0:
                log.error("gate state %s could not be saved (%s; %d failures); decisions go on, "
                          "positions since the last save would be lost on a restart",
                          self.path, exc, self.errors)
            return False
        self._last_saved = body
        return True

    def maybe_save(self, state: Any, now_mono: float, mode: str | None = None, fire: bool = False) -> bool:
        """On the gate thread: unless the last snapshot was less than interval_s ago,
        take one and hand it to the writer thread. True when one was handed on.
        A new commanded mode or fire latch is handed on at once: a crash must not
        lose a lockdown or end fire mode."""
        modes = (mode, bool(fire))
        urgent = modes != self._last_modes
        if not urgent and self._last_at is not None and now_mono - self._last_at < self.interval_s:
            return False
        self._last_at = now_mono
        self._last_modes = modes
        body = self._snapshot(state, mode, fire)
        if body is None or body == self._last_saved:
            return False
        self._last_saved = body  # what the file will hold; an unchanged state is not handed on again
        self._writer.put(body)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the writer thread."""
        self._writer.close(timeout)
