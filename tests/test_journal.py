"""The journal: nothing the gate did is lost (issue 4, section 1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent import contract
from agent.core.events import Now
from agent.core.records import make_record
from agent.uplink.journal import (
    BYTES_PER_EVENT_ESTIMATE,
    DEFAULT_DISK_BUDGET,
    Journal,
    JournalError,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = 1_788_000_000.0  # an epoch in 2026
BOOT = "5f0c1d2e-7a4b-4c3d-9e8f-0a1b2c3d4e5f"
DAY = 86400.0


def clock() -> Now:
    return Now(mono=100.0, wall=BASE, synced=True)


def granted(i: int, wall: float | None = None) -> dict:
    now = Now(mono=10.0 + i, wall=BASE + i if wall is None else wall)
    return make_record(
        "access.granted",
        now,
        BOOT,
        reader="entry",
        direction="in",
        card=100_000 + i,
        format="w26",
        person=f"p-{i:06d}",
    )


def reader_error(i: int) -> dict:
    now = Now(mono=10.0 + i, wall=BASE + i)
    return make_record(
        "reader.error", now, BOOT, reader="entry", kind="parity", detail="", raw=None
    )


def open_journal(path: Path, **kw) -> Journal:
    kw.setdefault("clock", clock)
    kw.setdefault("boot", BOOT)
    return Journal(path, **kw)


def drain(j: Journal, limit: int = 1000) -> list[dict]:
    return j.pending(0, limit)


def assert_valid_event(rec: dict) -> None:
    assert contract.validate("event", rec) == [], rec


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.db"


# --- numbering ----------------------------------------------------------------


def test_commit_numbers_records_in_order_and_keeps_their_fields(path):
    j = open_journal(path)
    recs = [granted(i) for i in range(3)]
    originals = [dict(r) for r in recs]
    out = j.commit(recs)
    assert [r["seq"] for r in out] == [1, 2, 3]
    assert [r["id"] for r in out] == [f"{j.id}:{n}" for n in (1, 2, 3)]
    assert re.fullmatch(r"[A-Za-z0-9._-]{8,12}", j.id)
    for got, orig in zip(out, originals):
        assert {k: v for k, v in got.items() if k not in ("id", "seq")} == orig
        assert_valid_event(got)
    assert recs == originals, "commit must not change the caller's dicts"
    j.close()


def test_a_record_carrying_an_old_id_gets_a_new_one(path):
    j = open_journal(path)
    j.commit([granted(0)])
    stale = {**granted(1), "id": "other:7", "seq": 7}
    (out,) = j.commit([stale])
    assert (out["seq"], out["id"]) == (2, f"{j.id}:2")
    j.close()


def test_journal_id_is_stable_and_seq_continues_across_reopen(path):
    j = open_journal(path)
    first = j.commit([granted(0), granted(1)])
    jid = j.id
    j.close()
    j = open_journal(path)
    assert j.id == jid
    assert drain(j) == first, "pending gives back the records exactly as committed"
    (nxt,) = j.commit([granted(2)])
    assert nxt["seq"] == 3 and nxt["id"] == f"{jid}:3"
    j.close()


def test_seq_is_never_reused_even_after_everything_was_purged(path):
    j = open_journal(path, retention_days=1)
    j.commit([granted(i) for i in range(5)])
    j.pending()
    assert j.ack_upto(j.id, 5)
    j.maintenance(BASE + 10 * DAY)  # apply the ack, then purge past retention
    j.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    j = open_journal(path)
    (nxt,) = j.commit([granted(9)])
    assert nxt["seq"] == 6
    j.close()


def test_different_databases_get_different_journal_ids(tmp_path):
    a = open_journal(tmp_path / "a.db")
    b = open_journal(tmp_path / "b.db")
    assert a.id != b.id
    a.close()
    b.close()


# --- pending and acknowledgements ------------------------------------------------


def test_pending_is_in_seq_order_after_a_seq_and_limited(path):
    j = open_journal(path)
    out = j.commit([granted(i) for i in range(10)])
    assert [r["seq"] for r in j.pending(0, 4)] == [1, 2, 3, 4]
    assert [r["seq"] for r in j.pending(4, 4)] == [5, 6, 7, 8]
    assert [r["seq"] for r in j.pending(8, 100)] == [9, 10]
    assert j.pending(10) == []
    assert j.pending(0, 100) == out
    j.close()


def test_ack_upto_is_cumulative_and_survives_reopen(path):
    j = open_journal(path)
    j.commit([granted(i) for i in range(6)])
    j.pending()
    assert j.ack_upto(j.id, 4) is True
    assert [r["seq"] for r in drain(j)] == [5, 6]
    assert j.backlog() == 2
    j.maintenance(BASE)
    assert [r["seq"] for r in drain(j)] == [5, 6]
    j.close()
    j = open_journal(path)
    assert [r["seq"] for r in drain(j)] == [5, 6]
    assert j.backlog() == 2
    j.close()


def test_an_ack_for_another_journal_is_ignored(path):
    j = open_journal(path)
    j.commit([granted(i) for i in range(3)])
    j.pending()
    assert j.ack_upto("someone-else", 3) is False
    assert [r["seq"] for r in drain(j)] == [1, 2, 3]
    j.maintenance(BASE)
    assert j.backlog() == 3
    j.close()


def test_ack_one_acknowledges_only_that_record(path):
    j = open_journal(path)
    j.commit([granted(i) for i in range(5)])
    j.pending()
    assert j.ack_one(2) and j.ack_one(4)
    assert [r["seq"] for r in drain(j)] == [1, 3, 5]
    assert j.backlog() == 3
    j.maintenance(BASE)
    j.close()
    j = open_journal(path)
    assert [r["seq"] for r in drain(j)] == [1, 3, 5]
    j.close()


def test_in_order_ack_one_compacts_and_reaches_the_table(path):
    j = open_journal(path)
    j.commit([granted(i) for i in range(50)])
    offered = drain(j)
    for rec in offered:  # broker mode: one PUBACK per message
        assert j.ack_one(rec["seq"])
    assert drain(j) == [] and j.backlog() == 0
    j.maintenance(BASE)
    j.close()
    j = open_journal(path)
    assert drain(j) == [] and j.backlog() == 0
    j.close()


def test_an_ack_beyond_what_was_committed_does_not_swallow_later_records(path):
    j = open_journal(path)
    j.commit([granted(i) for i in range(3)])
    j.pending()
    assert j.ack_upto(j.id, 1000)
    assert j.ack_one(500) is False
    j.maintenance(BASE)
    later = j.commit([granted(3), granted(4)])
    assert drain(j) == later
    j.close()


def test_acks_not_yet_applied_are_applied_by_close(path):
    j = open_journal(path)
    j.commit([granted(i) for i in range(4)])
    j.pending()
    j.ack_upto(j.id, 2)
    j.ack_one(4)
    j.close()  # no maintenance before
    j = open_journal(path)
    assert [r["seq"] for r in drain(j)] == [3]
    j.close()


def test_acks_are_applied_in_bounded_batches_by_maintenance(path):
    j = open_journal(path)
    for start in range(0, 5000, 1000):
        j.commit([granted(i) for i in range(start, start + 1000)])
    j.pending()
    j.ack_upto(j.id, 5000)
    calls = 0
    while j.stats()["stored"] > 0:
        j.maintenance(BASE)
        calls += 1
        assert calls < 100
    assert calls > 1, "5000 acknowledgements are not applied in one gate-thread pause"
    j.close()


def test_backlog_and_oldest_pending_age(path):
    j = open_journal(path)
    assert j.backlog() == 0 and j.oldest_pending_age_s(BASE) is None
    j.commit([granted(0, wall=BASE), granted(1, wall=BASE + 60)])
    assert j.backlog() == 2
    assert j.oldest_pending_age_s(BASE + 100) == pytest.approx(100.0)
    j.pending()
    j.ack_one(1)
    assert j.oldest_pending_age_s(BASE + 100) == pytest.approx(40.0)
    stats = j.stats()
    assert stats["journal"] == j.id and stats["backlog"] == 1 and stats["last_seq"] == 2
    j.close()


def _rows_in_main_file(path: Path) -> int:
    copy = path.with_name("copy.db")
    shutil.copy(path, copy)  # the database file alone, without its WAL
    with sqlite3.connect(copy) as db:
        has = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        n = db.execute("SELECT count(*) FROM events").fetchone()[0] if has else 0
    copy.unlink()
    return n


def test_commit_never_checkpoints_and_checkpoint_folds_the_wal_in(path):
    j = open_journal(path)
    out = j.commit([granted(i) for i in range(500)])
    for i in range(500, 700):
        out += j.commit([granted(i)])
    assert _rows_in_main_file(path) == 0, "the gate thread never checkpoints (a checkpoint fsyncs)"
    j.checkpoint()
    assert _rows_in_main_file(path) == len(out)
    j.close()


def test_pending_offers_only_records_already_synced_to_disk(path):
    j = open_journal(path)
    j.commit([granted(0)])
    before = j.stats()["syncs"]
    assert [r["seq"] for r in j.pending()] == [1]
    stats = j.stats()
    assert stats["synced_seq"] == 1 and stats["syncs"] > before
    j.close()


def test_pending_offers_fresh_records_while_the_sync_thread_runs(path):
    j = open_journal(path, sync_interval_s=30)  # the thread itself will not sync in time
    j.start_sync_thread()
    for i in range(3):
        (rec,) = j.commit([granted(i)])
        assert j.pending(rec["seq"] - 1) == [rec]
    j.close()


def test_sync_thread_syncs_in_the_background_and_stops(path):
    j = open_journal(path, sync_interval_s=0.05)
    j.start_sync_thread()
    j.commit([granted(0)])
    deadline = time.monotonic() + 10
    while j.stats()["synced_seq"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert j.stats()["synced_seq"] == 1
    j.stop()
    assert not any(t.name == "journal-sync" for t in __import__("threading").enumerate())
    j.close()


# --- the gate never waits for the uplink -------------------------------------------


def test_a_reader_holding_a_snapshot_does_not_block_commit(path):
    j = open_journal(path)
    j.commit([granted(0)])
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchone()  # holds a read snapshot
    out = j.commit([granted(1)])
    assert out[0]["seq"] == 2 and j.stats()["blocked"] is None and j.stats()["buffered"] == 0
    reader.execute("COMMIT")
    reader.close()
    j.close()


def test_a_foreign_write_lock_makes_commit_buffer_not_wait(path):
    j = open_journal(path)
    j.commit([granted(0)])
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # takes the write lock
    out = j.commit([granted(1)])
    assert [r["seq"] for r in out if r["type"] == "access.granted"] == [2]
    assert j.stats()["buffered"] >= 1
    other.execute("ROLLBACK")
    other.close()
    j.commit([granted(2)])
    assert j.stats()["buffered"] == 0
    seqs = [r["seq"] for r in drain(j)]
    assert seqs == list(range(1, len(seqs) + 1)) and {1, 2, 3} <= set(seqs)
    j.close()


# --- kill -9 -----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from agent.core.events import Now
    from agent.core.records import make_record
    from agent.uplink.journal import Journal
    j = Journal({path!r}, sync_interval_s=0.2)
    j.start_sync_thread()
    i = 0
    while True:
        i += 1
        now = Now(mono=float(i), wall=1788000000.0 + i)
        rec = make_record("passage", now, "boot", direction="in", source="card",
                          person="p-{cycle}-%d" % i, card=i, after_ms=900)
        (out,) = j.commit([rec])
        print(out["seq"], out["person"], flush=True)
    """
)


