"""A read-only SD card under the journal (issue 9, findings 6 and 7).

Real filesystems turned read-only the two ways a card does it (tests/readonly.py):
read-only from the start (a bind mount remounted ``ro``), and read-only under
a running journal (ext4 with ``errors=remount-ro`` after a filesystem error).
The journal, SQLite, the uplink and mosquitto are the real ones.
"""
# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent import contract
from agent.contract import topics
from agent.core.events import Now
from agent.core.records import make_record
from agent.uplink import failover
from agent.uplink.failover import FailoverJournal
from agent.uplink.journal import READ_ONLY, Journal
from tests.broker import (  # noqa: F401 - fixtures
    GATE,
    SITE,
    Observer,
    broker,
    ingest_at,
    make_broker,
    uplinks,
    wait_until,
)
from tests.readonly import failing_card, read_only

ROOT = Path(__file__).resolve().parent.parent
BASE = 1_788_000_000.0
BOOT = "5f0c1d2e-7a4b-4c3d-9e8f-0a1b2c3d4e5f"


def clock() -> Now:
    return Now(mono=100.0, wall=BASE, synced=True)


def granted(i: int) -> dict:
    return make_record(
        "access.granted", Now(mono=10.0 + i, wall=BASE + i), BOOT, reader="entry",
        direction="in", card=100_000 + i, format="w26", person=f"p-{i:06d}",
    )


def body(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("id", "seq", "salvaged_from")}


def failover_journal(path: Path, run: Path, **kw) -> FailoverJournal:
    kw.setdefault("retry_s", 0.1)
    return FailoverJournal(path, fallback_dir=run, clock=clock, boot=BOOT, **kw)


