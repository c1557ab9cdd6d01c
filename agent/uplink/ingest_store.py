"""Where the reference ingest keeps events: SQLite (default) or PostgreSQL.

Both stores hold the same two tables (see docs/ingest.md):

* ``events``: one row per event ``id`` (the gate's ``{journal}:{seq}``), with
  the journal, seq, site, gate, type, ts and the record as received;
* ``journals``: per journal, ``upto``, the highest seq up to which every
  event is stored. It is written in the same transaction as the events, so a
  restarted ingest acks from where the last one stopped.

``insert(rows)`` stores a batch in one transaction, skips ids already held
(``INSERT OR IGNORE`` / ``ON CONFLICT (id) DO NOTHING``), advances ``upto``
for every journal touched, commits, and only then returns the marks the
caller may ack. Several ingests may write one database side by side: SQLite
serialises them with ``BEGIN IMMEDIATE``, PostgreSQL with a row lock on each
journal's mark, so no two writers compute a mark from each other's half.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("agent.uplink.ingest")

# Seqs are SQL BIGINTs on both sides; a larger one is a malformed record.
MAX_SEQ = 2**63 - 1


class StoreError(RuntimeError):
    """The ingest database cannot be opened or written."""


class Row(NamedTuple):
    """One parsed event, as stored."""

    id: str
    journal: str
    seq: int
    site: str
    gate: str
    type: str | None
    ts: str | None
    body: str  # the record's JSON text as the gate sent it


class Mark(NamedTuple):
    """A journal's contiguous mark after a commit: what an ack may promise."""

    site: str
    gate: str
    upto: int


@dataclass
class Stored:
    """What one committed ``insert`` did."""

    new: int = 0  # rows inserted (the rest were duplicates or foreign)
    marks: dict[str, Mark] = field(default_factory=dict)  # per journal touched
    foreign: int = 0  # rows refused: their journal belongs to another gate


class Store(Protocol):
    """The interface both stores implement."""

    url: str  # for messages: the path or the DSN with any password removed

    def insert(self, rows: list[Row]) -> Stored: ...

    def events(self, site: str | None = None, gate: str | None = None) -> list[dict]: ...

    def upto(self, journal: str) -> int: ...

    def close(self) -> None: ...


def redact(url: str) -> str:
    """The DSN without its password, fit for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(db_url: str | Path) -> Store:
    """Open the store a URL names.

    ``postgresql://...`` (or ``postgres://``) opens PostgreSQL; ``sqlite:///rel.db``,
    ``sqlite:////abs/path.db`` or a plain path opens SQLite.
    """
    text = str(db_url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(text)
    if scheme == "sqlite":
        path = text[len("sqlite:///"):] if text.lower().startswith("sqlite:///") else ""
        if not path:
            raise StoreError(
                f"cannot read the database URL {text!r}; write sqlite:///relative.db or "
                "sqlite:////absolute/path.db"
            )
        return SqliteStore(path)
    if scheme:
        raise StoreError(
            f"the database URL {redact(text)!r} has scheme {scheme!r}; the ingest stores in SQLite "
            "(a path or sqlite:///path) or PostgreSQL (postgresql://user@host/db)"
        )
    return SqliteStore(text)


def _where(site: str | None, gate: str | None, mark: str) -> tuple[str, list[Any]]:
    where, args = [], []
    if site is not None:
        where.append(f"site = {mark}")
        args.append(site)
    if gate is not None:
        where.append(f"gate = {mark}")
        args.append(gate)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _own_rows(rows: list[Row], owners: dict[str, tuple[str, str]]) -> tuple[list[Row], int]:
    """The rows whose journal belongs to the gate whose topic they came on.

    A journal belongs to the first gate that sent it (``owners``: what the
    database already holds; a journal new to it is claimed by its first row
    here). A gate's broker identity may write only its own topics, but journal
    ids are public: without this, gate A could store ``B's-journal:n`` first and
    the real event would be dropped as a duplicate, yet acknowledged."""
    owners = dict(owners)
    kept = []
    for r in rows:
        owner = owners.setdefault(r.journal, (r.site, r.gate))
        if owner == (r.site, r.gate):
            kept.append(r)
        else:
            log.warning("ingest: refused %s from %s/%s: journal %s belongs to %s/%s",
                        r.id, r.site, r.gate, r.journal, *owner)
    return kept, len(rows) - len(kept)


def _marks_wanted(rows: list[Row]) -> list[tuple[str, str, str]]:
    # Sorted: every writer takes the journals' locks in one order, so none deadlock.
    latest: dict[str, tuple[str, str]] = {}
    for r in rows:
        latest[r.journal] = (r.site, r.gate)
    return [(j, *latest[j]) for j in sorted(latest)]


# --- SQLite ---------------------------------------------------------------------------

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    journal TEXT NOT NULL,
    seq INTEGER NOT NULL,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    type TEXT,
    ts TEXT,
    body JSON NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_journal_seq ON events(journal, seq);
CREATE INDEX IF NOT EXISTS events_site_gate ON events(site, gate);
CREATE TABLE IF NOT EXISTS journals (
    journal TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    upto INTEGER NOT NULL DEFAULT 0
);
"""