def test_every_record_whose_commit_returned_survives_kill_9(path):
    path.parent.mkdir(parents=True)
    seen: dict[int, str] = {}
    for cycle in range(3):
        code = CHILD.format(root=str(ROOT), path=str(path), cycle=cycle)
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        lines = []
        target = 200 + 150 * cycle
        while len(lines) < target:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"child died: {proc.stderr.read()}")
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        lines.extend(rest.splitlines(keepends=True))
        for line in lines:
            # A line the kill cut in two (its write straddled the pipe buffer) says nothing.
            if line.strip() and line.endswith("\n"):
                seq, person = line.split()
                seen[int(seq)] = person
        j = open_journal(path)
        stored = {r["seq"]: r for r in j.pending(0, 100_000)}
        for seq, person in seen.items():
            assert seq in stored, f"seq {seq} was committed before kill -9 and is gone"
            assert stored[seq]["person"] == person
        # Seqs stay gap-free and ordered through the kills.
        assert sorted(stored) == list(range(1, max(stored) + 1))
        j.close()


# --- corruption ------------------------------------------------------------------


def _corrupt_page_holding(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    at = data.find(needle)
    assert at > page_size, "the marker must sit on a data page"
    start = at - at % page_size
    data[start : start + page_size] = bytes((i * 37 + 11) % 256 for i in range(page_size))
    path.write_bytes(bytes(data))


def test_a_corrupt_journal_is_moved_aside_and_its_pending_records_salvaged(path, tmp_path):
    j = open_journal(path)
    committed = []
    for start in range(0, 300, 50):
        committed += j.commit([granted(i) for i in range(start, start + 50)])
    j.pending()
    j.ack_upto(j.id, 50)
    old_id = j.id
    j.close()
    pending_before = {r["id"]: r for r in committed[50:]}

    damaged = tmp_path / "copy" / "journal.db"
    damaged.parent.mkdir()
    shutil.copy(path, damaged)
    _corrupt_page_holding(damaged, b'"seq":200,')
    damaged_bytes = damaged.read_bytes()

    j = open_journal(damaged)
    rec = j.recovered_record
    assert rec is not None and rec["type"] == "journal.recovered"
    assert_valid_event(rec)
    assert rec["old_journal"] == old_id and j.id != old_id
    moved = Path(rec["moved_to"])
    assert moved.parent == damaged.parent and moved.name.startswith("journal.db.corrupt-")
    assert moved.read_bytes() == damaged_bytes, "the damaged file is kept as it was"
    assert stat.S_IMODE(moved.stat().st_mode) == 0o600

    new_pending = j.pending(0, 10_000)
    assert new_pending[-1] == rec, "journal.recovered follows the salvaged records"
    salvaged = new_pending[:-1]
    assert rec["salvaged"] == len(salvaged) > 0
    assert [r["seq"] for r in new_pending] == list(range(1, len(new_pending) + 1))
    origins = [r["salvaged_from"] for r in salvaged]
    assert origins == sorted(origins, key=lambda i: int(i.split(":")[1])), "salvage keeps the order"
    for r in salvaged:
        orig = pending_before[r["salvaged_from"]]
        assert r["id"] == f"{j.id}:{r['seq']}"
        strip = lambda d: {k: v for k, v in d.items() if k not in ("id", "seq", "salvaged_from")}
        assert strip(r) == strip(orig)
    assert f"{old_id}:200" not in origins
    assert rec["lost"] >= 1
    assert rec["salvaged"] + rec["lost"] >= len(pending_before)
    assert not any(o.split(":")[1] in {str(n) for n in range(1, 51)} for o in origins), (
        "acknowledged records are not salvaged"
    )
    j.close()
    j = open_journal(damaged)
    assert j.recovered_record is None, "a sound journal reopens without recovery"
    assert j.pending(0, 10_000) == new_pending
    j.close()


def test_a_file_that_is_not_a_database_is_replaced_by_a_new_journal(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite at all\n" * 200)
    j = open_journal(path)
    rec = j.recovered_record
    assert rec["salvaged"] == 0 and rec["lost"] is None and rec["old_journal"] is None
    assert_valid_event(rec)
    assert Path(rec["moved_to"]).read_bytes().startswith(b"this is not sqlite")
    assert drain(j) == [rec]
    (nxt,) = j.commit([granted(0)])
    assert nxt["seq"] == 2
    j.close()


def test_a_rebuild_interrupted_before_the_last_rename_is_finished_at_next_open(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage" * 1000)
    j = open_journal(path)
    jid, rec = j.id, j.recovered_record
    j.close()
    os.replace(path, path.with_name("journal.db.salvage"))  # as if the crash came before it
    j = open_journal(path)
    assert j.id == jid and j.recovered_record == rec
    j.close()


def test_a_stale_unfinished_salvage_beside_a_sound_journal_is_discarded(path):
    j = open_journal(path)
    out = j.commit([granted(0)])
    jid = j.id
    j.close()
    stale = path.with_name("journal.db.salvage")
    stale.write_bytes(b"half written")
    j = open_journal(path)
    assert j.id == jid and drain(j) == out and not stale.exists()
    j.close()


# --- capacity ----------------------------------------------------------------------


def test_capacity_alarm_low_value_first_overflow_counted_and_reported(path):
    j = open_journal(path, capacity_events=10)
    journalled = []
    alarms = []
    for i in range(8):
        out = j.commit([granted(i)])
        journalled += out
    assert not [r for r in journalled if r["type"] == "alarm"], "no alarm at 80 % exactly"
    out = j.commit([granted(8)])  # 9 of 10: past 80 %
    alarms = [r for r in out if r["type"] == "alarm"]
    assert len(alarms) == 1 and alarms[0]["kind"] == "journal_capacity" and alarms[0]["active"]
    assert_valid_event(alarms[0])
    # 10 of 10 stored now (9 records and the alarm): telemetry-like records give way first...
    assert j.commit([reader_error(1)]) == []
    # ...and access records are kept to the hard cap, then dropped and counted.
    assert j.commit([granted(20)]) == []
    assert j.commit([granted(21), reader_error(2)]) == []
    stats = j.stats()
    assert stats["stored"] == 10 and stats["dropped_total"] == 4
    assert not any(r["type"] == "alarm" for r in j.commit([granted(22)])), (
        "the alarm is raised once"
    )
    offered = drain(j)
    assert [r["seq"] for r in offered] == list(range(1, 11)), "dropped records leave no gap"

    j.ack_upto(j.id, 10)
    out = j.maintenance(BASE)  # space returns
    overflow = [r for r in out if r["type"] == "journal.overflow"]
    cleared = [r for r in out if r["type"] == "alarm"]
    assert len(overflow) == 1
    assert overflow[0]["dropped"] == 5
    assert overflow[0]["kinds"] == {"reader.error": 2, "access.granted": 3}
    assert_valid_event(overflow[0])
    assert len(cleared) == 1 and cleared[0]["active"] is False
    assert_valid_event(cleared[0])
    assert drain(j) == out, "the journal's own records are journalled like the others"
    # Accepting again.
    assert [r["type"] for r in j.commit([granted(30)])] == ["access.granted"]
    j.close()


def test_unreported_drops_survive_a_restart(path):
    j = open_journal(path, capacity_events=3)
    j.commit([granted(0), granted(1), granted(2)])  # full, and the capacity alarm beyond
    assert j.commit([granted(3)]) == []
    j.close()
    j = open_journal(path, capacity_events=3)
    j.pending()
    j.ack_upto(j.id, 4)
    out = j.maintenance(BASE)
    (overflow,) = [r for r in out if r["type"] == "journal.overflow"]
    assert overflow["dropped"] == 1 and overflow["kinds"] == {"access.granted": 1}
    j.close()


def test_a_million_pending_events_fit_the_default_budget(path):
    j = open_journal(path)
    n = 3000
    for start in range(0, n, 500):
        j.commit([granted(i) for i in range(start, start + 500)])
    j.close()
    with sqlite3.connect(path) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    per_event = (pages - free) * size / n
    assert per_event <= BYTES_PER_EVENT_ESTIMATE
    assert 1_000_000 * BYTES_PER_EVENT_ESTIMATE <= DEFAULT_DISK_BUDGET


def test_a_budget_too_small_for_the_capacity_is_refused_with_advice(path):
    with pytest.raises(ValueError, match="raise the budget|lower capacity_events"):
        Journal(path, capacity_events=1_000_000, disk_budget_bytes=10_000_000)


# --- full disk -------------------------------------------------------------------


def _fill_disk(j: Journal) -> list[dict]:
    """Commit until SQLITE_FULL (max_page_count pinned at the current size)."""
    j.set_disk_budget(0)  # SQLite keeps at least the current pages: no growth
    out: list[dict] = []
    for i in range(1000, 2000):
        out += j.commit([granted(i)])
        if j.stats()["blocked"]:
            return out
    pytest.fail("the journal never reported a full disk")


def test_a_full_disk_buffers_records_in_memory_and_writes_them_when_space_returns(path):
    j = open_journal(path)
    before = j.commit([granted(i) for i in range(20)])
    j.pending()
    during = _fill_disk(j)
    assert j.stats()["blocked"] == "disk full"
    alarms = [r for r in during if r["type"] == "alarm"]
    assert len(alarms) == 1 and alarms[0]["active"] and alarms[0]["detail"] == "disk full"
    assert_valid_event(alarms[0])
    for i in range(30):  # the gate keeps deciding; commit keeps numbering
        during += j.commit([granted(3000 + i)])
    seqs = [r["seq"] for r in before + during]
    assert seqs == list(range(1, len(seqs) + 1)), "gap-free, ordered, returned with their seq"
    buffered = j.stats()["buffered"]
    assert buffered >= 30
    offered = j.pending(0, 10_000)
    assert offered == (before + during)[: len(offered)], "only written records are offered"
    assert len(offered) < len(before) + len(during)
    assert j.backlog() == len(before) + len(during)

    j.set_disk_budget(DEFAULT_DISK_BUDGET)
    out = j.maintenance(BASE)
    assert [r["active"] for r in out if r["type"] == "alarm"] == [False]
    assert j.stats()["buffered"] == 0 and j.stats()["blocked"] is None
    everything = j.pending(0, 10_000)
    assert everything[: len(before) + len(during)] == before + during
    assert [r["seq"] for r in everything] == list(range(1, len(everything) + 1))
    j.close()
    j = open_journal(path)
    assert j.pending(0, 10_000) == everything, "nothing journalled was lost"
    j.close()


def test_a_full_disk_retries_on_the_next_commit(path):
    j = open_journal(path)
    j.commit([granted(0)])
    _fill_disk(j)
    j.set_disk_budget(DEFAULT_DISK_BUDGET)
    j.commit([granted(1)])
    assert j.stats()["buffered"] == 0
    j.close()


def test_the_memory_buffer_is_bounded_and_drops_are_reported(path):
    j = open_journal(path, memory_buffer=10)
    j.commit([granted(0)])
    journalled = _fill_disk(j)
    for i in range(40):
        journalled += j.commit([granted(100 + i), reader_error(i)])
    stats = j.stats()
    assert stats["buffered"] <= 10 + 2  # the bound, plus the journal's own alarm
    assert stats["dropped_total"] > 0
    kept = [r["type"] for r in journalled[1:] if r["type"] != "alarm"]
    last_low = max(i for i, t in enumerate(kept) if t == "reader.error")
    last_access = max(i for i, t in enumerate(kept) if t == "access.granted")
    assert last_low < last_access, "low-value records give way first"
    j.set_disk_budget(DEFAULT_DISK_BUDGET)
    out = j.maintenance(BASE)
    (overflow,) = [r for r in out if r["type"] == "journal.overflow"]
    assert overflow["dropped"] == stats["dropped_total"]
    assert set(overflow["kinds"]) == {"access.granted", "reader.error"}
    allrecs = j.pending(0, 10_000)
    assert [r["seq"] for r in allrecs] == list(range(1, len(allrecs) + 1))
    j.close()


def test_acknowledged_records_are_deleted_at_once_when_the_disk_is_full(path):
    j = open_journal(path)
    j.commit([granted(i) for i in range(200)])
    j.pending(0, 1000)
    _fill_disk(j)
    j.ack_upto(j.id, 150)
    j.maintenance(BASE)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events WHERE seq <= 150").fetchone()[0] == 0
    j.close()


# --- retention and privacy -------------------------------------------------------------


def test_retention_purges_only_acknowledged_records_past_it(path):
    j = open_journal(path, retention_days=30)
    j.commit([granted(0, wall=BASE), granted(1, wall=BASE), granted(2, wall=BASE + 20 * DAY)])
    j.pending()
    j.ack_one(1)
    j.ack_one(3)
    j.maintenance(BASE + 20 * DAY)  # applied; nothing old enough yet
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    j.maintenance(BASE + 31 * DAY)
    with sqlite3.connect(path) as db:
        left = [r[0] for r in db.execute("SELECT seq FROM events ORDER BY seq")]
    assert left == [2, 3], "acked seq 1 purged; unacked 2 kept however old; acked 3 too recent"
    assert [r["seq"] for r in drain(j)] == [2]
    j.close()


def test_a_future_timestamp_does_not_keep_an_acknowledged_record_forever(path):
    j = open_journal(path, retention_days=1)
    j.commit([granted(0, wall=BASE + 365 * DAY)])  # wrong clock, a year ahead
    j.pending()
    j.ack_one(1)
    j.maintenance(BASE)
    j.maintenance(BASE + 2 * DAY)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    j.close()


def test_database_files_are_readable_by_the_owner_only(path):
    j = open_journal(path)
    j.commit([granted(0)])
    j.pending()
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        assert p.exists()
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    j.close()


def test_a_closed_journal_says_so(path):
    j = open_journal(path)
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.commit([granted(0)])


def test_an_unwritable_directory_gives_an_actionable_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        with pytest.raises((JournalError, PermissionError)):
            Journal(locked / "journal.db")
    finally:
        os.chmod(locked, 0o700)


def test_the_journal_json_body_is_what_pending_returns(path):
    j = open_journal(path)
    (out,) = j.commit([granted(0)])
    with sqlite3.connect(path) as db:
        (body,) = db.execute("SELECT body FROM events").fetchone()
    assert json.loads(body) == out
    j.close()