def idle_until(j: FailoverJournal, pred, what: str, timeout: float = 15.0) -> list[dict]:
    """Run the gate thread's idle work until pred() holds; the records it committed."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        out += j.maintenance(BASE)
        time.sleep(0.02)
    return out


@pytest.fixture(autouse=True)
def short_grace(monkeypatch):
    monkeypatch.setattr(failover, "FOLD_GRACE_S", 0.5)


def test_a_card_read_only_at_start_sends_to_a_fallback_and_folds_it_back_when_writable(tmp_path):
    state, run = tmp_path / "state", tmp_path / "run"
    path = state / "journal.db"
    j = Journal(path, clock=clock, boot=BOOT)
    before = j.commit([granted(i) for i in range(10)])
    j.pending(0, 100)
    j.ack_upto(j.id, 4)
    j.maintenance(BASE)
    real_id = j.id
    j.close()

    with read_only(state) as set_ro:
        f = failover_journal(path, run)
        try:
            assert f.on_fallback and f.id != real_id
            (alarm,) = f.pending(0, 10)
            assert (alarm["type"], alarm["kind"], alarm["active"]) == ("alarm", "journal_readonly", True)
            assert contract.validate("event", alarm) == []
            during = f.commit([granted(i) for i in range(10, 20)])
            fb_id = f.id
            assert [r["id"] for r in during] == [f"{fb_id}:{n}" for n in range(2, 12)]
            assert f.pending(0, 100) == [alarm, *during]
            f.ack_upto(fb_id, 4)  # the server stored the alarm and the first three
            f.start_sync_thread()

            set_ro(False)  # the technician remounts it (or the card recovers)
            back = idle_until(f, lambda: not f.on_fallback, "the journal back on the card")
            assert f.id == real_id
            cleared = [r for r in back if r.get("kind") == "journal_readonly"]
            assert [r["active"] for r in cleared] == [False]
            fallback_file = f.fallback_path()
            idle_until(f, lambda: not fallback_file.exists(), "the fallback folded in and removed")
            assert f.stats()["folding"] == 0

            pending = f.pending(0, 1000)
            own = [r for r in pending if "salvaged_from" not in r]
            copies = [r for r in pending if "salvaged_from" in r]
            assert own[: len(before) - 4] == before[4:], "the card's unacknowledged records wait there"
            assert [r["salvaged_from"] for r in copies] == [r["id"] for r in during[3:]], (
                "exactly the fallback's unacknowledged records, in order, once each")
            assert [body(r) for r in copies] == [body(r) for r in during[3:]]
            assert all(r["id"].startswith(f"{real_id}:") for r in pending)
            seqs = [r["seq"] for r in pending]
            assert seqs == sorted(seqs) and seqs[0] == 5
            (nxt,) = f.commit([granted(99)])
            assert nxt["id"] == f"{real_id}:{seqs[-1] + 1}", "the card's journal numbers on, no gap"
        finally:
            f.close()


def test_the_card_turning_read_only_under_the_journal_moves_waiting_records_to_the_fallback(tmp_path):
    card, run = tmp_path / "card", tmp_path / "run"
    with failing_card(card) as fail:
        f = failover_journal(card / "journal.db", run)
        try:
            f.start_sync_thread()
            first = f.commit([granted(i) for i in range(10)])
            real_id = f.id
            f.sync()
            fail()  # the kernel remounts the card read-only
            during = f.commit([granted(i) for i in range(10, 13)])
            assert f.on_fallback and f.id != real_id
            fb_id = f.id
            assert all(r["id"].startswith(f"{fb_id}:") for r in during), "returned under the new ids"
            grants = [r for r in during if r["type"] == "access.granted"]
            assert [body(r) for r in grants] == [body(granted(i)) for i in range(10, 13)]
            assert [r["kind"] for r in during if r["type"] == "alarm"] == ["journal_readonly"]
            more = f.commit([granted(i) for i in range(13, 15)])
            pending = f.pending(0, 100)
            assert [body(r) for r in pending if r["type"] == "access.granted"] == [
                body(granted(i)) for i in range(10, 15)], "every record the gate made, in order"
            alarms = [r for r in pending if r["type"] == "alarm"]
            assert [(a["kind"], a["active"]) for a in alarms] == [("journal_readonly", True)]
            assert [r["seq"] for r in pending] == list(range(1, len(pending) + 1))
            assert set(map(json.dumps, during + more)) <= set(map(json.dumps, pending))
            # What was written before the card failed is still on it, readable.
            conn = sqlite3.connect(f"file:{card / 'journal.db'}?mode=ro", uri=True)
            try:
                on_card = [json.loads(b) for (b,) in conn.execute("SELECT body FROM events ORDER BY seq")]
            finally:
                conn.close()
            assert on_card[: len(first)] == first
        finally:
            f.close()


def test_without_a_fallback_records_wait_in_memory_and_the_alarm_says_read_only(tmp_path):
    card = tmp_path / "card"
    with failing_card(card) as fail:
        j = Journal(card / "journal.db", clock=clock, boot=BOOT)
        try:
            j.commit([granted(0)])
            fail()
            out = j.commit([granted(1)])
            assert j.readonly and j.stats()["blocked"] == READ_ONLY
            assert j.stats()["buffered"] == 2  # the record and the alarm, numbered, in memory
            (alarm,) = [r for r in out if r["type"] == "alarm"]
            assert (alarm["kind"], alarm["active"]) == ("journal_readonly", True)
            assert "read-only" in alarm["detail"] and contract.validate("event", alarm) == []
        finally:
            j.close()


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from agent.core.events import Now
    from agent.core.records import make_record
    from agent.uplink.failover import FailoverJournal

    clock = lambda: Now(mono=1.0, wall=1_788_000_000.0, synced=True)
    f = FailoverJournal(Path({path!r}), fallback_dir=Path({run!r}), clock=clock, boot="b")
    assert f.on_fallback
    i = 0
    while True:
        i += 1
        rec = make_record("access.granted", Now(mono=float(i), wall=1_788_000_000.0 + i), "b",
                          reader="entry", direction="in", card=i, format="w26", person="p-%d" % i)
        for r in f.commit([rec]):
            print(r["id"], r.get("card"), flush=True)
    """
)


