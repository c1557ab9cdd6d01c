"""The journal's WAL stays bounded under sustained appends (issue 12, "a bounded WAL").

The gate commits one record at a time, back to back, while a thread pages
through the journal the way the uplink does (``pending`` then ``ack_one``).
A PASSIVE checkpoint alone never lets the WAL start over while the gate keeps
appending, so before the fix the WAL grew by every commit (1.25 GB in a 5 s
bench run); here it must stay under ``wal_limit_bytes`` however long the
appends go on, lose nothing (every seq readable after, also across kill -9),
and a reader that holds an old snapshot must stop the WAL at its limit
instead of letting it grow: the records then wait in memory (``WAL full``)
and are written once the reader lets go.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.core.events import Now
from agent.core.records import make_record
from agent.uplink.journal import WAL_FULL, Journal
from tests.test_journal import BASE, BOOT, ROOT, granted, open_journal

MB = 1 << 20
WAIT_S = 60.0  # generous: waiting for the sync thread, never asserting speed


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.db"


def wal_size(path: Path) -> int:
    try:
        return os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        return 0


class Uplink(threading.Thread):
    """Pages through the journal and acknowledges one record at a time, as the
    uplink does in broker mode (agent/uplink/mqtt.py: pending, then ack_one)."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(name="test-uplink", daemon=True)
        self.journal = journal
        self.halt = threading.Event()
        self.acked = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            cursor = 0
            while not self.halt.is_set():
                batch = self.journal.pending(cursor, 50)
                for rec in batch:
                    self.journal.ack_one(rec["seq"])
                    cursor = rec["seq"]
                self.acked += len(batch)
                if not batch:
                    time.sleep(0.001)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=WAIT_S)
        assert self.error is None, f"the uplink thread failed: {self.error!r}"


