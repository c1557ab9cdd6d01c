"""The SD card's and the CPU's faults of `make chaos` (bench/chaos.py): a
damaged journal (``salvage``), a journal that lost records without damage
SQLite can see (``silent_loss``), a card that turns read-only (``readonly``)
and Wiegand frames on a busy CPU with late edge callbacks (``wiegand``).

The journal faults run the real agent in its own process on simulated
hardware (tests/agentproc.py), started on files damaged the way a card
damages them; what it must recover is computed from the damaged bytes
themselves (a record is still there when its exact stored body is), never
from the code that reads them. The read-only fault uses real mounts (a bind
mount remounted read-only, an ext4 image the kernel turns read-only after an
error; root needed), always unmounted again. The Wiegand fault calls the
loaded run of bench/bench_latency.py and delivers frames through the mock
pins with edge callbacks up to 50 ms late.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.core.events import Now
from agent.core.records import make_record
from agent.simctl import SimClientError, request
from agent.uplink.journal import Journal
from bench.chaos_rig import W26_READERS, CardLoop, Verdict, lost, start_ingest, wait_for
from tests.agentproc import CARDS, ROOT, AgentProcess
from tests.broker import Mosquitto

PAGE = 4096


# --------------------------------------------------------------------------- the agent


# The agent's own entry point, with the read-only card's retry period shortened
# (agent.uplink.failover.RETRY_S, 30 s in the field) so a run stays bounded; in
# quick runs the fold-back grace too (FOLD_GRACE_S, 10 s).
_BOOT = """\
import os, sys
if os.environ.get("CHAOS_RETRY_S"):
    import agent.uplink.failover as failover
    failover.RETRY_S = float(os.environ["CHAOS_RETRY_S"])
    failover.FOLD_GRACE_S = float(os.environ.get("CHAOS_FOLD_GRACE_S") or failover.FOLD_GRACE_S)
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Agent(AgentProcess):
    """AgentProcess with a runtime directory (the fallback journal's home),
    a shorter retry period for a read-only card, and optionally its journal
    and state directory on ``card`` (a filesystem that can fail) while the
    config and the log stay outside it."""

    def __init__(self, workdir: Path, *, runtime_dir: Path | None = None, retry_s: float | None = None,
                 fold_grace_s: float | None = None, card: Path | None = None, **kw) -> None:
        super().__init__(workdir, **kw)
        self.env: dict[str, str] = {}
        if runtime_dir is not None:
            self.env["RUNTIME_DIRECTORY"] = str(runtime_dir)
        if retry_s is not None:
            self.env["CHAOS_RETRY_S"] = str(retry_s)
        if fold_grace_s is not None:
            self.env["CHAOS_FOLD_GRACE_S"] = str(fold_grace_s)
        if card is not None:
            state = card / "state"
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            for f in self.state.iterdir():
                shutil.copy(f, state / f.name)
            text = self.config.read_text()
            for was, now in (('path = "data/journal.db"', f'path = "{card}/data/journal.db"'),
                             ('state_dir = "state"', f'state_dir = "{state}"')):
                if was not in text:
                    raise RuntimeError(f"tests/agentproc.py's config changed: no {was!r} to move to the card")
                text = text.replace(was, now)
            self.config.write_text(text)
            self.state, self.journal_path = state, card / "data" / "journal.db"
            for f in [*state.iterdir(), state, card]:  # on the card before it fails, as in the field
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def start(self, timeout: float = 60.0, *, socket: bool = True) -> Agent:
        """Start; wait for the sim socket (``socket=False``: for the log's ``ready``
        line instead, when the state directory cannot hold a socket)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM", "RUNTIME_DIRECTORY")}
        env.update(self.env, PYTHONPATH=str(ROOT))
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, "run", "--config", str(self.config)],
                cwd=self.workdir, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}: {self.log_tail()}")
            if socket:
                try:
                    if request(self.socket, {"op": "ping"}, timeout=2).get("ok"):
                        return self
                except (SimClientError, OSError):
                    pass
            elif b"INFO agent.service: ready:" in self.log_path.read_bytes()[mark:]:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not come up in {timeout} s: {self.log_tail()}")
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def present(agent: AgentProcess, n: int, start: int = 0) -> tuple[list[dict], int]:
    """n cards, each granted one walked through; (decisions, undecided)."""
    decided, undecided = [], 0
    for i in range(start, start + n):
        reply = agent.card(CARDS[i % len(CARDS)], wait=5)
        decision = reply.get("decision") if reply.get("ok") else None
        if decision is None:
            undecided += 1
            continue
        decided.append(decision)
        if decision["type"] == "access.granted":
            agent.sim({"op": "pass", "side": "A"})
    return decided, undecided


# --------------------------------------------------------------------------- journal files


def journal_files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm"), path.with_suffix(".marks")]


def copy_journal(src: Path, dest: Path) -> Path:
    """The journal's files (database, WAL, shm, marks) at ``src`` copied to the path ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for f, g in zip(journal_files(src), journal_files(dest), strict=True):
        g.unlink(missing_ok=True)
        if f.exists():
            shutil.copy(f, g)
    return dest


