# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""kill -9 at random moments under load loses nothing the gate acted on.

The real agent (``python -m tests.crash_agent``: ``gate-agent run`` on mock
pins with a simulated turnstile and crowd inside) runs against a real
mosquitto and the reference ingest (ack mode ``ingest``). It is killed with
SIGKILL at random moments, while the crowd presents cards and at times while
it is still starting (journal open, salvage, pins), and started again, for
GATE_CRASH_CYCLES cycles (default 50; the ``soak`` marker runs
GATE_SOAK_CYCLES, default 1,000: ``make soak``). Then it runs once more with
no load until the ingest holds everything, and stops cleanly.

What must hold (docs/design.md, principle 2; docs/reliability.md):

* every unlock the turnstile saw (the witness file, fsync'd by the simulated
  turnstile line by line, outlives each killed process) pairs with its own
  ``access.granted`` record, made in the same run before the line moved and
  stored at the ingest: a witnessed unlock without one is a lost event;
* no run ever starts with an output active, and no unlock comes before the
  run's first grant;
* the journal's seqs run from 1 to the last with no gap, all of one journal
  (nothing was rebuilt), each stored once at the ingest with the same body,
  and every copy the broker carried of an id (resends after a kill) is the
  same record;
* the journal passes SQLite's integrity check and opens without salvage.

GATE_CRASH_SEED fixes the random delays (the seed used is in every failure).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.core.acl import AccessList
from agent.downlink.aclfiles import ACL_FILE, store_list
from tests.broker import Observer, broker, ingest_at, make_broker, wait_until  # noqa: F401
from tests.crash_agent import BLOCKED, CARDS

ROOT = Path(__file__).resolve().parent.parent
SITE, GATE = "school9", "gate3"
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
CYCLES = int(os.environ.get("GATE_CRASH_CYCLES", "50"))
SOAK_CYCLES = int(os.environ.get("GATE_SOAK_CYCLES", "1000"))
KILL_AFTER_READY_S = (0.2, 1.5)  # random moments, counted from READY=1
KILL_WHILE_STARTING_S = (0.05, 1.0)  # every STARTING_EVERY-th cycle: from the spawn, maybe before READY
STARTING_EVERY = 5
EPS_S = 0.002  # records carry mono rounded to the millisecond
MAX_LAG_S = 5.0  # a grant's pulse is driven right after its commit; generous for a loaded CI box


def acl_snapshot() -> dict:
    people = [{"id": f"p-{i}", "cards": [c], "groups": ["pupils"]} for i, c in enumerate(CARDS)]
    return {"kind": "snapshot", "version": "crash.1", "site": SITE, "timezone": "UTC",
            "schedules": {"always": {"week": ALWAYS}},
            "groups": {"pupils": {"entry": "always", "exit": "always"}},
            "people": people, "blocked": BLOCKED}


def prepare(tmp_path: Path, broker) -> Path:
    """Config (mock pins, short pulses, the broker) and the access list kept on disk."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store_list(state / ACL_FILE, AccessList.from_snapshot(acl_snapshot()), applied_at=time.time())
    config = tmp_path / "agent.toml"
    config.write_text("\n".join([
        "[site]", f'id = "{SITE}"', f'gate = "{GATE}"',
        "[gate]", "pulse_s = 0.1", "wait_s = 1.0",
        "[hardware]", 'pin_factory = "mock"',
        "[journal]", 'path = "data/journal.db"', "sync_interval_s = 0.2",
        "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}", 'ack_mode = "ingest"',
        "backoff_max_s = 1", "telemetry_interval_s = 0",
        "[service]", 'state_dir = "state"', "state_save_s = 1",
    ]) + "\n")
    return config


class ReadySocket:
    """systemd's notify socket: which processes sent READY=1 (the kernel names the
    sender, SO_PASSCRED, so a late datagram from a killed agent is never mistaken
    for the next one's)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.ready: set[int] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds = struct.calcsize("3i")
        while not self._stop:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((struct.unpack("3i", d[:creds])[0] for level, kind, d in anc
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if pid is not None and "READY=1" in data.decode(errors="replace").splitlines():
                self.ready.add(pid)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def spawn(config: Path, tmp_path: Path, notify: ReadySocket, seed: int, *, crowd: bool = True,
          log_name: str = "agent.log") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = str(ROOT)
    env["NOTIFY_SOCKET"] = str(notify.path)
    args = [sys.executable, "-m", "tests.crash_agent", "--config", str(config),
            "--witness", str(tmp_path / "witness.jsonl"), "--seed", str(seed)]
    if not crowd:
        args.append("--no-crowd")
    # stderr to a file: a killed agent's last words stay readable, and no pipe can fill up.
    with open(tmp_path / log_name, "ab") as log:
        return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)


def log_tail(tmp_path: Path, name: str = "agent.log", n: int = 30) -> str:
    try:
        return "\n".join((tmp_path / name).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def journal_rows(path: Path) -> tuple[str, list[dict]]:
    with sqlite3.connect(path) as db:
        jid = db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]
        rows = [json.loads(b) for (b,) in db.execute("SELECT body FROM events ORDER BY seq")]
    return jid, rows


def journal_last_seq(path: Path) -> tuple[str | None, int]:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            jid = db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]
            return jid, db.execute("SELECT last_seq FROM state WHERE id = 1").fetchone()[0]
    except (sqlite3.Error, TypeError):
        return None, 0


