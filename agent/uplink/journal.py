"""The journal: every record the gate makes, numbered and kept on disk until
the regional side confirmed it (docs/design.md, principle 2; docs/contract.md,
"Delivery").

How the gate thread is kept from waiting:

* One writer. Only the gate thread writes the events database (``commit``,
  ``maintenance``, ``close``). The uplink reads it on its own connection; in
  WAL mode readers never block the writer. The one wait: while the sync
  thread has the WAL start over (below, "The WAL stays small").
* Acknowledgements stay in memory until the gate thread applies them.
  ``ack_upto`` raises a watermark (one int) and ``ack_one`` appends to a
  ``deque`` (atomic append/popleft: no lock is shared with the gate thread);
  the uplink's own view hides acknowledged records from ``pending`` and
  ``backlog`` at once. ``maintenance()``, which the gate thread calls when
  idle, writes them to the events table (``commit`` does so first when the
  journal is full). Chosen over a second "acks" database: no second file, no
  write on the uplink's hot path; a crash before ``maintenance`` only re-sends
  those records, and ids are stable so the server de-duplicates.
* No fsync on the gate thread. ``synchronous=NORMAL`` in WAL mode writes each
  commit to the WAL without fsync, which survives kill -9. Automatic
  checkpoints are off (a checkpoint fsyncs); a background thread fsyncs the
  WAL and checkpoints every ``sync_interval_s``, so a power cut loses at most
  that window (plus one fsync).
* A seq never names two different records on the server: ``pending`` offers
  only records already fsynced (it syncs first, on the uplink's thread, when
  needed; at most one extra fsync per 0.1 s while the sync thread runs, since
  an fsync slows the gate's WAL writes in the kernel). After a power cut the
  journal numbers on from the last durable seq, and nobody saw the records
  that were lost.

The WAL stays small. Every commit appends its pages (about 13 KB for one
record) to the WAL, and a checkpoint can fold the WAL into the database but
only the next write can make it start over, and only if nothing was appended
since the checkpoint began: under sustained commits (the gate writing
back to back) a PASSIVE checkpoint never catches up, and the WAL grew by
every commit (over 1 GB in a 5 s benchmark). So the gate looks at the WAL's
size every few transactions (one stat; more often near the limit) and,
once it passes half of ``wal_limit_bytes`` (default: an eighth of the disk
budget, at most 64 MiB), wakes the sync thread. That folds it in with a
PASSIVE checkpoint (the gate keeps writing), then runs a RESTART checkpoint
under ``_wal_lock``, a lock the gate takes around each of its write
transactions: the gate waits only while the tail written meanwhile is
copied and fsynced (milliseconds; ``stats()["max_wal_reset_s"]``),
never gets SQLITE_BUSY, and its next commit writes the WAL from the start,
over the same blocks (``journal_size_limit`` is the limit: the file keeps
the size it reached, room the budget reserves anyway, and no block is
allocated again; how much of it is in use is read from the wal-index
header, see ``_wal_frames``). That
checkpoint fsynced the database after folding everything in, so it also
advances the durable seq. Should the WAL still reach its limit, the gate
waits (at most GATE_WAIT_S) for the sync thread to empty it. The uplink's
reads are single statements (or a short transaction in ``backlog``), so
they delay a restart by at most RESET_READER_WAIT_MS. A reader that holds a
read transaction open (a technician's ``sqlite3`` shell, a stuck tool)
pins the WAL: nothing after its snapshot can be folded in. Then the WAL
stops at its limit, not past it: the gate numbers records and keeps them in
memory (``WAL_FULL``, the same path and ``journal_capacity`` alarm as a full
disk; like those, they die with the process), the sync thread tries again
every RESET_RETRY_S, and once the reader lets go the WAL is emptied and the
records written. Likewise, without an alarm, if a restart holds the gate off
longer than GATE_WAIT_S (an fsync that slow means a failing card). Without
the sync thread (tools, tests) nothing bounds the WAL: call ``checkpoint``.

Capacity and a full disk never make ``commit`` raise and never leave a gap in
the seqs (the contract promises none): a record that cannot be kept is refused
before it is numbered, counted, and reported by ``journal.overflow`` once space
returns. Low-value types (``LOW_VALUE_TYPES``) are refused from 90 % of the
capacity (and of the memory buffer), so access and passage records keep the
last 10 %; those are kept up to the hard cap ``capacity_events``. The
journal's own records (alarms, overflow, recovered) are always kept.

A full disk (``SQLITE_FULL``; ``disk_budget_bytes`` is enforced with
``PRAGMA max_page_count``, so an exhausted budget looks the same; the budget
covers the database and its WAL: the database gets the budget less
``wal_limit_bytes``) or any other write failure: records are numbered and
wait, in order, in a bounded memory buffer, written on the next ``commit``
or ``maintenance``. Buffered records are
not offered to the uplink until written, so if the process dies first their
seqs are reused safely. While the disk is full, acknowledged records are
deleted at once instead of kept for the retention period.

The marks: the journal's id and high-water marks (last durable seq, the
acknowledgement watermark) are also kept outside the database, in
``<name>.marks`` beside it (``journal.marks`` for ``journal.db``: not matched
by ``journal.db*``). The sync thread rewrites them after each fsync (a
temporary file renamed over the old one; the gate thread never writes them),
so they never claim more than the database durably holds.

At open the journal checks, in this order: a database file missing or empty
(with marks or a WAL left: ``missing``/``emptied``); SQLite's
``integrity_check`` (``quick_check`` on large files: ``damaged``); its tables,
id and state row (``incomplete``); and against the marks: another journal's
file (``replaced``), a file that ends before the last durable seq
(``rolled_back``), rows gone between the watermark and that seq
(``rows_missing``). Any of these: the pending records still readable are
copied into a new journal (new id, seqs from 1, ``salvaged_from`` keeps the old
id) built beside the old file; the old files are renamed
``<name>.corrupt-<UTC stamp>`` (never deleted), the new one takes its place,
and it holds a ``journal.recovered`` record (cause, salvaged, lost, old id).
Records are read from the file's pages (``agent.uplink.sqlite_pages``: SQLite's
own ``.recover`` needs a library Debian does not ship), SQLite's reader if that
fails.

Marks missing beside a sound database (an agent older than them, or removed
by hand): the database is trusted and the marks written anew. Marks damaged
likewise, logged. Marks missing *and* no database: a first start. Marks
damaged and no database: a journal existed and nothing says how much it held:
``journal.recovered`` with ``lost`` null.

The reading of a damaged file (the salvage, the marks file) lives in
``agent.uplink.salvage``. What stays here is one class, ``Journal``, of some
1,400 lines on purpose: its parts (the gate's writes, the WAL's limit, the
uplink's reads and acknowledgements, the sync thread's checkpoints, the
switch to a fallback journal) share one set of counters, watermarks and
locks, and the rules above hold only between them; split, every piece
would reach into the others' state.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Self
from urllib.parse import quote

from agent.core.events import Now
from agent.core.records import make_record
from agent.fileio import fsync_dir
from agent.host import boot_id

from .salvage import (
    MARKS_FORMAT,
    SALVAGE_CHUNK,
    _Marks,
    _marks_path,
    _read_marks,
    _salvage_into,
    _side,
    _Ticker,
    _type_of,
)

__all__ = [
    "BYTES_PER_EVENT_ESTIMATE",
    "DEFAULT_DISK_BUDGET",
    "LOW_VALUE_TYPES",
    "READ_ONLY",
    "Journal",
    "JournalError",
    "readonly_dir",
]

log = logging.getLogger(__name__)

# Records that give way first when the journal (or the memory buffer) is full.
LOW_VALUE_TYPES: frozenset[str] = frozenset(
    {"telemetry", "reader.error", "reader.status", "acl.requested"}
)

# Disk bytes one pending event takes (row, JSON body, index entries), with a
# margin: a typical access.granted measures about 330 bytes (tests/test_journal.py).
BYTES_PER_EVENT_ESTIMATE = 450
# 1,000,000 pending events need about 330 MB; the default leaves room to spare.
DEFAULT_DISK_BUDGET = 1 << 30

ALARM_ON_SHARE = 0.8  # alarm journal_capacity when the backlog passes this
ALARM_OFF_SHARE = 0.7  # and clear it when it falls below this
LOW_VALUE_SHARE = 0.9  # low-value records are refused from this share on
FULL_CHECK_MAX_BYTES = 32 << 20  # integrity_check up to this size, quick_check above
PURGE_BATCH = 2000  # rows deleted per maintenance call: bounds the gate's pause
ACK_BATCH = 2000  # rows marked acknowledged per call, for the same reason
PENDING_SYNC_GAP_S = 0.1  # pending() adds at most one fsync per this while the sync thread runs
MIN_DISK_BUDGET = 64 << 10
# The WAL (see the module docstring, "The WAL stays small").
WAL_LIMIT_MAX = 64 << 20  # the default WAL limit: an eighth of the disk budget, at most this
WAL_LIMIT_MIN = 256 << 10  # and at least this (a few dozen commits)
WAL_RESET_SHARE = 2  # the sync thread has the WAL start over past limit / this
WAL_WAIT_STEP_S = 0.1  # a gate waiting at the WAL's limit wakes the sync thread again this often
WAL_STAT_EVERY = 16  # the gate looks at it every this many write transactions (one stat)
WAL_TXN_PAGES = 8  # the gate stops short of the limit by this many WAL frames
RESET_READER_WAIT_MS = 20  # a restarting checkpoint waits at most this for the uplink's reads
RESET_RETRY_S = 0.25  # after a reader kept the WAL from starting over, the next try waits this
GATE_WAIT_S = 1.0  # the gate waits at most this for a restarting checkpoint, then buffers

_SQLITE_CORRUPT = 11
# What SQLite answers when the filesystem refuses a write (EROFS): then the directory is probed.
_MAYBE_READ_ONLY = frozenset({8, 10, 14})  # SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL,   -- high-water mark: seqs are never reused
    pending INTEGER NOT NULL,    -- rows with done IS NULL (the uplink reads it)
    acked_upto INTEGER NOT NULL, -- watermark applied to the table (salvage uses it)
    cap_alarm INTEGER NOT NULL,  -- the capacity alarm is active
    overflow TEXT NOT NULL       -- dropped counts not yet reported, JSON or ''
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    wall REAL NOT NULL,          -- the record's ts as epoch seconds
    done REAL,                   -- NULL while pending; retention counts from it
    body TEXT NOT NULL           -- the record as JSON, with id and seq
);
CREATE INDEX IF NOT EXISTS ev_pending ON events(seq) WHERE done IS NULL;
CREATE INDEX IF NOT EXISTS ev_done ON events(done) WHERE done IS NOT NULL;
"""

