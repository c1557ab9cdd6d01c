"""The reference ingest: stores each event once, acks the contiguous prefix, after commit;
keeps both versions of an id with two contents; holds records ahead of a gap, bounded."""
# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from agent.contract import topics, validate
from agent.core.events import Now
from agent.core.records import make_record
from agent.ratelimit import RateLimitFilter
from agent.regional.ingest import LOG_BUDGET, LOG_WINDOW_S, Ingest, main
from tests.broker import (  # noqa: F401 - fixtures
    GATE,
    SITE,
    Observer,
    broker,
    journal,
    make_broker,
    passage,
    uplinks,
    wait_until,
)

T = topics(SITE, GATE)


def event(journal: str, seq: int, **extra) -> dict:
    rec = make_record("alarm", Now(mono=float(seq), wall=1_790_000_000.0 + seq), "boot-1",
                      kind="tamper", active=bool(seq % 2), **extra)
    return {"id": f"{journal}:{seq}", "seq": seq, **rec}


@pytest.fixture
def ingest(broker, tmp_path: Path):
    ing = Ingest(broker.host, broker.port, db_path=tmp_path / "ingest.db").start()
    assert ing.ready.wait(10)
    yield ing
    ing.stop()


def test_each_event_stored_once_and_acked_up_to_the_first_gap(broker, ingest):
    t = topics("s1", "g1")
    with Observer(broker, t["ack"]) as acks, Observer(broker, "nobody/listens") as gate:
        for seq in (1, 2, 2, 4):  # a duplicate and a gap at 3
            gate.publish(t["events"], json.dumps(event("jA", seq)))
        wait_until(lambda: ingest.stats()["received"] == 4, 10, "four messages")
        wait_until(lambda: acks.records() and acks.records()[-1]["upto"] == 2, 10, "ack upto 2")
        # 4 is ahead of the gap: held, not in events, not acked.
        assert [e["seq"] for e in ingest.events()] == [1, 2]
        assert ingest.held_count() == 1
        assert ingest.stats()["duplicates"] == 1 and ingest.stats()["held"] == 1
        assert max(a["upto"] for a in acks.records()) == 2

        gate.publish(t["events"], json.dumps(event("jA", 3)))
        wait_until(lambda: ingest.upto("jA") == 4, 10, "the mark over the held 4 once 3 filled the gap")
        assert [e["seq"] for e in ingest.events()] == [1, 2, 3, 4] and ingest.held_count() == 0
        # 4 came in an earlier batch: this ack covers 3; 4 is acked when the gate sends it again.
        wait_until(lambda: acks.records()[-1]["upto"] == 3, 10, "ack upto 3")
        gate.publish(t["events"], json.dumps(event("jA", 4)))
        wait_until(lambda: acks.records()[-1]["upto"] == 4, 10, "ack upto 4 on the resend")
    assert all(validate("ack", a) == [] and a["journal"] == "jA" for a in acks.records())
    assert [e["id"] for e in ingest.events("s1", "g1")] == ["jA:1", "jA:2", "jA:3", "jA:4"]
    assert ingest.upto("jA") == 4
    assert ingest.stats()["conflicts"] == 0


def test_an_ack_is_only_sent_once_the_events_are_committed(broker, ingest, tmp_path):
    t = topics("s1", "g1")
    stored_when_acked: list[set[int]] = []

    with Observer(broker, t["ack"]) as acks:
        original = acks.client.on_message

        def on_ack(client, userdata, msg):
            # Look at the database from outside at the moment the ack arrives.
            with sqlite3.connect(tmp_path / "ingest.db") as db:
                stored_when_acked.append({s for (s,) in db.execute("SELECT seq FROM events")})
            original(client, userdata, msg)

        acks.client.on_message = on_ack
        with Observer(broker, "nobody/listens") as gate:
            for seq in range(1, 31):
                gate.publish(t["events"], json.dumps(event("jB", seq)))
            wait_until(lambda: acks.records() and acks.records()[-1]["upto"] == 30, 10, "the last ack")
    for ack, stored in zip(acks.records(), stored_when_acked):
        assert set(range(1, ack["upto"] + 1)) <= stored