@dataclass
class Run:
    """One agent process as the witness saw it."""

    attach_t: float
    pid: int
    lines: dict
    changes: list[dict] = field(default_factory=list)


def witness_runs(path: Path) -> tuple[list[Run], int]:
    """The witness file split at each attach; and how many lines were cut by a kill."""
    runs: list[Run] = []
    cut = 0
    for text in path.read_text().splitlines():
        if not text.strip():
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            cut += 1  # a kill in the middle of the write; the next run starts a fresh line
            continue
        if "attach" in doc:
            runs.append(Run(doc["t"], doc["attach"], doc["lines"]))
        else:
            runs[-1].changes.append(doc)
    return runs, cut


def check_witness(runs: list[Run], records: list[dict], seed: int) -> dict:
    """Every witnessed unlock pairs with its own grant of the same run; figures back."""
    grants = sorted((r for r in records if r["type"] == "access.granted"), key=lambda r: r["mono"])
    used: set[int] = set()
    line_dir = {"unlock_a": "in", "unlock_b": "out"}
    unlocks = 0
    for i, run in enumerate(runs):
        end_t = runs[i + 1].attach_t if i + 1 < len(runs) else float("inf")
        assert not any(run.lines.values()), f"seed {seed}: run {i} (pid {run.pid}) started with {run.lines}"
        for ch in run.changes:
            assert ch["line"] in line_dir or not ch["active"], \
                f"seed {seed}: {ch['line']} went active in run {i} with no fire or lockdown: {ch}"
            if ch["line"] not in line_dir or not ch["active"]:
                continue
            unlocks += 1
            t = ch["t"]
            match = None
            for g in grants:
                if g["mono"] > t + EPS_S:
                    break
                if (id(g) not in used and g["direction"] == line_dir[ch["line"]]
                        and g["mono"] >= run.attach_t - EPS_S and t - g["mono"] <= MAX_LAG_S
                        and g["mono"] < end_t):
                    match = g  # the latest unused grant before the change
            assert match is not None, (
                f"seed {seed}: LOST EVENT: run {i} (pid {run.pid}) witnessed {ch['line']} active at "
                f"t={t:.3f} but no access.granted of this run before it reached the ingest; "
                f"grants near it: {[(g['seq'], g['mono']) for g in grants if abs(g['mono'] - t) < 3]}")
            used.add(id(match))
    return {"unlocks": unlocks, "grants": len(grants)}


