"""The reference ingest on PostgreSQL: a real server, a real mosquitto, a real journal and uplink.

Each test gets a fresh database on one PostgreSQL server per module (tests/pg.py);
the module skips, saying why, where PostgreSQL or psycopg is missing.
"""
# ruff: noqa: F811 - pytest fixtures imported from tests.broker and tests.pg, used as arguments
from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from agent.contract import topics, validate
from agent.regional.ingest import Ingest, IngestError, main
from agent.regional.store import (
    PostgresStore,
    Row,
    SqliteStore,
    StoreError,
    open_store,
    redact,
)
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
from tests.pg import pg_url, postgres  # noqa: F401 - fixtures

T = topics(SITE, GATE)

pytestmark = pytest.mark.postgres  # the regional side: not installed on a board


def table(url: str, sql: str, *args) -> list[tuple]:
    """Look at the database from outside the ingest."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description is not None else []


@pytest.fixture
def pg_ingests(broker):
    """``pg_ingests(url, **options)``: started, subscribed ingests on PostgreSQL; stopped at the end."""
    made: list[Ingest] = []

    def make(url: str, **options) -> Ingest:
        ing = Ingest(broker.host, broker.port, db_url=url, **options).start()
        made.append(ing)
        assert ing.ready.wait(10), "the ingest did not subscribe"
        return ing

    yield make
    for ing in made:
        ing.stop()


def test_journalled_events_are_stored_once_by_id_in_postgres_and_leave_the_journal(
    broker, journal, uplinks, pg_url, pg_ingests
):
    committed = journal.commit([passage(i) for i in range(30)])
    ingest = pg_ingests(pg_url)
    uplinks(journal, broker, window=5)
    wait_until(lambda: journal.backlog() == 0, 15, "the ingest to acknowledge every event")

    assert ingest.events(SITE, GATE) == committed
    ids = [i for (i,) in table(pg_url, "SELECT id FROM events ORDER BY seq")]
    assert ids == [r["id"] for r in committed]
    assert table(pg_url, "SELECT journal, site, gate, upto FROM journals") == [
        (journal.id, SITE, GATE, committed[-1]["seq"])
    ]


def test_resent_events_are_stored_once(broker, journal, uplinks, pg_url, pg_ingests):
    committed = journal.commit([passage(i) for i in range(10)])
    ingest = pg_ingests(pg_url)
    with Observer(broker, "nobody/listens") as gate:
        # The same records twice, as a gate resends after a lost ack.
        for rec in committed + committed[:6]:
            gate.publish(T["events"], json.dumps(rec))
        wait_until(lambda: ingest.stats()["received"] == 16, 10, "every copy delivered")
    # And the uplink sends them all once more: the journal still holds them.
    uplinks(journal, broker)
    wait_until(lambda: journal.backlog() == 0, 15, "the uplink's copies to be acknowledged")

    assert ingest.stats()["stored"] == 10
    assert ingest.stats()["duplicates"] >= 6
    assert table(pg_url, "SELECT count(*), count(DISTINCT id) FROM events") == [(10, 10)]
    assert ingest.events() == committed


def test_an_ack_is_only_sent_once_its_events_are_committed(broker, pg_url, pg_ingests):
    pg_ingests(pg_url)
    stored_when_acked: list[tuple[int, set[int]]] = []
    with Observer(broker, T["ack"]) as acks:
        original = acks.client.on_message

        def on_ack(client, userdata, msg):
            # Another connection sees only committed rows: the ack's events must be there.
            seqs = {s for (s,) in table(pg_url, "SELECT seq FROM events")}
            stored_when_acked.append((json.loads(msg.payload)["upto"], seqs))
            original(client, userdata, msg)

        acks.client.on_message = on_ack
        with Observer(broker, "nobody/listens") as gate:
            for seq in range(1, 41):
                rec = {**passage(seq), "id": f"jC:{seq}", "seq": seq}
                gate.publish(T["events"], json.dumps(rec))
            wait_until(lambda: acks.records() and acks.records()[-1]["upto"] == 40, 10, "the last ack")
    assert all(validate("ack", a) == [] for a in acks.records())
    for upto, stored in stored_when_acked:
        assert set(range(1, upto + 1)) <= stored


def test_acks_resume_from_the_stored_mark_after_an_ingest_restart(
    broker, journal, uplinks, pg_url, pg_ingests
):
    first_batch = journal.commit([passage(i) for i in range(10)])
    first = pg_ingests(pg_url)
    up = uplinks(journal, broker, resend_after_s=0.5)
    wait_until(lambda: journal.backlog() == 0, 15, "the first ingest to acknowledge")
    first.stop()

    # A gap at the head of the journal's rows would hide a mark rebuilt from the
    # events table: remove seq 1 behind the ingest's back. Only the stored mark
    # (journals.upto) lets the next ingest ack past it.
    table(pg_url, "DELETE FROM events WHERE id = %s RETURNING id", first_batch[0]["id"])
    second = pg_ingests(pg_url)
    with Observer(broker, T["ack"]) as acks:
        later = journal.commit([passage(i) for i in range(10, 15)])
        up.wake()
        wait_until(lambda: journal.backlog() == 0, 15, "the restarted ingest to acknowledge")
    assert acks.records()[-1] == {"journal": journal.id, "upto": later[-1]["seq"]}
    assert second.upto(journal.id) == later[-1]["seq"]
    assert [e["id"] for e in second.events()] == [r["id"] for r in first_batch[1:] + later]


def test_two_ingests_in_one_group_on_one_database_store_each_event_exactly_once(
    broker, journal, uplinks, pg_url, pg_ingests
):
    a = pg_ingests(pg_url, group="region")
    b = pg_ingests(pg_url, group="region")
    committed = journal.commit([passage(i) for i in range(150)])
    with Observer(broker, "nobody/listens") as gate:
        # Also, straight on the wire, a second gate's journal interleaved with the first.
        for seq in range(1, 101):
            gate.publish(topics(SITE, "gate2")["events"],
                         json.dumps({**passage(seq), "id": f"jG2:{seq}", "seq": seq}))
        # resend_after_s: a record one ingest held and the other moved into events is
        # acked with the gate's next record or its resend.
        uplinks(journal, broker, window=50, resend_after_s=0.5)
        wait_until(lambda: journal.backlog() == 0, 20, "every event acknowledged")
        wait_until(lambda: a.upto("jG2") == 100, 10, "the second gate's mark at 100")

    assert a.received > 0 and b.received > 0, "the shared subscription did not share"
    assert a.stats()["stored"] + b.stats()["stored"] == 250
    assert table(pg_url, "SELECT count(*), count(DISTINCT id) FROM events") == [(250, 250)]
    assert a.events(SITE, GATE) == committed
    assert b.upto(journal.id) == committed[-1]["seq"]


def row(journal: str, seq: int) -> Row:
    rec = {**passage(seq), "id": f"{journal}:{seq}", "seq": seq}
    return Row(rec["id"], journal, seq, SITE, GATE, rec["type"], rec["ts"], json.dumps(rec))


def test_concurrent_writers_never_leave_the_mark_behind(pg_url):
    """Four stores write interleaved seqs of one journal at once, one per
    transaction: whichever commits last must see the others' rows, so the mark
    ends at the top, neither stuck at a gap another transaction filled nor
    moved back by a writer that looked before the others committed."""
    writers, top = 4, 400
    stores = [PostgresStore(pg_url) for _ in range(writers)]
    errors: list[BaseException] = []
    go = threading.Barrier(writers)

    def write(store: PostgresStore, k: int) -> None:
        try:
            go.wait(10)
            for seq in range(1 + k, top + 1, writers):
                store.insert([row("jW", seq)])
        except StoreError as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(st, k)) for k, st in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for st in stores:
        st.close()
    assert not errors, errors
    assert table(pg_url, "SELECT upto FROM journals WHERE journal = 'jW'") == [(top,)]


def test_a_writer_waits_for_another_writers_mark_and_counts_its_rows(pg_url):
    """Another ingest is mid-transaction on the same journal: it inserted seq 2
    and holds the journal's mark. Our batch (seq 1) must wait for it, then see
    seq 2, so the mark reaches 2 rather than 1."""
    import psycopg

    store = PostgresStore(pg_url)
    store.insert([row("jL", 5)])  # the journal's mark row exists (at 0: seq 1 is missing)
    other = psycopg.connect(pg_url)
    try:
        # What another writer does with seq 2 while 1 is missing: hold it, under the lock.
        other.execute("SELECT upto FROM journals WHERE journal = 'jL' FOR UPDATE")
        other.execute("INSERT INTO held(id, journal, seq, site, gate, type, ts, body, received) "
                      "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, '2026-09-01T07:00:00.000Z')",
                      row("jL", 2).columns())
        result: list = []
        writer = threading.Thread(target=lambda: result.append(store.insert([row("jL", 1)])))
        writer.start()
        writer.join(0.5)  # it must be waiting for the other writer, not done
        assert writer.is_alive(), "the batch did not wait for the other writer of this journal"
        other.execute("UPDATE journals SET upto = 0 WHERE journal = 'jL'")  # what that writer saw
        other.commit()
        writer.join(10)
        assert result[0].marks["jL"].upto == 2
        assert store.upto("jL") == 2
    finally:
        other.close()
        store.close()


def test_a_record_with_a_nul_escape_is_stored_and_read_back_unchanged(pg_url):
    store = PostgresStore(pg_url)
    try:
        r = row("jN", 1)
        rec = {**json.loads(r.body), "note": "a\u0000b"}
        done = store.insert([r._replace(body=json.dumps(rec))])
        assert done.new == 1 and done.marks["jN"].upto == 1
        assert store.events() == [rec]
    finally:
        store.close()


# --- choosing and opening the store (no server needed) ---------------------------------


def test_db_url_picks_the_store(tmp_path):
    assert isinstance(open_store(f"sqlite:///{tmp_path}/a.db"), SqliteStore)
    assert isinstance(open_store(tmp_path / "b.db"), SqliteStore)
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()
    with pytest.raises(StoreError, match="PostgreSQL"):
        open_store("mysql://u@h/db")


def test_a_password_never_shows_in_messages():
    assert redact("postgresql://gate:s3cret@db.example:5433/events") == \
        "postgresql://gate:***@db.example:5433/events"


def test_an_unreachable_postgres_is_explained(tmp_path, capsys):
    from tests.broker import free_port

    pytest.importorskip("psycopg")
    url = f"postgresql://ingest:hunter2@127.0.0.1:{free_port()}/gates"
    with pytest.raises(IngestError, match="cannot connect to the ingest database") as err:
        Ingest("127.0.0.1", 1, db_url=url)
    assert "hunter2" not in str(err.value)
    assert main(["--port", "1", "--db-url", url]) == 2
    out = capsys.readouterr().out
    assert "cannot connect" in out and "hunter2" not in out


def test_exactly_one_database_is_required(tmp_path):
    with pytest.raises(ValueError, match="one database"):
        Ingest("127.0.0.1", 1)
    with pytest.raises(ValueError, match="one database"):
        Ingest("127.0.0.1", 1, db_path=tmp_path / "a.db", db_url=f"sqlite:///{tmp_path}/b.db")


# --- forged records, conflicts, held records (issue 9, finding 3) ---------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "ingest.md"


def doc_sql() -> list[list[str]]:
    """The statements of each ```sql block of docs/ingest.md: layout, grants, queries."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.DOTALL)
    blocks = [re.sub(r"--[^\n]*", "", b) for b in blocks]  # comments may hold a ';'
    return [[st.strip() for st in b.split(";") if st.strip()] for b in blocks]


def forged(journal_id: str, seq: int) -> dict:
    return {**passage(500 + seq), "id": f"{journal_id}:{seq}", "seq": seq}


def versions(url: str, rid: str) -> list[dict]:
    """Every version of an id the ingest keeps (events, held, quarantine), read from outside."""
    out = []
    for name in ("events", "held", "quarantine"):
        if table(url, "SELECT to_regclass(%s) IS NOT NULL", name) == [(True,)]:
            out += [json.loads(b) for (b,) in table(url, f"SELECT body::text FROM {name} WHERE id = %s", rid)]
    return out


def test_forged_records_never_cost_a_gate_a_real_one_in_postgres(
    broker, journal, uplinks, pg_url, pg_ingests, caplog
):
    caplog.set_level(logging.ERROR, logger="agent.ingest")
    ingest = pg_ingests(pg_url)
    first = journal.commit([passage(i) for i in range(3)])
    up = uplinks(journal, broker, resend_after_s=1.0)
    wait_until(lambda: journal.backlog() == 0, 15, "the first three acknowledged")
    up.stop()  # the gate is offline; its certificate is used elsewhere

    # Seqs 4-9 continue the mark; 12 is ahead of a gap (held).
    fakes = [forged(journal.id, seq) for seq in (4, 5, 6, 7, 8, 9, 12)]
    before = ingest.stats()["received"]
    with Observer(broker, T["ack"]) as acks, Observer(broker, "nobody/listens") as forger:
        for rec in fakes:
            forger.publish(T["events"], json.dumps(rec))
        wait_until(lambda: ingest.stats()["received"] == before + 7, 10, "the forged records")
        wait_until(lambda: any(a["upto"] == 9 for a in acks.records()), 10, "the forged records' ack")

    later = journal.commit([passage(i) for i in range(3, 13)])  # seqs 4..13
    uplinks(journal, broker, resend_after_s=1.0)
    wait_until(lambda: journal.backlog() == 0, 20, "every real record acknowledged")

    for rec in first + later:
        assert rec in versions(pg_url, rec["id"]), f"real record {rec['id']} lost"
    conflicts = sorted(ingest.conflicts(SITE, GATE), key=lambda c: c["seq"])
    assert [c["seq"] for c in conflicts] == [4, 5, 6, 7, 8, 9, 12]
    assert [c["record"] for c in conflicts] == [r for r in later if r["seq"] in (4, 5, 6, 7, 8, 9, 12)]
    assert [c["first"] for c in conflicts] == fakes
    assert ingest.stats()["conflicts"] == 7 and ingest.held_count() == 0
    assert len([r for r in caplog.records if "CONFLICT" in r.getMessage()]) == 7


def create_ingest_role(pg_url: str) -> str:
    """A login role `ingest` with CONNECT only; returns its URL to this database."""
    if not table(pg_url, "SELECT 1 FROM pg_roles WHERE rolname = 'ingest'"):
        table(pg_url, "CREATE ROLE ingest LOGIN")
    dbname = pg_url.rsplit("/", 1)[1]
    table(pg_url, f'GRANT CONNECT ON DATABASE "{dbname}" TO ingest')
    return pg_url.replace("postgres@", "ingest@", 1)


def test_tables_made_beforehand_from_the_docs_need_only_the_documented_rights(
    broker, pg_url, pg_ingests
):
    layout, grants, queries = doc_sql()
    for statement in layout:
        table(pg_url, statement)
    role_url = create_ingest_role(pg_url)
    for statement in grants:
        table(pg_url, statement)
    assert table(pg_url, "SELECT has_schema_privilege('ingest', 'public', 'CREATE')") == [(False,)]

    ingest = pg_ingests(role_url)
    t = topics("s9", "g9")
    with Observer(broker, t["ack"]) as acks, Observer(broker, "nobody/listens") as pub:
        for rec in (forged("jD", 3), forged("jD", 6), forged("jD", 40)):
            pub.publish(t["events"], json.dumps(rec))
        for seq in (1, 2, 3, 4, 5, 6):
            pub.publish(t["events"], json.dumps({**passage(seq), "id": f"jD:{seq}", "seq": seq}))
        wait_until(lambda: ingest.stats()["received"] == 9, 10, "nine messages")
        wait_until(lambda: acks.records() and acks.records()[-1]["upto"] == 6, 10, "ack upto 6")
    assert ingest.stats()["conflicts"] == 2 and ingest.held_count() == 1
    assert ingest.expire_held(now=time.time() + 48 * 3600) == 1  # DELETE on held is enough
    # Every query the page shows runs with those rights.
    results = [table(role_url, q) for q in queries]
    assert sorted(r[3] for r in results[0]) == ["jD:3", "jD:6"]
    assert sorted(r[0] for r in results[1]) == ["jD:3", "jD:6"]
    assert results[2] == []


def test_an_older_layout_without_the_create_right_is_explained(pg_url):
    # What an ingest from before quarantine and held used.
    table(pg_url, "CREATE TABLE events (id TEXT PRIMARY KEY, journal TEXT NOT NULL, seq BIGINT NOT NULL, "
          "site TEXT NOT NULL, gate TEXT NOT NULL, type TEXT, ts TEXT, body JSON NOT NULL, UNIQUE (journal, seq))")
    table(pg_url, "CREATE TABLE journals (journal TEXT PRIMARY KEY, site TEXT NOT NULL, gate TEXT NOT NULL, "
          "upto BIGINT NOT NULL DEFAULT 0)")
    role_url = create_ingest_role(pg_url)
    table(pg_url, "GRANT SELECT, INSERT, UPDATE ON events, journals TO ingest")
    with pytest.raises(IngestError, match=r"tables held, quarantine .* CREATE .*docs/ingest.md"):
        Ingest("127.0.0.1", 1, db_url=role_url)


def test_a_record_postgres_cannot_hold_does_not_stall_other_gates(broker, pg_url, pg_ingests):
    """NaN is not JSON: PostgreSQL's json type refuses it, and the whole batch with it."""
    import psycopg

    ingest = pg_ingests(pg_url)
    other_gate = topics(SITE, "gate2")
    blocker = psycopg.connect(pg_url)
    with Observer(broker, other_gate["ack"]) as acks, Observer(broker, "nobody/listens") as pub:
        try:
            blocker.execute("LOCK TABLE events, journals IN ACCESS EXCLUSIVE MODE")
            pub.publish(T["events"], json.dumps({**passage(1), "id": "jN1:1", "seq": 1}))
            wait_until(ingest._queue.empty, 10, "the writer to take the first message")
            pub.publish(T["events"], '{"id": "jN1:2", "seq": 2, "x": NaN}')
            pub.publish(other_gate["events"], json.dumps({**passage(1), "id": "jN2:1", "seq": 1}))
        finally:
            blocker.rollback()  # the rest now goes in one batch
            blocker.close()
        wait_until(lambda: acks.records(), 10, "the other gate's record acknowledged")
    assert ingest.stats()["rejected"] == 1
    assert [e["id"] for e in ingest.events()] == ["jN1:1", "jN2:1"]


def test_held_records_are_bounded_per_journal_and_gate_and_expire_in_postgres(pg_url):
    store = PostgresStore(pg_url, hold_max=3)
    try:
        assert store.insert([row("jB", 1)]).marks["jB"] == (SITE, GATE, 1, 1)
        done = store.insert([row("jB", s) for s in (3, 4, 5, 9)])
        assert done.held == 2 and done.refused["jB"][2:5] == (2, 5, 9)  # 5 and 9: more than 3 ahead
        assert done.marks["jB"].ack == 0  # nothing of this batch is stored: no ack
        done = store.insert([row("jC", 3), row("jC", 4)])  # the gate's third held record, then full
        assert done.held == 1 and done.refused["jC"].count == 1
        assert store.held_count(SITE, GATE) == 3
        gone = store.expire_held("9999-12-31T00:00:00.000Z")
        assert sorted((e.journal, e.count, e.first_seq, e.last_seq) for e in gone) == \
            [("jB", 2, 3, 4), ("jC", 1, 3, 3)]
        assert store.held_count() == 0 and store.upto("jB") == 1
    finally:
        store.close()


def test_writers_racing_different_versions_of_one_id_keep_each_once(pg_url):
    """Four stores write their own version of the same 60 ids at once (in batches
    of 10): each id ends with exactly one version in events and the other three in
    quarantine, none lost, none twice, whatever the interleaving."""
    writers, top = 4, 60
    stores = [PostgresStore(pg_url) for _ in range(writers)]
    errors: list[BaseException] = []
    go = threading.Barrier(writers)

    def version(k: int, seq: int) -> Row:
        rec = {**passage(seq), "id": f"jR:{seq}", "seq": seq, "after_ms": 10_000 * (k + 1) + seq}
        return Row(rec["id"], "jR", seq, SITE, GATE, rec["type"], rec["ts"], json.dumps(rec))

    def write(store: PostgresStore, k: int) -> None:
        try:
            go.wait(10)
            seqs = list(range(1, top + 1))
            if k % 2:
                seqs.reverse()  # half of them from the far end: held first, then moved
            for i in range(0, top, 10):
                store.insert([version(k, s) for s in seqs[i:i + 10]])
        except StoreError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(st, k)) for k, st in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for st in stores:
        st.close()
    assert not errors, errors
    assert table(pg_url, "SELECT upto FROM journals WHERE journal = 'jR'") == [(top,)]
    assert table(pg_url, "SELECT count(*), count(DISTINCT id) FROM events") == [(top, top)]
    assert table(pg_url, "SELECT count(*) FROM held") == [(0,)]
    assert table(pg_url, "SELECT count(*), count(DISTINCT id) FROM quarantine") == [(top * 3, top)]
    every = {json.loads(b)["after_ms"] for (b,) in table(
        pg_url, "SELECT body::text FROM events UNION ALL SELECT body::text FROM quarantine")}
    assert every == {10_000 * (k + 1) + s for k in range(writers) for s in range(1, top + 1)}
