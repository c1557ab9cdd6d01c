"""What the console's pages read from the journal (read-only) and draw.

The journal is opened read-only for each page (agent/tools/journaltool.py): in
WAL mode a reader never blocks the gate's writer. Nothing here writes.
"""
from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from html import escape
from typing import Any

from agent.core.presence import record_wall
from agent.tools.journaltool import matching_records, read_records

__all__ = ["CSV_COLUMNS", "chart_svg", "csv_rows", "search", "today_stats"]

BIN_S = 600  # the chart's bars: 10 minutes
CHUNK = 64 * 1024  # CSV text handed on at a time
ENVELOPE = frozenset({"v", "id", "seq", "ts", "clock_synced", "boot", "mono", "type"})
CSV_COLUMNS = ("seq", "id", "ts", "type", "reader", "direction", "card", "format", "person", "source", "reason",
               "detail")
_NAMED = frozenset(CSV_COLUMNS) | ENVELOPE


def local_midnight(now: float) -> float:
    d = datetime.fromtimestamp(now).astimezone()
    return d.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def today_stats(conn: sqlite3.Connection, now: float, late_after: str = "08:30") -> dict[str, Any]:
    """Passages per 10 minutes (in and out), denials by reason, and the late arrivals
    (people whose first entry of the day came after ``late_after``, local HH:MM)."""
    start = local_midnight(now)
    end = (datetime.fromtimestamp(start).astimezone() + timedelta(days=1)).timestamp()
    bins = (end - start) // BIN_S
    n = int(bins)
    ins, outs = [0] * n, [0] * n
    denials: Counter[str] = Counter()
    first_in: dict[str, float] = {}
    hh, mm = (int(x) for x in late_after.split(":"))
    late_at = datetime.fromtimestamp(start).astimezone().replace(hour=hh, minute=mm).timestamp()
    total = 0
    for rec in read_records(conn, since_wall=start, until_wall=end):
        t = record_wall(rec)
        if t is None or not start <= t < end:
            continue
        kind = rec.get("type")
        if kind == "passage":
            i = min(n - 1, int((t - start) // BIN_S))
            total += 1
            if rec.get("direction") == "in":
                ins[i] += 1
                person = rec.get("person")
                if isinstance(person, str) and person not in first_in:
                    first_in[person] = t
            elif rec.get("direction") == "out":
                outs[i] += 1
        elif kind == "access.denied":
            denials[str(rec.get("reason"))] += 1
    late = sorted(((t, p) for p, t in first_in.items() if t >= late_at))
    return {"start": start, "ins": ins, "outs": outs, "passages": total, "denials": denials.most_common(),
            "late": [(p, t) for t, p in late], "late_after": late_after, "entered": len(first_in)}


def chart_svg(ins: list[int], outs: list[int], *, label_in: str, label_out: str, title: str) -> str:
    """Bars of entries (up) and exits (down) per 10 minutes, server-drawn: no script, no library,
    and it prints. Hours shown: 06..19 at least, widened to the first and last passage."""
    used = [i for i in range(len(ins)) if ins[i] or outs[i]]
    first_h = min([6] + [u // 6 for u in used])
    last_h = max([19] + [u // 6 + 1 for u in used])
    lo, hi = first_h * 6, min(len(ins), last_h * 6)
    peak = max([1] + ins[lo:hi] + outs[lo:hi])
    bw, left, width, half = 6, 34, (hi - lo) * 6, 90
    h = 2 * half + 30
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {left + width + 8} {h}" '
           f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'),
           f'<line x1="{left}" y1="{half}" x2="{left + width}" y2="{half}" class="axis"/>',
           f'<text x="2" y="12" class="lbl">{peak}</text><text x="2" y="{2 * half}" class="lbl">{peak}</text>',
           f'<text x="{left + 4}" y="12" class="lbl in">▲ {escape(label_in)}</text>',
           f'<text x="{left + 4}" y="{2 * half}" class="lbl out">▼ {escape(label_out)}</text>']
    for k in range(lo, hi):
        x = left + (k - lo) * bw
        if k % 6 == 0:
            out.append(f'<line x1="{x}" y1="0" x2="{x}" y2="{2 * half}" class="grid"/>'
                       f'<text x="{x}" y="{2 * half + 16}" class="lbl">{k // 6:02d}</text>')
        when = f"{k // 6:02d}:{k % 6 * 10:02d}"
        if ins[k]:
            hgt = max(1, round(ins[k] / peak * (half - 4)))
            out.append(f'<rect class="bin" x="{x}" y="{half - hgt}" width="{bw - 1}" height="{hgt}">'
                       f'<title>{when} {escape(label_in)}: {ins[k]}</title></rect>')
        if outs[k]:
            hgt = max(1, round(outs[k] / peak * (half - 4)))
            out.append(f'<rect class="bout" x="{x}" y="{half}" width="{bw - 1}" height="{hgt}">'
                       f'<title>{when} {escape(label_out)}: {outs[k]}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def search(conn: sqlite3.Connection, *, since_wall: float | None, until_wall: float | None,
           cards: frozenset[int] | None = None, person: str | None = None, kind: str | None = None) -> Iterator[dict]:
    """The journal's records in the window, filtered as `gate-agent journal export` filters
    (--card any form, --person), and by type."""
    for rec in matching_records(conn, since_wall=since_wall, until_wall=until_wall, cards=cards, person=person):
        if not kind or rec.get("type") == kind:
            yield rec


def csv_rows(records: Iterator[dict]) -> Iterator[str]:
    """CSV text, a row at a time: the fields `gate-agent journal export` writes, the common ones
    in their own columns (CSV_COLUMNS) and every other field of the record as JSON in ``detail``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for rec in records:
        rest = {k: v for k, v in rec.items() if k not in _NAMED}
        row = [rec.get(c) for c in CSV_COLUMNS[:-1]]
        w.writerow(["" if v is None else _cell(v) for v in row] + [json.dumps(rest, ensure_ascii=False) if rest else ""])
        if buf.tell() >= CHUNK:  # in pieces: the server hands each piece on from a thread
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _cell(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    # A spreadsheet runs a cell that starts with = + - @ as a formula (CSV injection): a
    # person id or a reader name comes from a server's list and must never run there.
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s