class SqliteStore:
    """One SQLite file (WAL); several ingests may share it."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.url = self.path
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: an ack promises the events are stored, so the commit must be on disk
            # before it is sent (NORMAL in WAL mode may lose the last commits at a power cut).
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open the ingest database {self.path!r} ({exc}); check the path and its permissions"
            ) from exc
        self._db = db

    def insert(self, rows: list[Row]) -> Stored:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")  # other ingests on this file wait; upto stays consistent
            try:
                journals = sorted({r.journal for r in rows})
                owners = {j: (s, g) for j, s, g in db.execute(
                    f"SELECT journal, site, gate FROM journals WHERE journal IN ({','.join('?' * len(journals))})",
                    journals)}
                rows, foreign = _own_rows(rows, owners)
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO events(id, journal, seq, site, gate, type, ts, body) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                done = Stored(new=db.total_changes - before, foreign=foreign)
                for journal, site, gate in _marks_wanted(rows):
                    done.marks[journal] = Mark(site, gate, self._advance(journal, site, gate))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path!r} failed: {exc}") from exc
        return done

    def _advance(self, journal: str, site: str, gate: str) -> int:
        """Move the journal's contiguous mark over the seqs now stored."""
        db = self._db
        row = db.execute("SELECT upto FROM journals WHERE journal = ?", (journal,)).fetchone()
        upto = row[0] if row else 0
        while True:
            seqs = [s for (s,) in db.execute(
                "SELECT seq FROM events WHERE journal = ? AND seq > ? ORDER BY seq LIMIT 1000",
                (journal, upto),
            )]
            moved = False
            for s in seqs:
                if s != upto + 1:
                    break
                upto, moved = s, True
            if not moved or len(seqs) < 1000 or seqs[-1] != upto:
                break
        db.execute(
            "INSERT INTO journals(journal, site, gate, upto) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(journal) DO UPDATE SET upto = excluded.upto",
            (journal, site, gate, upto),
        )
        return upto

    def events(self, site: str | None = None, gate: str | None = None) -> list[dict]:
        where, args = _where(site, gate, "?")
        # A separate connection: readers never wait for (or disturb) the writer.
        with sqlite3.connect(self.path, timeout=30) as db:
            rows = db.execute(f"SELECT body FROM events{where} ORDER BY journal, seq", args)
            return [json.loads(body) for (body,) in rows]

    def upto(self, journal: str) -> int:
        with sqlite3.connect(self.path, timeout=30) as db:
            row = db.execute("SELECT upto FROM journals WHERE journal = ?", (journal,)).fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        self._db.close()


# --- PostgreSQL -----------------------------------------------------------------------