def test_events_are_kept_apart_per_gate_and_journal(broker, ingest):
    with Observer(broker, "nobody/listens") as pub:
        pub.publish(topics("s1", "g1")["events"], json.dumps(event("j1", 1)))
        pub.publish(topics("s1", "g2")["events"], json.dumps(event("j2", 1)))
        pub.publish(topics("s2", "g1")["events"], json.dumps(event("j3", 1)))
        wait_until(lambda: len(ingest.events()) == 3, 10, "three events")
    assert [e["id"] for e in ingest.events(site="s1")] == ["j1:1", "j2:1"]
    assert [e["id"] for e in ingest.events(site="s1", gate="g2")] == ["j2:1"]
    assert [e["id"] for e in ingest.events(gate="g1")] == ["j1:1", "j3:1"]


def test_a_gate_cannot_store_events_into_another_gates_journal(broker, ingest):
    """Journal ids are public; gate g2 publishing `jA:2` first must not make the real
    event a "duplicate" that is dropped yet acknowledged."""
    with Observer(broker, topics("s1", "g1")["ack"]) as acks, Observer(broker, "nobody/listens") as pub:
        pub.publish(topics("s1", "g1")["events"], json.dumps(event("jA", 1)))
        wait_until(lambda: len(ingest.events()) == 1, 10, "the real gate's first event")
        forged = event("jA", 2, detail="forged")
        pub.publish(topics("s1", "g2")["events"], json.dumps(forged))
        wait_until(lambda: ingest.stats()["rejected"] == 1, 10, "the forged event refused")
        pub.publish(topics("s1", "g1")["events"], json.dumps(event("jA", 2)))
        wait_until(lambda: acks.records() and acks.records()[-1]["upto"] == 2, 10, "ack upto 2")
    stored = ingest.events()
    assert [e["id"] for e in stored] == ["jA:1", "jA:2"]
    assert "detail" not in stored[1], "the forged copy was stored"
    assert ingest.events(site="s1", gate="g2") == []


def test_malformed_messages_are_rejected_not_stored(broker, ingest):
    t = topics("s1", "g1")
    with Observer(broker, "nobody/listens") as pub:
        pub.publish(t["events"], b"{not json")
        pub.publish(t["events"], json.dumps({"id": "jX:2", "seq": 3}))  # id names another seq
        pub.publish(t["events"], json.dumps({"seq": 1}))
        pub.publish(t["events"], json.dumps(event("jX", 1)))
        wait_until(lambda: ingest.stats()["received"] == 4, 10, "four messages")
    assert ingest.stats()["rejected"] == 3
    assert [e["id"] for e in ingest.events()] == ["jX:1"]


def test_two_ingests_share_the_subscription_and_store_each_event_once(broker, journal, uplinks, tmp_path):
    db = tmp_path / "shared.db"
    a = Ingest(broker.host, broker.port, db_path=db).start()
    b = Ingest(broker.host, broker.port, db_path=db).start()
    try:
        assert a.ready.wait(10) and b.ready.wait(10)
        committed = journal.commit([passage(i) for i in range(40)])
        # Records one ingest holds may be moved into events by the other's batch: the
        # gate's resend (or its next record) then brings the ack for them.
        uplinks(journal, broker, resend_after_s=0.5)
        wait_until(lambda: journal.backlog() == 0, 20, "every event acknowledged")
        assert a.received > 0 and b.received > 0, "the shared subscription did not share"
        assert a.events() == committed
        assert a.stats()["conflicts"] + b.stats()["conflicts"] == 0 and a.held_count() == 0
    finally:
        a.stop()
        b.stop()


