# ruff: noqa: F811 - pytest fixtures imported from tests.pki, used as arguments
"""Three gates of one site, each its own `gate-agent run` process, against mosquitto
with the shipped mutual-TLS config, ACL and plugin (tests/pki.py): site-wide
anti-passback through the siblings' events (docs/site.md), a grant in force at one
turnstile refusing the same card at the others, and a gate that was down catching
up from its persistent session when it is back.

What each gate made of its siblings' records is read from its telemetry (``site``),
published every half second and watched here as the regional server would."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from tests.agentproc import CARDS, AgentProcess
from tests.pki import GATE_A, GATE_B, SITE, gate_broker, mqtt_client, pki  # noqa: F401 (fixtures)
from tests.test_runtime import wait_until

GATE_C = "gate-c"


class Watcher:
    """The regional server's view: every gate's latest telemetry."""

    def __init__(self, broker, pki) -> None:
        self.latest: dict[str, dict] = {}
        self._cond = threading.Condition()
        self.client = mqtt_client(broker, pki.regional, pki.ca_file, client_id="t-watcher")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.services_port, keepalive=30)
        self.client.subscribe(f"gate/v1/{SITE}/+/telemetry", qos=0)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        gate = message.topic.split("/")[3]
        with self._cond:
            self.latest[gate] = json.loads(message.payload)
            self._cond.notify_all()

    def site(self, gate: str) -> dict:
        return (self.latest.get(gate) or {}).get("site") or {}

    def wait(self, pred, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self), timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def site_gate(tmp_path, broker, pki, name: str, identity) -> AgentProcess:
    tls = (f'[mqtt.tls]\nca_file = "{pki.ca_file}"\ncert_file = "{identity.cert}"\n'
           f'key_file = "{identity.key}"\n')
    agent = AgentProcess(tmp_path / name, broker=broker, site=SITE, gate=name, telemetry_s=0.5,
                         extra_toml=tls)
    text = agent.config.read_text()
    text = text.replace("[gate]\n", '[gate]\napb = "hard"\n').replace("wait_s = 1.0", "wait_s = 5.0")
    text = text.replace("[mqtt]\n", "[mqtt]\nsite_events = true\n")
    agent.config.write_text(text)
    return agent


def guard_tool(g: AgentProcess, tool: str) -> str:
    """`gate-agent presence|rollcall --csv` on the gate's file, as the guard runs it."""
    done = subprocess.run([sys.executable, "-m", "agent.cli", tool, "--file",
                           str(g.state / "presence.json"), "--csv"],
                          check=False, capture_output=True, text=True, timeout=60, cwd=g.workdir)
    return done.stdout if done.returncode == 0 else ""


def decision(reply: dict) -> tuple[str, str | None]:
    d = reply.get("decision") or {}
    return d.get("type"), d.get("reason")


@pytest.mark.long(15)
def test_three_gates_share_anti_passback_presence_and_the_roll_call(tmp_path, gate_broker, pki):
    ident_c = pki.ca.issue(f"{SITE}/{GATE_C}")
    gates = {name: site_gate(tmp_path, gate_broker, pki, name, ident)
             for name, ident in ((GATE_A, pki.gate_a), (GATE_B, pki.gate_b), (GATE_C, ident_c))}
    watcher = Watcher(gate_broker, pki)
    a, b, c = gates[GATE_A], gates[GATE_B], gates[GATE_C]
    try:
        for g in gates.values():
            g.start()
        assert watcher.wait(lambda w: all(n in w.latest for n in gates)), "a gate never came online"
        pupil, other = CARDS[0], CARDS[1]

        # A grants p-0 and waits for the passage: B and C refuse the same card meanwhile.
        assert decision(a.card(pupil)) == ("access.granted", None)
        assert watcher.wait(lambda w: w.site(GATE_B).get("grants", 0) >= 1
                            and w.site(GATE_C).get("grants", 0) >= 1), watcher.latest
        assert decision(b.card(pupil)) == ("access.denied", "antipassback")
        assert decision(c.card(pupil)) == ("access.denied", "antipassback")

        # The pupil walks through at A: inside now, for every gate of the site.
        a.sim({"op": "pass", "side": "A"})
        assert watcher.wait(lambda w: w.site(GATE_B).get("passages", 0) >= 1
                            and w.site(GATE_C).get("passages", 0) >= 1), watcher.latest
        assert decision(b.card(pupil)) == ("access.denied", "antipassback")
        assert decision(c.card(pupil, reader="exit")) == ("access.granted", None)  # may leave at C
        c.sim({"op": "pass", "side": "B"})  # and leaves
        assert watcher.wait(lambda w: w.site(GATE_A).get("passages", 0) >= 1), watcher.latest

        # C goes down; meanwhile another pupil enters at A; C comes back and catches up
        # from the session the broker kept for it.
        c.stop()
        before = watcher.site(GATE_B).get("passages", 0)
        assert decision(a.card(other)) == ("access.granted", None)
        a.sim({"op": "pass", "side": "A"})
        assert watcher.wait(lambda w: w.site(GATE_B).get("passages", 0) > before), watcher.latest
        watcher.latest.pop(GATE_C, None)
        c.start()
        # C's own grant for p-0 at its exit reader is in its state already; the queued
        # passage of p-1 must arrive from the broker.
        assert watcher.wait(lambda w: w.site(GATE_C).get("passages", 0) >= 1), watcher.latest
        assert decision(c.card(other)) == ("access.denied", "antipassback")
        # Nothing of the siblings was journalled as this gate's own.
        own_passages = [r for r in b.records() if r["type"] == "passage"]
        assert own_passages == []

        # Presence agrees on every gate: p-1 inside, p-0 came and went.
        def inside(g: AgentProcess) -> list[str]:
            out = guard_tool(g, "presence")
            return sorted(row.split(",")[0] for row in out.splitlines()[1:])
        for g in gates.values():
            assert wait_until(lambda g=g: inside(g) == ["p-1"], 30), (g.gate, guard_tool(g, "presence"))

        # A fire drill at B (its loop alone: A and C stay in their modes): every gate
        # journals the roll-call, and p-1 leaving through A counts as left everywhere.
        b.sim({"op": "fire", "loop": "open"})
        for g in gates.values():
            assert wait_until(lambda g=g: any(r["type"] == "rollcall" for r in g.records()), 30), g.gate
            [rc] = [r for r in g.records() if r["type"] == "rollcall"]
            assert rc["inside"] == ["p-1"] and rc["by"] == ("fire_loop" if g is b else "site"), rc
        assert decision(a.card(other, reader="exit"))[0] == "access.granted"
        a.sim({"op": "pass", "side": "B"})
        for g in gates.values():
            assert wait_until(lambda g=g: "left,p-1" in guard_tool(g, "rollcall"), 30), \
                (g.gate, guard_tool(g, "rollcall"))
            rows = guard_tool(g, "rollcall").splitlines()
            assert [r.split(",")[:2] for r in rows[1:]] == [["inside_at_alarm", "p-1"], ["left", "p-1"]]
    finally:
        watcher.close()
        for g in gates.values():
            g.stop()
