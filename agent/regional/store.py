"""Where the reference ingest keeps events: SQLite (default) or PostgreSQL.

Both stores hold the same four tables (see docs/ingest.md):

* ``events``: one row per event ``id`` (the gate's ``{journal}:{seq}``), with
  the journal, seq, site, gate, type, ts and the record as received. Only a
  journal's contiguous prefix is here: every row has ``seq <= upto``.
* ``journals``: per journal, its gate and ``upto``, the highest seq up to
  which every event is stored. It is written in the same transaction as the
  events, so a restarted ingest acks from where the last one stopped.
* ``held``: records that arrived ahead of a gap (seq > upto + 1). They move
  into ``events`` when the gap before them fills; they are never acked while
  held, at most ``hold_max`` wait per gate, none more than ``hold_max`` seqs
  past the mark, and each waits at most ``hold_hours`` (the gate still has
  them, so dropping one loses nothing).
* ``quarantine``: a version of an event id whose content differs from the
  version stored first (a forged record, or a gate cloned from an old SD
  card). Both are kept: the first in ``events`` (or ``held``), this one here.

``insert(rows)`` places a batch in one transaction, per journal under that
journal's lock, commits, and only then returns the marks the caller may ack.
Content is compared canonically (``canonical``): a resend of the same record
is a duplicate whatever its spelling; different content under one id is a
conflict. Several ingests may write one database side by side: SQLite
serialises them with ``BEGIN IMMEDIATE``, PostgreSQL with a row lock on each
journal's mark, so no two writers place one journal's records at once.

Some 940 lines on purpose: one store, two back-ends. SQLite and PostgreSQL
run the same placement (``_place``, over ``_Tx``, which differs only in the
SQL dialect and the journal lock) and the same canonical comparison; each
back-end is a small class at the end. Together, the two cannot drift apart.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

from agent.core.records import rfc3339_ms

log = logging.getLogger("agent.regional.ingest")

# Seqs are SQL BIGINTs on both sides; a larger one is a malformed record.
MAX_SEQ = 2**63 - 1

# A record more than HOLD_MAX seqs past its journal's mark is refused, and a
# gate has at most HOLD_MAX records held (all its journals together). An honest
# gate sends in seq order, so it needs the held table only when records before
# a gap are lost or reordered; a week offline at 30 passages a minute is
# 302,400 records, and even if the first of them is lost the whole backlog fits.
# A refused record is not acked, so the gate sends it again later: the bound
# costs resends, never a record.
HOLD_MAX = 500_000
# A held record older than this is dropped (never acked, so the gate resends it
# if it is real); a forged one far ahead of the gate does not stay for good.
HOLD_HOURS = 24.0

_CHUNK = 500  # ids per IN (...) list: under SQLite's host parameter limit
_PAGE = 1000  # seqs per probe of the rows ahead of a mark


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
    digest: str = ""  # sha256 of canonical(body); the store computes it when it needs it

    def columns(self) -> tuple:
        return (self.id, self.journal, self.seq, self.site, self.gate, self.type, self.ts, self.body)


class Mark(NamedTuple):
    """A journal after a commit: its contiguous mark and what may be acked now."""

    site: str
    gate: str
    upto: int  # every seq up to here is stored (events, or quarantine beside it)
    ack: int = 0  # the ack to send: min(upto, highest seq of this batch's records now stored); 0: none


class Conflict(NamedTuple):
    """A version quarantined: its id was stored first with other content."""

    id: str
    journal: str
    seq: int
    site: str
    gate: str
    first_in: str  # where the first version is: "events", "held" or "batch" (earlier in this batch)


class Refused(NamedTuple):
    """Records of one journal refused in one batch: too far ahead, or the gate's held table full."""

    site: str
    gate: str
    count: int
    first_seq: int
    last_seq: int
    mark: int


class Expired(NamedTuple):
    """Held records of one journal dropped after waiting ``hold_hours`` for their gap."""

    journal: str
    site: str
    gate: str
    count: int
    first_seq: int
    last_seq: int