def crash_cycles(tmp_path: Path, broker, ingest_at, cycles: int) -> dict:
    seed = int(os.environ.get("GATE_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    config = prepare(tmp_path, broker)
    ingest = ingest_at(broker)
    notify = ReadySocket(tmp_path / "notify.sock")
    observer = Observer(broker, f"gate/v1/{SITE}/{GATE}/events")
    db = tmp_path / "data" / "journal.db"
    t0 = time.monotonic()
    killed_starting = 0
    try:
        for cycle in range(cycles):
            proc = spawn(config, tmp_path, notify, seed=rng.randrange(1 << 30))
            try:
                if cycle % STARTING_EVERY == STARTING_EVERY - 1:
                    time.sleep(rng.uniform(*KILL_WHILE_STARTING_S))
                    killed_starting += proc.pid not in notify.ready
                else:
                    wait_until(lambda p=proc: p.pid in notify.ready or p.poll() is not None, timeout=60,
                               what=f"READY=1 of cycle {cycle}")
                    assert proc.poll() is None, (
                        f"seed {seed}: the agent exited with {proc.returncode} in cycle {cycle}:\n"
                        f"{log_tail(tmp_path)}")
                    time.sleep(rng.uniform(*KILL_AFTER_READY_S))
                assert proc.poll() is None, (
                    f"seed {seed}: the agent died on its own in cycle {cycle} ({proc.returncode}):\n"
                    f"{log_tail(tmp_path)}")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
        cycles_s = time.monotonic() - t0

        # Drain: the agent once more, no load, until the ingest holds every seq; then a clean stop.
        proc = spawn(config, tmp_path, notify, seed=0, crowd=False)
        try:
            wait_until(lambda: proc.pid in notify.ready or proc.poll() is not None, timeout=60, what="READY=1")
            assert proc.poll() is None, log_tail(tmp_path)

            def drained() -> bool:
                jid, last = journal_last_seq(db)
                return jid is not None and last > 0 and ingest.upto(jid) >= last

            wait_until(drained, timeout=120, what=f"the ingest to hold every seq (seed {seed})")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        assert code == 0, f"seed {seed}: the drain run exited {code}:\n{log_tail(tmp_path)}"
        copies = observer.records()
    finally:
        observer.stop()
        notify.close()

    # --- the journal: whole, one journal, no gap --------------------------------------------
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    jid, rows = journal_rows(db)
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(1, len(rows) + 1)), f"seed {seed}: journal seqs have gaps"
    assert {r["id"].rpartition(":")[0] for r in rows} == {jid}
    assert not [r for r in rows if r["type"] == "journal.recovered"], f"seed {seed}: the journal was rebuilt"
    assert not list(db.parent.glob("*.corrupt-*"))
    from agent.uplink.journal import Journal

    with Journal(db) as reopened:
        assert reopened.recovered_record is None and reopened.id == jid

    # --- the ingest: every seq exactly once, the same records ---------------------------------
    stored = [e for e in ingest.events(SITE, GATE) if e["id"].startswith(f"{jid}:")]
    assert len(stored) == len({e["id"] for e in stored})
    missing = sorted(set(seqs) - {e["seq"] for e in stored})
    assert not missing, f"seed {seed}: journalled seqs never reached the ingest: {missing[:20]}"
    assert stored == rows, f"seed {seed}: the ingest holds other records than the journal"
    by_id: dict[str, dict] = {}
    for rec in copies:
        assert by_id.setdefault(rec["id"], rec) == rec, f"seed {seed}: id {rec['id']} named two records"

    runs, cut = witness_runs(tmp_path / "witness.jsonl")
    figures = check_witness(runs, stored, seed)
    figures.update(
        seed=seed, cycles=cycles, killed_while_starting=killed_starting, cycles_s=round(cycles_s, 1),
        records=len(rows), runs=len(runs), witness_lines_cut=cut, resent=len(copies) - len(by_id),
        types={t: sum(r["type"] == t for r in rows) for t in sorted({r["type"] for r in rows})},
    )
    print(f"\ncrash recovery: {json.dumps(figures)}")
    return figures


def _grant(mono: float, direction: str = "in") -> dict:
    return {"type": "access.granted", "mono": mono, "direction": direction, "seq": int(mono * 10)}


def test_the_witness_check_catches_an_unlock_with_no_record_and_a_start_with_a_line_active():
    idle = {"unlock_a": False, "unlock_b": False, "stop": False, "fire_release": False}
    run = Run(100.0, 1, idle, [{"t": 101.01, "line": "unlock_a", "active": True},
                               {"t": 101.11, "line": "unlock_a", "active": False},
                               {"t": 102.01, "line": "unlock_b", "active": True}])
    assert check_witness([run], [_grant(101.0), _grant(102.0, "out")], 0)["unlocks"] == 2
    with pytest.raises(AssertionError, match="LOST EVENT"):
        check_witness([run], [_grant(101.0)], 0)  # the exit grant is missing
    with pytest.raises(AssertionError, match="LOST EVENT"):
        check_witness([run], [_grant(101.0), _grant(101.5, "in")], 0)  # wrong direction
    with pytest.raises(AssertionError, match="LOST EVENT"):
        check_witness([run], [_grant(101.0), _grant(102.5, "out")], 0)  # recorded after the unlock
    # One grant never covers two unlocks, and a grant of an earlier run covers none.
    twice = Run(100.0, 1, idle, [{"t": 101.01, "line": "unlock_a", "active": True},
                                 {"t": 101.5, "line": "unlock_a", "active": True}])
    with pytest.raises(AssertionError, match="LOST EVENT"):
        check_witness([twice], [_grant(101.0)], 0)
    with pytest.raises(AssertionError, match="LOST EVENT"):
        check_witness([Run(90.0, 1, idle), run], [_grant(95.0), _grant(102.0, "out")], 0)
    with pytest.raises(AssertionError, match="started with"):
        check_witness([Run(100.0, 1, {**idle, "unlock_b": True})], [], 0)


@pytest.mark.long(50)
@pytest.mark.timeout(900)
def test_kill_9_at_random_moments_loses_nothing_the_gate_acted_on(tmp_path, broker, ingest_at):
    figures = crash_cycles(tmp_path, broker, ingest_at, CYCLES)
    # The load was real: grants were witnessed as unlocks and passages were made.
    assert figures["unlocks"] > 0 and figures["types"].get("passage", 0) > 0
    assert figures["types"]["agent.started"] >= CYCLES - figures["killed_while_starting"]


@pytest.mark.soak
@pytest.mark.timeout(6 * 3600)
def test_soak_kill_9_cycles(tmp_path, broker, ingest_at):
    figures = crash_cycles(tmp_path, broker, ingest_at, SOAK_CYCLES)
    assert figures["unlocks"] > 0
