"""The reference ingest: stores each event once, acks the contiguous prefix, after commit."""
# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.contract import topics, validate
from agent.core.events import Now
from agent.core.records import make_record
from agent.uplink.ingest import Ingest, main
from tests.broker import Observer, broker, make_broker, wait_until  # noqa: F401


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
        assert [e["seq"] for e in ingest.events()] == [1, 2, 4]
        assert ingest.stats()["duplicates"] == 1

        gate.publish(t["events"], json.dumps(event("jA", 3)))
        wait_until(lambda: acks.records()[-1]["upto"] == 4, 10, "ack upto 4 once the gap is filled")
    assert all(validate("ack", a) == [] and a["journal"] == "jA" for a in acks.records())
    assert [e["id"] for e in ingest.events("s1", "g1")] == ["jA:1", "jA:2", "jA:3", "jA:4"]
    assert ingest.upto("jA") == 4


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


def test_two_ingests_share_the_subscription_and_store_each_event_once(broker, tmp_path):
    db = tmp_path / "shared.db"
    a = Ingest(broker.host, broker.port, db_path=db).start()
    b = Ingest(broker.host, broker.port, db_path=db).start()
    try:
        assert a.ready.wait(10) and b.ready.wait(10)
        t = topics("s1", "g1")
        with Observer(broker, t["ack"]) as acks, Observer(broker, "nobody/listens") as gate:
            for seq in range(1, 41):
                gate.publish(t["events"], json.dumps(event("jS", seq)))
            wait_until(lambda: a.received + b.received == 40, 10, "all forty delivered")
            wait_until(lambda: any(r["upto"] == 40 for r in acks.records()), 10, "ack upto 40")
        assert a.received > 0 and b.received > 0, "the shared subscription did not share"
        assert [e["seq"] for e in a.events()] == list(range(1, 41))
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