def test_the_contiguous_mark_survives_a_restart(broker, tmp_path):
    t = topics("s1", "g1")
    db = tmp_path / "ingest.db"
    with Observer(broker, t["ack"]) as acks, Observer(broker, "nobody/listens") as gate:
        first = Ingest(broker.host, broker.port, db_path=db).start()
        assert first.ready.wait(10)
        gate.publish(t["events"], json.dumps(event("jR", 1)))
        wait_until(lambda: acks.records(), 10, "first ack")
        first.stop()
        second = Ingest(broker.host, broker.port, db_path=db).start()
        try:
            assert second.ready.wait(10)
            gate.publish(t["events"], json.dumps(event("jR", 2)))
            wait_until(lambda: acks.records()[-1]["upto"] == 2, 10, "ack upto 2 after restart")
        finally:
            second.stop()


def test_main_explains_an_unusable_database(tmp_path: Path, capsys):
    rc = main(["--host", "127.0.0.1", "--port", "1", "--db", str(tmp_path / "no" / "such" / "dir.db")])
    assert rc == 2
    assert "cannot open the ingest database" in capsys.readouterr().out


# --- forged records, conflicts and held records (issue 9, finding 3) ------------------------


@pytest.fixture
def ingest_db(broker, tmp_path: Path):
    """``ingest_db(**options)``: a started, subscribed ingest on tmp_path/ingest.db."""
    made: list[Ingest] = []

    def make(**options) -> Ingest:
        ing = Ingest(broker.host, broker.port, db_path=tmp_path / "ingest.db", **options).start()
        made.append(ing)
        assert ing.ready.wait(10), "the ingest did not subscribe"
        return ing

    yield make
    for ing in made:
        ing.stop()


def forged(journal_id: str, seq: int) -> dict:
    """A contract-valid passage that never happened, under the gate's journal id."""
    return {**passage(500 + seq), "id": f"{journal_id}:{seq}", "seq": seq}


def stored_versions(db: Path, rid: str) -> list[dict]:
    """Every version of an id the ingest keeps (events, held, quarantine), read from outside."""
    with sqlite3.connect(db) as conn:
        tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = [b for t in ("events", "held", "quarantine") if t in tables
                for (b,) in conn.execute(f"SELECT body FROM {t} WHERE id = ?", (rid,))]
    return [json.loads(b) for b in rows]


def watch_acks(journal, real: dict[int, dict], db: Path) -> list[tuple[int, int]]:
    """Check, each time the gate's journal takes an ack (and so forgets records),
    that every real record it covers is stored; returns the violations seen."""
    violations: list[tuple[int, int]] = []
    original = journal.ack_upto

    def checked(journal_id: str, upto: int) -> bool:
        for seq, rec in list(real.items()):
            if seq <= upto and rec not in stored_versions(db, rec["id"]):
                violations.append((upto, seq))
        return original(journal_id, upto)

    journal.ack_upto = checked
    return violations


