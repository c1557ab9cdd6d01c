# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""A broker flood never stops the gate (issue 9, finding 1), end to end.

The real agent in its own process (tests.agentproc: `gate-agent run` on
simulated hardware, cards through its `gate-agent sim` socket, the path a
reader's frame takes), a real mosquitto, the reference ingest, and a flooder
process publishing junk on the gate's `cmd` topic as fast as the field saw
(5,000 messages a second). While it floods, every card read is decided, the
junk leaves a bounded trace in the journal and the agent's memory stays
flat. Card latency under the flood is measured by `make chaos` (bench/chaos.py),
not asserted here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from agent.contract import topics
from tests.agentproc import CARDS, ROOT, AgentProcess
from tests.broker import broker, ingest_at, make_broker, wait_until  # noqa: F401

FLOOD_RATE = 5000
FLOOD_S = 8.0


@pytest.fixture
def agent(tmp_path, broker):
    a = AgentProcess(tmp_path / "agent", broker=broker)
    yield a.start()
    a.kill()


def start_flood(broker, topic: str, rate: float, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.flooder", broker.host, str(broker.port), topic, str(rate),
         str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.mark.long(9)
def test_every_card_is_decided_while_the_broker_floods_the_gate_with_junk(broker, ingest_at, agent):
    ingest = ingest_at(broker)
    cmd = topics(agent.site, agent.gate)["cmd"]
    rss_before = agent.rss_mb()
    flood = start_flood(broker, cmd, FLOOD_RATE, FLOOD_S)
    replies: list[dict] = []
    rss_max = [rss_before]

    def watch_rss() -> None:
        while flood.poll() is None:
            rss_max[0] = max(rss_max[0], agent.rss_mb())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_rss, daemon=True)
    watcher.start()
    time.sleep(0.5)  # the flood is on
    i = 0
    while flood.poll() is None:
        replies.append(agent.card(CARDS[i % len(CARDS)], wait=5))
        agent.sim({"op": "pass", "side": "A"})  # the pupil walks through
        i += 1
        time.sleep(0.1)
    sent = json.loads(flood.stdout.read())["sent"]
    watcher.join(5)

    assert sent >= FLOOD_RATE * FLOOD_S * 0.5, "the flooder did not flood"
    assert len(replies) >= 10
    undecided = [r for r in replies if not (r.get("ok") and r.get("decision"))]
    assert undecided == [], f"{len(undecided)} of {len(replies)} card reads got no decision"
    assert [r["decision"]["type"] for r in replies] == ["access.granted"] * len(replies), replies

    agent.stop()
    records = agent.records()
    from_flood = [r for r in records if r["type"] == "command.result"
                  or (r["type"] == "alarm" and r.get("kind") == "downlink_flood")]
    assert len(from_flood) < 100, f"{len(from_flood)} journal records from {sent} junk messages"
    assert any(r["type"] == "alarm" and r.get("kind") == "downlink_flood" for r in records)
    assert rss_max[0] - rss_before < 50, f"RSS grew {rss_max[0] - rss_before:.1f} MB"
    grants = [r for r in records if r["type"] == "access.granted"]
    assert len(grants) == len(replies)
    assert len([r for r in records if r["type"] == "passage"]) == len(replies)
    # The gate's own events still reached the server.
    wait_until(lambda: {g["id"] for g in grants} <= {e["id"] for e in ingest.events()}, 15,
               "the grants to reach the ingest")