# body is `json`, not `jsonb`: it keeps the record's text as the gate sent it and
# accepts every string JSON can carry (jsonb refuses \u0000, which would make one
# record block its whole batch forever). Cast to jsonb in queries that need it.
POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    journal TEXT NOT NULL,
    seq BIGINT NOT NULL,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    type TEXT,
    ts TEXT,
    body JSON NOT NULL,
    UNIQUE (journal, seq)
);
CREATE INDEX IF NOT EXISTS events_site_gate ON events(site, gate);
CREATE TABLE IF NOT EXISTS journals (
    journal TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    upto BIGINT NOT NULL DEFAULT 0
);
"""

# The end of the contiguous run that starts right after the mark (each step is
# one probe of the (journal, seq) index); NULL when seq upto+1 is missing.
_PG_RUN_END = """
WITH RECURSIVE run(seq) AS (
    SELECT seq FROM events WHERE journal = %(j)s AND seq = %(upto)s + 1
    UNION ALL
    SELECT e.seq FROM events e JOIN run ON e.journal = %(j)s AND e.seq = run.seq + 1
)
SELECT max(seq) FROM run
"""


def _psycopg():
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(
            "PostgreSQL needs the psycopg package; install it with "
            "`pip install 'gate-agent[postgres]'` (or `pip install 'psycopg[binary]'`)"
        ) from exc
    return psycopg


class PostgresStore:
    """A PostgreSQL database (psycopg 3); several ingests may share it.

    The writer keeps one connection and reopens it after a failure; readers
    (``events``, ``upto``) use their own, so they never wait for the writer.
    """

    # Two writers can still meet in a deadlock or a serialization failure
    # (PostgreSQL picks a victim); the batch is then simply tried again.
    RETRIES = 3

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self.url = redact(dsn)
        self.connect_timeout_s = connect_timeout_s
        self._pg = _psycopg()
        self._db = self._connect()
        try:
            with self._db.transaction():
                # One schema creator at a time: two ingests starting together would
                # otherwise race on CREATE TABLE IF NOT EXISTS.
                self._db.execute("SELECT pg_advisory_xact_lock(hashtext('gate-agent ingest schema'))")
                # Tables a DBA made beforehand are used as they are: the user then
                # needs no CREATE right (CREATE ... IF NOT EXISTS still checks it).
                (have,) = self._db.execute(
                    "SELECT to_regclass('events') IS NOT NULL AND to_regclass('journals') IS NOT NULL"
                ).fetchone()
                if not have:
                    self._db.execute(POSTGRES_SCHEMA)
        except self._pg.Error as exc:
            self._db.close()
            raise StoreError(
                f"cannot create the ingest tables in {self.url} ({exc}); the user needs "
                "CREATE on its schema (or have the tables created as shown in docs/ingest.md)"
            ) from exc
        self._read_lock = threading.Lock()
        self._reader = None

    def _connect(self):
        pg = self._pg
        try:
            return pg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s)
        except pg.Error as exc:
            raise StoreError(
                f"cannot connect to the ingest database {self.url} ({str(exc).strip()}); check that "
                "PostgreSQL runs there, the database exists and the user may log in "
                "(a password goes in ~/.pgpass or PGPASSWORD, not on the command line)"
            ) from exc

    def insert(self, rows: list[Row]) -> Stored:
        pg = self._pg
        # Sorted by (journal, seq): two writers holding overlapping batches wait on
        # each other's ids in one order, never in a cycle.
        rows = sorted(rows, key=lambda r: (r.journal, r.seq))
        for attempt in range(1, self.RETRIES + 1):
            try:
                if self._db.closed or self._db.broken:
                    self._db = self._connect()
                return self._insert(rows)
            except (pg.errors.DeadlockDetected, pg.errors.SerializationFailure) as exc:
                if attempt == self.RETRIES:
                    raise StoreError(f"writing to {self.url} failed {attempt} times: {exc}") from exc
            except pg.Error as exc:
                raise StoreError(f"writing to {self.url} failed: {str(exc).strip()}") from exc
        raise AssertionError("unreachable")

    def _insert(self, rows: list[Row]) -> Stored:
        db = self._db
        with db.transaction(), db.cursor() as cur:
            journals = sorted({r.journal for r in rows})
            owners = {j: (s, g) for j, s, g in cur.execute(
                "SELECT journal, site, gate FROM journals WHERE journal = ANY(%s)", (journals,)).fetchall()}
            rows, foreign = _own_rows(rows, owners)
            done = Stored(foreign=foreign)
            # executemany pipelines the batch (one round trip); rowcount sums the rows.
            cur.executemany(
                "INSERT INTO events(id, journal, seq, site, gate, type, ts, body) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                rows,
            )
            done.new = max(cur.rowcount, 0)
            for journal, site, gate in _marks_wanted(rows):
                cur.execute(
                    "INSERT INTO journals(journal, site, gate) VALUES (%s, %s, %s) "
                    "ON CONFLICT (journal) DO NOTHING",
                    (journal, site, gate),
                )
                # The row lock makes another ingest's commit for this journal visible
                # before we look: READ COMMITTED takes a fresh snapshot per statement,
                # so the scan below sees every event a writer before us committed.
                (upto,) = cur.execute(
                    "SELECT upto FROM journals WHERE journal = %s FOR UPDATE", (journal,)
                ).fetchone()
                (end,) = cur.execute(_PG_RUN_END, {"j": journal, "upto": upto}).fetchone()
                if end is not None:
                    upto = end
                cur.execute("UPDATE journals SET upto = %s WHERE journal = %s", (upto, journal))
                done.marks[journal] = Mark(site, gate, upto)
        # Leaving the transaction block committed it: the marks may now be acked.
        return done

    def _read(self, sql: str, args: Any) -> list[tuple]:
        pg = self._pg
        with self._read_lock:
            try:
                if self._reader is None or self._reader.closed or self._reader.broken:
                    self._reader = self._connect()
                return self._reader.execute(sql, args).fetchall()
            except pg.Error as exc:
                raise StoreError(f"reading from {self.url} failed: {str(exc).strip()}") from exc

    def events(self, site: str | None = None, gate: str | None = None) -> list[dict]:
        where, args = _where(site, gate, "%s")
        # body::text: parse it ourselves, the same way as the SQLite store does.
        rows = self._read(f"SELECT body::text FROM events{where} ORDER BY journal, seq", args)
        return [json.loads(body) for (body,) in rows]

    def upto(self, journal: str) -> int:
        rows = self._read("SELECT upto FROM journals WHERE journal = %s", (journal,))
        return rows[0][0] if rows else 0

    def close(self) -> None:
        self._db.close()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