def test_kill_9_on_the_fallback_loses_nothing_the_gate_journalled(tmp_path):
    state, run = tmp_path / "state", tmp_path / "run"
    path = state / "journal.db"
    Journal(path, clock=clock, boot=BOOT).close()
    with read_only(state) as set_ro:
        seen: dict[str, object] = {}
        for _ in range(2):
            code = CHILD.format(root=str(ROOT), path=str(path), run=str(run))
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            lines = [proc.stdout.readline() for _ in range(150)]
            assert all(lines), proc.stderr.read()
            proc.send_signal(signal.SIGKILL)
            rest, _err = proc.communicate()
            for line in lines + rest.splitlines(keepends=True):
                if line.strip() and line.endswith("\n"):  # not a line the kill cut in two
                    rid, card = line.split()
                    seen[rid] = None if card == "None" else int(card)
        f = failover_journal(path, run)
        try:
            assert f.on_fallback
            kept = {r["id"]: r.get("card") for r in f.pending(0, 10_000)}
            missing = set(seen) - set(kept)
            assert not missing, f"journalled before kill -9 and gone: {sorted(missing)[:5]}"
            assert all(kept[rid] == card for rid, card in seen.items())
            fb_id = f.id
            f.start_sync_thread()
            set_ro(False)
            idle_until(f, lambda: not f.on_fallback and f.stats()["folding"] == 0, "back and folded")
            idle_until(f, lambda: not f.fallback_path().exists(), "the fallback removed")
            copies = {r["salvaged_from"]: r for r in f.pending(0, 10_000) if "salvaged_from" in r}
            assert set(copies) == set(kept), "every fallback record is in the card's journal, once"
            assert all(r.startswith(f"{fb_id}:") for r in copies)
        finally:
            f.close()


def test_a_fallback_left_by_a_stopped_agent_is_folded_in_at_the_next_start(tmp_path):
    state, run = tmp_path / "state", tmp_path / "run"
    path = state / "journal.db"
    Journal(path, clock=clock, boot=BOOT).close()
    with read_only(state):
        f = failover_journal(path, run)
        during = f.commit([granted(i) for i in range(5)])
        fb_id, fb_file = f.id, f.fallback_path()
        f.close()  # systemctl stop while the card is read-only
    assert fb_file.exists(), "the fallback outlives the agent (RuntimeDirectoryPreserve=yes)"
    f = failover_journal(path, run)
    try:
        assert not f.on_fallback and not fb_file.exists()
        pending = f.pending(0, 100)
        assert [r["salvaged_from"] for r in pending if "salvaged_from" in r][1:] == [r["id"] for r in during]
        assert pending[0]["salvaged_from"] == f"{fb_id}:1"  # the alarm raised then
        assert [(r["kind"], r["active"]) for r in pending if r["type"] == "alarm"] == [
            ("journal_readonly", True), ("journal_readonly", False)]
    finally:
        f.close()


# --- the uplink across journal ids -------------------------------------------------------


