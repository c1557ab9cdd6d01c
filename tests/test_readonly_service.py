# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""A read-only SD card at the service level (issue 9, finding 7).

The real Service on mock pins (simulated turnstile and reader, agent.simhw)
with a real mosquitto and the reference ingest, started on a state directory
that is a read-only bind mount (tests/readonly.py), as when the kernel
remounted the card after errors. Today's main exits 1 there and systemd
restarts it in a loop: nobody passes.

What must hold (docs/reliability.md, "A read-only SD card"): the service
starts and decides cards (the relay is driven); ``alarm`` ``journal_readonly``
is raised and reaches the server; the records go to the fallback journal in
the runtime directory and reach the ingest; the state file, the downlink's
counters and a damaged counters file do not stop the start; when the card
takes writes again the journal moves back to it, and every record the gate
made reaches the ingest once.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from agent.config import load_config
from agent.core.acl import AccessList
from agent.downlink.aclfiles import ACL_FILE, COUNTERS_FILE, store_list
from agent.service import STATE_FILE, ClockSync, Service
from agent.simhw import SimulatedReader, SimulatedTurnstile
from agent.uplink import failover
from agent.uplink.journal import Journal
from tests.broker import broker, ingest_at, make_broker, wait_until  # noqa: F401
from tests.readonly import read_only

SITE, GATE = "school5", "gate1"
CARD = "100,60179"
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def prepare(tmp_path: Path, broker) -> tuple[Path, Path]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    acl = {"kind": "snapshot", "version": "ro.1", "site": SITE, "timezone": "UTC",
           "schedules": {"always": {"week": ALWAYS}},
           "groups": {"pupils": {"entry": "always", "exit": "always"}},
           "people": [{"id": "p-1", "cards": [CARD], "groups": ["pupils"]}]}
    store_list(state / ACL_FILE, AccessList.from_snapshot(acl), applied_at=time.time())
    (state / COUNTERS_FILE).write_text("{damaged")  # cannot be moved aside on a read-only card
    (tmp_path / "agent.toml").write_text("\n".join([
        "[site]", f'id = "{SITE}"', f'gate = "{GATE}"',
        "[gate]", "pulse_s = 0.1", "wait_s = 2.0",
        "[hardware]", 'pin_factory = "mock"',
        "[journal]", 'path = "state/journal.db"', "sync_interval_s = 0.2",
        "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}", 'ack_mode = "ingest"',
        "backoff_max_s = 1", "telemetry_interval_s = 0",
        "[service]", 'state_dir = "state"', "state_save_s = 0.5",
    ]) + "\n")
    return state, tmp_path / "agent.toml"


@pytest.mark.long(8)
def test_the_service_starts_and_decides_on_a_read_only_card_and_moves_back_when_it_is_writable(
        tmp_path, broker, ingest_at, monkeypatch, caplog):
    monkeypatch.setattr(failover, "RETRY_S", 0.3)
    monkeypatch.setattr(failover, "FOLD_GRACE_S", 0.5)
    state, config = prepare(tmp_path, broker)
    # The journal of the run before the card failed: 5 records the server never acknowledged.
    j = Journal(state / "journal.db")
    earlier = j.commit([{"v": 1, "ts": "2026-09-01T07:00:00.000Z", "clock_synced": True,
                         "boot": "b", "mono": float(i), "type": "alarm", "kind": "tamper",
                         "active": bool(i % 2)} for i in range(5)])
    card_id = j.id
    j.close()
    ingest = ingest_at(broker)
    run = tmp_path / "run"

    with read_only(state) as set_ro:
        factory = MockFactory()
        svc = Service(load_config(config), factory=factory, clock_sync=ClockSync(lambda: True),
                      env={"RUNTIME_DIRECTORY": str(run)})
        board = svc.config.hardware.board
        turnstile = SimulatedTurnstile(factory, board, walk_s=(0.05, 0.1), rng=random.Random(5))
        try:
            svc.start()  # today: ServiceError, exit 1, a restart loop
            journal = svc.journal
            assert journal.on_fallback and journal.id != card_id
            fb_id = journal.id
            reader = SimulatedReader(factory, board, "entry", adapter=svc.readers["entry"])

            reader.present(CARD)
            wait_until(lambda: turnstile.unlocks == 1, what="the relay driven for the card")
            wait_until(lambda: not turnstile.walking and turnstile.wait_idle(), what="the walk over")
            wait_until(lambda: any(e["type"] == "passage" for e in ingest.events(SITE, GATE)), 20,
                       "the passage at the ingest")
            during = {e["id"]: e for e in ingest.events(SITE, GATE)}
            assert all(rid.startswith(f"{fb_id}:") for rid in during)
            alarms = [e for e in during.values() if e["type"] == "alarm" and e["kind"] == "journal_readonly"]
            assert [a["active"] for a in alarms] == [True]
            grants = [e for e in during.values() if e["type"] == "access.granted"]
            assert [g["person"] for g in grants] == ["p-1"]
            assert not (state / STATE_FILE).exists(), "nothing was written to the read-only card"
            assert any("read-only" in r.getMessage() for r in caplog.records)

            set_ro(False)  # the card takes writes again
            wait_until(lambda: not journal.on_fallback, 15, "the journal back on the card")
            assert journal.id == card_id
            reader.present(CARD)
            wait_until(lambda: turnstile.unlocks == 2, what="the relay driven again")
            wait_until(lambda: not turnstile.walking and turnstile.wait_idle(), what="the walk over")
            wait_until(lambda: ingest.upto(card_id) >= journal.stats()["last_seq"], 20,
                       "the card's journal at the ingest")
            wait_until(lambda: not journal.fallback_path().exists(), 15, "the fallback folded in")
            wait_until(lambda: journal.backlog() == 0, 15, "everything acknowledged")
        finally:
            turnstile.close()
            svc.stop()

    stored = ingest.events(SITE, GATE)
    by_id = {e["id"]: e for e in stored}
    for rec in earlier:
        assert by_id[rec["id"]] == rec, "the records waiting on the card were sent once it was back"
    after = [e for e in stored if e["id"].startswith(f"{card_id}:") and e["seq"] > len(earlier)]
    assert [(a["kind"], a["active"]) for a in after if a["type"] == "alarm"][:1] == [
        ("journal_readonly", False)]
    assert [e["person"] for e in after if e["type"] == "access.granted"] == ["p-1"]
    assert not [e for e in stored if "salvaged_from" in e], "nothing sent twice"
    assert (state / STATE_FILE).exists(), "the gate state is saved once the card takes writes"


