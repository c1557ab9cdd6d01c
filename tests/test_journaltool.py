"""``gate-agent journal tail|export|stats`` against a real journal, read-only,
also while the journal is open for writing (as the service holds it)."""
from __future__ import annotations

import argparse
import io
import json
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.core.events import Now
from agent.core.records import make_record
from agent.i18n import set_language
from agent.tools import journaltool
from agent.tools.journaltool import (
    JournalReadError,
    follow,
    journal_path,
    journal_stats,
    open_readonly,
    read_records,
    tail_records,
)
from agent.uplink.journal import Journal

BOOT = "boot-1"


@pytest.fixture(autouse=True)
def _english():
    set_language("en")
    yield
    set_language(None)


def _records(n: int, start_mono: float = 1.0) -> list[dict]:
    out = []
    now = time.time()
    for i in range(n):
        clock = Now(start_mono + i, now + i, True)
        if i % 3 == 2:
            out.append(make_record("access.denied", clock, BOOT, reader="entry", direction="in", card=12345 + i,
                                   format="w26", reason="unknown_card"))
        else:
            out.append(make_record("access.granted", clock, BOOT, reader="entry", direction="in", card=6613779,
                                   format="w26", person=f"p-{i:04d}"))
    return out


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db", boot=BOOT)
    yield j
    j.close()


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    journaltool.add_journal_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_gives_the_committed_records_as_json_lines_while_the_writer_keeps_writing(journal, capsys):
    committed = journal.commit(_records(5))
    code, out, _err = _cli(["journal", "export", "--db", str(journal.path)], capsys)
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == committed
    # The reader never blocks the service: it commits on while a read-only connection is open.
    conn = open_readonly(journal.path)
    more = journal.commit(_records(2, start_mono=100.0))
    assert [r["seq"] for r in more] == [6, 7]
    assert [r["seq"] for r in read_records(conn)] == [1, 2, 3, 4, 5, 6, 7]
    conn.close()


def test_export_since_and_pending_select_what_the_server_has_not_confirmed(journal, capsys):
    committed = journal.commit(_records(6))
    journal.sync()
    assert journal.ack_upto(journal.id, 4)
    journal.maintenance(time.time())  # the gate thread writes the acknowledgement into the table
    _code, out, _err = _cli(["journal", "export", "--db", str(journal.path), "--pending"], capsys)
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [5, 6]
    _code, out, _err = _cli(["journal", "export", "--db", str(journal.path), "--since", "2"], capsys)
    assert [json.loads(line) for line in out.splitlines()] == committed[2:]


def test_tail_prints_the_last_records_one_line_each_with_cards_as_facility_card(journal, capsys):
    committed = journal.commit(_records(7))
    code, out, _err = _cli(["journal", "tail", "-n", "3", "--db", str(journal.path)], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    for line, rec in zip(lines, committed[-3:], strict=True):
        assert f"#{rec['seq']} " in line and rec["type"] in line
    assert "card=100,60179" in out  # 6613779 is printed 0006613779, facility 100 card 60179
    assert [r["seq"] for r in tail_records(open_readonly(journal.path), 2)] == [6, 7]


def test_stats_count_by_type_and_what_waits_for_the_server(journal, capsys):
    recs = _records(9)
    journal.commit(recs)
    journal.sync()
    journal.ack_upto(journal.id, 3)
    journal.maintenance(time.time())
    stats = journal_stats(open_readonly(journal.path), journal.path, time.time())
    by_type = {t: sum(1 for r in recs if r["type"] == t) for t in {r["type"] for r in recs}}
    assert stats["by_type"] == by_type
    assert stats["last_seq"] == 9 and stats["stored"] == 9 and stats["pending"] == 6
    assert stats["journal"] == journal.id
    code, out, _err = _cli(["journal", "stats", "--json", "--db", str(journal.path)], capsys)
    assert code == 0 and json.loads(out)["pending"] == 6
    code, out, _err = _cli(["journal", "stats", "--db", str(journal.path)], capsys)
    assert code == 0 and journal.id in out and "access.denied" in out


def test_reading_never_changes_the_journal_file(tmp_path, capsys):
    with Journal(tmp_path / "j.db", boot=BOOT) as j:
        j.commit(_records(4))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for cmd in (["tail"], ["export"], ["stats"]):
        code, _out, _err = _cli(["journal", *cmd, "--db", str(tmp_path / "j.db")], capsys)
        assert code == 0
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before}
    assert after == before


def test_a_missing_journal_says_where_it_looked_and_what_to_do(tmp_path, capsys):
    code, _out, err = _cli(["journal", "tail", "--db", str(tmp_path / "none.db")], capsys)
    assert code == 2
    assert str(tmp_path / "none.db") in err and "--db" in err


def test_a_file_that_is_no_journal_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(JournalReadError, match="journal"):
        open_readonly(bad)


def test_the_journal_path_comes_from_the_config_relative_to_its_folder(tmp_path):
    cfg = tmp_path / "etc" / "agent.toml"
    cfg.parent.mkdir()
    cfg.write_text('[journal]\npath = "data/j.db"\n')
    assert journal_path(cfg) == cfg.parent.resolve() / "data" / "j.db"
    cfg.write_text("[site]\n")
    assert journal_path(cfg) == journaltool.DEFAULT_JOURNAL
    assert journal_path(cfg, tmp_path / "x.db") == tmp_path / "x.db"
    with pytest.raises(JournalReadError, match="--db"):
        journal_path(tmp_path / "missing.toml")