def test_forged_records_for_seqs_a_gate_has_not_reached_never_cost_it_a_real_one(
    broker, journal, uplinks, ingest_db, tmp_path, caplog, capsys
):
    """The issue's scenario: with gate A's identity, records under A's journal id for
    the 14 seqs A uses next; A's real records with those ids arrive afterwards."""
    caplog.set_level(logging.WARNING, logger="agent.ingest")
    db = tmp_path / "ingest.db"
    ingest = ingest_db()
    first = journal.commit([passage(i) for i in range(5)])
    up = uplinks(journal, broker, resend_after_s=1.0)
    wait_until(lambda: journal.backlog() == 0, 15, "the first five acknowledged")
    up.stop()  # A is offline; its certificate is used elsewhere

    fakes = [forged(journal.id, seq) for seq in range(6, 20)]
    with Observer(broker, T["ack"]) as acks, Observer(broker, "nobody/listens") as forger:
        for rec in fakes:
            forger.publish(T["events"], json.dumps(rec))
        wait_until(lambda: ingest.upto(journal.id) == 19, 10, "the forged records stored")
        # The forger's records are acked like any others (nothing tells them apart).
        # Let those acks pass before A makes its records: an ack still on its way when
        # A has made, but not yet sent, records would make A skip them (the gate caps
        # an ack at what it has synced, not at what it has sent: a gate-side matter).
        wait_until(lambda: any(a["upto"] == 19 for a in acks.records()), 10, "the forged records' ack")

    real = {r["seq"]: r for r in first}
    violations = watch_acks(journal, real, db)
    later = journal.commit([passage(i) for i in range(5, 19)])
    assert [r["seq"] for r in later] == list(range(6, 20))
    real.update({r["seq"]: r for r in later})
    uplinks(journal, broker, resend_after_s=1.0)
    wait_until(lambda: journal.backlog() == 0, 20, "every real record acknowledged")

    assert violations == [], "the gate forgot real records that were not stored"
    for rec in first + later:
        assert rec in stored_versions(db, rec["id"]), f"real record {rec['id']} lost"
    # Both versions kept: the first (forged) in events, A's real one in quarantine.
    assert ingest.stats()["conflicts"] == 14
    conflicts = sorted(ingest.conflicts(SITE, GATE), key=lambda c: c["seq"])
    assert [c["record"] for c in conflicts] == later
    assert [c["first"] for c in conflicts] == fakes
    assert {c["first_in"] for c in conflicts} == {"events"}
    # The regional alarm: one ERROR per conflict naming journal, seq and gate.
    alarms = [r.getMessage() for r in caplog.records
              if r.levelno == logging.ERROR and "CONFLICT" in r.getMessage()]
    assert len(alarms) == 14
    for seq, line in zip(range(6, 20), sorted(alarms, key=lambda m: int(m.split("seq ")[1].split(")")[0]))):
        assert f"journal {journal.id}, seq {seq}" in line and f"gate {SITE}/{GATE}" in line
    # The queries docs/ingest.md shows run on SQLite too.
    text = (Path(__file__).resolve().parent.parent / "docs" / "ingest.md").read_text()
    queries = re.sub(r"--[^\n]*", "", re.findall(r"```sql\n(.*?)```", text, re.DOTALL)[2])
    with sqlite3.connect(db) as conn:
        results = [conn.execute(q).fetchall() for q in queries.split(";") if q.strip()]
    assert sorted(r[3] for r in results[0]) == sorted(r["id"] for r in later)
    assert sorted(r[0] for r in results[1]) == sorted(r["id"] for r in later)
    # And the operator's listing: exit 1 while the quarantine holds anything.
    capsys.readouterr()
    assert main(["--db", str(db), "--conflicts"]) == 1
    out = capsys.readouterr().out
    assert f"{journal.id}:6 " in out and f"{journal.id}:19 " in out and "14 conflicting" in out
    assert main(["--db", str(db), "--conflicts", "--json", "--gate", "elsewhere"]) == 0


def test_forged_records_far_ahead_wait_in_held_unacked_and_the_real_ones_are_kept(
    broker, journal, uplinks, ingest_db, tmp_path
):
    db = tmp_path / "ingest.db"
    ingest = ingest_db()
    first = journal.commit([passage(i) for i in range(5)])
    up = uplinks(journal, broker, resend_after_s=1.0)
    wait_until(lambda: journal.backlog() == 0, 15, "the first five acknowledged")
    up.stop()

    fakes = [forged(journal.id, seq) for seq in (10, 11, 12)]
    before = ingest.stats()["received"]
    with Observer(broker, T["ack"]) as acks, Observer(broker, "nobody/listens") as forger:
        for rec in fakes:
            forger.publish(T["events"], json.dumps(rec))
        wait_until(lambda: ingest.stats()["received"] == before + 3, 10, "the forged records delivered")
        assert [e["seq"] for e in ingest.events(SITE, GATE)] == [1, 2, 3, 4, 5]  # not shown as events
        assert ingest.held_count(SITE, GATE) == 3 and ingest.upto(journal.id) == 5
        assert acks.records() == []  # and never acknowledged

    real = {r["seq"]: r for r in first}
    violations = watch_acks(journal, real, db)
    later = journal.commit([passage(i) for i in range(5, 15)])
    real.update({r["seq"]: r for r in later})
    uplinks(journal, broker, resend_after_s=1.0)
    wait_until(lambda: journal.backlog() == 0, 20, "every real record acknowledged")

    assert violations == []
    for rec in first + later:
        assert rec in stored_versions(db, rec["id"]), f"real record {rec['id']} lost"
    assert ingest.upto(journal.id) == 15 and ingest.held_count() == 0
    conflicts = sorted(ingest.conflicts(), key=lambda c: c["seq"])
    assert [c["seq"] for c in conflicts] == [10, 11, 12]
    assert [c["record"] for c in conflicts] == later[4:7]
    # The first version stays where it was when the real one came: it was held.
    assert {c["first_in"] for c in conflicts} <= {"held", "events"}


