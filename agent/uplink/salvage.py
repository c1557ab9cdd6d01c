"""Reading what can be read of a damaged journal: the salvage at start.

When the events database fails its checks at start (agent.uplink.journal,
``Journal._open``), every record that can still be read, from the database
pages themselves when SQLite cannot, is copied into a fresh journal in seq
order (``_salvage_into``); a range that raises is bisected down to single
records. The marks file beside the journal (``_Marks``) says which seqs the
server already acknowledged, so a salvage neither loses an unacknowledged
record nor sends an acknowledged one again. Split from the journal itself,
which stays the one writer on the gate thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from agent.uplink.sqlite_pages import PageReader

log = logging.getLogger("agent.uplink.journal")

SALVAGE_CHUNK = 4096
PROGRESS_S = 5.0  # a long salvage says it is alive this often (systemd's start timeout)


def _type_of(rec: dict) -> str:
    t = rec.get("type")
    return t if isinstance(t, str) and t else "unknown"


def _side(path: Path, suffix: str) -> Path:
    return Path(str(path) + suffix)


class _Salvage:
    """Reads what it can of a damaged journal, in seq order.

    A range that raises is bisected down to single seqs; each seq that still
    cannot be read, above the acknowledged watermark, counts as lost (an
    upper bound: it may have been acknowledged one by one, or purged).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.old_id: str | None = None
        self.lost: int | None = 0
        self.conn: sqlite3.Connection | None = None
        try:
            # Read-only: no checkpoint into the damaged file on close.
            self.conn = sqlite3.connect(
                f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None
            )
        except sqlite3.Error:
            self.conn = None

    def _one(self, sql: str):
        try:
            row = self.conn.execute(sql).fetchone()
            return None if row is None else row[0]
        except sqlite3.Error:
            return None

    def batches(self) -> Iterator[list[dict]]:
        if self.conn is None:
            self.lost = None
            return
        old = self._one("SELECT value FROM meta WHERE key = 'journal_id'")
        self.old_id = old if isinstance(old, str) and old.strip() else None
        acked = self._one("SELECT acked_upto FROM state WHERE id = 1")
        acked = acked if isinstance(acked, int) else 0
        highs = [
            v
            for v in (
                self._one("SELECT last_seq FROM state WHERE id = 1"),
                self._one("SELECT max(seq) FROM events NOT INDEXED"),
            )
            if isinstance(v, int)
        ]
        if not highs:
            self.lost = None  # nothing tells how many there were
            yield from self._scan()
            return
        hi = max(highs)
        stack = [(a, min(a + SALVAGE_CHUNK - 1, hi)) for a in range(1, hi + 1, SALVAGE_CHUNK)]
        stack.reverse()
        while stack:
            a, b = stack.pop()
            got: list[dict] = []
            last = a - 1
            try:
                for seq, done, body in self.conn.execute(
                    "SELECT seq, done, body FROM events NOT INDEXED "
                    "WHERE seq BETWEEN ? AND ? ORDER BY seq",
                    (a, b),
                ):
                    last = seq
                    if done is not None:
                        continue
                    rec = self._parse(body)
                    if rec is None:
                        self.lost += 1
                    else:
                        got.append(rec)
            except sqlite3.Error:
                lo = last + 1
                if lo == b:
                    self.lost += 1 if lo > acked else 0
                elif lo < b:
                    mid = (lo + b) // 2
                    stack.append((mid + 1, b))
                    stack.append((lo, mid))
            if got:
                yield got

    def _scan(self) -> Iterator[list[dict]]:
        got: list[dict] = []
        try:
            for _seq, done, body in self.conn.execute(
                "SELECT seq, done, body FROM events NOT INDEXED ORDER BY seq"
            ):
                rec = self._parse(body) if done is None else None
                if rec is not None:
                    got.append(rec)
                if len(got) >= SALVAGE_CHUNK:
                    yield got
                    got = []
        except sqlite3.Error:
            pass
        if got:
            yield got

    @staticmethod
    def _parse(body) -> dict | None:
        try:
            rec = json.loads(body)
        except (TypeError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MARKS_FORMAT = 1


@dataclass(frozen=True)
class _Marks:
    """What the journal last made durable, as kept outside the database."""

    journal: str
    last_seq: int  # every seq up to this was fsynced
    acked_upto: int  # the acknowledgement watermark written to the table
    previous: str | None = None  # the journal this one replaced, if any


def _marks_path(path: Path) -> Path:
    # Not "journal.db.marks": a glob for the database's files (journal.db*) must
    # not take the witness of what they held with them.
    return path.with_suffix(".marks") if path.suffix else _side(path, ".marks")


def _read_marks(path: Path) -> tuple[_Marks | None, str]:
    """The marks and a note for the log ("" when there is nothing to say)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"marks damaged: {path} cannot be read ({exc.strerror})"
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != MARKS_FORMAT:
            raise ValueError("not a marks file of format 1")
        jid, last, acked = doc["journal"], doc["last_seq"], doc["acked_upto"]
        prev = doc.get("previous")
        if not (isinstance(jid, str) and _ID_PATTERN.match(jid)):
            raise ValueError("bad journal id")
        for v in (last, acked):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError("bad seq")
        if prev is not None and not (isinstance(prev, str) and _ID_PATTERN.match(prev)):
            raise ValueError("bad previous journal id")
        return _Marks(jid, last, min(acked, last), prev), ""
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"marks damaged: {path} ({exc}); the database alone says what it holds"


class _Found:
    """What a salvage read from a damaged journal: its pending records (in a
    scratch table of the new journal's connection, in seq order), the old
    journal's id, how many records are lost and how they were read."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.old_id: str | None = None
        self.lost: int | None = None
        self.method = "none"
        self._prefix: str | None = None
        self._wm = 0
        conn.execute(
            "CREATE TEMP TABLE salvage_scan (seq INTEGER NOT NULL, free INTEGER NOT NULL, "
            "done REAL, prefix TEXT NOT NULL, body TEXT NOT NULL)"
        )

    def pending(self) -> Iterator[dict]:
        """The file's own records not acknowledged: one copy per seq (one from a
        page in use when there is one), none of a seq any copy says is done."""
        if self._prefix is None:
            return
        cursor = self.conn.execute(
            "SELECT s.body FROM salvage_scan s WHERE s.prefix = :p AND s.seq > :wm "
            "AND NOT EXISTS (SELECT 1 FROM salvage_scan t WHERE t.prefix = :p "
            "  AND t.seq = s.seq AND t.done IS NOT NULL) "
            "AND s.rowid = (SELECT u.rowid FROM salvage_scan u WHERE u.prefix = :p "
            "  AND u.seq = s.seq ORDER BY u.free, u.rowid LIMIT 1) "
            "ORDER BY s.seq",
            {"p": self._prefix, "wm": self._wm},
        )
        for (body,) in cursor:
            rec = _Salvage._parse(body)
            if rec is not None:
                yield rec

    def drop(self) -> None:
        self.conn.execute("DROP TABLE temp.salvage_scan")


class _Ticker:
    """Calls ``progress`` (the service: "still starting" to systemd) at most
    every PROGRESS_S while a long salvage runs."""

    def __init__(self, progress: Callable[[], None] | None) -> None:
        self._progress = progress
        self._last = time.monotonic()

    def __call__(self) -> None:
        if self._progress is not None and time.monotonic() - self._last >= PROGRESS_S:
            self._last = time.monotonic()
            try:
                self._progress()
            except Exception:  # a report must never stop the salvage
                log.debug("progress report failed", exc_info=True)


def _scan_pages(found: _Found, path: Path, wal: Path, tick: Callable[[], None]) -> tuple[list, list]:
    """Every event row, journal id and state row the pages of path (and its
    WAL) still hold, into the scratch table; returns (ids, states) with a
    flag for copies found on free pages."""
    ids: list[tuple[bool, str]] = []
    states: list[tuple[bool, int, int]] = []
    batch: list[tuple] = []
    with PageReader(path if path.exists() else None, wal if wal.exists() else None) as reader:
        for cell in itertools.chain(reader.cells(), reader.old_cells()):
            v = cell.values
            if len(v) == 5 and v[0] is None and isinstance(v[4], str):
                rec = _Salvage._parse(v[4])
                rid = rec.get("id") if rec is not None else None
                done = v[3]
                if (
                    rec is None
                    or rec.get("seq") != cell.rowid
                    or not isinstance(rid, str)
                    or not rid.endswith(f":{cell.rowid}")
                    or v[1] != _type_of(rec)
                    or not (done is None or isinstance(done, (int, float)))
                ):
                    continue  # not one of our event rows, or a damaged one
                batch.append((cell.rowid, int(cell.free), done, rid.rsplit(":", 1)[0], v[4]))
                if len(batch) >= SALVAGE_CHUNK:
                    found.conn.executemany("INSERT INTO salvage_scan VALUES (?, ?, ?, ?, ?)", batch)
                    batch = []
                    tick()
            elif len(v) == 2 and v[0] == "journal_id" and isinstance(v[1], str):
                if _ID_PATTERN.match(v[1]):
                    ids.append((cell.free, v[1]))
            elif (
                len(v) == 6
                and cell.rowid == 1
                and v[0] is None
                and all(isinstance(x, int) and x >= 0 for x in v[1:5])
                and isinstance(v[5], str)
            ):
                states.append((cell.free, v[1], v[3]))
    found.conn.executemany("INSERT INTO salvage_scan VALUES (?, ?, ?, ?, ?)", batch)
    found.conn.execute("CREATE INDEX temp.salvage_seq ON salvage_scan(prefix, seq)")
    return ids, states


def _salvage_into(
    conn: sqlite3.Connection, path: Path, wal: Path, marks: _Marks | None,
    tick: Callable[[], None] = lambda: None,
) -> _Found:
    """Read what the old files hold (pages first, SQLite's reader if that
    fails) and count what is lost.

    ``lost`` is, for the journal that was in use, the number of seqs above the
    acknowledged watermark and up to the highest seq known (the marks, the
    state row, the rows themselves) of which no copy could be read: an upper
    bound of the records lost (a seq acknowledged one by one and purged counts
    too), so never below the known gap. None when nothing tells how many
    records there were.
    """
    found = _Found(conn)
    if not path.exists() and not wal.exists():
        ids: list = []
        states: list = []
    else:
        try:
            ids, states = _scan_pages(found, path, wal, tick)
            found.method = "pages"
        except Exception:  # a bug in the page reader must not cost the records SQLite can read
            log.exception("journal %s: reading the pages failed; using SQLite's reader", path)
            conn.execute("DELETE FROM salvage_scan")
            return _salvage_with_sqlite(found, path, marks)
    ids.sort(key=lambda t: t[0])  # a copy on a page in use first
    states.sort(key=lambda t: (t[0], -t[1]))
    file_id = ids[0][1] if ids else None
    if file_id is None:
        row = conn.execute(
            "SELECT prefix FROM salvage_scan GROUP BY prefix ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()
        file_id = row[0] if row else None
    state_last, state_wm = (states[0][1], states[0][2]) if states else (0, 0)

    def gap(prefix: str, hi: int, wm: int) -> int | None:
        top = conn.execute(
            "SELECT max(seq) FROM salvage_scan WHERE prefix = ?", (prefix,)
        ).fetchone()[0]
        hi = max(hi, top or 0)
        if hi == 0 and wm == 0 and not states:
            return None  # nothing says how many there were
        read = conn.execute(
            "SELECT count(DISTINCT seq) FROM salvage_scan WHERE prefix = ? AND seq > ? AND seq <= ?",
            (prefix, wm, hi),
        ).fetchone()[0]
        return max(0, hi - wm - read)

    lost: int | None = None
    if file_id is not None:
        wm = state_wm
        hi = state_last
        if marks is not None and marks.journal == file_id:
            wm, hi = max(wm, marks.acked_upto), max(hi, marks.last_seq)
        found._prefix, found._wm = file_id, wm
        lost = gap(file_id, hi, wm)
    if marks is not None and marks.journal != file_id:
        # The journal in use is not (or no longer) in this file: its unacknowledged records are gone.
        lost = (lost or 0) + marks.last_seq - marks.acked_upto
        found.old_id = marks.journal
    else:
        found.old_id = file_id
    found.lost = lost
    return found


def _salvage_with_sqlite(found: _Found, path: Path, marks: _Marks | None) -> _Found:
    """The fallback: what SQLite itself can still read (see _Salvage)."""
    salvage = _Salvage(path)
    try:
        for batch in salvage.batches():
            found.conn.executemany(
                "INSERT INTO salvage_scan VALUES (?, 0, NULL, '', ?)",
                [(r.get("seq", 0), json.dumps(r, separators=(",", ":"))) for r in batch],
            )
    finally:
        salvage.close()
    found.method = "reader"
    found._prefix, found._wm = "", 0
    found.old_id = salvage.old_id or (marks.journal if marks is not None else None)
    found.lost = salvage.lost
    if marks is not None and salvage.old_id not in (None, marks.journal):
        found.lost = (found.lost or 0) + marks.last_seq - marks.acked_upto
        found.old_id = marks.journal
    return found
