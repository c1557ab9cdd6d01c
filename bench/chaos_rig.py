"""What the chaos faults (bench/chaos.py and its fault modules) share: the
verdict, the ingest, a card loop through the agent's sim socket, and the
loss count. See bench/chaos.py."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.simctl import SimClientError
from tests.agentproc import CARDS, AgentProcess
from tests.broker import Mosquitto

W26_READERS = """
[[hardware.readers]]
name = "entry"
type = "wiegand"
format = 26

[[hardware.readers]]
name = "exit"
type = "wiegand"
format = 26
"""


class Verdict(Exception):
    """A fault's promise was broken: the message says which figure."""


def start_ingest(broker: Mosquitto, db: Path, **options: Any) -> Any:
    """The reference ingest on ``broker``, subscribed (options go to Ingest: tls, port...)."""
    from agent.regional.ingest import Ingest

    ing = Ingest(broker.host, options.pop("port", broker.port), db_path=db, **options).start()
    if not ing.ready.wait(15):
        raise RuntimeError("the ingest did not subscribe")
    return ing


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll until ``pred()``; False after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


class CardLoop:
    """Presents cards (and walks each granted pupil through) until stopped; keeps
    every sim reply, so each decision the gate reported can be looked for later."""

    def __init__(self, agent: AgentProcess, pause_s: float = 0.1) -> None:
        self.agent = agent
        self.pause_s = pause_s
        self.replies: list[dict] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CardLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                reply = self.agent.card(CARDS[i % len(CARDS)], wait=5)
                self.replies.append(reply)
                if (reply.get("decision") or {}).get("type") == "access.granted":
                    self.agent.sim({"op": "pass", "side": "A"})
            except (SimClientError, OSError):
                self.errors += 1  # the agent was killed under us: the next one answers
                time.sleep(0.05)
            i += 1
            self._stop.wait(self.pause_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def decided(self) -> list[dict]:
        return [r["decision"] for r in self.replies if r.get("ok") and r.get("decision")]

    def undecided(self) -> int:
        return sum(1 for r in self.replies if r.get("ok") and not r.get("decision"))


def lost(decisions: list[dict], stored: list[dict]) -> int:
    """How many of the gate's decisions (sim replies' records) are not among ``stored``.
    A record folded back from the fallback journal (a read-only card) may arrive as its
    copy, which names it in ``salvaged_from``: that counts as delivered."""
    ids = {e["id"] for e in stored} | {e["salvaged_from"] for e in stored if "salvaged_from" in e}
    return sum(1 for d in decisions if d["id"] not in ids)




@contextmanager
def plain_rig(work: Path, **agent_options: Any) -> Iterator[tuple[Mosquitto, Any, AgentProcess]]:
    """A plain mosquitto, the reference ingest on it and an agent (not started yet) with
    fixed-format W26 readers; every one of them stopped at the end, whatever happened."""
    broker = Mosquitto(work / "mq").start()
    try:
        ingest = start_ingest(broker, work / "ingest.db")
        try:
            agent = AgentProcess(work / "agent", broker=broker, extra_toml=W26_READERS, **agent_options)
            try:
                yield broker, ingest, agent
            finally:
                agent.kill()
        finally:
            ingest.stop()
    finally:
        broker.kill()