def test_a_benign_resend_is_never_a_conflict(broker, journal, uplinks, ingest_db):
    ingest = ingest_db()
    committed = journal.commit([passage(i) for i in range(6)])
    with Observer(broker, "nobody/listens") as gate:
        for rec in committed:
            gate.publish(T["events"], json.dumps(rec))
        # The same records as another serializer would spell them: keys reversed,
        # blanks, \u escapes, an integral float for an int and an int for an integral float.
        for rec in committed:
            respelt = dict(reversed(list(rec.items())))
            respelt["after_ms"] = float(respelt["after_ms"])
            respelt["mono"] = int(respelt["mono"]) if float(respelt["mono"]).is_integer() else respelt["mono"]
            gate.publish(T["events"], json.dumps(respelt, indent=2, ensure_ascii=True))
        wait_until(lambda: ingest.stats()["received"] == 12, 10, "every copy delivered")
    uplinks(journal, broker)  # and the gate's own resends
    wait_until(lambda: journal.backlog() == 0, 15, "the uplink's copies acknowledged")

    assert ingest.stats()["conflicts"] == 0 and ingest.conflicts() == []
    assert ingest.stats()["duplicates"] >= 12
    assert ingest.events() == committed


def test_a_change_in_any_value_is_a_conflict_however_small(broker, ingest_db):
    ingest = ingest_db()
    base = {**passage(1), "id": "jV:1", "seq": 1}
    variants = [
        {**base, "after_ms": str(base["after_ms"])},  # "801" is not 801
        {**base, "clock_synced": 1},  # 1 is not true
        {**base, "extra": None},  # a field added, even null
    ]
    with Observer(broker, "nobody/listens") as gate:
        for rec in [base, *variants]:
            gate.publish(topics("s1", "g1")["events"], json.dumps(rec))
        wait_until(lambda: ingest.stats()["received"] == 4, 10, "four versions")
    assert ingest.stats()["conflicts"] == 3
    assert sorted(json.dumps(c["record"], sort_keys=True) for c in ingest.conflicts()) == \
        sorted(json.dumps(v, sort_keys=True) for v in variants)
    assert ingest.events() == [base]


def test_records_ahead_of_a_gap_are_bounded_per_journal_and_per_gate(broker, ingest_db, caplog):
    caplog.set_level(logging.WARNING, logger="agent.ingest")
    ingest = ingest_db(hold_max=5)
    t = topics("s1", "g1")
    with Observer(broker, t["ack"]) as acks, Observer(broker, "nobody/listens") as gate:
        gate.publish(t["events"], json.dumps(event("jH", 1)))
        wait_until(lambda: ingest.upto("jH") == 1, 10, "jH:1")
        for seq in (3, 4, 5, 6, 7, 8, 50):
            gate.publish(t["events"], json.dumps(event("jH", seq)))
        wait_until(lambda: ingest.stats()["received"] == 8, 10, "eight messages")
        # Up to 5 past the mark (1) is held; 7, 8 and 50 are refused.
        assert ingest.held_count("s1", "g1") == 4 and ingest.stats()["ahead"] == 3
        # The gate's fifth held record, in another of its journals; then the gate is full.
        gate.publish(t["events"], json.dumps(event("jK", 1)))
        gate.publish(t["events"], json.dumps(event("jK", 3)))
        gate.publish(t["events"], json.dumps(event("jK", 4)))
        wait_until(lambda: ingest.stats()["received"] == 11, 10, "eleven messages")
        assert ingest.held_count("s1", "g1") == 5 and ingest.stats()["ahead"] == 4
        assert ingest.upto("jK") == 1  # a record in order needs no room: never refused
        assert max(a["upto"] for a in acks.records() if a["journal"] == "jH") == 1

        gate.publish(t["events"], json.dumps(event("jH", 2)))
        wait_until(lambda: ingest.upto("jH") == 6, 10, "the gap filled, the held records in events")
        for seq in (7, 8):  # the gate sends again what was not acknowledged
            gate.publish(t["events"], json.dumps(event("jH", seq)))
        wait_until(lambda: [a["upto"] for a in acks.records() if a["journal"] == "jH"][-1] == 8, 10,
                   "ack upto 8")
    assert [e["seq"] for e in ingest.events("s1", "g1") if e["id"].startswith("jH:")] == list(range(1, 9))
    assert ingest.held_count() == 1  # jK:3 waits for jK:2
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("journal jH" in m and "..50)" in m for m in refusals), refusals
    assert any("journal jK" in m and "(seqs 4..4)" in m for m in refusals), refusals