def test_acks_for_an_old_journal_never_wedge_the_uplink_across_a_switch(tmp_path, broker, uplinks,
                                                                         ingest_at):
    """Records go out under the card's journal, the card turns read-only
    (fallback), then writable again; stale and forged acks for every id that
    was ever used arrive all along. Everything reaches the ingest and is
    acknowledged; nothing of one journal is acknowledged by another's ack."""
    state, run = tmp_path / "state", tmp_path / "run"
    path = state / "journal.db"
    T = topics(SITE, GATE)
    ingest = ingest_at(broker)
    j = Journal(path, clock=clock, boot=BOOT)
    first = j.commit([granted(i) for i in range(20)])
    real_id = j.id
    j.close()
    with read_only(state) as set_ro, Observer(broker, T["events"]) as server:
        f = failover_journal(path, run)
        try:
            f.start_sync_thread()
            up = uplinks(f, broker, window=5)
            fb_id = f.id
            during = f.commit([granted(i) for i in range(20, 40)])
            up.wake()
            for jid in (real_id, "someone-else", fb_id + "x"):
                server.publish(T["ack"], json.dumps({"journal": jid, "upto": 10**9}))
            wait_until(lambda: ingest.upto(fb_id) >= len(during) + 1, 20, "the fallback's records stored")
            wait_until(lambda: f.backlog() == 0, 10, "the fallback's records acknowledged")
            set_ro(False)
            idle_until(f, lambda: not f.on_fallback, "back on the card")
            later = f.commit([granted(i) for i in range(40, 50)])
            up.wake()
            for jid in (fb_id + "x", "someone-else"):  # (fb_id's own acks come from the ingest)
                server.publish(T["ack"], json.dumps({"journal": jid, "upto": 10**9}))
            wait_until(lambda: ingest.upto(real_id) >= later[-1]["seq"], 20, "the card's records stored")
            idle_until(f, lambda: not f.fallback_path().exists(), "the fallback removed")
            wait_until(lambda: f.backlog() == 0, 10, "everything acknowledged")
        finally:
            f.close()
    stored = {e["id"]: e for e in ingest.events(SITE, GATE)}
    for rec in first + during + later:
        assert stored[rec["id"]] == rec
    assert not [e for e in stored.values() if "salvaged_from" in e], (
        "the ingest acknowledged the fallback before the switch back: nothing copied twice")


def test_the_unit_keeps_the_fallback_across_restarts_of_the_agent():
    """systemd removes a RuntimeDirectory= when the service stops, and Restart=always
    stops it first: without RuntimeDirectoryPreserve the fallback's records would go
    with every crash."""
    settings = {}
    for line in (ROOT / "systemd" / "gate-agent.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    assert settings["RuntimeDirectory"] == "gate-agent"
    assert settings.get("RuntimeDirectoryPreserve") == "yes"


FOLDING_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from agent.core.events import Now
    from agent.core.records import make_record
    from agent.uplink import failover
    from agent.uplink.failover import FailoverJournal

    failover.FOLD_BATCH, failover.FOLD_GRACE_S = 3, 0.0
    clock = lambda: Now(mono=1.0, wall=1_788_000_000.0, synced=True)
    f = FailoverJournal(Path({path!r}), fallback_dir=Path({run!r}), clock=clock, boot="b", retry_s=0.1)
    out = f.commit([make_record("access.granted", Now(mono=float(i), wall=1_788_000_000.0 + i), "b",
                                reader="entry", direction="in", card=i, format="w26", person="p")
                    for i in range(10)])
    print(f.id, *[r["id"] for r in out if r["type"] == "access.granted"], flush=True)
    f.start_sync_thread()
    sys.stdin.readline()  # the card takes writes again
    while f.on_fallback:
        f.maintenance(1_788_000_000.0)
        time.sleep(0.02)
    f.maintenance(1_788_000_000.0)  # a batch folded in, then killed
    print("folding", f.stats()["folding"], flush=True)
    time.sleep(60)
    """
)


def test_kill_9_while_folding_the_fallback_in_copies_no_record_twice_and_loses_none(tmp_path):
    state, run = tmp_path / "state", tmp_path / "run"
    path = state / "journal.db"
    Journal(path, clock=clock, boot=BOOT).close()
    with read_only(state) as set_ro:
        code = FOLDING_CHILD.format(root=str(ROOT), path=str(path), run=str(run))
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            fb_id, *ids = proc.stdout.readline().split()
            assert ids, proc.stderr.read()
            set_ro(False)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            left = proc.stdout.readline().split()
            assert left and left[0] == "folding" and int(left[1]) > 0, "killed before the fold ended"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        g = failover_journal(path, run)  # the next start finds the fallback and folds the rest in
        try:
            assert not g.on_fallback and not g.fallback_path().exists()
            copies = [r["salvaged_from"] for r in g.pending(0, 100) if "salvaged_from" in r]
            assert copies == [f"{fb_id}:1", *ids], "each once, in order"
        finally:
            g.close()
