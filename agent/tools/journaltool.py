"""``gate-agent journal``: read the gate's journal without disturbing the service.

    gate-agent journal tail [-n N] [-f]           the last records, one line each; -f follows
    gate-agent journal export [--since SEQ|DATE] [--until SEQ|DATE] [--card C] [--person P]
                              [--pending] > file.jsonl
    gate-agent journal stats [--json]             counts, backlog, oldest pending, size

The journal database (agent/uplink/journal.py) is opened read-only
(``mode=ro``, ``query_only``): in WAL mode a reader never blocks the
service, and the service never waits for it, so every subcommand works
while the agent runs. A journal whose -shm file cannot be created (a
read-only directory) is read as immutable when no WAL is pending.

"Pending" here is what the journal file says: records the service has not
yet marked confirmed. The service applies acknowledgements when the gate is
idle, so a record acknowledged a moment ago may still show as pending.

Times are shown in the board's local time zone, with the zone (``+07:00``),
by every subcommand; a DATE given to export is local too unless it carries
an offset (``2026-09-01``, ``2026-09-01T08:00``, ``2026-09-01T08:00+07:00``).

Exit codes: 0 done, 2 the journal cannot be found or read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from agent.exits import Exit
from agent.i18n import _
from agent.tools import config_path
from agent.tools.words import age_text, detail_text

__all__ = [
    "DEFAULT_JOURNAL",
    "JournalReadError",
    "add_journal_parser",
    "export_records",
    "format_record",
    "journal_path",
    "journal_stats",
    "open_readonly",
    "read_records",
    "tail_records",
]

DEFAULT_CONFIG = Path("/etc/gate-agent/agent.toml")
DEFAULT_JOURNAL = Path("/var/lib/gate-agent/journal.db")
EXIT_OK = Exit.OK
EXIT_UNREADABLE = Exit.USAGE
EXIT_USAGE = Exit.USAGE  # a bad --since/--until/--card: argparse's own code for bad options
FOLLOW_POLL_S = 0.5
_HIDDEN_FIELDS = frozenset({"v", "id", "seq", "ts", "clock_synced", "boot", "mono", "type"})


class JournalReadError(RuntimeError):
    """The journal cannot be opened or read; the message says what to do."""


# --------------------------------------------------------------------------- locating


def journal_path(config: str | os.PathLike[str] | None = None, db: str | os.PathLike[str] | None = None) -> Path:
    """The journal file: ``db`` when given, else ``journal.path`` of the config.

    Only that one key is read (not the whole config checked), so the tool
    still works when another part of the config is wrong, which is exactly
    when a technician looks at the journal. A missing config means the
    default path.
    """
    if db is not None:
        return Path(db)
    found = config_path(config, DEFAULT_CONFIG, "journal", "path", error=JournalReadError,
                        instead=_("the journal file with --db"))
    return found if found is not None else DEFAULT_JOURNAL


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection to a journal; JournalReadError saying what to do."""
    p = Path(path)
    if not p.exists():
        try:
            os.stat(p.parent)
        except PermissionError:
            raise JournalReadError(
                _("cannot look into {dir} (permission denied): the journal belongs to the service "
                  "user; run the command with sudo").format(dir=p.parent)) from None
        except FileNotFoundError:
            pass
        raise JournalReadError(
            _("no journal at {path}: the service creates it at its first start; check journal.path "
              "in the config or give the file with --db").format(path=p))
    if not os.access(p, os.R_OK):
        raise JournalReadError(
            _("cannot read {path} (permission denied): the journal holds personal data and belongs "
              "to the service user; run the command with sudo").format(path=p))
    uri = f"file:{quote(str(p.resolve()))}?mode=ro"
    try:
        conn = _connect(uri)
    except sqlite3.OperationalError:
        wal = Path(str(p) + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise JournalReadError(
                _("cannot open {path} read-only while the service writes it: this user cannot create "
                  "its shared-memory file; run the command with sudo").format(path=p)) from None
        # No WAL to merge: reading the file as it stands is exact.
        try:
            conn = _connect(uri + "&immutable=1")
        except sqlite3.Error as exc:
            raise JournalReadError(_("cannot open {path}: {error}").format(path=p, error=exc)) from None
    except sqlite3.DatabaseError as exc:
        raise JournalReadError(
            _("{path} is not a journal database ({error}); check journal.path").format(path=p, error=exc)
        ) from None
    return conn


def _connect(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA query_only=1")
        conn.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
        conn.execute("SELECT count(*) FROM events WHERE seq < 0").fetchone()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _journal_id(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
    return row[0] if row else "?"


# --------------------------------------------------------------------------- reading


def read_records(conn: sqlite3.Connection, *, since_seq: int = 0, pending_only: bool = False,
                 batch: int = 1000, until_seq: int | None = None, since_wall: float | None = None,
                 until_wall: float | None = None) -> Iterator[dict]:
    """Records with since_seq < seq (<= until_seq) in seq order (as committed: with id and
    seq); since_wall/until_wall (epoch seconds): only records stamped in [since, until)."""
    where = "seq > ?" + (" AND done IS NULL" if pending_only else "")
    extra: list[float] = []
    for cond, value in (("seq <= ?", until_seq), ("wall >= ?", since_wall), ("wall < ?", until_wall)):
        if value is not None:
            where += f" AND {cond}"
            extra.append(value)
    cursor = int(since_seq)
    while True:
        rows = conn.execute(f"SELECT seq, body FROM events WHERE {where} ORDER BY seq LIMIT ?",
                            (cursor, *extra, batch)).fetchall()
        for seq, body in rows:
            cursor = seq
            try:
                yield json.loads(body)
            except ValueError:
                yield {"seq": seq, "type": "?", "unreadable": body[:200]}
        if len(rows) < batch:
            return


def tail_records(conn: sqlite3.Connection, n: int) -> list[dict]:
    """The last n records in seq order."""
    if n <= 0:
        return []
    rows = conn.execute("SELECT body FROM events ORDER BY seq DESC LIMIT ?", (int(n),)).fetchall()
    out = []
    for (body,) in reversed(rows):
        try:
            out.append(json.loads(body))
        except ValueError:
            out.append({"type": "?", "unreadable": body[:200]})
    return out


def export_records(conn: sqlite3.Connection, out: TextIO, *, since_seq: int = 0,
                   pending_only: bool = False, until_seq: int | None = None,
                   since_wall: float | None = None, until_wall: float | None = None,
                   cards: frozenset[int] | None = None, person: str | None = None) -> int:
    """Write records as JSON Lines (the contract's event records); returns how many.
    cards, person: as ``matching_records``."""
    n = 0
    for rec in matching_records(conn, since_seq=since_seq, pending_only=pending_only, until_seq=until_seq,
                                since_wall=since_wall, until_wall=until_wall, cards=cards, person=person):
        out.write(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
        n += 1
    return n


def matching_records(conn: sqlite3.Connection, *, cards: frozenset[int] | None = None, person: str | None = None,
                     **window: Any) -> Iterator[dict]:
    """``read_records(conn, **window)`` whose card is one of ``cards`` (card_keys) and whose
    person is ``person``, where given: the export's filter, and the console's search."""
    for rec in read_records(conn, **window):
        if cards is not None and rec.get("card") not in cards:
            continue
        if person is not None and rec.get("person") != person:
            continue
        yield rec


_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_when(text: str, *, end: bool = False) -> float:
    """Epoch seconds for a date a technician types: ``2026-09-01`` (that local day's start,
    or with end its end), ``today``, ``yesterday``, or an ISO date-time (local unless it
    carries an offset). ValueError saying the accepted forms."""
    s = text.strip()
    bad = _("{text!r} is not a date: give YYYY-MM-DD, today, yesterday, or a date and time "
            "such as 2026-09-01T08:00").format(text=text)
    if s in ("today", "yesterday") or _DAY.match(s):
        try:
            day = (datetime.now().date() - timedelta(days=1 if s == "yesterday" else 0)
                   if s in ("today", "yesterday") else datetime.strptime(s, "%Y-%m-%d").date())
        except ValueError:
            raise ValueError(bad) from None
        try:
            if end:
                day += timedelta(days=1)
            return datetime(day.year, day.month, day.day).astimezone().timestamp()  # local midnight
        except (OverflowError, ValueError, OSError):  # year 1 or 9999: beyond what the clock can say
            raise ValueError(bad) from None
    try:
        t = datetime.fromisoformat(s.replace(" ", "T", 1))
        return (t if t.tzinfo else t.astimezone()).timestamp()
    except (OverflowError, ValueError, OSError):
        raise ValueError(bad) from None


def card_keys(text: str) -> frozenset[int]:
    """The keys a card string may be stored under (the journal records the key at the
    access list's key width, which the tool does not know): every width's reading."""
    from agent.core.cards import MAX_KEY_WIDTH, MIN_KEY_WIDTH, CardFormatError, parse_card_string

    keys = set()
    error = None
    for width in range(MIN_KEY_WIDTH, MAX_KEY_WIDTH + 1):
        try:
            keys.add(parse_card_string(text, width))
        except (CardFormatError, ValueError) as exc:
            error = exc
    if not keys:
        raise ValueError(str(error))
    return frozenset(keys)


def local_time_text(t: datetime, *, ms: bool = False, date: bool = True) -> str:
    """A time as the board's clock shows it, with the zone: ``2026-09-01 08:00:00 +07:00``."""
    t = t.astimezone()
    off = t.strftime("%z")
    zone = f"{off[:3]}:{off[3:]}" if len(off) == 5 else off
    shown = t.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    if ms:
        shown += f".{t.microsecond // 1000:03d}"
    return f"{shown} {zone}" if date else shown


def journal_stats(conn: sqlite3.Connection, path: str | os.PathLike[str], now_wall: float) -> dict:
    """Figures a technician asks for: id, last seq, stored, pending, oldest pending,
    by type, time range, file size."""
    p = Path(path)
    size = 0
    for f in (p, Path(str(p) + "-wal")):
        try:
            size += f.stat().st_size
        except OSError:
            pass
    conn.execute("BEGIN")  # one snapshot for every figure
    try:
        state = conn.execute("SELECT last_seq, acked_upto, overflow FROM state WHERE id = 1").fetchone()
        top = conn.execute("SELECT max(seq), min(seq), count(*), min(wall), max(wall) FROM events").fetchone()
        pending, oldest = conn.execute(
            "SELECT count(*), min(wall) FROM events WHERE done IS NULL").fetchone()
        by_type = dict(conn.execute("SELECT type, count(*) FROM events GROUP BY type ORDER BY type"))
        pending_by_type = dict(conn.execute(
            "SELECT type, count(*) FROM events WHERE done IS NULL GROUP BY type ORDER BY type"))
        recovered = conn.execute("SELECT value FROM meta WHERE key = 'recovered_seq'").fetchone()
        jid = _journal_id(conn)
    finally:
        conn.execute("COMMIT")
    last_seq = max(state[0] if state else 0, top[0] or 0)
    overflow = 0
    if state and state[2]:
        try:
            overflow = sum(int(v) for v in json.loads(state[2]).get("kinds", {}).values())
        except (ValueError, AttributeError, TypeError):
            overflow = 0
    return {
        "journal": jid,
        "path": str(p),
        "bytes": size,
        "last_seq": last_seq,
        "stored": top[2],
        "first_stored_seq": top[1],
        "pending": pending,
        "pending_by_type": pending_by_type,
        "oldest_pending_s": None if oldest is None else round(max(0.0, now_wall - oldest), 3),
        "confirmed_upto": state[1] if state else 0,
        "by_type": by_type,
        "first_ts": None if top[3] is None else _iso(top[3]),
        "last_ts": None if top[4] is None else _iso(top[4]),
        "dropped_unreported": overflow,
        # The seq of this journal's journal.recovered record: it was rebuilt from a damaged one.
        "recovered_seq": int(recovered[0]) if recovered else None,
    }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- display


def format_record(rec: dict, tz: tzinfo | None = None, *, date: bool = True) -> str:
    """One human line: local time, #seq, type, the type's fields (cards as
    facility,card); "clock?" marks a record made with an unsynchronised clock."""
    from agent.core.cards import format_key

    ts = rec.get("ts") or ""
    shown = ts
    if ts:
        try:
            # With the date (tail), the zone too, as journal stats shows its times.
            shown = local_time_text(datetime.fromisoformat(ts).astimezone(tz), ms=True, date=date)
        except ValueError:
            shown = ts
    parts = []
    # The reason first: what a denial, a rejection or a fault is about must survive a narrow
    # screen (the live view at 80 columns) ahead of the reader and card details.
    first = [k for k in ("reason", "kind") if k in rec]
    for k, v in [(k, rec[k]) for k in first] + [(k, v) for k, v in rec.items() if k not in first]:
        if k in _HIDDEN_FIELDS or v is None:
            continue
        if k == "card" and isinstance(v, int):
            try:
                v = format_key(v, max(24, v.bit_length()))["facility_card"]
            except ValueError:
                pass
        elif k == "detail" and isinstance(v, str):
            v = detail_text(v)  # the agent's English detail, in the user's language
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        parts.append(f"{k}={v}")
    flag = " clock?" if rec.get("clock_synced") is False else ""
    seq = rec.get("seq", "?")
    return f"{shown} #{seq:<6} {rec.get('type', '?'):<17} {' '.join(parts)}{flag}".rstrip()


def follow(path: Path, out: TextIO, *, after_seq: int, stop: Callable[[], bool] = lambda: False,
           poll_s: float = FOLLOW_POLL_S) -> None:
    """Print new records as they are committed until ``stop()`` (or Ctrl-C).
    A journal rebuilt by the service (a new id) is followed from its start."""
    conn: sqlite3.Connection | None = None
    jid = None
    last = after_seq
    while not stop():
        try:
            if conn is None:
                conn = open_readonly(path)
                new_id = _journal_id(conn)
                if jid is not None and new_id != jid:
                    out.write(_("-- the journal was rebuilt (new id {id}); following it from the start --")
                              .format(id=new_id) + "\n")
                    last = 0
                jid = new_id
            for rec in read_records(conn, since_seq=last):
                out.write(format_record(rec) + "\n")
                last = rec.get("seq", last)
            out.flush()
        except (sqlite3.Error, JournalReadError):
            if conn is not None:
                conn.close()
            conn = None  # the file was replaced or is busy: open it again next time
        time.sleep(poll_s)
    if conn is not None:
        conn.close()


def _local_ts(ts: str | None) -> str:
    if not ts:
        return "-"
    try:
        return local_time_text(datetime.fromisoformat(ts))
    except ValueError:
        return ts


def format_stats(s: dict) -> str:
    lines = [
        _("journal {id}: {path}").format(id=s["journal"], path=s["path"]),
        _("  size: {mb} MB").format(mb=round(s["bytes"] / 1e6, 2)),
        _("  last seq: {seq}").format(seq=s["last_seq"]),
        _("  records kept: {n}").format(n=s["stored"]),
        _("  waiting for the server's confirmation: {n} (oldest: {age})")
        .format(n=s["pending"], age=age_text(s["oldest_pending_s"])),
        _("  time range: {first} .. {last}").format(first=_local_ts(s["first_ts"]), last=_local_ts(s["last_ts"])),
    ]
    if s["dropped_unreported"]:
        lines.append(_("  refused for lack of space, not yet reported: {n}").format(n=s["dropped_unreported"]))
    if s["recovered_seq"]:
        lines.append(_("  rebuilt from a damaged journal (see record #{seq})").format(seq=s["recovered_seq"]))
    if s["by_type"]:
        lines.append(_("  by type (kept / pending):"))
        for t, n in s["by_type"].items():
            lines.append(f"    {t:<18} {n:>8} / {s['pending_by_type'].get(t, 0)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _open_from_args(args: argparse.Namespace) -> tuple[Path, sqlite3.Connection]:
    path = journal_path(args.config, args.db)
    return path, open_readonly(path)


def _export_bounds(args: argparse.Namespace) -> dict[str, Any]:
    """export's --since/--until (a seq or a date), --card and --person as export_records'
    arguments; ValueError saying what is wrong."""
    out: dict[str, Any] = {}
    for name, end in (("since", False), ("until", True)):
        text = getattr(args, name)
        if text is None:
            continue
        if text.strip().isdigit():  # a sequence number: after it (--since), up to it (--until)
            seq = int(text)
            if seq >= 2**63:
                raise ValueError(_("--{name} {text}: a record number is far smaller").format(name=name, text=text))
            out["since_seq" if name == "since" else "until_seq"] = seq
        else:
            out["since_wall" if name == "since" else "until_wall"] = parse_when(text, end=end)
    if args.card is not None:
        try:
            out["cards"] = card_keys(args.card)
        except ValueError as exc:
            raise ValueError(_("the card {card!r} cannot be read: {error}").format(card=args.card, error=exc)) from None
    if args.person is not None:
        out["person"] = args.person
    return out


def _cmd_journal(args: argparse.Namespace) -> int:
    out = sys.stdout
    what = getattr(args, "journal_command", None)
    bounds: dict[str, Any] = {}
    if what == "export":
        try:
            bounds = _export_bounds(args)  # before the journal is opened: a typo is said at once
        except ValueError as exc:
            print(f"gate-agent journal export: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        path, conn = _open_from_args(args)
    except JournalReadError as exc:
        print(f"gate-agent journal: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        if what == "tail":
            recs = tail_records(conn, args.lines)
            for rec in recs:
                out.write(format_record(rec) + "\n")
            out.flush()
            if args.follow:
                try:  # Ctrl-C ends it, even while it is still starting to follow
                    last = recs[-1]["seq"] if recs and "seq" in recs[-1] else (
                        conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
                    conn.close()
                    follow(path, out, after_seq=last)
                except KeyboardInterrupt:
                    pass
            return EXIT_OK
        if what == "export":
            n = export_records(conn, out, pending_only=args.pending, **bounds)
            out.flush()
            print(_("gate-agent journal: exported records: {n}").format(n=n), file=sys.stderr)
            return EXIT_OK
        stats = journal_stats(conn, path, time.time())
        if args.json:
            print(json.dumps(stats, indent=2, ensure_ascii=False), file=out)
        else:
            print(format_stats(stats), file=out)
        return EXIT_OK
    except sqlite3.Error as exc:
        print("gate-agent journal: " + _("reading {path} failed: {error}; try again, or run "
                                         "gate-agent doctor").format(path=path, error=exc), file=sys.stderr)
        return EXIT_UNREADABLE
    finally:
        try:
            conn.close()
        except sqlite3.Error:
            pass


def add_journal_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``journal tail|export|stats`` to a ``gate-agent`` subparsers object."""
    p = subparsers.add_parser(
        "journal",
        help=_("read the gate's journal (tail, export as JSON Lines, statistics); safe while the service runs"),
        description=_("Read the gate's event journal read-only: it works while the service runs. "
                      "Exit codes: 0 done, 2 the journal cannot be found or read."),
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, metavar="FILE",
                        help=_("config file whose journal.path is read (default {path})")
                        .format(path=DEFAULT_CONFIG))
    common.add_argument("--db", default=None, metavar="FILE", help=_("the journal file itself"))
    sub = p.add_subparsers(dest="journal_command", required=True)
    t = sub.add_parser("tail", parents=[common], help=_("the last records, one line each"))
    t.add_argument("-n", "--lines", type=int, default=20, help=_("how many (default 20)"))
    t.add_argument("-f", "--follow", action="store_true", help=_("keep printing new records (Ctrl-C stops)"))
    e = sub.add_parser("export", parents=[common], help=_("records as JSON Lines on standard output"))
    e.add_argument("--since", default=None, metavar="SEQ|DATE",
                   help=_("only records after this seq, or from this date or time (local: 2026-09-01, "
                          "2026-09-01T08:00, today, yesterday; or with an offset)"))
    e.add_argument("--until", default=None, metavar="SEQ|DATE",
                   help=_("only records up to this seq, or before the end of this date (a time: before it)"))
    e.add_argument("--card", default=None, metavar="CARD",
                   help=_("only this card's records (100,60179, the printed number 0006613779, or hex:UID)"))
    e.add_argument("--person", default=None, metavar="ID",
                   help=_("only this person's records (the person id of the access list)"))
    e.add_argument("--pending", action="store_true", help=_("only records not yet confirmed by the server"))
    s = sub.add_parser("stats", parents=[common], help=_("counts, backlog, oldest pending record, size"))
    s.add_argument("--json", action="store_true", help=_("as JSON"))
    p.set_defaults(func=_cmd_journal)
    return p