_INSERT = "INSERT INTO events (seq, type, wall, body) VALUES (?, ?, ?, ?)"
_STATE = (
    "UPDATE state SET last_seq = ?, pending = ?, acked_upto = ?, cap_alarm = ?, overflow = ? "
    "WHERE id = 1"
)


READ_ONLY = "read-only filesystem"  # Journal.stats()["blocked"] when the disk refuses writes
# Journal.stats()["blocked"] while the WAL is at its limit (a reader holds an old snapshot).
WAL_FULL = "WAL full"
_PROBE_NAME = ".gate-agent-probe"


def readonly_dir(directory: Path) -> bool:
    """Whether the filesystem holding ``directory`` refuses writes (an SD card the
    kernel remounted read-only after errors). The mount flag first; then a probe
    file, since some kernels mark such a filesystem only inside (ext4's
    emergency read-only state is not in statvfs)."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    probe = directory / f"{_PROBE_NAME}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    except OSError as exc:
        return exc.errno == errno.EROFS
    try:
        os.write(fd, b"x")
    except OSError as exc:
        return exc.errno == errno.EROFS
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass
    return False


class JournalError(RuntimeError):
    """The journal cannot be opened or used; the message says what to do."""


class _WalBusy(sqlite3.OperationalError):
    """The gate waited GATE_WAIT_S for a checkpoint restarting the WAL."""


def _system_clock() -> Now:
    # Only when the runtime passes no clock: this one cannot know NTP state.
    return Now(mono=time.monotonic(), wall=time.time(), synced=False)


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _is_full(exc: BaseException) -> bool:
    code = _code(exc)
    return code == _SQLITE_FULL if code is not None else "full" in str(exc)


def _is_corrupt(exc: BaseException) -> bool:
    code = _code(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return not isinstance(exc, sqlite3.OperationalError)


def _wall_of(rec: dict) -> float:
    ts = rec.get("ts")
    if isinstance(ts, str):
        try:
            return datetime.fromisoformat(ts).timestamp()
        except ValueError:
            pass
    return time.time()


def _db_files(path: Path) -> list[Path]:
    return [path, _side(path, "-wal"), _side(path, "-shm")]


def _create_private(path: Path) -> None:
    """Create an empty file readable by the service user only (personal data)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def _chmod_private(path: Path) -> None:
    for p in _db_files(path):
        try:
            if p.stat().st_mode & 0o777 != 0o600:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass




def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _setup_writer(conn: sqlite3.Connection, path: Path, wal_keep: int = WAL_LIMIT_MAX) -> None:
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(
            f"the journal {path} cannot use WAL mode (got {mode!r}); put it on a local "
            "filesystem that supports shared memory (not NFS or a FUSE mount)"
        )
    conn.execute("PRAGMA synchronous=NORMAL")  # no fsync at commit in WAL mode
    conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints (fsync) only off the gate thread
    # A WAL that starts over is cut back to this (it keeps its blocks up to it).
    conn.execute(f"PRAGMA journal_size_limit={int(wal_keep)}")


def _new_db(conn: sqlite3.Connection, journal_id: str) -> None:
    conn.executescript(_SCHEMA)
    conn.execute("BEGIN")
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('journal_id', ?)", (journal_id,))
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', '1')")
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('holes', '0')")
    conn.execute("INSERT OR IGNORE INTO state VALUES (1, 0, 0, 0, 0, '')")
    conn.execute("COMMIT")


def _new_journal_id() -> str:
    # secrets.token_hex(5) without importing secrets (hmac, hashlib: OpenSSL mapped at start).
    return os.urandom(5).hex()  # 10 hex digits; fits the contract's id pattern