def stored(path: Path, scratch: Path) -> dict[int, bytes]:
    """seq -> the body exactly as stored, of every record SQLite reads from the
    journal at ``path`` (its WAL included; read from a copy, which SQLite may change)."""
    copy = copy_journal(path, scratch / "journal.db")
    db = sqlite3.connect(copy)
    try:
        return {seq: body.encode() for seq, body in db.execute("SELECT seq, body FROM events")}
    finally:
        db.close()
        shutil.rmtree(scratch)


def acked_upto(path: Path) -> int:
    """The acknowledgement watermark in the journal's marks (0 without marks)."""
    try:
        return json.loads(path.with_suffix(".marks").read_text())["acked_upto"]
    except FileNotFoundError:
        return 0


def journal_id(bodies: dict[int, bytes]) -> str:
    ids = {json.loads(b)["id"].rsplit(":", 1)[0] for b in bodies.values()}
    if len(ids) != 1:
        raise RuntimeError(f"records of {len(ids)} journals in one journal: {sorted(ids)[:3]}")
    return ids.pop()


def still_there(data: bytes, bodies: dict[int, bytes]) -> set[int]:
    """The seqs of ``bodies`` whose stored body is whole in ``data`` (one pass:
    every body starts with its own id, ``{"id":"<journal>:<seq>"``)."""
    found = set()
    at = data.find(b'{"id":"')
    while at != -1:
        head = data[at + 7: at + 80].split(b'"', 1)[0]
        seq = head.rsplit(b":", 1)[-1]
        n = int(seq) if seq.isdigit() else 0
        if n in bodies and data.startswith(bodies[n], at):
            found.add(n)
        at = data.find(b'{"id":"', at + 1)
    return found


def on_disk(path: Path) -> bytes:
    """What the card holds of the journal: its database and its WAL, as they are."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def recovered(agent: AgentProcess) -> tuple[dict | None, list[dict]]:
    """The agent's ``journal.recovered`` record and the records it salvaged."""
    records = agent.records()
    rec = next((r for r in records if r["type"] == "journal.recovered"), None)
    return rec, [r for r in records if "salvaged_from" in r]


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("id", "seq", "salvaged_from")}


# --------------------------------------------------------------------------- salvage