def settle(j: Journal) -> list[dict]:
    """Gate thread, idle: until what waits in memory is written; the records
    the journal committed itself meanwhile."""
    out: list[dict] = []
    deadline = time.monotonic() + WAIT_S
    while True:
        out.extend(j.maintenance(BASE))
        if j.stats()["buffered"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert j.stats()["buffered"] == 0, j.stats()
    return out


def stored_seqs(path: Path) -> dict[int, dict]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {seq: json.loads(body) for seq, body in conn.execute("SELECT seq, body FROM events")}
    finally:
        conn.close()


def test_the_wal_stays_under_its_limit_while_the_gate_appends_and_the_uplink_reads(path):
    limit = 4 * MB
    j = open_journal(path, wal_limit_bytes=limit, sync_interval_s=1.0)
    j.start_sync_thread()
    uplink = Uplink(j)
    uplink.start()
    committed: dict[int, str] = {}
    biggest = 0
    own: list[dict] = []
    try:
        # One record per commit, as the gate does: 6,000 commits write about
        # 80 MB of pages to the WAL, 20 times its limit. (So small a limit
        # leaves the sync thread little time at this pace: the gate may reach
        # it and hold records in memory for a moment; they count as committed.)
        for i in range(6000):
            for rec in j.commit([granted(i)]):
                if rec["type"] == "access.granted":
                    committed[rec["seq"]] = rec["person"]
                else:
                    own.append(rec)
            biggest = max(biggest, wal_size(path))
    finally:
        uplink.stop()
    settle(j)
    stats = j.stats()
    j.close()
    assert biggest <= limit, f"the WAL reached {biggest} bytes, over its limit of {limit}"
    assert stats["wal_max_bytes"] <= limit
    assert stats["wal_resets"] >= 5, "the WAL started over again and again"
    assert stats["wal_limit_bytes"] == limit
    assert uplink.acked > 0, "the uplink read while the gate appended"
    assert len(committed) == 6000
    assert all(r["type"] == "alarm" and r["kind"] == "journal_capacity" for r in own), own
    rows = stored_seqs(path)
    assert set(committed) <= set(rows), "every committed record is in the journal"
    assert all(rows[s]["person"] == p for s, p in committed.items())
    assert sorted(rows) == list(range(1, max(rows) + 1)), "no gap in the seqs"


def test_a_reader_holding_a_snapshot_stops_the_wal_at_its_limit_and_loses_nothing(path):
    """A reader that keeps a read transaction open (a technician's sqlite3
    shell, a stuck tool) keeps every checkpoint from folding in what came
    after its snapshot, so the WAL cannot start over. It must not grow past
    its limit: at the limit the gate keeps numbering records and holds them
    in memory (the disk-full path), raises a journal_capacity alarm, and
    writes them all once the reader lets go."""
    limit = 1 * MB
    j = open_journal(path, wal_limit_bytes=limit, sync_interval_s=0.05)
    j.start_sync_thread()
    out: list[dict] = j.commit([granted(i) for i in range(300)])
    offered = j.pending(0, 300)  # the uplink has them; it acknowledges them below
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchone()  # holds a read snapshot
    biggest = 0
    i = 300
    try:
        # Far more than the limit's worth (about 80 commits fill 1 MB), with the
        # server's acknowledgements arriving and the gate's idle maintenance.
        while i < 1800:
            out.extend(j.commit([granted(i)]))
            biggest = max(biggest, wal_size(path))
            i += 1
            if i % 50 == 0:
                j.ack_upto(j.id, offered[-1]["seq"])
                out.extend(j.maintenance(BASE))
                biggest = max(biggest, wal_size(path))
        stats = j.stats()
        assert stats["blocked"] == WAL_FULL, stats
        assert stats["buffered"] > 0
        assert stats["wal_pinned"] >= 1, "the sync thread tried and was kept from restarting"
        alarms = [r for r in out if r["type"] == "alarm"]
        assert alarms and alarms[0]["kind"] == "journal_capacity" and alarms[0]["active"]
        assert "snapshot" in alarms[0]["detail"], alarms[0]["detail"]
        # Nothing waiting in memory is offered to the uplink (it may die with the process).
        offered = j.pending(0, 10_000)
        assert offered and max(r["seq"] for r in offered) < max(r["seq"] for r in out)
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert biggest <= limit, f"the WAL reached {biggest} bytes, over its limit of {limit}"
    out.extend(settle(j))
    out.extend(j.commit([granted(i)]))
    stats = j.stats()
    assert stats["blocked"] is None and stats["buffered"] == 0, stats
    cleared = [r for r in out if r["type"] == "alarm" and not r["active"]]
    assert cleared, "the alarm is cleared once the WAL starts over"
    j.close()
    rows = stored_seqs(path)
    assert {r["seq"] for r in out} <= set(rows)
    assert sorted(rows) == list(range(1, max(rows) + 1)), "no gap in the seqs"
    assert all(rows[r["seq"]] == r for r in out)


def test_the_disk_budget_holds_the_database_and_its_wal(path):
    """journal.disk_budget_mb bounds the journal's files together: the
    database may only use the budget less the WAL's limit."""
    budget = 4 * MB
    limit = 512 * 1024
    j = open_journal(
        path, disk_budget_bytes=budget, capacity_events=8000, wal_limit_bytes=limit,
        sync_interval_s=0.05,
    )
    j.start_sync_thread()
    biggest = 0
    n = 0
    deadline = time.monotonic() + WAIT_S
    while j.stats()["blocked"] != "disk full" and time.monotonic() < deadline:
        now = Now(mono=float(n), wall=BASE + n)
        j.commit([
            make_record("alarm", now, BOOT, kind="test", active=True, detail="x" * 1500)
            for _ in range(4)
        ])
        n += 4
        files = sum(os.stat(p).st_size for p in (path, Path(f"{path}-wal")) if p.exists())
        biggest = max(biggest, files)
    stats = j.stats()
    j.close()
    assert stats["blocked"] == "disk full", stats
    assert biggest <= budget, f"database and WAL took {biggest} bytes, over the budget {budget}"


def test_the_wal_limit_is_checked(path):
    with pytest.raises(ValueError, match="wal_limit_bytes"):
        open_journal(path, wal_limit_bytes=1024)
    with pytest.raises(ValueError, match="wal_limit_bytes"):
        open_journal(path, disk_budget_bytes=8 * MB, capacity_events=1000, wal_limit_bytes=6 * MB)


# --- kill -9 while the WAL starts over ---------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, threading, time
    sys.path.insert(0, {root!r})
    from agent.core.events import Now
    from agent.core.records import make_record
    from agent.uplink.journal import Journal
    j = Journal({path!r}, sync_interval_s=0.2, wal_limit_bytes=512 * 1024)
    j.start_sync_thread()

    def uplink():
        cursor = 0
        while True:
            batch = j.pending(cursor, 50)
            for rec in batch:
                j.ack_one(rec["seq"])
                cursor = rec["seq"]
            if not batch:
                time.sleep(0.001)

    threading.Thread(target=uplink, daemon=True).start()
    i = 0
    while True:
        i += 1
        now = Now(mono=float(i), wall=1788000000.0 + i)
        rec = make_record("passage", now, "boot", direction="in", source="card",
                          person="p-{cycle}-%d" % i, card=i, after_ms=900)
        for out in j.commit([rec]):
            if out["type"] == "passage":
                print(out["seq"], out["person"], flush=True)
        if i % 200 == 0:
            j.maintenance(1788000000.0 + i)
            print("resets", j.stats()["wal_resets"], flush=True)
    """
)


def test_kill_9_while_the_wal_starts_over_loses_no_committed_record(path):
    path.parent.mkdir(parents=True)
    seen: dict[int, str] = {}
    resets = 0
    for cycle in range(3):
        code = CHILD.format(root=str(ROOT), path=str(path), cycle=cycle)
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        lines = []
        cycle_resets = 0
        # Enough commits for the WAL (limit 512 KiB) to start over several times.
        deadline = time.monotonic() + WAIT_S
        while cycle_resets < 3 + cycle or len(lines) < 1500:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"child died or stalled: {proc.stderr.read()[-2000:]}")
            if line.startswith("resets "):
                cycle_resets = int(line.split()[1])
            else:
                lines.append(line)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        lines.extend(rest.splitlines(keepends=True))
        resets += cycle_resets
        for line in lines:
            # A line the kill cut in two (its write straddled the pipe buffer) says nothing.
            if line.strip() and line.endswith("\n") and not line.startswith("resets "):
                parts = line.split()
                assert len(parts) == 2, f"the child printed {line!r}"
                seen[int(parts[0])] = parts[1]
        j = open_journal(path)
        assert j.recovered_record is None, j.recovered_record
        j.close()
        rows = stored_seqs(path)
        for seq, person in seen.items():
            assert seq in rows, f"seq {seq} was committed before kill -9 and is gone"
            assert rows[seq]["person"] == person
        assert sorted(rows) == list(range(1, max(rows) + 1)), "no gap in the seqs"
    assert resets >= 3