class Journal:
    """The SQLite journal of one gate.

    Gate thread: ``commit``, ``maintenance``, ``set_disk_budget``, ``close``
    (and ``start_sync_thread``/``stop``). Uplink and telemetry (any other
    thread): ``pending``, ``ack_upto``, ``ack_one``, ``backlog``,
    ``oldest_pending_age_s``, ``stats``, ``sync``, ``checkpoint``; these take the uplink's own
    lock and connection, so keep them off the gate thread.

    ``clock`` gives the time for the journal's own records (alarms, overflow,
    recovered); pass the runtime's, which knows whether the clock is
    synchronised. ``boot`` defaults to the kernel's boot id.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync_interval_s: float = 1.0,
        capacity_events: int = 1_000_000,
        disk_budget_bytes: int = DEFAULT_DISK_BUDGET,
        retention_days: float = 30,
        memory_buffer: int = 10_000,
        wal_limit_bytes: int | None = None,
        clock: Callable[[], Now] | None = None,
        boot: str | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        if not sync_interval_s > 0:
            raise ValueError(
                f"sync_interval_s={sync_interval_s!r}: give a positive number of seconds"
            )
        if capacity_events < 1:
            raise ValueError(f"capacity_events={capacity_events!r}: give at least 1")
        if memory_buffer < 1:
            raise ValueError(f"memory_buffer={memory_buffer!r}: give at least 1")
        if not retention_days > 0:
            raise ValueError(f"retention_days={retention_days!r}: give a positive number of days")
        need = capacity_events * BYTES_PER_EVENT_ESTIMATE
        if disk_budget_bytes < max(need, MIN_DISK_BUDGET):
            raise ValueError(
                f"disk_budget_bytes={disk_budget_bytes} cannot hold capacity_events={capacity_events} "
                f"(about {BYTES_PER_EVENT_ESTIMATE} bytes each): raise the budget to at least "
                f"{max(need, MIN_DISK_BUDGET)} or lower capacity_events"
            )
        if wal_limit_bytes is None:
            wal_limit_bytes = max(WAL_LIMIT_MIN, min(WAL_LIMIT_MAX, disk_budget_bytes // 8))
        if not WAL_LIMIT_MIN <= wal_limit_bytes <= max(WAL_LIMIT_MIN, disk_budget_bytes // 2):
            raise ValueError(
                f"wal_limit_bytes={wal_limit_bytes}: give at least {WAL_LIMIT_MIN} and at most "
                f"half the disk budget ({disk_budget_bytes // 2})"
            )
        self.path = Path(path)
        self._tmp_path = _side(self.path, ".salvage")
        self._marks_path = _marks_path(self.path)
        self._wal_path = _side(self.path, "-wal")
        self._sync_interval = float(sync_interval_s)
        self._capacity = int(capacity_events)
        self._low_cap = max(1, int(capacity_events * LOW_VALUE_SHARE))
        self._alarm_on = capacity_events * ALARM_ON_SHARE
        self._alarm_off = capacity_events * ALARM_OFF_SHARE
        self._budget = int(disk_budget_bytes)
        self._wal_limit = int(wal_limit_bytes)
        self._wal_reset_at = max(WAL_LIMIT_MIN // 2, self._wal_limit // WAL_RESET_SHARE)
        self._retention_s = float(retention_days) * 86400.0
        self._memory_buffer = int(memory_buffer)
        self._buf_low_cap = max(1, int(memory_buffer * LOW_VALUE_SHARE))
        self._clock = clock or _system_clock
        self._boot = boot or boot_id()
        self._progress = progress

        self.id = ""
        self.recovered_record: dict | None = None
        self._previous: str | None = None  # the journal this one replaced (meta previous_journal)
        self._marks_written: tuple | None = None
        self._marks_failing = False
        self._absorb_marks: dict[str, int] = {}  # meta rows written with the next rows (absorb)
        self._offered = 0  # highest seq pending() returned (ack_one accepts no higher)
        self._closed = False
        # Gate-thread state (other threads only read these ints).
        self._last_seq = 0  # last seq handed out
        self._committed_seq = 0  # every seq <= this is written to the WAL
        self._db_pending = 0  # rows with done IS NULL
        self._applied_wm = 0  # ack watermark written to the table
        self._applied_gen = 0  # ack_one entries up to this generation are written
        self._oldest_done: float | None = None
        self._buffer: list[tuple[dict, tuple, bool]] = []  # (record, row, own) waiting for the disk
        self._blocked: str | None = None  # why writes fail: "disk full", ...
        self._blocked_alarm: str | None = None  # the alarm raised for it
        self._cap_alarm = False
        self._dropped: dict[str, int] = {}  # refused since the last overflow record
        self._dropped_total = 0
        self._state_dirty = False  # state row behind memory (drop counts)
        # Uplink state: guarded by _ulock, which the gate thread never takes.
        self._ulock = threading.Lock()
        self._uconn: sqlite3.Connection | None = None
        self._u_wm = 0  # everything <= this is acknowledged (or not pending)
        self._u_singles: dict[int, int] = {}  # seq -> generation, acknowledged one by one
        self._u_gen = 0
        self._u_pruned = (0, 0)
        self._acks: deque[tuple[int, int]] = deque()  # (generation, seq) for the gate thread
        # Sync.
        self._sync_lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        # Held by the gate around each write transaction and by the sync thread
        # while a checkpoint has the WAL start over (the only time the gate waits).
        self._wal_lock = threading.Lock()
        self._wal_txns = 0  # gate: write transactions since it last looked at the WAL's size
        self._wal_full = False  # gate: the WAL reached its limit; records wait in memory
        self._wal_stat_every = 0  # gate: transactions until it looks at the WAL's size again
        self._wal_seen_max = 0  # the largest WAL size seen (sync thread and gate)
        self._wal_resets = 0  # checkpoints that had the WAL start over
        self._wal_pinned = 0  # restarts a reader's snapshot (or a foreign writer) prevented
        self._wal_pinned_logged = False
        self._wal_busy_waits = 0  # gate: commits that found the WAL lock held past GATE_WAIT_S
        self._reset_not_before = 0.0
        self._wal_wanted = False  # gate: waiting at the WAL's limit for the sync thread
        self._wal_pinned_now = False  # the last restart failed: a reader's snapshot
        self._wal_kick = threading.Event()  # set after each restart the sync thread tries
        self._wal_poke = threading.Event()  # the gate wakes the sync thread: the WAL is big
        self._shm_fd: int | None = None  # the -shm file, read for the WAL's frame count
        self._max_reset_s = 0.0  # the longest a restarting checkpoint held the gate off
        self._ckpt_conn: sqlite3.Connection | None = None
        self._synced_seq = 0
        self._syncs = 0
        self._sync_errors = 0
        self._sync_failing = False
        self._last_sync_s = 0.0
        self._max_sync_s = 0.0
        self._last_sync_at = 0.0
        self._sync_gap = min(PENDING_SYNC_GAP_S, self._sync_interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        self._open()

    # --- open, recover ------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        adopted = self._settle_salvage()
        marks, marks_note = _read_marks(self._marks_path)
        if marks_note:
            log.warning("journal %s: %s", self.path, marks_note)
        finding = self._diagnose(marks, marks_note)
        if finding is not None:
            cause, problem = finding
            try:
                self._rebuild(cause, problem, marks)
            except (sqlite3.Error, OSError) as exc:
                raise JournalError(
                    f"the journal {self.path} is damaged ({problem}) and could not be rebuilt: "
                    f"{exc}; free disk space or fix permissions in {self.path.parent} and restart "
                    "(the damaged file is left as it was)"
                ) from exc
        if not self.path.exists():
            _create_private(self.path)
        conn = None
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=2000")
            _setup_writer(conn, self.path, self._wal_limit)
            _new_db(conn, _new_journal_id())
            conn.execute("PRAGMA busy_timeout=0")  # from now on a lock never makes the gate wait
        except (sqlite3.Error, JournalError) as exc:
            if conn is not None:
                conn.close()  # not left holding the file (a read-only card must unmount)
            if isinstance(exc, JournalError):
                raise
            raise JournalError(
                f"cannot open the journal {self.path}: {exc}; check that the service user can "
                f"write {self.path.parent} and that no other gate-agent uses this journal"
            ) from exc
        self._db = conn
        self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        self.set_disk_budget(self._budget)
        self.id = conn.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]
        row = conn.execute("SELECT value FROM meta WHERE key = 'previous_journal'").fetchone()
        self._previous = row[0] if row else None
        last, pending, acked, cap_alarm, overflow = conn.execute(
            "SELECT last_seq, pending, acked_upto, cap_alarm, overflow FROM state WHERE id = 1"
        ).fetchone()
        actual = conn.execute(
            "SELECT count(*) FROM events INDEXED BY ev_pending WHERE done IS NULL"
        ).fetchone()[0]
        top = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        self._last_seq = self._committed_seq = max(last, top)
        self._db_pending = actual
        self._applied_wm = acked
        if actual != pending or self._last_seq != last:
            log.warning(
                "journal %s: state corrected (pending %d, last seq %d)",
                self.path,
                actual,
                self._last_seq,
            )
            conn.execute(
                "UPDATE state SET pending = ?, last_seq = ? WHERE id = 1", (actual, self._last_seq)
            )
        self._cap_alarm = bool(cap_alarm)
        if overflow:
            try:
                self._dropped = {str(k): int(v) for k, v in json.loads(overflow)["kinds"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                self._dropped = {}
        self._refresh_oldest_done()
        if self.recovered_record is None and adopted:
            self.recovered_record = self._load_recovered()
        _chmod_private(self.path)
        fsync_dir(self.path.parent)
        self.sync()  # what a killed predecessor left in the WAL is durable from here on

    def _settle_salvage(self) -> bool:
        """Finish or discard a rebuild that a crash interrupted."""
        tmp = self._tmp_path
        if not tmp.exists():
            return False
        if not self.path.exists() and not _side(tmp, "-wal").exists():
            # The damaged file was moved aside; the finished salvage takes its place.
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            return True
        for p in _db_files(tmp):
            p.unlink(missing_ok=True)  # an unfinished copy: the damaged original is still there
        return False

    def _load_recovered(self) -> dict | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'recovered_seq'").fetchone()
        if row is None:
            return None
        body = self._db.execute("SELECT body FROM events WHERE seq = ?", (int(row[0]),)).fetchone()
        return json.loads(body[0]) if body else None

    def _diagnose(self, marks: _Marks | None, marks_note: str) -> tuple[str, str] | None:
        """(cause, what is wrong) when the journal on disk is not the one the
        marks describe or not sound; None when it is (or when there is none
        and nothing says there was one: a first start)."""
        p = self.path
        size = p.stat().st_size if p.exists() else None
        wal_size = self._wal_path.stat().st_size if self._wal_path.exists() else 0
        if not size:
            cause = "missing" if size is None else "emptied"
            what = "missing" if size is None else "empty"
            if wal_size:
                return cause, f"the database file is {what} but its write-ahead log was left"
            if marks is not None:
                return cause, (
                    f"the database file is {what}, but journal {marks.journal} had records up to "
                    f"seq {marks.last_seq} ({marks.last_seq - marks.acked_upto} not acknowledged)"
                )
            if marks_note.startswith("marks damaged"):
                return cause, f"the database file is {what} and its marks file is unreadable"
            return None  # a first start
        problem = self._check_integrity()
        if problem is not None:
            return "damaged", problem
        return self._check_shape(marks)

    def _check_shape(self, marks: _Marks | None) -> tuple[str, str] | None:
        """The schema, the journal id and the marks against a file SQLite calls sound."""
        conn = sqlite3.connect(
            f"file:{quote(str(self.path))}?mode=ro", uri=True, isolation_level=None
        )
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
            }
            if not tables and marks is None:
                return None  # created, never written: a first start
            missing = sorted({"meta", "state", "events"} - tables)
            if missing:
                return "incomplete", f"table(s) {', '.join(missing)} missing"
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            jid = meta.get("journal_id")
            if not isinstance(jid, str) or not jid:
                return "incomplete", "its journal id is missing"
            state = conn.execute(
                "SELECT last_seq, acked_upto FROM state WHERE id = 1"
            ).fetchone()
            if state is None:
                return "incomplete", "its state row is missing"
            if marks is None or marks.journal == meta.get("previous_journal"):
                return None  # nothing to compare, or a rebuild whose marks were not yet written
            if marks.journal != jid:
                return "replaced", (
                    f"the file holds journal {jid}, but journal {marks.journal} was in use "
                    f"(records up to seq {marks.last_seq})"
                )
            top = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
            last = max(int(state[0]), int(top))
            if last < marks.last_seq:
                return "rolled_back", (
                    f"it ends at seq {last}, but seq {marks.last_seq} had been made durable"
                )
            wm = max(int(state[1]), marks.acked_upto)
            if marks.last_seq > wm:
                have = conn.execute(
                    "SELECT count(*) FROM events WHERE seq > ? AND seq <= ?", (wm, marks.last_seq)
                ).fetchone()[0]
                try:  # records acknowledged out of order and deleted on a full disk
                    holes = int(meta.get("holes", 0))
                except ValueError:
                    holes = 0
                gone = marks.last_seq - wm - have - holes
                if gone > 0:
                    return "rows_missing", (
                        f"{gone} record(s) between seq {wm + 1} and {marks.last_seq} are missing"
                    )
            return None
        finally:
            conn.close()

    def _check_integrity(self) -> str | None:
        """None when the file is sound, else what is wrong with it."""
        p = self.path
        size = p.stat().st_size
        check = "integrity_check" if size <= FULL_CHECK_MAX_BYTES else "quick_check"
        try:
            conn = sqlite3.connect(str(p), isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                rows = conn.execute(f"PRAGMA {check}").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            if _is_corrupt(exc):
                return str(exc)
            raise JournalError(
                f"cannot check the journal {p}: {exc}; check that the service user can write "
                f"{p.parent} and that no other gate-agent uses this journal"
            ) from exc
        if rows == [("ok",)]:
            return None
        return "; ".join(str(r[0]) for r in rows[:5]) or "integrity check failed"

    def _rebuild(self, cause: str, problem: str, marks: _Marks | None) -> None:
        """Salvage what the journal on disk still holds into a new journal, move
        the old files aside (never deleted) and put the new one in place."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while any(p.exists() for p in _db_files(dest)):
            dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        present = [p for p in _db_files(self.path) if p.exists()]
        log.error(
            "journal %s: %s (%s); salvaging it into a new journal%s",
            self.path,
            cause,
            problem,
            f", then moving it to {dest}" if present else "",
        )
        tmp = self._tmp_path
        for p in _db_files(tmp):
            p.unlink(missing_ok=True)
        _create_private(tmp)
        new = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            _setup_writer(new, tmp)
            jid = _new_journal_id()
            _new_db(new, jid)
            new.execute("BEGIN")  # one transaction: a crash leaves no half salvage
            tick = _Ticker(self._progress)
            found = _salvage_into(new, self.path, self._wal_path, marks, tick)
            seq = 0
            rows: list[tuple] = []
            for rec in found.pending():
                seq += 1
                orig = rec.get("id")
                rec = {k: v for k, v in rec.items() if k not in ("id", "seq")}
                d = {"id": f"{jid}:{seq}", "seq": seq, **rec}
                if isinstance(orig, str):
                    d["salvaged_from"] = orig
                rows.append(self._row(d))
                if len(rows) >= SALVAGE_CHUNK:
                    new.executemany(_INSERT, rows)
                    rows = []
                    tick()
            new.executemany(_INSERT, rows)
            found.drop()
            salvaged = seq
            rec = make_record(
                "journal.recovered",
                self._clock(),
                self._boot,
                moved_to=str(dest) if present else None,
                salvaged=salvaged,
                lost=found.lost,
                old_journal=found.old_id,
                cause=cause,
                method=found.method,
            )
            seq += 1
            d = {"id": f"{jid}:{seq}", "seq": seq, **rec}
            new.execute(_INSERT, self._row(d))
            new.execute(_STATE, (seq, seq, 0, 0, ""))
            new.execute("INSERT OR REPLACE INTO meta VALUES ('recovered_seq', ?)", (str(seq),))
            if found.old_id is not None:
                new.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('previous_journal', ?)", (found.old_id,)
                )
            new.execute("COMMIT")
        finally:
            new.close()  # last connection: checkpoints and removes its WAL
        # The damaged WAL moves first: a WAL left behind must never meet the new file.
        for suffix in ("-wal", "-shm", ""):
            src = _side(self.path, suffix)
            if src.exists():
                os.replace(src, _side(dest, suffix))
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.recovered_record = d
        log.error(
            "journal %s rebuilt as %s (%s, read by %s): %d record(s) salvaged, lost %s%s",
            self.path,
            jid,
            cause,
            found.method,
            salvaged,
            found.lost,
            f", old files kept at {dest}" if present else "",
        )

    # --- the gate thread ------------------------------------------------------

    def commit(self, records: list[dict]) -> list[dict]:
        """Number the records and journal them, in one transaction; return them.

        Each returned dict is the record with ``id`` and ``seq`` added (a new
        dict; the input is not changed). Records refused for capacity are left
        out (counted, and reported later by ``journal.overflow``); records the
        journal adds itself (``alarm`` journal_capacity, ``journal.overflow``)
        follow in the list. Never raises for a full journal or disk, never
        waits for an fsync or for the uplink.
        """
        self._check_open()
        fresh: list[tuple[dict, tuple, bool]] = []
        for rec in records:
            if self._admit(rec, len(fresh)):
                fresh.append(self._prepare(rec, own=False))
        out = self._store(fresh)
        out.extend(self._after_write())
        return out

    def maintenance(self, now_wall: float) -> list[dict]:
        """Gate thread, when idle: write buffered records, apply the uplink's
        acknowledgements, purge acknowledged records past retention. Returns
        the records the journal committed itself. Cheap when there is
        nothing to do."""
        self._check_open()
        out: list[dict] = []
        if self._buffer:
            out.extend(self._store([]))
        if self._u_wm > self._applied_wm or self._acks:
            freed = self._apply_acks(now_wall)
            if freed and self._buffer:
                out.extend(self._store([]))  # the acknowledged rows made room
        if self._oldest_done is not None and self._oldest_done < now_wall - self._retention_s:
            self._purge(now_wall - self._retention_s)
        out.extend(self._after_write())
        return out

    def set_disk_budget(self, disk_budget_bytes: int) -> int:
        """Change the disk budget (gate thread); returns the budget in force.

        The budget covers the database file and its WAL: the database may use
        the budget less the WAL's limit (``wal_limit_bytes``). SQLite will not
        shrink below the current file, so a budget smaller than the file stops
        growth where it is.
        """
        self._budget = int(disk_budget_bytes)
        # At least half: under 512 KiB the WAL's floor (WAL_LIMIT_MIN) comes on top.
        db_bytes = max(self._budget - self._wal_limit, self._budget // 2)
        pages = max(1, db_bytes // self._page_size)
        got = self._db.execute(f"PRAGMA max_page_count={pages}").fetchone()[0]
        if got > pages:
            log.warning(
                "journal %s is %d bytes, over its disk budget of %d bytes (less %d for the WAL); "
                "it will not grow",
                self.path,
                got * self._page_size,
                self._budget,
                self._wal_limit,
            )
        return got * self._page_size

    def _stored(self) -> int:
        return self._db_pending + len(self._buffer)

    def _wal_size(self) -> int:
        try:
            return self._wal_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _wal_frames(self) -> tuple[int, int] | None:
        """(frames in the WAL, frames folded into the database), read from the
        wal-index header in the -shm file (https://www.sqlite.org/walformat.html,
        "The wal-index header": mxFrame at byte 16, nBackfill at byte 96, native
        byte order). The WAL file itself is kept at its size when the WAL
        starts over (no new blocks to allocate: cheaper fsyncs), so its size
        says how big the WAL got, not how big it is. None if unreadable."""
        fd = self._shm_fd
        if fd is None:
            try:
                fd = self._shm_fd = os.open(_side(self.path, "-shm"), os.O_RDONLY)
            except OSError:
                return None
        try:
            head = os.pread(fd, 100, 0)
        except OSError:
            return None
        if len(head) < 100:
            return None
        version, _u, _c, init, _e, _p, frames = struct.unpack_from("=IIIBBHI", head, 0)
        if version != 3007000 or not init:
            return None
        return frames, struct.unpack_from("=I", head, 96)[0]

    def _wal_bytes(self) -> int:
        """How much of the WAL file is in use (its size if the header cannot be read)."""
        got = self._wal_frames()
        return self._wal_size() if got is None else 32 + got[0] * (self._page_size + 24)

    def _wal_wait(self) -> bool:
        """Gate thread, the WAL at its limit: wait (at most GATE_WAIT_S) for the
        sync thread to empty it, unless it just found a reader's snapshot in
        the way or the gate already holds records in memory for that. True
        when the gate may write again."""
        if self._wal_full:
            return False
        deadline = time.monotonic() + GATE_WAIT_S
        self._wal_wanted = True
        try:
            while self._wal_at_limit():
                left = deadline - time.monotonic()
                if left <= 0 or self._wal_pinned_now:
                    return False
                self._wal_kick.clear()
                self._wal_poke.set()
                if self._wal_at_limit():
                    self._wal_kick.wait(min(left, WAL_WAIT_STEP_S))
            return True
        finally:
            self._wal_wanted = False

    def _wal_at_limit(self) -> bool:
        """Gate thread: whether the WAL reached its limit (less room for one
        transaction of WAL_TXN_PAGES pages). One stat every WAL_STAT_EVERY
        write transactions, more often as the room left shrinks, every time
        at the end (the sync thread has it start over at half, unless a
        reader's snapshot prevents it)."""
        if self._thread is None or self._wal_txns < self._wal_stat_every:
            return False  # without the sync thread nothing could empty it: see checkpoint
        self._wal_txns = 0
        size = self._wal_bytes()
        if size > self._wal_reset_at:
            self._wal_poke.set()  # the sync thread has it start over
        txn = WAL_TXN_PAGES * (self._page_size + 24)
        room = self._wal_limit - size - txn
        self._wal_stat_every = max(0, min(WAL_STAT_EVERY, room // txn - 1))
        return room <= 0

    def _wal_small(self) -> bool:
        """Gate thread: the WAL is below the point where it starts over, so a
        big transaction (acknowledgements, a purge: up to thousands of rows)
        cannot take it to its limit. Those wait otherwise (in memory; a
        crash only re-sends acknowledged records)."""
        if self._thread is None:
            return True
        return not self._wal_full and self._wal_bytes() <= self._wal_reset_at

    def _acks_waiting(self) -> bool:
        return self._u_wm > self._applied_wm or bool(self._acks)

    def _admit(self, rec: dict, extra: int) -> bool:
        """Whether one more record fits; refused records are counted, never numbered."""
        rtype = _type_of(rec)
        low = rtype in LOW_VALUE_TYPES
        limit = self._low_cap if low else self._capacity
        if self._stored() + extra >= limit and self._acks_waiting():
            self._apply_acks(self._clock().wall)  # room the server already gave back
        if self._stored() + extra >= limit or (
            self._buffer
            and len(self._buffer) + extra >= (self._buf_low_cap if low else self._memory_buffer)
        ):
            self._dropped[rtype] = self._dropped.get(rtype, 0) + 1
            self._dropped_total += 1
            self._state_dirty = True
            return False
        return True

    def _row(self, d: dict) -> tuple:
        return (
            d["seq"],
            _type_of(d),
            _wall_of(d),
            json.dumps(d, separators=(",", ":"), default=str),
        )

    def _prepare(self, rec: dict, own: bool) -> tuple[dict, tuple, bool]:
        self._last_seq += 1
        seq = self._last_seq
        if "id" in rec or "seq" in rec:
            rec = {k: v for k, v in rec.items() if k not in ("id", "seq")}
        d = {"id": f"{self.id}:{seq}", "seq": seq, **rec}
        return (d, self._row(d), own)

    def _state_args(self, last_seq: int, pending: int, acked_upto: int) -> tuple:
        # last_seq: only seqs already written, so a crash never leaves a gap.
        overflow = ""
        if self._dropped:
            overflow = json.dumps({"dropped": sum(self._dropped.values()), "kinds": self._dropped})
        return (last_seq, pending, acked_upto, int(self._cap_alarm), overflow)

    def _txn(self, body: Callable[[sqlite3.Connection], None]) -> BaseException | None:
        """Run body in one write transaction; the sqlite error, or None.

        Under ``_wal_lock``: the sync thread holds it only while a checkpoint
        has the WAL start over (a few milliseconds: the tail of the WAL and two
        fsyncs); past GATE_WAIT_S the gate gives up (``_WalBusy``)."""
        if not self._wal_lock.acquire(timeout=GATE_WAIT_S):
            self._wal_busy_waits += 1
            return _WalBusy("a checkpoint is restarting the WAL")
        try:
            return self._txn_locked(body)
        finally:
            self._wal_lock.release()

    def _txn_locked(self, body: Callable[[sqlite3.Connection], None]) -> BaseException | None:
        conn = self._db
        self._wal_txns += 1
        try:
            conn.execute("BEGIN")
            try:
                body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            return exc
        return None

    def _store(self, items: list[tuple[dict, tuple, bool]]) -> list[dict]:
        """Write the buffer and the new items, in seq order; buffer them on failure."""
        if not items and not self._buffer:
            if self._state_dirty or self._absorb_marks:  # drop counts, absorb marks alone
                marks = dict(self._absorb_marks)

                def state(conn: sqlite3.Connection) -> None:
                    conn.execute(
                        _STATE, self._state_args(self._last_seq, self._db_pending, self._applied_wm)
                    )
                    for key, upto in marks.items():
                        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(upto)))

                self._state_dirty = self._txn(state) is not None
                if not self._state_dirty:
                    self._marks_stored(marks)
            return []
        if self._wal_at_limit() and not self._wal_wait():
            if not self._wal_full:
                log.error(
                    "journal %s: its WAL reached its limit of %d bytes and has not started over "
                    "(a reader holds an old snapshot, or the disk is slow); records wait in memory",
                    self.path,
                    self._wal_limit,
                )
            self._wal_full = True
            self._blocked = WAL_FULL
            self._buffer.extend(items)
            return [it[0] for it in items]
        if self._wal_full:
            log.warning("journal %s: its WAL started over; writing again", self.path)
            self._wal_full = False
        rows = [it[1] for it in self._buffer] + [it[1] for it in items]
        pending = self._db_pending + len(rows)

        marks = dict(self._absorb_marks)

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(_INSERT, rows)
            conn.execute(_STATE, self._state_args(self._last_seq, pending, self._applied_wm))
            for key, upto in marks.items():  # with the copies themselves (see absorb)
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(upto)))

        exc = self._txn(write)
        if exc is None:
            self._marks_stored(marks)
            self._state_dirty = False
            self._db_pending = pending
            self._committed_seq = self._last_seq  # nothing numbered is left unwritten
            if self._buffer:
                log.warning(
                    "journal %s: %d buffered record(s) written", self.path, len(self._buffer)
                )
                self._buffer.clear()
            self._blocked = None
        elif isinstance(exc, _WalBusy):
            # Not a fault: a restarting checkpoint took longer than GATE_WAIT_S (a slow
            # fsync); the records are written with the next commit or maintenance.
            self._buffer.extend(items)
        else:
            if _is_full(exc):
                reason = "disk full"
            elif _code(exc) in _MAYBE_READ_ONLY and readonly_dir(self.path.parent):
                reason = READ_ONLY
            else:
                reason = f"write failed: {exc}"
            if self._blocked is None:
                log.error("journal %s: %s; records wait in memory", self.path, reason)
            self._blocked = reason
            self._buffer.extend(items)
        return [it[0] for it in items]

    def _marks_stored(self, marks: dict[str, int]) -> None:
        for key, upto in marks.items():
            if self._absorb_marks.get(key) == upto:
                del self._absorb_marks[key]

    def _alarm(self, active: bool, detail: str, kind: str = "journal_capacity") -> dict:
        return make_record(
            "alarm",
            self._clock(),
            self._boot,
            kind=kind,
            active=active,
            detail=detail,
        )

    def _blocked_kind(self, reason: str) -> str:
        return "journal_readonly" if reason == READ_ONLY else "journal_capacity"

    def _after_write(self) -> list[dict]:
        """The journal's own records for the state it is now in."""
        own: list[dict] = []
        if self._blocked is not None and (
            self._blocked_alarm is None
            or self._blocked_kind(self._blocked_alarm) != self._blocked_kind(self._blocked)
        ):
            if self._blocked_alarm is not None:  # the other alarm now: clear the old one
                kind = self._blocked_kind(self._blocked_alarm)
                own.append(self._alarm(False, self._blocked_alarm, kind))
            self._blocked_alarm = self._blocked
            detail = self._blocked
            if self._blocked == WAL_FULL:
                detail = (
                    f"the journal's WAL reached its limit ({self._wal_limit} bytes) and has not "
                    f"started over: a reader holds an old snapshot of {self.path} (close it) or "
                    "the disk is slow; records wait in memory"
                )
            elif self._blocked == READ_ONLY:
                detail = (
                    f"{self.path.parent} is read-only (the SD card is failing): records wait in "
                    "memory; replace the card"
                )
            own.append(self._alarm(True, detail, self._blocked_kind(self._blocked)))
        elif self._blocked is None and self._blocked_alarm is not None:
            kind = self._blocked_kind(self._blocked_alarm)
            own.append(self._alarm(False, f"{self._blocked_alarm}: writable again", kind))
            self._blocked_alarm = None
        stored = self._stored()
        if not self._cap_alarm and stored > self._alarm_on:
            self._cap_alarm = True
            own.append(self._alarm(True, f"backlog {stored} of {self._capacity}"))
        elif self._cap_alarm and stored < self._alarm_off:
            self._cap_alarm = False
            own.append(self._alarm(False, f"backlog {stored} of {self._capacity}"))
        if self._dropped and self._blocked is None and stored < self._capacity:
            kinds, self._dropped = self._dropped, {}
            own.append(
                make_record(
                    "journal.overflow",
                    self._clock(),
                    self._boot,
                    dropped=sum(kinds.values()),
                    kinds=kinds,
                )
            )
        if not own:
            return []
        return self._store([self._prepare(r, own=True) for r in own])

    def _apply_acks(self, now_wall: float) -> int:
        """Write the uplink's acknowledgements into the events table, at most
        ACK_BATCH rows a call so the gate thread never pauses long. Not while
        the WAL is past half its limit: they wait in memory rather than grow it."""
        if not self._wal_small():
            return 0
        upto = min(self._u_wm, self._committed_seq)
        if upto > self._applied_wm:
            row = self._db.execute(
                "SELECT seq FROM events INDEXED BY ev_pending WHERE done IS NULL AND seq > ? "
                "AND seq <= ? ORDER BY seq LIMIT 1 OFFSET ?",
                (self._applied_wm, upto, ACK_BATCH - 1),
            ).fetchone()
            if row is not None:
                upto = row[0]  # the rest on the next call
        items: list[tuple[int, int]] = []
        while len(items) < ACK_BATCH:
            try:
                items.append(self._acks.popleft())
            except IndexError:
                break
        singles = sorted({s for _g, s in items if s > upto and s <= self._committed_seq})
        do_upto = upto > self._applied_wm
        new_wm = max(self._applied_wm, upto)
        counted = [0]

        def mark(conn: sqlite3.Connection) -> None:
            n = 0
            if do_upto:
                n += conn.execute(
                    "UPDATE events INDEXED BY ev_pending SET done = min(wall, ?) "
                    "WHERE done IS NULL AND seq <= ?",
                    (now_wall, upto),
                ).rowcount
            if singles:
                n += conn.executemany(
                    "UPDATE events SET done = min(wall, ?) WHERE seq = ? AND done IS NULL",
                    [(now_wall, s) for s in singles],
                ).rowcount
            counted[0] = n
            conn.execute(
                _STATE, self._state_args(self._committed_seq, self._db_pending - n, new_wm)
            )

        def delete(conn: sqlite3.Connection) -> None:
            n = 0
            if do_upto:
                n += conn.execute(
                    "DELETE FROM events INDEXED BY ev_pending WHERE done IS NULL AND seq <= ?",
                    (upto,),
                ).rowcount
            if singles:
                holes = conn.executemany(
                    "DELETE FROM events WHERE seq = ? AND done IS NULL", [(s,) for s in singles]
                ).rowcount
                n += holes
                # Rows gone above the watermark by the journal's own hand (see _check_shape).
                conn.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'holes'",
                    (holes,),
                )
            counted[0] = n
            conn.execute(
                _STATE, self._state_args(self._committed_seq, self._db_pending - n, new_wm)
            )

        # A full disk: acknowledged records go now rather than after retention.
        exc = self._txn(delete if self._blocked == "disk full" else mark)
        if exc is not None and _is_full(exc):
            exc = self._txn(delete)
        if exc is not None:
            log.warning("journal %s: acknowledgements not written yet (%s)", self.path, exc)
            self._acks.extendleft(reversed(items))  # try again later, in order
            return 0
        self._db_pending -= counted[0]
        self._applied_wm = new_wm
        if items:
            self._applied_gen = max(self._applied_gen, max(g for g, _s in items))
        self._refresh_oldest_done()
        return counted[0]

    def _refresh_oldest_done(self) -> None:
        self._oldest_done = self._db.execute(
            "SELECT min(done) FROM events INDEXED BY ev_done WHERE done IS NOT NULL AND seq <= ?",
            (self._applied_wm,),
        ).fetchone()[0]

    def _purge(self, cutoff: float) -> None:
        if not self._wal_small():
            return  # after the WAL starts over
        exc = self._txn(
            lambda conn: conn.execute(
                # Only under the watermark: a record acknowledged out of order stays until the
                # records before it are acknowledged too, so a row missing above the
                # watermark is never the journal's own doing (see _check_shape).
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events INDEXED BY ev_done "
                "WHERE done IS NOT NULL AND done < ? AND seq <= ? LIMIT ?)",
                (cutoff, self._applied_wm, PURGE_BATCH),
            )
        )
        if exc is not None:
            log.warning("journal %s: purge failed (%s); will retry", self.path, exc)
        self._refresh_oldest_done()

    # --- the uplink ---------------------------------------------------------

    def _uplink_conn(self) -> sqlite3.Connection:
        # Called with _ulock held.
        if self._uconn is None:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")  # the uplink may wait; the gate never does
            conn.execute("PRAGMA query_only=1")
            self._uconn = conn
        return self._uconn

    def _prune(self, applied_gen: int) -> None:
        # Called with _ulock held. Entries the gate wrote before applied_gen was
        # read, or that the watermark covers, are no longer needed in memory.
        if self._u_singles and (applied_gen, self._u_wm) != self._u_pruned:
            wm = self._u_wm
            self._u_singles = {
                s: g for s, g in self._u_singles.items() if s > wm and g > applied_gen
            }
            self._u_pruned = (applied_gen, wm)

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[dict]:
        """Records not yet acknowledged with seq > after_seq, in seq order, as
        committed (dicts with id and seq). Only records already fsynced are
        offered: if newer ones exist this syncs first, on the caller's thread
        (waiting up to PENDING_SYNC_GAP_S while the sync thread runs)."""
        self._check_open()
        if limit <= 0:
            return []
        self._make_durable()
        hi = self._synced_seq
        applied = self._applied_gen  # read before the query: see _prune
        out: list[dict] = []
        with self._ulock:
            self._prune(applied)
            wm = self._u_wm
            start = max(int(after_seq), wm)
            singles = self._u_singles
            conn = self._uplink_conn()
            cursor = start
            while len(out) < limit:
                want = limit - len(out)
                rows = conn.execute(
                    "SELECT seq, body FROM events INDEXED BY ev_pending "
                    "WHERE done IS NULL AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                    (cursor, hi, want),
                ).fetchall()
                out.extend(json.loads(body) for seq, body in rows if seq not in singles)
                if len(rows) < want:
                    cursor = hi
                    break
                cursor = rows[-1][0]
            if start == wm:
                # Nothing below the first record offered is pending any more:
                # move the watermark there, so one-by-one acks compact into it.
                top = out[0]["seq"] - 1 if out else cursor
                self._u_wm = max(self._u_wm, top)
            if out:
                self._offered = max(self._offered, out[-1]["seq"])
        return out

    def _make_durable(self) -> None:
        # Offer only what is on disk. An fsync slows the gate's own WAL writes in
        # the kernel, so while the sync thread runs the uplink adds at most one
        # every PENDING_SYNC_GAP_S, waiting (on its own thread) for the slot.
        if self._committed_seq <= self._synced_seq:
            return
        if self._thread is not None:
            wait = self._last_sync_at + self._sync_gap - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                if self._committed_seq <= self._synced_seq:
                    return
        try:
            self.sync()
        except OSError as exc:  # a card gone read-only: offer what is already durable
            self._sync_failed(exc)

    def ack_upto(self, journal_id: str, seq: int) -> bool:
        """Ingest acknowledgement: every record of journal_id with seq <= seq is
        stored by the server. Another journal's ack is ignored (False)."""
        if journal_id != self.id:
            return False
        with self._ulock:
            # The server can hold only what was offered, and only durable records are.
            seq = min(int(seq), self._synced_seq)
            self._u_wm = max(self._u_wm, seq)
        return True

    def ack_one(self, seq: int) -> bool:
        """Broker-mode acknowledgement of one record. False for a seq never
        offered (by ``pending`` in this run): a late PUBACK for a record of the
        journal used before a switch cannot acknowledge one of this journal."""
        seq = int(seq)
        with self._ulock:
            if seq < 1 or seq > max(self._offered, self._u_wm):
                return False
            if seq <= self._u_wm or seq in self._u_singles:
                return True
            if seq == self._u_wm + 1:
                wm = seq
                while wm + 1 in self._u_singles:
                    wm += 1
                self._u_wm = wm
            else:
                self._u_gen += 1
                self._u_singles[seq] = self._u_gen
                self._acks.append((self._u_gen, seq))
        return True

    def backlog(self) -> int:
        """Records committed and not yet acknowledged (memory buffer included)."""
        self._check_open()
        buffered = len(self._buffer)
        applied = self._applied_gen
        with self._ulock:
            self._prune(applied)
            wm = self._u_wm
            singles = sorted(s for s in self._u_singles if s > wm)
            conn = self._uplink_conn()
            conn.execute("BEGIN")  # one snapshot for the counter and the counts
            try:
                total = conn.execute("SELECT pending FROM state WHERE id = 1").fetchone()[0]
                total -= conn.execute(
                    "SELECT count(*) FROM events INDEXED BY ev_pending WHERE done IS NULL AND seq <= ?",
                    (wm,),
                ).fetchone()[0]
                for i in range(0, len(singles), 500):
                    chunk = singles[i : i + 500]
                    total -= conn.execute(
                        "SELECT count(*) FROM events WHERE done IS NULL AND seq IN "
                        f"({','.join('?' * len(chunk))})",
                        chunk,
                    ).fetchone()[0]
            finally:
                conn.execute("COMMIT")
        return total + buffered

    def oldest_pending_age_s(self, now_wall: float) -> float | None:
        """Age of the oldest record not yet acknowledged (by its ts), or None."""
        self._check_open()
        applied = self._applied_gen
        with self._ulock:
            self._prune(applied)
            cursor = self._u_wm
            singles = self._u_singles
            conn = self._uplink_conn()
            while True:
                rows = conn.execute(
                    "SELECT seq, wall FROM events INDEXED BY ev_pending "
                    "WHERE done IS NULL AND seq > ? ORDER BY seq LIMIT 64",
                    (cursor,),
                ).fetchall()
                for seq, wall in rows:
                    if seq not in singles:
                        return max(0.0, now_wall - wall)
                if len(rows) < 64:
                    break
                cursor = rows[-1][0]
        first = self._buffer[:1]
        return max(0.0, now_wall - first[0][1][2]) if first else None

    def stats(self) -> dict:
        """Figures for telemetry and the log."""
        db_bytes = 0
        for p in (self.path, self._wal_path):
            try:
                db_bytes += p.stat().st_size
            except FileNotFoundError:
                pass
        return {
            "journal": self.id,
            "last_seq": self._last_seq,
            "synced_seq": self._synced_seq,
            "backlog": self.backlog(),
            "stored": self._stored(),
            "capacity": self._capacity,
            "buffered": len(self._buffer),
            "memory_buffer": self._memory_buffer,
            "blocked": self._blocked,
            "capacity_alarm": self._cap_alarm,
            "dropped_unreported": sum(self._dropped.values()),
            "dropped_total": self._dropped_total,
            "db_bytes": db_bytes,
            "disk_budget_bytes": self._budget,
            "wal_bytes": self._wal_size(),
            "wal_limit_bytes": self._wal_limit,
            "wal_max_bytes": self._wal_seen_max,
            "wal_resets": self._wal_resets,
            "wal_pinned": self._wal_pinned,
            "wal_busy_waits": self._wal_busy_waits,
            "max_wal_reset_s": self._max_reset_s,
            "sync_interval_s": self._sync_interval,
            "syncs": self._syncs,
            "sync_errors": self._sync_errors,
            "last_sync_s": self._last_sync_s,
            "max_sync_s": self._max_sync_s,
            "recovered": self.recovered_record is not None,
        }

    # --- durability -----------------------------------------------------------

    def sync(self) -> int:
        """fsync the journal files (never on the gate thread); returns the
        highest seq now durable."""
        with self._sync_lock:
            target = self._committed_seq
            t0 = time.monotonic()
            _fsync_file(self._wal_path)
            _fsync_file(self.path)
            took = time.monotonic() - t0
            self._syncs += 1
            self._last_sync_s = took
            self._max_sync_s = max(self._max_sync_s, took)
            self._synced_seq = max(self._synced_seq, target)
            self._last_sync_at = time.monotonic()
            self._write_marks()
            return self._synced_seq

    def _write_marks(self) -> None:
        """Keep the id and high-water marks beside the database (under _sync_lock).

        After the fsync, so the marks never claim more than the database holds
        durably; they may claim less (a power cut can keep the previous file),
        which is safe: they are only compared as a lower bound. Hence no fsync
        of their own: a temporary file renamed over the old one, so a reader
        sees one whole version or the other."""
        now = (self.id, self._synced_seq, self._applied_wm, self._previous)
        if now == self._marks_written or not self.id:
            return
        doc = {
            "format": MARKS_FORMAT,
            "journal": self.id,
            "last_seq": self._synced_seq,
            "acked_upto": min(self._applied_wm, self._synced_seq),
            "previous": self._previous,
        }
        tmp = self._marks_path.with_name(f".{self._marks_path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(doc, separators=(",", ":")) + "\n")
            os.replace(tmp, self._marks_path)
        except OSError as exc:
            if not self._marks_failing:
                log.warning(
                    "journal %s: cannot write its marks %s (%s); retrying after each sync",
                    self.path,
                    self._marks_path,
                    exc.strerror or exc,
                )
                self._marks_failing = True
            return
        if self._marks_failing:
            log.warning("journal %s: marks written again", self.path)
            self._marks_failing = False
        self._marks_written = now

    def start_sync_thread(self) -> None:
        """Sync and checkpoint the WAL every sync_interval_s, and empty it when it
        passes half its limit, off the gate thread."""
        self._check_open()
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._thread.start()

    def _checkpoint_conn(self) -> sqlite3.Connection:
        # Called with _ckpt_lock held.
        if self._ckpt_conn is None:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={RESET_READER_WAIT_MS}")
            conn.execute(f"PRAGMA journal_size_limit={self._wal_limit}")
            # Never OFF: the checkpoint's own fsyncs (the WAL before copying, the database
            # after) make a restart safe and are why it advances the durable seq.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._ckpt_conn = conn
        return self._ckpt_conn

    def checkpoint(self) -> bool:
        """Sync, then fold the WAL into the database file (never on the gate
        thread), and have it start over if it passed half its limit.
        Returns whether it did. The sync thread calls it every
        sync_interval_s; call it after a bulk fill without one."""
        self.sync()
        return self._fold(self._wal_due(retry=True))

    def _wal_due(self, retry: bool = False) -> bool:
        """Sync thread: the WAL passed half its limit and is not yet wholly
        folded in (then the gate's next commit has it start over), or the
        gate waits at its limit."""
        self._wal_seen_max = max(self._wal_seen_max, self._wal_size())
        if not retry and time.monotonic() < self._reset_not_before:
            return False
        if self._wal_full or self._wal_wanted:
            return True  # TRUNCATE: the gate writes nothing that would restart it
        got = self._wal_frames()
        if got is None:
            return self._wal_size() > self._wal_reset_at
        frames, folded = got
        return 32 + frames * (self._page_size + 24) > self._wal_reset_at and folded < frames

    def _fold(self, restart: bool) -> bool:
        """PASSIVE first: it never waits for the gate or the uplink, but under
        sustained writes the gate appends while it copies, so the WAL would
        never start over by itself. Then, if ``restart``, RESTART under
        ``_wal_lock``: the gate is held off while the tail written meanwhile
        is copied and fsynced, and its next commit writes the WAL from the
        start (TRUNCATE instead while the gate waits for a full WAL: that
        empties the file at once). It waits at most RESET_READER_WAIT_MS for
        the uplink's reads (each is one short statement); a reader that holds
        a snapshot longer keeps the WAL from starting over, so the next try
        waits RESET_RETRY_S, and at its limit the gate stops writing (records
        wait in memory: ``WAL_FULL``)."""
        with self._ckpt_lock:
            conn = self._checkpoint_conn()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if not restart:
                return False
            mode = "TRUNCATE" if self._wal_full or self._wal_wanted else "RESTART"
            with self._wal_lock:
                t0 = time.monotonic()
                target = self._committed_seq  # all of it is in the WAL being folded in
                busy = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
                held = time.monotonic() - t0
            self._wal_seen_max = max(self._wal_seen_max, self._wal_size())
            self._max_reset_s = max(self._max_reset_s, held)
            self._wal_pinned_now = bool(busy)
            self._wal_kick.set()
            if busy:
                self._wal_pinned += 1
                self._reset_not_before = time.monotonic() + RESET_RETRY_S
                if not self._wal_pinned_logged:
                    log.warning(
                        "journal %s: a reader holds an old snapshot, the WAL (%d bytes) cannot "
                        "start over; retrying every %.2f s",
                        self.path,
                        self._wal_size(),
                        RESET_RETRY_S,
                    )
                    self._wal_pinned_logged = True
                return False
        self._wal_resets += 1
        if self._wal_pinned_logged:
            log.warning("journal %s: the WAL starts over again", self.path)
            self._wal_pinned_logged = False
        # The checkpoint fsynced the database after folding in every frame: durable.
        with self._sync_lock:
            if target > self._synced_seq:
                self._synced_seq = target
                self._write_marks()
        return True

    def _sync_loop(self) -> None:
        # Asleep until the next sync or until the gate finds the WAL past half its
        # limit: no polling, so an idle gate costs one wake-up per sync_interval_s.
        due = time.monotonic() + self._sync_interval
        while not self._stop.is_set():
            now = time.monotonic()
            if now < self._reset_not_before:  # a reader holds the WAL: pokes wait too
                if self._stop.wait(min(due, self._reset_not_before) - now):
                    break
            else:
                self._wal_poke.wait(max(0.0, due - now))
                self._wal_poke.clear()
                if self._stop.is_set():
                    break
            try:
                if time.monotonic() >= due:
                    due = time.monotonic() + self._sync_interval
                    self.sync()
                    self._fold(self._wal_due())
                elif self._wal_due():
                    self._fold(True)  # its own fsyncs make what it folds in durable
            except (OSError, sqlite3.Error) as exc:
                self._sync_failed(exc)
                self._wal_pinned_now = True  # a gate waiting at the WAL's limit need not wait
                self._wal_kick.set()
            else:
                if self._sync_failing:
                    log.warning("journal %s: sync works again", self.path)
                    self._sync_failing = False

    def _sync_failed(self, exc: BaseException) -> None:
        # Logged once per outage (and every 1000th time): a read-only card fails every second.
        self._sync_errors += 1
        if not self._sync_failing or self._sync_errors % 1000 == 0:
            log.warning(
                "journal %s: sync failed (%s); retrying every %.1f s (%d failures)",
                self.path,
                exc,
                self._sync_interval,
                self._sync_errors,
            )
        self._sync_failing = True

    def stop(self) -> None:
        """Stop the sync thread (idempotent)."""
        self._stop.set()
        self._wal_poke.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self._sync_interval))
            self._thread = None

    def close(self) -> None:
        """Write what waits, apply acknowledgements, sync, close (gate thread)."""
        if self._closed:
            return
        self.stop()
        try:
            now = self._clock().wall
            self.maintenance(now)
            for _ in range(10_000):  # acks are applied in batches; bounded in case writes fail
                if not self._acks_waiting() or self._blocked is not None:
                    break
                self._apply_acks(now)
        except sqlite3.Error as exc:
            log.warning("journal %s: final maintenance failed (%s)", self.path, exc)
        if self._buffer:
            log.error(
                "journal %s closed with %d record(s) still in memory (%s): they are lost",
                self.path,
                len(self._buffer),
                self._blocked,
            )
        try:
            self.sync()
        except OSError as exc:
            self._sync_failed(exc)
        self._closed = True
        self._close_readers()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass
        self._db.close()

    # --- switching journals (agent.uplink.failover) ---------------------------

    @property
    def last_seq(self) -> int:
        """The highest seq this journal has handed out (any thread: one int)."""
        return self._last_seq

    @property
    def readonly(self) -> bool:
        """Writes fail because the filesystem is read-only."""
        return self._blocked == READ_ONLY

    @property
    def blocked(self) -> str | None:
        """Why writes fail ("disk full", READ_ONLY, ...), or None."""
        return self._blocked

    def offered_seq(self) -> int:
        """The highest seq pending() returned in this run."""
        return self._offered

    def acked_seq(self) -> int:
        """Every seq up to this is acknowledged."""
        return max(self._u_wm, self._applied_wm)

    def committed_seq(self) -> int:
        return self._committed_seq

    def synced_seq(self) -> int:
        return self._synced_seq

    def files(self) -> list[Path]:
        """The journal's files: the database, its WAL and shared memory, the marks."""
        return [*_db_files(self.path), self._marks_path]

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Gate thread: a meta value, kept if already set."""
        with self._wal_lock:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))

    def take_buffer(self) -> list[dict]:
        """Gate thread: hand over the records waiting in memory (numbered, never
        written, so never offered) and forget their seqs, which this journal
        will give out again: nobody saw them."""
        recs = [it[0] for it in self._buffer]
        self._buffer.clear()
        self._last_seq = self._committed_seq
        return recs

    def absorb(self, source_id: str, records: list[dict], upto: int) -> list[dict]:
        """Gate thread: copy records of another journal (a fallback) into this
        one, numbered here, each with ``salvaged_from`` its old id. ``upto``
        (the highest source seq copied) is written in the same transaction
        as the copies (meta ``absorbed:<id>``), so a crash never copies one
        twice. Returns the copies and the journal's own records, as commit."""
        self._check_open()
        self._absorb_marks[f"absorbed:{source_id}"] = int(upto)
        items: list[tuple[dict, tuple, bool]] = []
        for rec in records:
            orig = rec.get("id")
            d = {k: v for k, v in rec.items() if k not in ("id", "seq")}
            if isinstance(orig, str):
                d["salvaged_from"] = orig
            if self._admit(d, len(items)):
                items.append(self._prepare(d, own=False))
        out = self._store(items)
        out.extend(self._after_write())
        return out

    def absorbed_upto(self, source_id: str) -> int:
        """The highest seq of journal source_id already copied in (gate thread)."""
        row = self._db.execute(
            "SELECT value FROM meta WHERE key = ?", (f"absorbed:{source_id}",)
        ).fetchone()
        pending = self._absorb_marks.get(f"absorbed:{source_id}")
        return max(int(row[0]) if row else 0, pending or 0)

    def unacknowledged(self, after_seq: int, limit: int) -> list[dict]:
        """Gate thread: written records not acknowledged, seq > after_seq, in
        order (what a journal being folded into another still has to give)."""
        start = max(int(after_seq), self._u_wm, self._applied_wm)
        rows = self._db.execute(
            "SELECT seq, body FROM events INDEXED BY ev_pending WHERE done IS NULL AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (start, limit),
        ).fetchall()
        singles = self._u_singles
        return [json.loads(body) for seq, body in rows if seq not in singles]

    def _close_readers(self) -> None:
        """Close the uplink's and the checkpointer's connections (close, abandon)."""
        with self._ulock:
            if self._uconn is not None:
                self._uconn.close()
                self._uconn = None
        with self._ckpt_lock:
            if self._ckpt_conn is not None:
                self._ckpt_conn.close()
                self._ckpt_conn = None
        fd, self._shm_fd = self._shm_fd, None
        if fd is not None:
            os.close(fd)  # a read still under way fails its version check: the file size is used

    def abandon(self) -> None:
        """Let go of a journal whose disk refuses writes, writing nothing (not on
        the gate thread: closing may touch the failing disk). Take its buffer
        first (take_buffer)."""
        self._stop.set()
        self._wal_poke.set()
        self._closed = True
        self._close_readers()
        try:
            self._db.close()
        except sqlite3.Error:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"the journal {self.path} is closed; open a new Journal")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, id={self.id!r}, last_seq={self._last_seq})"
