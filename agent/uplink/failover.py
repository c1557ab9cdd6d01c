"""The service's journal on an SD card that may turn read-only.

SD cards that find errors are remounted read-only by the kernel. The gate
must go on deciding (principle 1) and keep what it did (principle 2), so
``FailoverJournal`` puts a second journal beside the real one:

* The real journal (``journal.path`` on the card) while it takes writes.
* When its filesystem refuses them (at start, or a commit fails and the
  directory proves read-only) a **fallback journal** in the runtime
  directory (``/run/gate-agent``, systemd ``RuntimeDirectory=``: a tmpfs,
  kept across restarts of the service by ``RuntimeDirectoryPreserve=yes``).
  It is a journal of its own: a new id, seqs from 1. The records the real
  journal held in memory (numbered, never written, so never offered to
  anyone) are renumbered into it; ``alarm`` ``journal_readonly`` is raised.
* Every ``retry_s`` a thread of its own (never the gate thread) checks whether
  the card takes writes again and, when it does, opens the real journal (with
  every check of a normal start). The gate thread then switches to it, clears
  the alarm, and folds the fallback's unacknowledged records into it a batch
  per idle call: each copy gets a new seq in the real journal and
  ``salvaged_from`` its fallback id; the highest fallback seq copied is written
  in the same transaction as the copies, so a crash never copies one twice.
  Acknowledgements for the fallback's id still count while it is folded in
  (``ack_upto``), and records the server may already hold (offered, not yet
  acknowledged) get ``FOLD_GRACE_S`` to be acknowledged before they are
  copied: with the server online none is sent twice; otherwise the copy's
  ``salvaged_from`` names the original. When nothing is left and the copies
  are fsynced, the fallback file is deleted.

Why a fallback journal and not only the memory buffer a full disk uses: a
record in tmpfs survives kill -9, a crash and a restart of the service (the
next start finds the fallback and goes on with it, or folds it in), and it is
sent: the server keeps getting the school's events and sees the alarm. Only a
power cut or a reboot loses it, which would lose the memory buffer too. The
memory buffer stays the last resort: when no fallback can be opened (no
runtime directory, or it is full), records wait in memory as on a full disk.

What waits on the card: records the real journal held unacknowledged when it
turned read-only stay in it (readable, not lost) and are sent once it takes
writes again; the uplink sends from one journal at a time. Ids never collide:
the real journal numbers on from what it wrote, the fallback has its own id.

Threads: ``commit``, ``maintenance``, ``set_disk_budget``, ``close`` on the
gate thread, as for ``Journal``; the uplink's methods (``id``, ``pending``,
``ack_upto``, ``ack_one``) on the uplink thread. A switch is one reference
assignment on the gate thread; the uplink notices the new ``id`` and starts
that journal from its beginning.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from agent.core.events import Now
from agent.core.records import make_record
from agent.uplink.journal import (
    BYTES_PER_EVENT_ESTIMATE,
    DEFAULT_DISK_BUDGET,
    MIN_DISK_BUDGET,
    Journal,
    JournalError,
    readonly_dir,
)

__all__ = ["DEFAULT_RUNTIME_DIR", "FailoverJournal", "fallback_path"]

log = logging.getLogger("agent.uplink.journal")

DEFAULT_RUNTIME_DIR = Path("/run/gate-agent")
RETRY_S = 30.0  # how often a read-only card is tried again
FOLD_BATCH = 500  # fallback records copied per idle call: bounds the gate's pause
FOLD_GRACE_S = 10.0  # records the server may hold get this long to be acknowledged
FALLBACK_SHARE = 0.5  # of the free space in the runtime directory at most


def _system_clock() -> Now:
    return Now(mono=time.monotonic(), wall=time.time(), synced=False)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class FailoverJournal:
    """The journal at ``path``, or while its filesystem is read-only a
    fallback journal in ``fallback_dir`` (None: no fallback, records wait in
    memory). ``retry_s``: how often the card is tried again (default
    ``RETRY_S``). The other keyword arguments are ``Journal``'s."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fallback_dir: str | os.PathLike[str] | None,
        retry_s: float | None = None,
        clock: Callable[[], Now] | None = None,
        boot: str | None = None,
        **options: Any,
    ) -> None:
        self.real_path = Path(path)
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self._retry_s = float(RETRY_S if retry_s is None else retry_s)
        self._clock = clock or _system_clock
        self._boot = boot
        self._options: dict[str, Any] = dict(options, clock=self._clock, boot=boot)
        self.recovered_record: dict | None = None
        self._draining: Journal | None = None  # a fallback being folded into the real journal
        self._ready: Journal | None = None  # the real journal, reopened by the retry thread
        self._retired: list[Journal] = []  # real journals let go, closed by the retry thread
        self._on_fallback = False
        self._alarm_raised = False
        self._fallback_failed_at: float | None = None
        self._fold_grace_until = 0.0
        self._sync_started = False
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None
        self._retry_note = ""
        self._active = self._open()

    # --- opening ----------------------------------------------------------------

    def fallback_path(self) -> Path | None:
        """Where the fallback journal of this journal lives (one per journal path)."""
        if self.fallback_dir is None:
            return None
        return fallback_path(self.real_path, self.fallback_dir)

    def _open(self) -> Journal:
        try:
            real = Journal(self.real_path, **self._options)
        except (JournalError, OSError) as exc:
            if self.fallback_dir is None or not readonly_dir(_existing(self.real_path.parent)):
                raise
            log.error(
                "journal %s cannot be opened: its filesystem is read-only (%s); the SD card is "
                "failing: records go to a fallback journal in %s until it takes writes again",
                self.real_path,
                exc,
                self.fallback_dir,
            )
            fb = self._open_fallback()  # JournalError when there is none either: the start fails
            self._on_fallback = True
            self._raise_alarm(fb)
            return fb
        self.recovered_record = real.recovered_record
        fb_path = self.fallback_path()
        if fb_path is not None and fb_path.exists():
            # Left by an agent that stopped while the card was read-only: fold it in now.
            try:
                fb = self._open_fallback()
            except (JournalError, OSError, ValueError) as exc:
                log.error("fallback journal %s cannot be opened (%s); left as it is", fb_path, exc)
            else:
                log.warning(
                    "fallback journal %s (%s) found: its records are copied into %s",
                    fb_path,
                    fb.id,
                    self.real_path,
                )
                self._draining = fb
                self._alarm_raised = True  # raised by that agent: cleared below
                while self._draining is not None:
                    real.maintenance(self._clock().wall)
                    if not self._fold_step(real, at_start=True):
                        break
                self._clear_alarm(real, "the card takes writes again")
        return real

    def _open_fallback(self) -> Journal:
        path = self.fallback_path()
        assert path is not None and self.fallback_dir is not None
        self.fallback_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        free = shutil.disk_usage(self.fallback_dir).free
        budget = int(self._options.get("disk_budget_bytes", DEFAULT_DISK_BUDGET))
        budget = max(MIN_DISK_BUDGET, min(budget, int(free * FALLBACK_SHARE)))
        capacity = int(self._options.get("capacity_events", 1_000_000))
        capacity = max(1, min(capacity, budget // BYTES_PER_EVENT_ESTIMATE))
        options = dict(self._options, disk_budget_bytes=budget, capacity_events=capacity)
        fb = Journal(path, **options)
        fb.set_meta("fallback_for", str(self.real_path.absolute()))
        if fb.meta("fallback_for") != str(self.real_path.absolute()):
            fb.close()
            raise JournalError(f"{path} is the fallback of another journal; left as it is")
        return fb

    # --- alarms -------------------------------------------------------------------

    def _alarm(self, active: bool, detail: str) -> dict:
        return make_record(
            "alarm", self._clock(), self._boot or "unknown", kind="journal_readonly",
            active=active, detail=detail[:1000],
        )

    def _raise_alarm(self, fb: Journal) -> list[dict]:
        self._alarm_raised = True
        return fb.commit([self._alarm(True, (
            f"{self.real_path.parent} is read-only: the SD card is failing. Records go to a "
            f"fallback journal in {self.fallback_dir} (kept across restarts of the agent, lost "
            "on a power cut or reboot); replace the card"
        ))])

    def _clear_alarm(self, real: Journal, why: str) -> list[dict]:
        if not self._alarm_raised:
            return []
        self._alarm_raised = False
        return real.commit([self._alarm(False, f"{self.real_path}: {why}")])

    # --- the gate thread ------------------------------------------------------------

    def commit(self, records: list[dict]) -> list[dict]:
        """Journal.commit on the journal in use (switching first if due)."""
        out = self._adopt()
        done = self._active.commit(records)
        if self._active.readonly and not self._on_fallback:
            done = self._fail_over(done)
        return out + done

    def maintenance(self, now_wall: float) -> list[dict]:
        """Journal.maintenance, switching and folding the fallback in when due."""
        out = self._adopt()
        out += self._active.maintenance(now_wall)
        if self._active.readonly and not self._on_fallback:
            out = self._fail_over(out)
        if self._draining is not None and not self._on_fallback:
            self._draining.maintenance(now_wall)  # its acknowledgements, applied
            self._fold_step(self._active, out=out)
        return out

    def set_disk_budget(self, disk_budget_bytes: int) -> int:
        return self._active.set_disk_budget(disk_budget_bytes)

    def _fail_over(self, out: list[dict]) -> list[dict]:
        """The real journal's filesystem refuses writes: move to the fallback."""
        real = self._active
        if self.fallback_dir is None:
            return out  # records wait in real's memory buffer (alarm journal_readonly raised)
        now = time.monotonic()
        if self._fallback_failed_at is not None and now - self._fallback_failed_at < self._retry_s:
            return out
        if self._draining is not None:  # read-only again while folding the fallback in
            fb, self._draining = self._draining, None
        else:
            try:
                fb = self._open_fallback()
            except (JournalError, OSError, ValueError) as exc:
                self._fallback_failed_at = now
                log.error(
                    "journal %s: read-only, and no fallback journal in %s (%s); records wait "
                    "in memory",
                    self.real_path,
                    self.fallback_dir,
                    exc,
                )
                return out
        taken = real.take_buffer()
        kept = [r for r in taken if not _readonly_alarm(r)]  # the fallback raises its own
        moved = fb.commit(kept)
        renumbered = _match(kept, moved)
        copies = {id(r) for r in renumbered.values()}
        taken_ids = {id(r) for r in taken}
        # This call's records under their new ids (earlier ones moved too, already reported),
        # then the fallback's own records.
        out = [renumbered[id(r)] for r in out if id(r) in renumbered] + [
            r for r in out if id(r) not in taken_ids
        ]
        out += [r for r in moved if id(r) not in copies]
        if not self._alarm_raised:
            out += self._raise_alarm(fb)
        self._active = fb
        self._on_fallback = True
        self._retired.append(real)
        if self._sync_started:
            fb.start_sync_thread()
        self._start_retry()
        log.error(
            "journal %s: the filesystem went read-only; %d record(s) waiting in memory moved to "
            "the fallback journal %s (%s), where records go until the card takes writes again",
            self.real_path,
            len(kept),
            fb.path,
            fb.id,
        )
        return out

    def _adopt(self) -> list[dict]:
        """Switch back to the real journal once the retry thread reopened it."""
        real = self._ready
        if real is None:
            return []
        self._ready = None
        fb = self._active
        self._active = real
        self._on_fallback = False
        self._draining = fb
        self._fold_grace_until = time.monotonic() + FOLD_GRACE_S
        if self._sync_started:
            real.start_sync_thread()
        log.warning(
            "journal %s takes writes again: records go there; the fallback %s is copied in",
            self.real_path,
            fb.id,
        )
        return self._clear_alarm(real, "the card takes writes again; the fallback journal is copied in")

    def _fold_step(self, real: Journal, *, at_start: bool = False, out: list | None = None) -> bool:
        """Copy a batch of the fallback's unacknowledged records into the real
        journal; delete the fallback once none is left and the copies are
        durable. False when nothing could be done now."""
        fb = self._draining
        assert fb is not None
        if real.blocked is not None:
            return False  # the real journal cannot write either: wait
        upto = real.absorbed_upto(fb.id)
        offered_unacked = fb.offered_seq() > max(fb.acked_seq(), upto)
        if offered_unacked and not at_start and time.monotonic() < self._fold_grace_until:
            return False  # the server may acknowledge these yet: copying them would send them twice
        batch = fb.unacknowledged(upto, FOLD_BATCH)
        if batch:
            copied = real.absorb(fb.id, batch, batch[-1]["seq"])
            if out is not None:
                out.extend(copied)
            return True
        if at_start:
            real.sync()
        elif real.synced_seq() < real.committed_seq():
            return False  # the sync thread makes the copies durable first
        self._draining = None
        fb.close()
        for p in fb.files():
            p.unlink(missing_ok=True)
        log.warning("fallback journal %s (%s) folded into %s and removed", fb.path, fb.id, self.real_path)
        return False

    # --- the retry thread -------------------------------------------------------------

    def _start_retry(self) -> None:
        if self._retry is not None and self._retry.is_alive():
            return
        self._stop.clear()
        self._retry = threading.Thread(target=self._retry_loop, name="journal-retry", daemon=True)
        self._retry.start()

    def _retry_loop(self) -> None:
        while not self._stop.wait(self._retry_s):
            try:
                self._retry_once()
            except Exception:  # never let the thread die: the card is tried again later
                log.exception("journal %s: retrying the card failed", self.real_path)

    def _retry_once(self) -> None:
        while self._retired:
            self._retired.pop().abandon()
        if not self._on_fallback or self._ready is not None:
            return
        if readonly_dir(_existing(self.real_path.parent)):
            return
        try:
            real = Journal(self.real_path, **self._options)
        except (JournalError, OSError) as exc:
            note = str(exc)
            if note != self._retry_note:
                log.error("journal %s: the card takes writes but the journal does not open: %s",
                          self.real_path, exc)
                self._retry_note = note
            return
        self._retry_note = ""
        if real.recovered_record is not None:
            log.error("journal %s was rebuilt on reopening: %s", self.real_path, real.recovered_record)
        self._ready = real

    # --- the uplink and telemetry -------------------------------------------------------

    @property
    def id(self) -> str:
        return self._active.id

    @property
    def path(self) -> Path:
        return self._active.path

    @property
    def on_fallback(self) -> bool:
        """Records go to the fallback journal (the card is read-only)."""
        return self._on_fallback

    @property
    def readonly(self) -> bool:
        return self._on_fallback or self._active.readonly

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[dict]:
        return self._active.pending(after_seq, limit)

    def ack_upto(self, journal_id: str, seq: int) -> bool:
        """The journal in use, or the fallback being folded in (its records
        acknowledged now need no copy)."""
        draining = self._draining
        if draining is not None and journal_id == draining.id:
            return draining.ack_upto(journal_id, seq)
        return self._active.ack_upto(journal_id, seq)

    def ack_one(self, seq: int) -> bool:
        return self._active.ack_one(seq)

    def backlog(self) -> int:
        draining = self._draining
        return self._active.backlog() + (draining.backlog() if draining is not None else 0)

    def oldest_pending_age_s(self, now_wall: float) -> float | None:
        ages = [self._active.oldest_pending_age_s(now_wall)]
        draining = self._draining
        if draining is not None:
            ages.append(draining.oldest_pending_age_s(now_wall))
        ages = [a for a in ages if a is not None]
        return max(ages) if ages else None

    def stats(self) -> dict:
        out = self._active.stats()
        draining = self._draining
        out["fallback"] = self._on_fallback
        out["folding"] = draining.backlog() if draining is not None else 0
        return out

    def sync(self) -> int:
        return self._active.sync()

    def checkpoint(self) -> None:
        self._active.checkpoint()

    # --- threads, closing ---------------------------------------------------------------

    def start_sync_thread(self) -> None:
        self._sync_started = True
        self._active.start_sync_thread()
        if self._draining is not None:
            self._draining.start_sync_thread()
        if self._on_fallback:
            self._start_retry()

    def stop(self) -> None:
        self._stop.set()
        if self._retry is not None:
            self._retry.join(timeout=max(5.0, 2 * self._retry_s))
            self._retry = None
        for j in (self._active, self._draining):
            if j is not None:
                j.stop()

    def close(self) -> None:
        """Close every journal (gate thread). A fallback not yet folded in stays
        in the runtime directory for the next start."""
        self.stop()
        for j in (self._ready, self._draining):
            if j is not None:
                j.close()
        self._ready = self._draining = None
        while self._retired:
            self._retired.pop().abandon()
        self._active.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else (tests, tools) is the journal in use's.
        if name.startswith("__") or name == "_active":
            raise AttributeError(name)
        return getattr(self._active, name)

    def __repr__(self) -> str:
        where = "fallback" if self._on_fallback else "real"
        return f"FailoverJournal({str(self.real_path)!r}, {where}: {self._active!r})"


def fallback_path(journal_path: str | os.PathLike[str], runtime_dir: str | os.PathLike[str]) -> Path:
    """The fallback journal of the journal at journal_path (named after it, so
    two journals never share one)."""
    try:  # CPython's own SHA-1, the same digest as hashlib's without mapping OpenSSL (~3 MB) at start
        from _sha1 import sha1
    except ImportError:
        from hashlib import sha1
    tag = sha1(str(Path(journal_path).absolute()).encode()).hexdigest()[:10]
    return Path(runtime_dir) / f"journal-fallback-{tag}.db"


def _readonly_alarm(rec: dict) -> bool:
    return rec.get("type") == "alarm" and rec.get("kind") == "journal_readonly"


def _match(kept: list[dict], moved: list[dict]) -> dict[int, dict]:
    """id(old record) -> its renumbered copy; the copies come in order, some
    may have been refused for capacity, the journal's own records follow."""
    out: dict[int, dict] = {}
    j = 0
    for new in moved:
        body = {k: v for k, v in new.items() if k not in ("id", "seq")}
        while j < len(kept):
            old = kept[j]
            j += 1
            if {k: v for k, v in old.items() if k not in ("id", "seq")} == body:
                out[id(old)] = new
                break
        else:
            break
    return out