def test_held_records_are_dropped_after_hold_hours_and_come_back_with_the_gate(broker, ingest_db, caplog):
    caplog.set_level(logging.WARNING, logger="agent.ingest")
    ingest = ingest_db(hold_hours=1)
    t = topics("s1", "g1")
    with Observer(broker, t["ack"]) as acks, Observer(broker, "nobody/listens") as gate:
        for seq in (1, 3, 4):
            gate.publish(t["events"], json.dumps(event("jE", seq)))
        wait_until(lambda: ingest.held_count() == 2, 10, "3 and 4 held")
        assert ingest.expire_held(now=time.time()) == 0  # not old yet
        assert ingest.expire_held(now=time.time() + 2 * 3600) == 2
        assert ingest.held_count() == 0 and ingest.stats()["expired"] == 2
        assert any("dropped 2 held record(s) of journal jE" in r.getMessage() for r in caplog.records)
        for seq in (2, 3, 4):  # the gate resends everything after its last ack
            gate.publish(t["events"], json.dumps(event("jE", seq)))
        wait_until(lambda: acks.records() and acks.records()[-1]["upto"] == 4, 10, "ack upto 4")
    assert [e["seq"] for e in ingest.events()] == [1, 2, 3, 4]
    assert ingest.stats()["conflicts"] == 0


def test_malformed_records_never_block_the_batch_they_arrive_in(broker, ingest_db, tmp_path):
    """NaN (not JSON; PostgreSQL refuses it), a lone surrogate in the id (no UTF-8 for
    SQL) and absurd nesting each used to fail the whole batch, other gates' events too."""
    ingest = ingest_db()
    blocker = sqlite3.connect(tmp_path / "ingest.db", isolation_level=None)
    poison = [
        '{"id": "jP:2", "seq": 2, "x": NaN}',
        '{"id": "j\\ud800:1", "seq": 1}',
        '{"id": "jQ:1", "seq": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ]
    with Observer(broker, topics("s2", "g2")["ack"]) as acks, Observer(broker, "nobody/listens") as pub:
        blocker.execute("BEGIN IMMEDIATE")  # the writer's next batch waits for this lock
        try:
            pub.publish(topics("s1", "g1")["events"], json.dumps(event("jP", 1)))
            wait_until(ingest._queue.empty, 10, "the writer to take the first message")
            for p in poison:
                pub.publish(topics("s1", "g1")["events"], p)
            pub.publish(topics("s2", "g2")["events"], json.dumps(event("jOther", 1)))
        finally:
            blocker.execute("ROLLBACK")  # now the rest goes in one batch
        wait_until(lambda: acks.records(), 10, "the other gate's record acknowledged")
    assert ingest.stats()["rejected"] == 3
    assert [e["id"] for e in ingest.events()] == ["jOther:1", "jP:1"]
    blocker.close()


# --- item 10: reconnecting, file modes ------------------------------------------------------


@pytest.mark.long(10)
def test_the_ingest_is_back_within_seconds_after_a_broker_restart(broker, ingest):
    broker.kill()
    wait_until(lambda: not ingest.ready.is_set(), 10, "the ingest to notice the broker is gone")
    # With paho's backoff doubling up to 30 s the tries come 1, 3, 7, 15 s after the loss:
    # after 8 s away the next would be 7 s after the restart. Now one comes every <= 2 s.
    time.sleep(8)
    broker.start()
    assert ingest.ready.wait(5), "the ingest did not resubscribe within 5 s of the restart"
    with Observer(broker, topics("s1", "g1")["ack"]) as acks, Observer(broker, "nobody/listens") as gate:
        gate.publish(topics("s1", "g1")["events"], json.dumps(event("jR2", 1)))
        wait_until(lambda: acks.records(), 10, "an ack after the restart")


def test_the_database_and_its_wal_are_readable_by_the_service_user_only(broker, tmp_path):
    old = os.umask(0o022)
    try:
        ing = Ingest(broker.host, broker.port, db_path=tmp_path / "private.db").start()
    finally:
        os.umask(old)
    try:
        assert ing.ready.wait(10)
        with Observer(broker, "nobody/listens") as gate:
            gate.publish(topics("s1", "g1")["events"], json.dumps(event("jM", 1)))
            wait_until(lambda: ing.upto("jM") == 1, 10, "a record stored")
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE((tmp_path / f"private.db{suffix}").stat().st_mode)
            assert mode == 0o600, f"private.db{suffix} is {mode:o}"
    finally:
        ing.stop()


def test_an_existing_database_readable_by_others_is_flagged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="agent.regional.ingest")
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()
    db.chmod(0o644)
    Ingest("127.0.0.1", 1, db_path=db).stop()  # never started: opens the database only
    assert stat.S_IMODE(db.stat().st_mode) == 0o644  # left as the operator set it
    assert any("readable by other users (mode 644)" in r.getMessage() for r in caplog.records)