def fault_salvage(work: Path, quick: bool, rng: random.Random) -> dict:
    """20,000 pending records (and 2,000 acknowledged) in the agent's journal, the
    file damaged six ways, and once more as kill -9 leaves it (the last 1,000
    records in the WAL only) with the database cut; the real agent started on
    each: it salvages exactly the records still on the card, counts the rest
    lost, and decides cards."""
    total, acked, in_wal = 22_000, 2_000, 1_000
    src = work / "pristine" / "journal.db"
    boot = "chaos-salvage"
    base = time.time() - 86_400

    def clock() -> Now:
        return Now(mono=time.monotonic(), wall=time.time(), synced=True)

    def granted(i: int) -> dict:
        return make_record("access.granted", Now(mono=10.0 + i, wall=base + i), boot, reader="entry",
                           direction="in", card=100_000 + i, format="w26", person=f"p-{i:06d}")

    j = Journal(src, clock=clock, boot=boot)
    for start in range(0, total - in_wal, 1000):
        j.commit([granted(i) for i in range(start, start + 1000)])
    j.pending(0, 1)
    if not j.ack_upto(j.id, acked):
        raise RuntimeError("the journal refused the acknowledgement")
    while j.maintenance(time.time()) or j.stats()["backlog"] > total - in_wal - acked:
        pass
    j.checkpoint()
    j.commit([granted(i) for i in range(total - in_wal, total)])
    j.sync()
    killed = copy_journal(src, work / "killed" / "journal.db")  # as kill -9 leaves it
    old_id = j.id
    j.close()
    bodies = {s: b for s, b in stored(src, work / "scratch").items() if s > acked}
    records = {s: json.loads(b) for s, b in bodies.items()}
    if len(bodies) != total - acked or max(stored(killed, work / "scratch")) != total:
        raise RuntimeError(f"the journal holds {len(bodies)} pending records, not {total - acked}")
    pages = src.stat().st_size // PAGE

    def cut(keep: int):
        return lambda data: data[: len(data) * keep // 100]

    def garble_page_1(data: bytes) -> bytes:
        return rng.randbytes(PAGE) + data[PAGE:]

    def spoil_pages(zeros: bool):
        def damage(data: bytes) -> bytes:
            out = bytearray(data)
            for pgno in rng.sample(range(2, pages + 1), 40):  # zeros: a card that reads back zeros
                out[(pgno - 1) * PAGE: pgno * PAGE] = bytes(PAGE) if zeros else rng.randbytes(PAGE)
            return bytes(out)
        return damage

    damages = {"cut99": (src, cut(99)), "cut90": (src, cut(90)), "cut50": (src, cut(50)),
               "page1": (src, garble_page_1), "zeroed40": (src, spoil_pages(True)),
               "garbled40": (src, spoil_pages(False)), "wal_cut90": (killed, cut(90))}
    out: dict = {"pending": len(bodies)}
    broken: list[str] = []
    reads = undecided = 0
    for n, (name, (snap, damage)) in enumerate(damages.items()):
        agent = Agent(work / name)
        path = copy_journal(snap, agent.journal_path)
        path.write_bytes(damage(path.read_bytes()))
        truth = still_there(on_disk(path), bodies)
        try:
            t0 = time.monotonic()
            agent.start(timeout=180)
            took = time.monotonic() - t0
            _decided, missed = present(agent, 2, start=n)
            reads, undecided = reads + 2, undecided + missed
            rec, salvaged = recovered(agent)
        finally:
            agent.stop()
            agent.kill()
        if rec is None:
            out[name] = "no journal.recovered"
            broken.append(f"{name}: the damage went unreported")
            continue
        got = [int(r["salvaged_from"].rsplit(":", 1)[1]) for r in salvaged
               if r["salvaged_from"].startswith(f"{old_id}:")]
        wrong = sum(1 for r in salvaged if r["salvaged_from"].startswith(f"{old_id}:")
                    and _strip(r) != _strip(records.get(int(r["salvaged_from"].rsplit(":", 1)[1]), {})))
        lost_n = rec["lost"]
        out[name] = (f"in file {len(truth)}, salvaged {rec['salvaged']}, lost {lost_n}, "
                     f"start {took:.1f} s")
        if rec["salvaged"] != len(truth) or set(got) != truth or len(got) != len(set(got)):
            broken.append(f"{name}: salvaged {rec['salvaged']} ({len(set(got) & truth)} of the {len(truth)} "
                          f"in the file, {len(set(got) - truth)} not in it)")
        if wrong:
            broken.append(f"{name}: {wrong} salvaged records differ from the originals")
        if lost_n is None or rec["salvaged"] + lost_n < len(bodies):
            broken.append(f"{name}: salvaged {rec['salvaged']} + lost {lost_n} < pending {len(bodies)}")
        if rec["old_journal"] != old_id:
            broken.append(f"{name}: old_journal {rec['old_journal']}, not {old_id}")
        if got != sorted(got):
            broken.append(f"{name}: the salvage changed the records' order")
    out.update(reads=reads, undecided=undecided)
    if undecided:
        broken.append(f"{undecided} of {reads} cards undecided after a salvage")
    if broken:
        raise Verdict({**out, "why": "; ".join(broken)})
    return out


# --------------------------------------------------------------------------- silent loss


def _tamper(sql: str):
    def damage(path: Path) -> None:
        db = sqlite3.connect(path)
        try:
            db.execute(sql)
            db.commit()
        finally:
            db.close()  # the last connection folds the WAL in and removes it
    return damage


def fault_silent_loss(work: Path, quick: bool, rng: random.Random) -> dict:
    """Losses SQLite cannot see (an emptied or deleted file, a dropped table, a
    deleted id row or rows, an older copy or another journal put back): the
    real agent, started on each, reports ``journal.recovered`` with ``lost`` at
    least the records no byte on the card still holds."""
    per_session = 6 if quick else 15
    agent = Agent(work / "maker")
    snaps = work / "snapshots"
    reads = undecided = 0

    def session(name: str, *, kill: bool) -> Path:
        nonlocal reads, undecided
        agent.start()
        try:
            _decided, missed = present(agent, per_session, start=reads)
            reads, undecided = reads + per_session, undecided + missed
        finally:
            if kill:
                agent.kill()
            else:
                agent.stop()
        return copy_journal(agent.journal_path, snaps / name / "journal.db")

    older = session("older", kill=False)  # an image of the card taken earlier
    clean = session("clean", kill=False)  # stopped cleanly: no WAL
    killed = session("killed", kill=True)  # kill -9: the last records are in the WAL only
    jid = journal_id(stored(clean, work / "scratch"))
    if journal_id(stored(killed, work / "scratch")) != jid:
        raise RuntimeError("the maker agent changed journals between sessions")

    other = Journal(snaps / "other" / "journal.db", boot="other")
    other.commit([make_record("alarm", Now(mono=1.0, wall=time.time()), "other", kind="tamper", active=True)
                  for _ in range(5)])
    other.close()

    def emptied(p: Path) -> None:
        p.write_bytes(b"")

    def deleted(p: Path) -> None:
        p.unlink()

    def put_back(copy: Path):
        return lambda p: shutil.copy(copy, p)

    cases = {  # name: (the journal as the agent left it, the damage)
        "emptied": (clean, emptied),
        "deleted": (clean, deleted),
        "deleted_wal_left": (killed, deleted),
        "table_dropped": (clean, _tamper("DROP TABLE events")),
        "id_row_deleted": (clean, _tamper("DELETE FROM meta WHERE key = 'journal_id'")),
        "rows_deleted": (clean, None),  # the newer half of the rows, set below
        "older_copy": (clean, put_back(older)),
        "other_journal": (clean, put_back(snaps / "other" / "journal.db")),
    }
    out: dict = {"cases": len(cases)}
    detected = 0
    figures: list[str] = []
    broken: list[str] = []
    for n, (name, (snap, damage)) in enumerate(cases.items()):
        acked = acked_upto(snap)
        bodies = {s: b for s, b in stored(snap, work / "scratch").items() if s > acked}
        if damage is None:
            damage = _tamper(f"DELETE FROM events WHERE seq > {acked + len(bodies) // 2}")
        case = Agent(work / name)
        path = copy_journal(snap, case.journal_path)
        damage(path)
        gap = len(bodies) - len(still_there(on_disk(path), bodies))
        try:
            case.start()
            _decided, missed = present(case, 1, start=n)
            reads, undecided = reads + 1, undecided + missed
            rec, salvaged = recovered(case)
        finally:
            case.stop()
            case.kill()
        if rec is None:
            figures.append(f"{name}: UNDETECTED, {len(bodies)} pending, {gap} gone")
            broken.append(f"{name}: no journal.recovered ({len(bodies)} pending, {gap} gone from the card)")
            continue
        detected += 1
        figures.append(f"{name}: {rec['cause']}, {len(bodies)} pending, {gap} gone, "
                       f"salvaged {rec['salvaged']}, lost {rec['lost']}")
        if rec["lost"] is None or rec["lost"] < gap:
            broken.append(f"{name}: lost {rec['lost']} < {gap} records no longer on the card")
        elif rec["salvaged"] + rec["lost"] < len(bodies):
            broken.append(f"{name}: salvaged {rec['salvaged']} + lost {rec['lost']} < pending {len(bodies)}")
        if rec["old_journal"] != jid:
            broken.append(f"{name}: old_journal {rec['old_journal']}, not {jid}")
        ours = [r for r in salvaged if r["salvaged_from"].startswith(f"{jid}:")]
        wrong = sum(1 for r in ours if _strip(r) != _strip(json.loads(
            bodies.get(int(r["salvaged_from"].rsplit(":", 1)[1]), b"{}"))))
        if wrong:
            broken.append(f"{name}: {wrong} of {len(ours)} salvaged records differ from the originals")
    out.update(detected=detected, reads=reads, undecided=undecided, each="; ".join(figures))
    if undecided:
        broken.append(f"{undecided} of {reads} cards undecided")
    if broken:
        raise Verdict({**out, "why": "; ".join(broken)})
    return out


# --------------------------------------------------------------------------- read-only card


class _NoMount(RuntimeError):
    """This machine cannot make the mounts the fault needs (tests/readonly.py skips)."""


@contextmanager
def _mounts() -> Iterator[None]:
    """tests/readonly.py's helpers skip a test (pytest's Skipped, a BaseException)
    when mounting is impossible here; for chaos that is a failure with its reason."""
    import pytest

    try:
        yield
    except pytest.skip.Exception as exc:
        raise _NoMount(f"cannot run: {exc}") from None


def _repair(card: Path) -> None:
    """What a technician does once the agent is stopped: unmount the card, fsck it, mount it
    again (read-write; tests/readonly.failing_card unmounts it at the end)."""
    image = card.with_name(card.name + ".img")
    for argv in (["umount", str(card)], ["e2fsck", "-fy", str(image)],
                 ["mount", "-o", "loop,errors=remount-ro", str(image), str(card)]):
        got = subprocess.run(argv, capture_output=True, text=True, check=False)
        if got.returncode and not (argv[0] == "e2fsck" and got.returncode in (1, 2)):
            raise RuntimeError(f"{' '.join(argv)}: {got.returncode} {got.stderr.strip()[:200]}")


def _alarms(ingest, since: float = 0.0) -> list[bool]:
    """The journal_readonly alarms at the ingest made after ``since`` (time.monotonic), in
    order, each once (one folded back from the fallback may be there as itself and a copy)."""
    got = {e.get("salvaged_from") or e["id"]: e for e in ingest.events()
           if e["type"] == "alarm" and e.get("kind") == "journal_readonly" and e["mono"] >= since}
    return [e["active"] for e in sorted(got.values(), key=lambda e: e["mono"])]


def fault_readonly(work: Path, quick: bool, rng: random.Random) -> dict:
    """The journal on a card that is read-only when the agent starts (a bind
    mount, made writable again while it runs), then the whole card (journal
    and state) turning read-only under the running agent (ext4, errors=remount-ro,
    after an error), the agent killed (-9) and started again on it, stopped,
    and the card repaired (fsck) before the next start: every card decided,
    every decision at the ingest, the agent never exits by itself, the
    fallback journal folded back each time."""
    from agent.uplink.failover import FOLD_GRACE_S, fallback_path
    from tests.readonly import failing_card, read_only

    retry_s, grace_s = 2.0, (1.0 if quick else FOLD_GRACE_S)
    spell = 2.0 if quick else 5.0  # seconds of cards in each state
    broker = Mosquitto(work / "mq").start()
    ingest = start_ingest(broker, work / "ingest.db")
    loops: list[CardLoop] = []
    restarts = 0
    fold_s: list[float] = []
    stop_codes: list[int | None] = []
    why: list[str] = []

    def cards(agent: Agent, seconds: float) -> None:
        loop = CardLoop(agent).start()
        loops.append(loop)
        end = time.monotonic() + seconds
        while time.monotonic() < end and agent.running():
            time.sleep(0.1)
        loop.stop()
        alive(agent)

    def alive(agent: Agent) -> None:
        nonlocal restarts
        if not agent.running():
            restarts += 1
            raise Verdict({"restarts": restarts, "why": f"the agent exited: {agent.log_tail(3)[-200:]}"})

    def start(agent: Agent, **kw) -> None:
        """Start; an exit is a restart (systemd would restart it: three times here, then the verdict)."""
        nonlocal restarts
        for _ in range(3):
            try:
                agent.start(**kw)
                return
            except RuntimeError:
                if agent.running():
                    raise  # up but unreachable: a broken rig, not a restart
                restarts += 1
        raise Verdict({"restarts": restarts, "why": f"the agent exits at start: {agent.log_tail(3)[-200:]}"})

    def stop(agent: Agent) -> None:
        alive(agent)
        stop_codes.append(agent.stop())

    def fold_back(agent: Agent, fb: Path, since: float) -> None:
        if not wait_for(lambda: not fb.exists() or not agent.running(), retry_s + grace_s + 60):
            why.append(f"the fallback {fb.name} was not folded back")
        alive(agent)
        if not fb.exists():
            fold_s.append(time.monotonic() - since)

    def delivered(what: str, cleared_since: float | None = None) -> None:
        """Every decision so far at the ingest (the agent does not wait for its uplink when
        stopped: wait before stopping it); with ``cleared_since``, the alarm cleared too."""
        decided = [d for loop in loops for d in loop.decided()]
        if not wait_for(lambda: lost(decided, ingest.events()) == 0, 30):
            why.append(f"{lost(decided, ingest.events())} decisions not at the ingest {what}")
        if cleared_since is not None and not wait_for(
                lambda: _alarms(ingest, cleared_since)[-1:] == [False], 30):
            why.append(f"journal_readonly alarms {_alarms(ingest, cleared_since)} {what}, not cleared")

    try:
        with _mounts():
            # 1. Read-only at start: the journal's directory (the state directory holds the
            #    sim socket, so it stays writable here; part 2 takes it too).
            a = Agent(work / "a", broker=broker, extra_toml=W26_READERS, runtime_dir=work / "run-a",
                      retry_s=retry_s, fold_grace_s=grace_s)
            part1 = time.monotonic()
            start(a)
            try:
                cards(a, spell / 2)
                delivered("before the card turned read-only")
                stop(a)
                with read_only(a.journal_path.parent) as set_ro:
                    try:
                        start(a)
                        fb = fallback_path(a.journal_path, work / "run-a")
                        if not fb.exists():
                            why.append("started on a read-only journal without a fallback")
                        cards(a, spell)
                        delivered("while the card was read-only")
                        set_ro(False)
                        fold_back(a, fb, time.monotonic())
                        cards(a, spell / 2)
                        delivered("after the card took writes again", cleared_since=part1)
                        stop(a)
                    finally:
                        a.kill()
            finally:
                a.kill()
            if _alarms(ingest, part1) != [True, False]:
                why.append(f"journal_readonly alarms {_alarms(ingest, part1)} in part 1, not raised then cleared")
            part2 = time.monotonic()

            # 2. The card fails under the running agent; it is restarted on the failed card;
            #    the card is repaired and the agent started again.
            card = work / "card"
            with failing_card(card) as fail:
                b = Agent(work / "b", broker=broker, extra_toml=W26_READERS, runtime_dir=work / "run-b",
                          retry_s=retry_s, fold_grace_s=grace_s, card=card)
                fb = fallback_path(b.journal_path, work / "run-b")
                try:
                    start(b)
                    cards(b, spell / 2)
                    delivered("before the card failed")
                    loop = CardLoop(b).start()
                    loops.append(loop)
                    time.sleep(0.5)
                    fail()  # the kernel turns the card read-only: open files too
                    time.sleep(spell)
                    loop.stop()
                    alive(b)
                    if not wait_for(fb.exists, 10):
                        why.append("the card failed under the agent and no fallback was opened")
                    delivered("after the card failed under the agent")
                    alive(b)
                    b.kill()  # it crashes (kill -9): systemd starts it again, on the failed card
                    start(b, socket=False)  # the read-only state directory cannot take a new socket
                    time.sleep(spell / 2)
                    stop(b)
                    _repair(card)
                    since = time.monotonic()
                    start(b)  # finds the fallback and folds it in
                    fold_back(b, fb, since)
                    cards(b, spell / 2)
                    delivered("after the card was repaired", cleared_since=part2)
                    stop(b)
                finally:
                    b.kill()
            raised = _alarms(ingest, part2)
            if raised[:1] != [True] or raised[-1:] != [False]:
                why.append(f"journal_readonly alarms {raised} in part 2, not raised then cleared")
    finally:
        ingest.stop()
        broker.kill()
    decided = [d for loop in loops for d in loop.decided()]
    stored_events = ingest.events()
    stored_ids = {e["id"] for e in stored_events}
    out = {"reads": sum(len(loop.replies) for loop in loops),
           "undecided": sum(loop.undecided() + loop.errors for loop in loops),
           "lost": lost(decided, stored_events), "restarts": restarts,
           "stop_codes": stop_codes, "alarms": len(_alarms(ingest)),
           "folded_back": len(fold_s), "fold_s": [round(s, 1) for s in fold_s],
           # Records the ingest got twice: as themselves and as a copy folded back (by design
           # when an acknowledgement takes longer than the fold-back grace; measured).
           "sent_twice": sum(1 for e in stored_events if e.get("salvaged_from") in stored_ids)}
    if out["undecided"]:
        why.append(f"{out['undecided']} reads undecided")
    if any(code != 0 for code in stop_codes):
        why.append(f"a stop exited with {stop_codes}")
    if why or out["lost"] or out["folded_back"] != 2:
        raise Verdict({**out, "why": "; ".join(why)})
    return out


# --------------------------------------------------------------------------- Wiegand on a busy CPU


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)


