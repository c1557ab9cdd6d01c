"""A damaged journal on a failing SD card: salvage and silent loss (issue 9, findings 5 and 6).

Real SQLite files, damaged the way a card damages them (cut short, page 1
garbled, pages overwritten or zeroed, files deleted or emptied, tables
dropped, rows deleted), then opened by the journal as the service opens it.
What the salvage must find is computed from the damaged bytes themselves: a
record is "still in the file" when its exact stored body is there, so the
counts are checked against the file, not against the code that reads it.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from agent import contract
from agent.core.events import Now
from agent.core.records import make_record
from agent.uplink import salvage as salvage_mod
from agent.uplink.journal import Journal

BASE = 1_788_000_000.0
BOOT = "5f0c1d2e-7a4b-4c3d-9e8f-0a1b2c3d4e5f"
TOTAL, ACKED = 20_000, 2_000


def clock() -> Now:
    return Now(mono=100.0, wall=BASE, synced=True)


def granted(i: int) -> dict:
    return make_record(
        "access.granted", Now(mono=10.0 + i, wall=BASE + i), BOOT, reader="entry",
        direction="in", card=100_000 + i, format="w26", person=f"p-{i:06d}",
    )


def open_journal(path: Path, **kw) -> Journal:
    kw.setdefault("clock", clock)
    kw.setdefault("boot", BOOT)
    return Journal(path, **kw)


def stored_body(rec: dict) -> bytes:
    """The body exactly as the journal stores it (Journal._row)."""
    return json.dumps(rec, separators=(",", ":"), default=str).encode()


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("id", "seq", "salvaged_from")}


def files_of(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm"), path.with_suffix(".marks")]


def copy_journal(src: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True)
    for f in files_of(src):
        if f.exists():
            shutil.copy(f, dest_dir / f.name)
    return dest_dir / src.name


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, str, dict[int, dict]]:
    """A closed journal: 20,000 records, the first 2,000 acknowledged."""
    path = tmp_path_factory.mktemp("big") / "journal.db"
    j = open_journal(path)
    out: dict[int, dict] = {}
    for start in range(0, TOTAL, 1000):
        out.update((r["seq"], r) for r in j.commit([granted(i) for i in range(start, start + 1000)]))
    j.pending(0, 1)
    assert j.ack_upto(j.id, ACKED)
    while j.maintenance(BASE) or j.stats()["backlog"] > TOTAL - ACKED:
        pass
    jid = j.id
    j.close()
    return path, jid, out


def still_in_file(data: bytes, records: dict[int, dict]) -> set[int]:
    """Pending seqs whose stored body is whole in these bytes (one pass over them:
    every body starts with its own id)."""
    found = set()
    at = data.find(b'{"id":"')
    while at != -1:
        head = data[at + 7 : at + 80].split(b'"', 1)[0]
        seq = head.rsplit(b":", 1)[-1]
        n = int(seq) if seq.isdigit() else 0
        if n > ACKED and n in records and data.startswith(stored_body(records[n]), at):
            found.add(n)
        at = data.find(b'{"id":"', at + 1)
    return found


def check_salvage(j: Journal, old_id: str, records: dict[int, dict], truth: set[int]) -> dict:
    rec = j.recovered_record
    assert rec is not None and rec["type"] == "journal.recovered"
    assert contract.validate("event", rec) == [], rec
    assert rec["old_journal"] == old_id and j.id != old_id
    new = j.pending(0, 100_000)
    assert new[-1] == rec
    salvaged = new[:-1]
    got = [int(r["salvaged_from"].split(":")[1]) for r in salvaged]
    assert got == sorted(got), "salvage keeps the order"
    assert set(got) == truth, (
        f"salvaged {len(got)} of {len(truth)} records still in the file; "
        f"missed {sorted(truth - set(got))[:10]}, invented {sorted(set(got) - truth)[:10]}"
    )
    assert len(got) == len(set(got)), "each record salvaged once"
    for r in salvaged:
        assert r["salvaged_from"].startswith(f"{old_id}:")
        assert strip(r) == strip(records[int(r["salvaged_from"].split(":")[1])])
    assert rec["salvaged"] == len(truth)
    # The marks know the journal held 20,000 with 2,000 acknowledged: every other seq is
    # either salvaged or counted lost.
    assert rec["lost"] == TOTAL - ACKED - len(truth)
    return rec


# --- finding 5: salvage what the pages still hold -----------------------------------


@pytest.mark.parametrize("keep", [99, 90, 50])
def test_a_truncated_journal_gives_back_every_record_still_in_the_file(big, tmp_path, keep):
    src, old_id, records = big
    path = copy_journal(src, tmp_path / "j")
    data = path.read_bytes()
    cut = len(data) * keep // 100
    path.write_bytes(data[:cut])
    truth = still_in_file(data[:cut], records)
    assert len(truth) > (TOTAL - ACKED) * (keep - 12) // 100, "the test cut too much"

    j = open_journal(path)
    rec = check_salvage(j, old_id, records, truth)
    assert rec["cause"] == "damaged" and rec["method"] == "pages"
    assert Path(rec["moved_to"]).read_bytes() == data[:cut], "the damaged file is kept as it was"
    j.close()


def test_a_garbled_page_1_loses_no_record(big, tmp_path):
    src, old_id, records = big
    path = copy_journal(src, tmp_path / "j")
    data = bytearray(path.read_bytes())
    data[:4096] = bytes(random.Random(1).randrange(256) for _ in range(4096))
    path.write_bytes(bytes(data))
    truth = still_in_file(bytes(data), records)
    assert len(truth) == TOTAL - ACKED, "page 1 holds no record"

    j = open_journal(path)
    check_salvage(j, old_id, records, truth)
    j.close()


@pytest.mark.parametrize("seed", [3, 11, 2026])
def test_random_page_damage_costs_only_the_records_on_those_pages(big, tmp_path, seed):
    src, old_id, records = big
    path = copy_journal(src, tmp_path / "j")
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    pages = len(data) // 4096
    for pgno in rng.sample(range(1, pages + 1), 40):
        start = (pgno - 1) * 4096
        if rng.random() < 0.5:
            data[start : start + 4096] = bytes(4096)  # a card that reads back zeros
        else:
            data[start : start + 4096] = rng.randbytes(4096)
    path.write_bytes(bytes(data))
    truth = still_in_file(bytes(data), records)
    assert len(truth) < TOTAL - ACKED, "the damage hit no record page"

    j = open_journal(path)
    check_salvage(j, old_id, records, truth)
    j.close()


def test_records_committed_since_the_last_checkpoint_are_salvaged_from_the_wal(tmp_path):
    path = tmp_path / "live" / "journal.db"
    j = open_journal(path)
    first = j.commit([granted(i) for i in range(300)])
    j.checkpoint()  # these are in the main file
    later = j.commit([granted(i) for i in range(300, 400)])  # these only in the WAL
    j.sync()
    jid = j.id
    # The process dies here (no close): copy the files as kill -9 leaves them.
    path2 = copy_journal(path, tmp_path / "dead")
    j.close()
    assert Path(f"{path2}-wal").stat().st_size > 0
    data = bytearray(path2.read_bytes())
    at = data.find(stored_body(first[10]))
    data[at - at % 4096 : at - at % 4096 + 4096] = bytes(4096)  # a page of early records is gone
    path2.write_bytes(bytes(data))
    gone = {r["id"] for r in first if stored_body(r) not in data}
    assert gone and not any(stored_body(r) in data for r in later), "the later ones are in the WAL only"

    j2 = open_journal(path2)
    rec = j2.recovered_record
    assert rec is not None and rec["cause"] == "damaged"
    got = {r["salvaged_from"] for r in j2.pending(0, 10_000)[:-1]}
    assert got == {r["id"] for r in first + later} - gone
    assert rec["salvaged"] == 400 - len(gone) and rec["lost"] == len(gone)
    assert rec["old_journal"] == jid
    j2.close()


def test_without_the_marks_the_state_row_still_bounds_what_is_lost(big, tmp_path):
    src, old_id, records = big
    path = copy_journal(src, tmp_path / "j")
    path.with_suffix(".marks").unlink()
    data = path.read_bytes()[: len(path.read_bytes()) * 90 // 100]
    path.write_bytes(data)
    truth = still_in_file(data, records)
    j = open_journal(path)
    rec = j.recovered_record
    assert rec["salvaged"] == len(truth) and rec["old_journal"] == old_id
    assert rec["lost"] >= TOTAL - ACKED - len(truth)
    j.close()


def test_if_the_pages_cannot_be_decoded_sqlites_reader_is_used_and_the_record_says_so(
        tmp_path, monkeypatch, caplog):
    path = tmp_path / "j" / "journal.db"
    j = open_journal(path)
    out = j.commit([granted(i) for i in range(50)])
    jid = j.id
    j.close()
    with sqlite3.connect(path) as db:  # damage SQLite notices: a wrong page count for an index
        db.execute("PRAGMA writable_schema=ON")
        db.execute("UPDATE sqlite_schema SET rootpage = 2 WHERE name = 'ev_done'")

    class Broken:
        def __init__(self, *a, **kw) -> None:
            raise RuntimeError("page reader broken")

    monkeypatch.setattr(salvage_mod, "PageReader", Broken)
    caplog.set_level(logging.ERROR, logger="agent.uplink.journal")
    j = open_journal(path)
    rec = j.recovered_record
    assert rec is not None and rec["method"] == "reader"
    assert rec["salvaged"] == 50 and rec["old_journal"] == jid
    assert {r["salvaged_from"] for r in j.pending(0, 100)[:-1]} == {r["id"] for r in out}
    assert "using SQLite's reader" in caplog.text
    j.close()


def tamper(path: Path, sql: str) -> None:
    """Change the database the way a person with a shell would, then close
    (the last connection folds the WAL in and removes it)."""
    db = sqlite3.connect(path)
    db.execute(sql)
    db.commit()
    db.close()
    assert not Path(f"{path}-wal").exists()


# --- finding 6: silent loss --------------------------------------------------------------


@pytest.fixture
def live(tmp_path) -> tuple[Path, str, list[dict]]:
    """A closed journal with 83 records not yet acknowledged (the adversarial run's figure)."""
    path = tmp_path / "state" / "journal.db"
    j = open_journal(path)
    out = j.commit([granted(i) for i in range(83)])
    jid = j.id
    j.close()
    return path, jid, out


def assert_reported(j: Journal, old_id: str | None, cause: str, lost: int | None, salvaged: int = 0):
    rec = j.recovered_record
    assert rec is not None, "the loss went unreported"
    assert contract.validate("event", rec) == [], rec
    assert (rec["cause"], rec["old_journal"], rec["salvaged"]) == (cause, old_id, salvaged)
    assert rec["lost"] == lost
    assert j.id != old_id
    assert j.pending(0, 1000)[-1] == rec
    return rec


def test_a_zero_length_database_is_reported_with_everything_it_held_lost(live):
    path, jid, _out = live
    path.write_bytes(b"")
    j = open_journal(path)
    rec = assert_reported(j, jid, "emptied", 83)
    assert Path(rec["moved_to"]).stat().st_size == 0, "the emptied file is kept"
    j.close()


def test_a_deleted_database_is_reported(live):
    path, jid, _out = live
    path.unlink()
    j = open_journal(path)
    rec = assert_reported(j, jid, "missing", 83)
    assert rec["moved_to"] is None
    j.close()


def test_a_database_deleted_with_its_wal_left_is_salvaged_from_the_wal(tmp_path):
    path = tmp_path / "state" / "journal.db"
    j = open_journal(path)
    early = j.commit([granted(i) for i in range(70)])
    j.checkpoint()
    late = j.commit([granted(i) for i in range(70, 83)])
    j.sync()
    jid = j.id
    copy = copy_journal(path, tmp_path / "copy")  # as a killed process leaves it
    j.close()
    wal = Path(f"{copy}-wal").read_bytes()
    copy.unlink()
    truth = {r["id"] for r in early + late if stored_body(r) in wal}
    assert {r["id"] for r in late} <= truth

    j = open_journal(copy)
    rec = assert_reported(j, jid, "missing", 83 - len(truth), salvaged=len(truth))
    assert {r["salvaged_from"] for r in j.pending(0, 1000)[:-1]} == truth
    assert Path(rec["moved_to"] + "-wal").read_bytes() == wal, "the orphan WAL is kept"
    j.close()


def test_a_dropped_events_table_is_reported(live):
    path, jid, _out = live
    tamper(path, "DROP TABLE events")
    j = open_journal(path)
    rec = j.recovered_record
    assert rec is not None and rec["cause"] == "incomplete" and rec["old_journal"] == jid
    assert rec["salvaged"] + rec["lost"] == 83  # what secure_delete left of the rows, and the rest
    j.close()


def test_a_deleted_journal_id_row_keeps_every_record_under_a_reported_new_id(live):
    path, jid, out = live
    tamper(path, "DELETE FROM meta WHERE key = 'journal_id'")
    j = open_journal(path)
    assert_reported(j, jid, "incomplete", 0, salvaged=83)
    assert [r["salvaged_from"] for r in j.pending(0, 1000)[:-1]] == [r["id"] for r in out]
    j.close()


def test_deleted_rows_are_counted_lost(live):
    path, jid, _out = live
    tamper(path, "DELETE FROM events WHERE seq > 50")
    j = open_journal(path)
    assert_reported(j, jid, "rows_missing", 33, salvaged=50)
    j.close()


def test_deleted_rows_still_in_the_wal_are_salvaged(live):
    path, jid, out = live
    db = sqlite3.connect(path)
    db.execute("DELETE FROM events WHERE seq > 50")
    db.commit()  # and the tamperer's connection stays open: its WAL holds the old pages
    try:
        j = open_journal(path)
        assert_reported(j, jid, "rows_missing", 0, salvaged=83)
        assert [r["salvaged_from"] for r in j.pending(0, 1000)[:-1]] == [r["id"] for r in out]
        j.close()
    finally:
        db.close()


def test_an_older_copy_put_back_is_not_taken_for_the_journal(tmp_path):
    path = tmp_path / "state" / "journal.db"
    j = open_journal(path)
    j.commit([granted(i) for i in range(50)])
    jid = j.id
    j.close()
    backup = copy_journal(path, tmp_path / "backup")
    j = open_journal(path)
    j.commit([granted(i) for i in range(50, 83)])
    j.close()
    shutil.copy(backup, path)  # the card restored from an old image: seqs 51..83 would be reused
    j = open_journal(path)
    assert_reported(j, jid, "rolled_back", 33, salvaged=50)
    (nxt,) = j.commit([granted(99)])
    assert not nxt["id"].startswith(f"{jid}:"), "a seq of the old journal would name two records"
    j.close()


def test_another_journal_in_its_place_is_reported(live, tmp_path):
    path, jid, _out = live
    other = tmp_path / "other" / "journal.db"
    o = open_journal(other)
    o.commit([granted(i) for i in range(5)])
    oid = o.id
    o.close()
    shutil.copy(other, path)
    j = open_journal(path)
    assert_reported(j, jid, "replaced", 83, salvaged=5)
    assert {r["salvaged_from"].split(":")[0] for r in j.pending(0, 100)[:-1]} == {oid}
    j.close()


def test_marks_follow_what_is_durable(tmp_path):
    path = tmp_path / "state" / "journal.db"
    marks = path.with_suffix(".marks")
    j = open_journal(path)
    assert json.loads(marks.read_text()) == {
        "format": 1, "journal": j.id, "last_seq": 0, "acked_upto": 0, "previous": None}
    before = marks.stat().st_mtime_ns, marks.read_bytes()
    j.commit([granted(i) for i in range(10)])  # the gate thread: no fsync, no marks
    assert (marks.stat().st_mtime_ns, marks.read_bytes()) == before
    j.sync()  # the sync thread (or the uplink) after its fsync
    assert json.loads(marks.read_text())["last_seq"] == 10
    j.pending(0, 10)
    j.ack_upto(j.id, 6)
    j.maintenance(BASE)
    j.sync()
    doc = json.loads(marks.read_text())
    assert (doc["last_seq"], doc["acked_upto"]) == (10, 6)
    assert marks.stat().st_mode & 0o777 == 0o600
    j.close()


def test_missing_or_damaged_marks_beside_a_sound_journal_are_rewritten_not_reported(live, caplog):
    path, jid, out = live
    marks = path.with_suffix(".marks")
    marks.unlink()  # an agent older than the marks, or a technician's rm
    j = open_journal(path)
    assert j.recovered_record is None and j.id == jid
    assert j.pending(0, 100) == out
    j.close()
    assert json.loads(marks.read_text())["journal"] == jid
    marks.write_text("{garbage")
    caplog.set_level(logging.WARNING, logger="agent.uplink.journal")
    j = open_journal(path)
    assert j.recovered_record is None and j.id == jid
    assert "marks damaged" in caplog.text
    j.close()
    assert json.loads(marks.read_text())["last_seq"] == 83


def test_damaged_marks_and_no_database_are_reported_as_unknown_loss(live):
    path, _jid, _out = live
    path.unlink()
    path.with_suffix(".marks").write_text("not json")
    j = open_journal(path)
    assert_reported(j, None, "missing", None)
    j.close()


def test_a_first_start_reports_nothing(tmp_path):
    j = open_journal(tmp_path / "new" / "journal.db")
    assert j.recovered_record is None
    j.close()


def test_a_rebuild_whose_marks_were_not_yet_rewritten_is_not_rebuilt_again(live):
    path, jid, _out = live
    marks = path.with_suffix(".marks")
    old_marks = marks.read_bytes()
    path.write_bytes(b"")
    j = open_journal(path)
    new_id, rec = j.id, j.recovered_record
    j.close()
    marks.write_bytes(old_marks)  # as if killed between the swap and the marks
    j = open_journal(path)
    assert j.id == new_id and j.recovered_record is None
    assert j.pending(0, 100)[-1] == rec
    j.close()
    assert json.loads(marks.read_text())["previous"] == jid


def test_a_long_salvage_keeps_saying_it_is_alive(big, tmp_path, monkeypatch):
    """systemd kills a start that takes longer than its timeout: a salvage of a
    large journal on a Pi takes minutes, so it reports progress (the service
    sends EXTEND_TIMEOUT_USEC for it)."""
    src, _old_id, _records = big
    path = copy_journal(src, tmp_path / "j")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 90 // 100])
    monkeypatch.setattr(salvage_mod, "PROGRESS_S", 0.0)
    calls: list[float] = []
    j = open_journal(path, progress=lambda: calls.append(1.0))
    assert j.recovered_record is not None
    assert len(calls) >= 3, "progress reported while reading and while copying"
    j.close()