def test_follow_prints_records_as_the_service_commits_them(journal):
    journal.commit(_records(2))
    out = io.StringIO()
    seen = threading.Event()

    def stop() -> bool:
        if "#4 " in out.getvalue():
            seen.set()
        return seen.is_set()

    t = threading.Thread(target=follow, args=(journal.path, out), kwargs={"after_seq": 2, "stop": stop,
                                                                          "poll_s": 0.05})
    t.start()
    journal.commit(_records(2, start_mono=50.0))
    t.join(10)
    assert seen.is_set(), out.getvalue()
    assert "#1 " not in out.getvalue() and "#3 " in out.getvalue()


def test_messages_follow_the_language(tmp_path, capsys):
    set_language("ru")
    code, _out, err = _cli(["journal", "stats", "--db", str(tmp_path / "none.db")], capsys)
    assert code == 2 and "журнала" in err and str(tmp_path / "none.db") in err


def test_unreadable_record_bodies_do_not_stop_an_export(tmp_path):
    import sqlite3

    path = tmp_path / "j.db"
    with Journal(path, boot=BOOT) as j:
        j.commit(_records(2))
    with sqlite3.connect(path) as db:  # damage one body, as a bad sector would
        db.execute("UPDATE events SET body = 'not json' WHERE seq = 1")
    recs = list(read_records(open_readonly(path)))
    assert recs[0]["unreadable"] == "not json" and recs[1]["seq"] == 2


def test_the_reader_sees_a_journal_rebuilt_by_the_service(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path, boot=BOOT) as j:
        j.commit(_records(1))
        old_id = j.id
    conn = open_readonly(path)
    assert journal_stats(conn, path, time.time())["journal"] == old_id
    conn.close()
    for p in tmp_path.glob("j.db*"):
        p.unlink()
    with Journal(path, boot=BOOT) as j:
        j.commit(_records(1))
        new_id = j.id
    assert journal_stats(open_readonly(path), Path(path), time.time())["journal"] == new_id != old_id


@pytest.fixture
def novosibirsk(monkeypatch):
    """The board's local zone, UTC+7 (no daylight saving), for the time of the test."""
    monkeypatch.setenv("TZ", "Asia/Novosibirsk")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _at(wall: float, card: int, person: str | None, mono: float) -> dict:
    return make_record("access.granted", Now(mono, wall, True), BOOT, reader="entry", direction="in",
                       card=card, format="w26", person=person)


def test_tail_and_stats_show_their_times_in_the_same_local_zone_with_the_zone(journal, capsys, novosibirsk):
    # 2026-09-01 01:30:00 UTC is 08:30 at UTC+7.
    wall = datetime(2026, 9, 1, 1, 30, tzinfo=UTC).timestamp()
    journal.commit([_at(wall, 6613779, "p-1", 1.0), _at(wall + 3600, 6613779, "p-1", 2.0)])
    _code, tail, _err = _cli(["journal", "tail", "--db", str(journal.path)], capsys)
    _code, stats, _err = _cli(["journal", "stats", "--db", str(journal.path)], capsys)
    assert "2026-09-01 08:30:00.000 +07:00" in tail and "2026-09-01 09:30:00.000 +07:00" in tail
    assert "2026-09-01 08:30:00 +07:00 .. 2026-09-01 09:30:00 +07:00" in stats, stats


def test_export_filters_by_local_date_time_card_and_person(journal, capsys, novosibirsk):
    day1 = datetime(2026, 9, 1, 8, 0, tzinfo=timezone(timedelta(hours=7))).timestamp()
    day2 = day1 + 86400
    # 23:30 local on the 1st (16:30 UTC): still the 1st for a local-date filter.
    late = day1 + 15.5 * 3600
    recs = [_at(day1, 6613779, "p-1", 1.0), _at(late, 0x0A0001, "p-2", 2.0),
            _at(day2, 6613779, "p-1", 3.0), _at(day2 + 60, 0x0A0001, "p-2", 4.0)]
    journal.commit(recs)

    def seqs(*argv: str) -> list[int]:
        code, out, err = _cli(["journal", "export", "--db", str(journal.path), *argv], capsys)
        assert code == 0, err
        return [json.loads(line)["seq"] for line in out.splitlines()]

    assert seqs("--since", "2026-09-01", "--until", "2026-09-01") == [1, 2]  # the local day, to its end
    assert seqs("--since", "2026-09-02") == [3, 4]
    assert seqs("--since", "2026-09-02T08:00:30") == [4]                   # local time
    assert seqs("--until", "2026-09-01T01:00:01+00:00") == [1]             # with an offset
    assert seqs("--card", "100,60179") == [1, 3]
    assert seqs("--card", "0006613779") == [1, 3]                          # the printed number
    assert seqs("--person", "p-2", "--since", "2026-09-02") == [4]
    assert seqs("--since", "1", "--until", "3") == [2, 3]                  # sequence numbers still work
    code, out, err = _cli(["journal", "export", "--db", str(journal.path), "--since", "1 sept"], capsys)
    assert code == 2 and out == "" and "YYYY-MM-DD" in err
    code, out, err = _cli(["journal", "export", "--db", str(journal.path), "--card", "100;60179"], capsys)
    assert code == 2 and out == "" and "100;60179" in err