def _late_frames(n: int, rng: random.Random, max_lag_s: float) -> dict:
    """n frames on each reader of the mock pins (the entry ending frames by silence,
    mixed formats; the exit fixed 26-bit), every edge's callback up to 50 ms after
    its stamp, in order, from one thread as lgpio's: every frame must read whole."""
    from gpiozero.pins.mock import MockFactory

    from agent.hw.wiegand_gpio import WiegandReader
    from bench.bench_latency import WirePin
    from tests.submitted import Events
    from tests.test_wiegand_gpio import deliver, expected, frames_of, late_arrivals, schedule

    factory = MockFactory(pin_class=WirePin)
    got = Events()
    wires = {"entry": (20, 21), "exit": (13, 19)}
    readers = {"entry": WiegandReader("entry", *wires["entry"], factory=factory, submit=got, max_lag_s=max_lag_s),
               "exit": WiegandReader("exit", *wires["exit"], factory=factory, submit=got, max_lag_s=max_lag_s,
                                     decoder_kwargs={"fixed_bits": 26})}
    try:
        from agent.core.cards import encode_w26

        frames = {"entry": frames_of(rng, n),
                  "exit": [encode_w26(rng.randrange(256), rng.randrange(65536)) for _ in range(n)]}
        t0 = time.monotonic() + 0.05
        plan = sorted(
            [(t, wires["entry"][line], lvl) for t, line, lvl in
             schedule(frames["entry"], t0, rng, gap=(0.2e-3, 5e-3), pause=(0.05, 0.2))]
            + [(t, wires["exit"][line], lvl) for t, line, lvl in
               schedule(frames["exit"], t0 + 0.013, rng, gap=(0.2e-3, 5e-3), pause=(0.05, 0.2),
                        back_to_back=0.003)])
        lags = deliver(factory, plan, late_arrivals(plan, rng, 0.050))
        want = expected(frames["entry"], "entry") + expected(frames["exit"], "exit")
        wait_for(lambda: len(got.items) >= len(want), 5 + max_lag_s)
        time.sleep(0.1 + max_lag_s)  # a cut frame gives more items than frames: let them come
        counters = {name: r.counters for name, r in readers.items()}
    finally:
        for r in readers.values():
            r.close()
    left = list(got.items)
    whole = 0
    for item in want:
        if item in left:
            left.remove(item)
            whole += 1
    late = sum(c["late_edges"] for c in counters.values())
    return {"frames": len(want), "cut": len(want) - whole, "extra": len(left), "late_edges": late,
            "lags": lags, "lag_max_s": max(c["lag_max_us"] for c in counters.values()) / 1e6}