@dataclass
class Stored:
    """What one committed ``insert`` did, row by row."""

    new: int = 0  # rows that entered events (directly, or moved from held)
    held: int = 0  # rows put in held (ahead of a gap)
    duplicates: int = 0  # rows whose content was already stored under their id
    foreign: int = 0  # rows refused: their journal belongs to another gate
    conflicts: list[Conflict] = field(default_factory=list)  # new versions quarantined
    refused: dict[str, Refused] = field(default_factory=dict)  # per journal: beyond the hold bound
    marks: dict[str, Mark] = field(default_factory=dict)  # per journal touched

    @property
    def ahead(self) -> int:
        return sum(r.count for r in self.refused.values())


class Store(Protocol):
    """The interface both stores implement."""

    url: str  # for messages: the path or the DSN with any password removed

    def insert(self, rows: list[Row]) -> Stored: ...

    def events(self, site: str | None = None, gate: str | None = None) -> list[dict]: ...

    def upto(self, journal: str) -> int: ...

    def conflicts(self, site: str | None = None, gate: str | None = None) -> list[dict]: ...

    def held_count(self, site: str | None = None, gate: str | None = None) -> int: ...

    def expire_held(self, before: str) -> list[Expired]: ...

    def close(self) -> None: ...


# --- canonical content -----------------------------------------------------------------


class _Lit(str):
    """Text already in canonical form (punctuation), as opposed to a JSON string value."""


def _number(d: Decimal) -> str:
    # Exact and context-free: 1, 1.0, 10E-1 and 1e0 are one number; -0 is 0.
    sign, digits, exp = d.as_tuple()
    if not isinstance(exp, int):  # NaN or Infinity: parse_constant stops them first
        raise ValueError("not a finite number")  # noqa: TRY004 - bad JSON, as json.loads says
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return "0"
    stripped = text.rstrip("0")
    exp += len(text) - len(stripped)
    return f"{'-' if sign else ''}{stripped}e{exp}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def canonical(body: str) -> str:
    """One spelling of a JSON text: keys sorted, no blanks, numbers by value.

    Two bodies with the same canonical form are the same record, however a
    gate (or a later version of it) spelled them: key order, blanks, escapes
    (``\\u00e9`` or ``é``) and number forms (``1.0``, ``1``) do not matter;
    ``true`` and ``1``, ``"1"`` and ``1`` stay different. A key given twice
    counts once, with its last value, as JSON parsers read it. Raises
    ValueError for text that is not JSON (NaN, Infinity) and RecursionError
    for absurd nesting. Iterative, so the depth json.loads accepts is fine.
    """
    value = json.loads(body, parse_float=Decimal, parse_int=Decimal, parse_constant=_reject_constant)
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, _Lit):
            out.append(v)
        elif isinstance(v, str) or v is True or v is False or v is None:
            out.append(json.dumps(v))
        elif isinstance(v, Decimal):
            out.append(_number(v))
        elif isinstance(v, dict):
            parts: list[Any] = [_Lit("{")]
            for i, k in enumerate(sorted(v)):
                parts += [_Lit(("," if i else "") + json.dumps(k) + ":"), v[k]]
            parts.append(_Lit("}"))
            stack.extend(reversed(parts))
        elif isinstance(v, list):
            parts = [_Lit("[")]
            for i, x in enumerate(v):
                parts += [_Lit(",")] if i else []
                parts.append(x)
            parts.append(_Lit("]"))
            stack.extend(reversed(parts))
        else:  # pragma: no cover - json.loads makes nothing else
            raise ValueError(f"unexpected JSON value {type(v).__name__}")
    return "".join(out)


def digest(body: str) -> str:
    """sha256 (hex) of the canonical form: equal for the same record, however spelt."""
    return hashlib.sha256(canonical(body).encode("utf-8", "surrogatepass")).hexdigest()


def _digest_of_stored(body: str) -> str:
    # A row stored by an older ingest may hold text canonical() refuses (NaN):
    # compare such a row by its exact text.
    try:
        return digest(body)
    except (ValueError, RecursionError):
        return "text:" + hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