def test_main_explains_a_hold_bound_it_cannot_use(tmp_path: Path, capsys):
    db = tmp_path / "never.db"
    assert main(["--port", "1", "--db", str(db), "--hold", "0"]) == 2
    assert main(["--port", "1", "--db", str(db), "--hold-hours", "inf"]) == 2
    out = capsys.readouterr().out
    assert "hold_max (--hold) 0 must be a whole number" in out
    assert "hold_hours (--hold-hours) inf must be a number of hours" in out
    assert not db.exists()


def test_ingests_made_at_once_have_client_ids_of_their_own(tmp_path, monkeypatch):
    # Started in the same millisecond (two hosts, or a test making two at once): the
    # same id would make each take the other's connection over, one getting no events.
    frozen = time.time()
    monkeypatch.setattr("agent.regional.ingest.time.time", lambda: frozen)
    made = [Ingest("127.0.0.1", 1, db_path=tmp_path / "ids.db") for _ in range(20)]
    try:
        assert len({ing.client_id for ing in made}) == 20
    finally:
        for ing in made:
            ing.stop()


def test_a_flood_of_conflicting_versions_is_all_kept_and_logged_within_a_budget(broker, ingest_db):
    # The log handler `gate-agent ingest` runs with (agent.regional.ingest.main): rate-limited.
    lines: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lines.append
    handler.addFilter(RateLimitFilter(LOG_BUDGET, LOG_WINDOW_S))
    logger = logging.getLogger("agent.ingest")
    logger.addHandler(handler)
    try:
        ingest = ingest_db()
        t = topics("s1", "g1")
        with Observer(broker, "nobody/listens") as forger:
            forger.publish(t["events"], json.dumps(event("jF", 1)))
            for n in range(60):
                forger.publish(t["events"], json.dumps(event("jF", 1, detail=f"forged {n}")))
            forger.publish(t["events"], json.dumps(event("jF", 2)))
            wait_until(lambda: ingest.upto("jF") == 2, 10, "the flood through")
    finally:
        logger.removeHandler(handler)
    assert ingest.stats()["conflicts"] == 60 and len(ingest.conflicts()) == 60
    conflicts = [r for r in lines if "CONFLICT" in r.getMessage()]
    assert len(conflicts) == 20  # the rest counted, said on the first line after the minute