def fault_wiegand(work: Path, quick: bool, rng: random.Random) -> dict:
    """Frames through the mock pins the lgpio way (each edge with its own stamp,
    called back as late as the machine makes it) with a busy loop on every core
    and a thread holding the GIL: bench/bench_latency.py's loaded run (to the
    relay, through the gate and the journal), then frames whose callbacks are
    held back up to 50 ms more. No frame whole on the wire may be cut while the
    callbacks stay within hardware.wiegand_max_lag_s; later ones are counted."""
    from agent.hw.wiegand_gpio import DEFAULT_MAX_LAG_S
    from bench import bench_latency

    reads = 40 if quick else 160
    frames = 10 if quick else 40
    common = {"silence_s": 0.025, "max_lag_s": DEFAULT_MAX_LAG_S, "cards": 20_000, "sink": "journal"}
    seed = rng.randrange(1 << 30)
    with bench_latency.busy_machine(1) as cores_busy:
        runs = [bench_latency.run(reads - reads // 2, fixed=True, seed=seed, pins=True, **common),
                bench_latency.run(reads // 2, fixed=False, seed=seed + 1, pins=True, **common)]
        late = _late_frames(frames, rng, DEFAULT_MAX_LAG_S)
    # A frame may be cut only by an edge called back later than the bound: a run's cuts are
    # excused when its readers saw such an edge and this side saw the machine that slow
    # (an edge driven more than half the bound late). Otherwise a cut is the reader's fault.
    bound = DEFAULT_MAX_LAG_S

    def excused(reader_lag_max: float, driven: list[float]) -> bool:
        return reader_lag_max > bound and max(driven, default=0.0) > bound / 2

    beyond = [r for r in runs if excused(r.lag_max_s, r.lags)]
    late_beyond = excused(late["lag_max_s"], late["lags"]) and late["late_edges"] > 0
    cut = sum(len(r.cut) for r in runs if r not in beyond) + (0 if late_beyond else late["cut"])
    cut_beyond = sum(len(r.cut) for r in beyond) + (late["cut"] if late_beyond else 0)
    lags = [x for r in runs for x in r.lags]
    out = {"cores_busy": cores_busy, "reads": reads, "decided": sum(len(r.latencies) for r in runs),
           "cut_frames": cut, "cut_beyond_lag_bound": cut_beyond,
           "relay_p99_ms": _p(runs[0].latencies, 0.99), "silence_relay_p99_ms": _p(runs[1].latencies, 0.99),
           "lag_p99_ms": _p(lags, 0.99), "lag_max_ms": round(max(r.lag_max_s for r in runs) * 1000, 1),
           "late_frames": late["frames"], "late_cut": late["cut"], "late_lag_p99_ms": _p(late["lags"], 0.99),
           "late_lag_max_ms": round(late["lag_max_s"] * 1000, 1), "late_edges": late["late_edges"],
           "lag_bound_ms": DEFAULT_MAX_LAG_S * 1000}
    if cut or (late["extra"] and not late_beyond):
        raise Verdict(out)
    return out


FAULTS = {
    "salvage": fault_salvage,
    "silent_loss": fault_silent_loss,
    "readonly": fault_readonly,
    "wiegand": fault_wiegand,
}