@pytest.mark.long(7)
def test_a_card_failing_under_the_running_service_changes_nothing_at_the_gate(
        tmp_path, broker, ingest_at, monkeypatch):
    """The kernel turns the card read-only while the agent runs (ext4,
    errors=remount-ro, after a filesystem error): cards are still decided,
    the records the journal held in memory move to the fallback and reach the
    ingest with the alarm."""
    from tests.readonly import failing_card

    monkeypatch.setattr(failover, "RETRY_S", 0.3)
    card = tmp_path / "card"
    ingest = ingest_at(broker)
    with failing_card(card) as fail:
        _state, config = prepare(card, broker)  # the config on the card too, as on the Pi
        factory = MockFactory()
        svc = Service(load_config(config), factory=factory, clock_sync=ClockSync(lambda: True),
                      env={"RUNTIME_DIRECTORY": str(tmp_path / "run")})
        board = svc.config.hardware.board
        turnstile = SimulatedTurnstile(factory, board, walk_s=(0.05, 0.1), rng=random.Random(6))
        try:
            svc.start()
            journal = svc.journal
            card_id = journal.id
            assert not journal.on_fallback
            reader = SimulatedReader(factory, board, "entry", adapter=svc.readers["entry"])
            reader.present(CARD)
            wait_until(lambda: turnstile.unlocks == 1, what="the relay driven")
            wait_until(lambda: not turnstile.walking and turnstile.wait_idle(), what="the walk over")
            wait_until(lambda: ingest.upto(card_id) >= journal.stats()["last_seq"], 20, "sent")

            fail()  # the SD card fails: read-only from now on, open files too
            for n in (2, 3):
                reader.present(CARD)
                wait_until(lambda n=n: turnstile.unlocks == n, what=f"the relay driven ({n})")
                wait_until(lambda: not turnstile.walking and turnstile.wait_idle(), what="the walk over")
            wait_until(lambda: journal.on_fallback, 10, "the journal on the fallback")
            fb_id = journal.id
            wait_until(lambda: len([e for e in ingest.events(SITE, GATE) if e["id"].startswith(f"{fb_id}:")
                                    and e["type"] == "passage"]) == 2, 20, "both passages at the ingest")
            on_fb = [e for e in ingest.events(SITE, GATE) if e["id"].startswith(f"{fb_id}:")]
            assert [e["person"] for e in on_fb if e["type"] == "access.granted"] == ["p-1", "p-1"]
            assert [(e["kind"], e["active"]) for e in on_fb if e["type"] == "alarm"
                    and e["kind"].startswith("journal")] == [("journal_readonly", True)]
            assert [e["seq"] for e in on_fb] == list(range(1, len(on_fb) + 1)), "no gap"
        finally:
            turnstile.close()
            svc.stop()
