# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""A full disk at the service level: the gate goes on, nothing journalled is lost.

The real Service on mock pins (simulated turnstile and reader, agent.simhw),
a real mosquitto; the reference ingest joins only once space is back (while
nobody acknowledges, the journal has nothing it may free, so the disk stays
full). The disk fills through the journal's own budget, ``PRAGMA
max_page_count`` (``Journal.set_disk_budget``: SQLite then answers
SQLITE_FULL exactly as on a full filesystem), set from the gate thread, which
owns the journal's writer connection.

What must hold (docs/design.md, principles 1 and 2; docs/reliability.md):
while the disk is full, granted cards still open the relay and the person's
passage is still decided; ``alarm`` ``journal_capacity`` is raised at once
(logged, and stored with the rest once it can be); every record journalled
before stays; when space returns, the records kept in memory are written in
seq order, published and stored at the ingest: seqs 1..N, no gap, no loss.
"""
from __future__ import annotations

import json
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockFactory

from agent.config import load_config
from agent.core import events as ev
from agent.core.acl import AccessList
from agent.downlink.aclfiles import ACL_FILE, store_list
from agent.service import ClockSync, Service
from agent.simhw import SimulatedReader, SimulatedTurnstile
from agent.uplink.journal import DEFAULT_DISK_BUDGET
from tests.broker import broker, ingest_at, make_broker, wait_until  # noqa: F401

SITE, GATE = "school4", "gate2"
CARD = "100,60179"
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


class GateThread:
    """Runs test actions on the gate thread (the journal's single writer) and keeps what
    the journal numbered. It stands in for the runtime's sink and wraps the journal's
    idle maintenance, the two places the gate thread touches the journal."""

    def __init__(self, svc: Service) -> None:
        self.journal = svc.journal
        self.numbered: list[dict] = []
        self._lock = threading.Lock()
        self._todo: queue.SimpleQueue[tuple[Callable[[], Any], threading.Event]] = queue.SimpleQueue()
        self._maintenance = svc.journal.maintenance
        svc.journal.maintenance = self._maintain  # Service._on_idle calls it on the gate thread
        svc.runtime.sink = self

    def _run_todo(self) -> None:
        while True:
            try:
                action, done = self._todo.get_nowait()
            except queue.Empty:
                return
            action()
            done.set()

    def commit(self, records: list[dict]) -> list[dict]:
        self._run_todo()
        out = self.journal.commit(records)
        with self._lock:
            self.numbered += out
        return out

    def _maintain(self, now_wall: float) -> list[dict]:
        self._run_todo()
        out = self._maintenance(now_wall)
        with self._lock:
            self.numbered += out
        return out

    def call(self, action: Callable[[], Any]) -> None:
        done = threading.Event()
        self._todo.put((action, done))
        assert done.wait(10), "the gate thread did not run the action (it runs when idle)"

    def of(self, rtype: str, **fields: Any) -> list[dict]:
        with self._lock:
            return [r for r in self.numbered if r["type"] == rtype
                    and all(r.get(k) == v for k, v in fields.items())]


def setup_service(tmp_path: Path, broker) -> tuple[Service, MockFactory]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    acl = {"kind": "snapshot", "version": "disk.1", "site": SITE, "timezone": "UTC",
           "schedules": {"always": {"week": ALWAYS}},
           "groups": {"pupils": {"entry": "always", "exit": "always"}},
           "people": [{"id": "p-1", "cards": [CARD], "groups": ["pupils"]}]}
    store_list(state / ACL_FILE, AccessList.from_snapshot(acl), applied_at=time.time())
    (tmp_path / "agent.toml").write_text("\n".join([
        "[site]", f'id = "{SITE}"', f'gate = "{GATE}"',
        "[gate]", "pulse_s = 0.1", "wait_s = 2.0",
        "[hardware]", 'pin_factory = "mock"',
        "[journal]", 'path = "data/journal.db"', "sync_interval_s = 0.2",
        "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}", 'ack_mode = "ingest"',
        "backoff_max_s = 1", "telemetry_interval_s = 0",
        "[service]", 'state_dir = "state"',
    ]) + "\n")
    factory = MockFactory()
    svc = Service(load_config(tmp_path / "agent.toml"), factory=factory,
                  clock_sync=ClockSync(lambda: True), env={})
    return svc, factory


def rows_on_disk(path: Path) -> dict[int, dict]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        return {seq: json.loads(body) for seq, body in db.execute("SELECT seq, body FROM events")}


def test_a_full_disk_keeps_the_gate_open_raises_the_alarm_and_loses_nothing(
        tmp_path, broker, ingest_at, caplog):
    caplog.set_level(logging.WARNING, logger="agent.service")
    svc, factory = setup_service(tmp_path, broker)
    board = svc.config.hardware.board
    turnstile = SimulatedTurnstile(factory, board, walk_s=(0.05, 0.1), rng=random.Random(4),
                                   witness=tmp_path / "witness.jsonl")
    svc.start()
    try:
        gate = GateThread(svc)
        journal = svc.journal
        reader = SimulatedReader(factory, board, "entry", adapter=svc.readers["entry"])

        def admitted(n: int) -> None:
            """Present the card and wait for the person's passage, the n-th."""
            reader.present(CARD)
            wait_until(lambda: len(gate.of("passage", source="card")) >= n, what=f"passage {n}")
            wait_until(lambda: not turnstile.walking, what="the walk over")

        admitted(1)  # healthy: written and published (no ingest yet: nobody acknowledges)

        # The disk fills: no page may be added from now on.
        gate.call(lambda: journal.set_disk_budget(0))
        rng = random.Random(8)
        for _ in range(3000):
            if journal.stats()["blocked"] == "disk full":
                break
            svc.runtime.submit(ev.CardRead("exit", key=rng.randrange(1 << 23, 1 << 24), format="w26"))
            assert svc.runtime.wait_idle(5)
        assert journal.stats()["blocked"] == "disk full", journal.stats()
        before = rows_on_disk(journal.path)
        unlocks_before = turnstile.unlocks

        # Decisions go on: the relay opens for the card and the passage is recorded.
        for n in (2, 3):
            admitted(n)
        assert turnstile.unlocks == unlocks_before + 2
        full_grants = gate.of("access.granted", person="p-1")[1:]
        full_passages = gate.of("passage", source="card")[1:]
        assert len(full_grants) == 2 and len(full_passages) == 2
        assert journal.stats()["buffered"] >= 4  # they wait in memory, numbered
        raised = gate.of("alarm", kind="journal_capacity", active=True)
        assert raised and raised[0]["detail"] == "disk full"
        assert any("journal_capacity" in r.getMessage() for r in caplog.records), "alarm not logged"
        # Nothing journalled before the disk filled went away.
        on_disk = rows_on_disk(journal.path)
        assert all(on_disk.get(seq) == rec for seq, rec in before.items())

        # Space returns; the regional side acknowledges again.
        gate.call(lambda: journal.set_disk_budget(DEFAULT_DISK_BUDGET))
        wait_until(lambda: journal.stats()["blocked"] is None and journal.stats()["buffered"] == 0,
                   what="the buffered records written")
        ingest = ingest_at(broker)
        wait_until(lambda: ingest.upto(journal.id) >= journal.stats()["last_seq"], timeout=30,
                   what="every record at the ingest")
        last = journal.stats()["last_seq"]
    finally:
        turnstile.close()
        svc.stop()

    stored = {e["seq"]: e for e in ingest.events(SITE, GATE) if e["id"].startswith(f"{journal.id}:")}
    assert sorted(stored) == list(range(1, last + 1)), "a gap: a record was lost"
    for rec in [*before.values(), *full_grants, *full_passages]:
        assert stored[rec["seq"]] == rec
    alarms = [e for e in stored.values() if e["type"] == "alarm" and e["kind"] == "journal_capacity"]
    assert [a["active"] for a in alarms][:2] == [True, False]
    assert alarms[0]["seq"] < full_grants[0]["seq"] < alarms[1]["seq"]