class _Digests:
    """Digests computed only when two versions must be compared: a new record or
    a resend with the very same text (the usual case) never needs one."""

    def __init__(self) -> None:
        self._rows: dict[int, str] = {}

    def of(self, r: Row) -> str:
        if r.digest:
            return r.digest
        key = id(r)
        if key not in self._rows:
            self._rows[key] = _digest_of_stored(r.body)
        return self._rows[key]

    def same(self, stored_body: str, r: Row) -> bool:
        return stored_body == r.body or _digest_of_stored(stored_body) == self.of(r)


# --- opening ----------------------------------------------------------------------------


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


def open_store(db_url: str | Path, *, hold_max: int = HOLD_MAX) -> Store:
    """Open the store a URL names.

    ``postgresql://...`` (or ``postgres://``) opens PostgreSQL; ``sqlite:///rel.db``,
    ``sqlite:////abs/path.db`` or a plain path opens SQLite.
    """
    text = str(db_url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(text, hold_max=hold_max)
    if scheme == "sqlite":
        path = text[len("sqlite:///"):] if text.lower().startswith("sqlite:///") else ""
        if not path:
            raise StoreError(
                f"cannot read the database URL {text!r}; write sqlite:///relative.db or "
                "sqlite:////absolute/path.db"
            )
        return SqliteStore(path, hold_max=hold_max)
    if scheme:
        raise StoreError(
            f"the database URL {redact(text)!r} has scheme {scheme!r}; the ingest stores in SQLite "
            "(a path or sqlite:///path) or PostgreSQL (postgresql://user@host/db)"
        )
    return SqliteStore(text, hold_max=hold_max)


def _check_hold_max(hold_max: int) -> int:
    if isinstance(hold_max, bool) or not isinstance(hold_max, int) or hold_max < 1:
        raise ValueError(f"hold_max (--hold) {hold_max!r} must be a whole number of records >= 1 "
                         f"(default {HOLD_MAX})")
    return hold_max


def _where(site: str | None, gate: str | None, mark: str, prefix: str = "") -> tuple[str, list[Any]]:
    where, args = [], []
    if site is not None:
        where.append(f"{prefix}site = {mark}")
        args.append(site)
    if gate is not None:
        where.append(f"{prefix}gate = {mark}")
        args.append(gate)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _chunks(items: list, n: int = _CHUNK) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# --- placing a batch (one dialect-neutral algorithm for both stores) ----------------------


class _Tx:
    """The statements of one transaction, written with ``?`` for either database."""

    def __init__(self, cur: Any, pg: bool) -> None:
        self.cur, self.pg = cur, pg

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def q(self, sql: str, args: Any = ()) -> list[tuple]:
        return self.cur.execute(self._sql(sql), args).fetchall()

    def x(self, sql: str, args: Any = ()) -> int:
        return max(self.cur.execute(self._sql(sql), args).rowcount, 0)

    def many(self, sql: str, rows: list[tuple]) -> None:
        if rows:  # psycopg pipelines these: one round trip for the lot
            self.cur.executemany(self._sql(sql), rows)

    def lock_journal(self, journal: str, site: str, gate: str) -> tuple[str, str, int]:
        """The journal's owner and mark, locked for this transaction (claimed if new)."""
        if self.pg:
            # One round trip: insert or lock the existing row, and read it. The row lock
            # makes another ingest's commit for this journal visible before we look:
            # READ COMMITTED takes a fresh snapshot per statement.
            return self.q("INSERT INTO journals(journal, site, gate) VALUES (?, ?, ?) "
                          "ON CONFLICT (journal) DO UPDATE SET journal = excluded.journal "
                          "RETURNING site, gate, upto", (journal, site, gate))[0]
        row = self.q("SELECT site, gate, upto FROM journals WHERE journal = ?", (journal,))
        if row:
            return row[0]
        self.x("INSERT INTO journals(journal, site, gate, upto) VALUES (?, ?, ?, 0)", (journal, site, gate))
        return site, gate, 0

    def lookup(self, journal: str, ids: list[str], high: list[str], upto: int
               ) -> tuple[dict[str, tuple[str, str]], list[tuple[int, str]]]:
        """The versions stored under ``ids`` (events) and ``high`` (held), as id ->
        (table, body text); and the first page of seqs stored past ``upto``."""
        first: dict[str, tuple[str, str]] = {}
        if self.pg:
            # One round trip: on a busy server the count of statements is what costs.
            rows = self.q(
                "SELECT 'held', id, body::text FROM held WHERE id = ANY(?) "
                "UNION ALL SELECT 'events', id, body::text FROM events WHERE id = ANY(?) "
                "UNION ALL SELECT 'held+', NULL, seq::text FROM (SELECT seq FROM held "
                "WHERE journal = ? AND seq > ? ORDER BY seq LIMIT ?) h "
                "UNION ALL SELECT 'events+', NULL, seq::text FROM (SELECT seq FROM events "
                "WHERE journal = ? AND seq > ? ORDER BY seq LIMIT ?) e",
                (high, ids, journal, upto, _PAGE, journal, upto, _PAGE))
            page = [(int(text), where[:-1]) for where, _, text in rows if where.endswith("+")]
            for where, rid, body in rows:
                if not where.endswith("+") and first.get(rid, ("",))[0] != "events":
                    first[rid] = (where, body)  # events wins: it is where a version counts
            return first, page
        for table, wanted in (("held", high), ("events", ids)):
            for part in _chunks(wanted):
                marks = ",".join("?" * len(part))
                for rid, body in self.q(f"SELECT id, body FROM {table} WHERE id IN ({marks})", part):
                    first[rid] = (table, body)
        return first, self.probe(journal, upto)

    def probe(self, journal: str, after: int) -> list[tuple[int, str]]:
        """A page of the journal's seqs stored past ``after``: held, or in events (an older ingest)."""
        return self.q(
            "SELECT seq, 'held' FROM (SELECT seq FROM held WHERE journal = ? AND seq > ? "
            "ORDER BY seq LIMIT ?) h UNION ALL "
            "SELECT seq, 'events' FROM (SELECT seq FROM events WHERE journal = ? AND seq > ? "
            "ORDER BY seq LIMIT ?) e", (journal, after, _PAGE, journal, after, _PAGE))

    def quarantined(self, ids: list[str]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        for part in _chunks(ids):
            marks = ",".join("?" * len(part))
            found.update(self.q(f"SELECT id, digest FROM quarantine WHERE id IN ({marks})", part))
        return found


class _Ahead:
    """The seqs of one journal stored past its mark (held, or in events by an older
    ingest), read in pages as a run walks forward over them."""

    def __init__(self, tx: _Tx, journal: str, first_page: list[tuple[int, str]]) -> None:
        self.tx, self.journal = tx, journal
        self.buf: deque[tuple[int, str]] = deque()
        self.known_to = -1  # every stored seq up to here is in buf (or was consumed)
        self._load(first_page)

    def _load(self, rows: list[tuple[int, str]]) -> None:
        held = [s for s, w in rows if w == "held"]
        ev = [s for s, w in rows if w == "events"]
        # Complete only up to the end of a full page: beyond it the other table may hide rows.
        ends = [max(page) for page in (held, ev) if len(page) >= _PAGE]
        self.known_to = min(ends) if ends else MAX_SEQ
        self.buf = deque(sorted((s, w) for s, w in rows if s <= self.known_to))

    def at(self, seq: int) -> str | None:
        """Where seq is stored ("held" or "events"), or None. Call with growing seqs."""
        while self.buf and self.buf[0][0] < seq:
            self.buf.popleft()
        if not self.buf and seq > self.known_to:
            self._load(self.tx.probe(self.journal, seq - 1))
        if self.buf and self.buf[0][0] == seq:
            return self.buf[0][1]
        return None


_EVENT_COLS = "id, journal, seq, site, gate, type, ts, body"


def _place(tx: _Tx, rows: list[Row], received: str, hold_max: int) -> Stored:
    """Place a batch: events, held, quarantine; move the marks. Inside the caller's transaction.

    Per journal (under its lock) the rows are classified and the run walked; the
    writes go out at the end, one pipelined statement per table for the whole batch.
    """
    done = Stored()
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.journal, []).append(r)
    held_per_gate: dict[tuple[str, str], int] = {}
    to_events: list[tuple] = []
    to_held: list[tuple] = []
    to_quarantine: list[tuple] = []
    marks_moved: list[tuple[int, str]] = []
    # Sorted: every writer takes the journals' locks in one order, so none deadlock.
    for journal in sorted(groups):
        arrived = groups[journal]
        site, gate, upto = tx.lock_journal(journal, arrived[0].site, arrived[0].gate)
        mine = []
        for r in arrived:
            if (r.site, r.gate) == (site, gate):
                mine.append(r)
            else:
                # A journal belongs to the first gate that sent it: without this, gate B
                # could store `A's-journal:n` first and have the real one quarantined.
                done.foreign += 1
                log.warning("ingest: refused %s from %s/%s: journal %s belongs to %s/%s",
                            r.id, r.site, r.gate, journal, site, gate)
        if not mine:
            continue
        mine.sort(key=lambda r: r.seq)  # stable: copies of one id keep their arrival order

        # The version stored first for each id (its text), and where it is. A version in
        # events past the mark was left there by an older ingest.
        first, page = tx.lookup(journal, [r.id for r in mine], [r.id for r in mine if r.seq > upto], upto)
        digests = _Digests()
        cand: dict[int, Row] = {}  # new ids past the mark: to events, held or refused
        stored_seq: set[int] = set()  # seqs of this batch's rows whose own content is stored
        dup_of_held: list[int] = []  # duplicates of a held version: stored only if it moves
        suspects: list[tuple[Row, str]] = []
        for r in mine:
            known = first.get(r.id)
            if known is None:
                if r.seq <= upto:
                    # Under the mark but not in events: archived away. Nothing to compare with.
                    done.duplicates += 1
                    stored_seq.add(r.seq)
                else:
                    first[r.id] = ("batch", r.body)
                    cand[r.seq] = r
            elif digests.same(known[1], r):
                done.duplicates += 1
                if known[0] == "held":
                    dup_of_held.append(r.seq)
                elif known[0] == "events":
                    stored_seq.add(r.seq)
            else:
                suspects.append((r, known[0]))
        if suspects:
            have = tx.quarantined([r.id for r, _ in suspects])
            for r, where in suspects:
                stored_seq.add(r.seq)
                sha = digests.of(r)
                if (r.id, sha) in have:
                    done.duplicates += 1  # a resend of a version already quarantined
                    continue
                have.add((r.id, sha))
                to_quarantine.append((*r.columns(), sha, received))
                done.conflicts.append(Conflict(r.id, journal, r.seq, site, gate, where))

        # Walk the contiguous run from the mark over this batch's new rows and the
        # rows already held; what it passes goes into events.
        ahead = _Ahead(tx, journal, page)
        cur, moved_held = upto, False
        while True:
            s = cur + 1
            r = cand.pop(s, None)
            if r is not None:
                to_events.append(r.columns())
                stored_seq.add(s)
                done.new += 1
            else:
                where = ahead.at(s)
                if where is None:
                    break
                moved_held = moved_held or where == "held"
            cur = s
        if moved_held:
            done.new += tx.x(f"INSERT INTO events({_EVENT_COLS}) SELECT {_EVENT_COLS} FROM held "
                             "WHERE journal = ? AND seq > ? AND seq <= ?", (journal, upto, cur))
            tx.x("DELETE FROM held WHERE journal = ? AND seq > ? AND seq <= ?", (journal, upto, cur))
        stored_seq.update(s for s in dup_of_held if s <= cur)

        # What is left is ahead of a gap: hold it, within the bounds.
        if cand:
            key = (site, gate)
            if key not in held_per_gate:
                held_per_gate[key] = tx.q("SELECT count(*) FROM held WHERE site = ? AND gate = ?", key)[0][0]
            refused = []
            for s in sorted(cand):
                if s - cur <= hold_max and held_per_gate[key] < hold_max:
                    to_held.append((*cand[s].columns(), received))
                    held_per_gate[key] += 1
                    done.held += 1
                else:
                    refused.append(s)
            if refused:
                done.refused[journal] = Refused(site, gate, len(refused), refused[0], refused[-1], cur)

        if cur != upto:
            marks_moved.append((cur, journal))
        # The ack covers no seq beyond this batch's own stored records: a record only
        # held, or stored earlier by someone else, never lets the gate forget one of its own.
        done.marks[journal] = Mark(site, gate, cur, min(cur, max(stored_seq, default=0)))

    # Every journal of the batch is locked by now: no other writer touches these ids.
    tx.many(f"INSERT INTO events({_EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", to_events)
    tx.many(f"INSERT INTO held({_EVENT_COLS}, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", to_held)
    tx.many(f"INSERT INTO quarantine({_EVENT_COLS}, digest, received) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", to_quarantine)
    tx.many("UPDATE journals SET upto = ? WHERE journal = ?", marks_moved)
    return done


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
CREATE TABLE IF NOT EXISTS held (
    id TEXT PRIMARY KEY,
    journal TEXT NOT NULL,
    seq INTEGER NOT NULL,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    type TEXT,
    ts TEXT,
    body JSON NOT NULL,
    received TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS held_journal_seq ON held(journal, seq);
CREATE INDEX IF NOT EXISTS held_site_gate ON held(site, gate);
CREATE INDEX IF NOT EXISTS held_received ON held(received);
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT NOT NULL,
    journal TEXT NOT NULL,
    seq INTEGER NOT NULL,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    type TEXT,
    ts TEXT,
    body JSON NOT NULL,
    digest TEXT NOT NULL,
    received TEXT NOT NULL,
    PRIMARY KEY (id, digest)
);
CREATE INDEX IF NOT EXISTS quarantine_site_gate ON quarantine(site, gate);
"""


def _create_private(path: str) -> None:
    """Create the database file readable by the service user only (it holds card
    numbers and person ids). SQLite gives its -wal and -shm the main file's mode.
    An existing file keeps its mode (a DBA may have chosen it); a warning says so."""
    if path == ":memory:":
        return
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError:
            pass  # sqlite3.connect reports the problem in its own words
        return
    except OSError:
        return
    if mode & 0o077:
        log.warning("ingest: the database %s is readable by other users (mode %o); it holds card "
                    "numbers and person ids: `chmod 600` it and its -wal and -shm", path, mode)


class _Reads:
    """The read side both stores share; a store gives ``_read(sql, args)``, its
    parameter mark and the cast that reads a JSON column as text."""

    _MARK = "?"
    _TEXT = ""

    def _read(self, sql: str, args: Any = ()) -> list[tuple]:
        raise NotImplementedError

    def events(self, site: str | None = None, gate: str | None = None) -> list[dict]:
        where, args = _where(site, gate, self._MARK)
        # As text, parsed here: the same records from either store.
        rows = self._read(f"SELECT body{self._TEXT} FROM events{where} ORDER BY journal, seq", args)
        return [json.loads(body) for (body,) in rows]

    def upto(self, journal: str) -> int:
        rows = self._read(f"SELECT upto FROM journals WHERE journal = {self._MARK}", (journal,))
        return rows[0][0] if rows else 0

    def conflicts(self, site: str | None = None, gate: str | None = None) -> list[dict]:
        where, args = _where(site, gate, self._MARK, "q.")
        return _conflict_dicts(self._read(_CONFLICTS_SQL.format(cast=self._TEXT, where=where), args))

    def held_count(self, site: str | None = None, gate: str | None = None) -> int:
        where, args = _where(site, gate, self._MARK)
        return self._read(f"SELECT count(*) FROM held{where}", args)[0][0]


class SqliteStore(_Reads):
    """One SQLite file (WAL); several ingests may share it."""

    def __init__(self, path: str | Path, *, hold_max: int = HOLD_MAX) -> None:
        self.path = str(path)
        self.url = self.path
        self.hold_max = _check_hold_max(hold_max)
        try:
            _create_private(self.path)
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
                done = _place(_Tx(db, pg=False), rows, rfc3339_ms(time.time()), self.hold_max)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path!r} failed: {exc}") from exc
        return done

    def expire_held(self, before: str) -> list[Expired]:
        """Drop held records received before ``before`` (RFC 3339 UTC)."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = [Expired(*r) for r in db.execute(
                    "SELECT journal, site, gate, count(*), min(seq), max(seq) FROM held "
                    "WHERE received < ? GROUP BY journal, site, gate ORDER BY journal", (before,))]
                db.execute("DELETE FROM held WHERE received < ?", (before,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"dropping old held records from {self.path!r} failed: {exc}") from exc
        return gone

    def _read(self, sql: str, args: Any = ()) -> list[tuple]:
        # A separate connection: readers never wait for (or disturb) the writer.
        try:
            with sqlite3.connect(self.path, timeout=30) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading from {self.path!r} failed: {exc}") from exc

    def close(self) -> None:
        self._db.close()


_CONFLICTS_SQL = """
SELECT q.id, q.journal, q.seq, q.site, q.gate, q.received, q.body{cast},
       coalesce(e.body{cast}, h.body{cast}), CASE WHEN e.id IS NOT NULL THEN 'events'
       WHEN h.id IS NOT NULL THEN 'held' END
FROM quarantine q LEFT JOIN events e ON e.id = q.id LEFT JOIN held h ON h.id = q.id{where}
ORDER BY q.received, q.journal, q.seq, q.digest
"""


def _conflict_dicts(rows: list[tuple]) -> list[dict]:
    out = []
    for rid, journal, seq, site, gate, received, body, first, first_in in rows:
        out.append({"id": rid, "journal": journal, "seq": seq, "site": site, "gate": gate,
                    "received": received, "record": json.loads(body),
                    "first": json.loads(first) if first is not None else None, "first_in": first_in})
    return out


# --- PostgreSQL -----------------------------------------------------------------------

# body is `json`, not `jsonb`: it keeps the record's text as the gate sent it and
# accepts every string JSON can carry (jsonb refuses \u0000, which would make one
# record block its whole batch forever). Cast to jsonb in queries that need it.
# One statement list per table: tables a DBA made beforehand are left alone.
POSTGRES_TABLES = {
    "events": """
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
""",
    "journals": """
CREATE TABLE IF NOT EXISTS journals (
    journal TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    upto BIGINT NOT NULL DEFAULT 0
);
""",
    "held": """
CREATE TABLE IF NOT EXISTS held (
    id TEXT PRIMARY KEY,
    journal TEXT NOT NULL,
    seq BIGINT NOT NULL,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    type TEXT,
    ts TEXT,
    body JSON NOT NULL,
    received TEXT NOT NULL,
    UNIQUE (journal, seq)
);
CREATE INDEX IF NOT EXISTS held_site_gate ON held(site, gate);
CREATE INDEX IF NOT EXISTS held_received ON held(received);
""",
    "quarantine": """
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT NOT NULL,
    journal TEXT NOT NULL,
    seq BIGINT NOT NULL,
    site TEXT NOT NULL,
    gate TEXT NOT NULL,
    type TEXT,
    ts TEXT,
    body JSON NOT NULL,
    digest TEXT NOT NULL,
    received TEXT NOT NULL,
    PRIMARY KEY (id, digest)
);
CREATE INDEX IF NOT EXISTS quarantine_site_gate ON quarantine(site, gate);
""",
}


def _psycopg():
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(
            "PostgreSQL needs the psycopg package; install it with "
            "`pip install 'gate-agent[postgres]'` (or `pip install 'psycopg[binary]'`)"
        ) from exc
    return psycopg


class PostgresStore(_Reads):
    """A PostgreSQL database (psycopg 3); several ingests may share it.

    The writer keeps one connection and reopens it after a failure; readers
    (``events``, ``upto``, ``conflicts``) use their own, so they never wait for the writer.
    """

    # Two writers can still meet in a deadlock or a serialization failure
    # (PostgreSQL picks a victim); the batch is then simply tried again.
    RETRIES = 3

    _MARK = "%s"
    _TEXT = "::text"

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10, hold_max: int = HOLD_MAX) -> None:
        self.dsn = dsn
        self.url = redact(dsn)
        self.connect_timeout_s = connect_timeout_s
        self.hold_max = _check_hold_max(hold_max)
        self._pg = _psycopg()
        self._db = self._connect()
        missing: list[str] = []
        try:
            with self._db.transaction():
                # One schema creator at a time: two ingests starting together would
                # otherwise race on CREATE TABLE IF NOT EXISTS.
                self._db.execute("SELECT pg_advisory_xact_lock(hashtext('gate-agent ingest schema'))")
                # Tables a DBA made beforehand are used as they are: the user then
                # needs no CREATE right (CREATE ... IF NOT EXISTS still checks it).
                missing = [t for t in POSTGRES_TABLES
                           if self._db.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is None]
                for table in missing:
                    self._db.execute(POSTGRES_TABLES[table])
        except self._pg.Error as exc:
            self._db.close()
            raise StoreError(
                f"cannot create the ingest tables {', '.join(missing)} in {self.url} "
                f"({str(exc).strip().splitlines()[0]}); "
                "the user needs CREATE on its schema (or have the tables created as shown in docs/ingest.md)"
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

    def _retrying(self, what: str, work):
        pg = self._pg
        for attempt in range(1, self.RETRIES + 1):
            try:
                if self._db.closed or self._db.broken:
                    self._db = self._connect()
                return work()
            except (pg.errors.DeadlockDetected, pg.errors.SerializationFailure) as exc:
                if attempt == self.RETRIES:
                    raise StoreError(f"{what} {self.url} failed {attempt} times: {exc}") from exc
            except pg.Error as exc:
                raise StoreError(f"{what} {self.url} failed: {str(exc).strip()}") from exc
        raise AssertionError("unreachable")

    def insert(self, rows: list[Row]) -> Stored:
        received = rfc3339_ms(time.time())

        def work() -> Stored:
            db = self._db
            with db.transaction(), db.cursor() as cur:
                done = _place(_Tx(cur, pg=True), rows, received, self.hold_max)
            # Leaving the transaction block committed it: the marks may now be acked.
            return done

        return self._retrying("writing to", work)

    def expire_held(self, before: str) -> list[Expired]:
        """Drop held records received before ``before``, one journal at a time under its lock."""
        def work() -> list[Expired]:
            gone: list[Expired] = []
            db = self._db
            journals = [j for (j,) in db.execute(
                "SELECT DISTINCT journal FROM held WHERE received < %s ORDER BY journal", (before,))]
            for journal in journals:
                with db.transaction(), db.cursor() as cur:
                    cur.execute("SELECT upto FROM journals WHERE journal = %s FOR UPDATE", (journal,))
                    rows = cur.execute(
                        "SELECT site, gate, count(*), min(seq), max(seq) FROM held "
                        "WHERE journal = %s AND received < %s GROUP BY site, gate", (journal, before)).fetchall()
                    cur.execute("DELETE FROM held WHERE journal = %s AND received < %s", (journal, before))
                gone += [Expired(journal, *r) for r in rows]
            return gone

        return self._retrying("dropping old held records from", work)

    def _read(self, sql: str, args: Any) -> list[tuple]:
        pg = self._pg
        with self._read_lock:
            try:
                if self._reader is None or self._reader.closed or self._reader.broken:
                    self._reader = self._connect()
                return self._reader.execute(sql, args).fetchall()
            except pg.Error as exc:
                raise StoreError(f"reading from {self.url} failed: {str(exc).strip()}") from exc

    def close(self) -> None:
        self._db.close()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
