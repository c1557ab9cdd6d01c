"""`make chaos`, the broker, identity and clock faults (bench/chaos.py runs them).

- ``share_hijack``: the shipped broker files (mutual TLS, the gate_acl plugin,
  both listeners), the real agent as gate A over TLS, the reference ingest as
  ``regional-ingest`` on the services' listener; gate B's certificate keeps
  trying to join the ingest's shared subscription (and ``#``,
  ``gate/v1/+/+/events``) on every listener while cards are read.
- ``takeover``: gate B's and the services' certificates connect again and
  again with each client id gate A could hold, on both listeners.
- ``forgery``: a forger holding gate A's certificate publishes records under
  A's journal id, some with seqs A already sent, some with seqs A has not
  reached yet, with other content.
- ``clock``: the agent's clock an hour behind and not synchronised
  (bench/chaos_clockshift.c preloaded into the agent's process only);
  signed commands that expired 1 to 50 minutes ago by the server's clock
  arrive after a signed command has set the time floor.

Each fault returns its figures or raises ``Verdict`` when a promise is broken;
what the machine's speed decides (latencies) is measured, and judged only
where the promise itself is about time (a stall of the ingest).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import secrets
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.contract import topics
from agent.core.records import parse_rfc3339
from agent.core.stats import nearest_rank
from agent.regional.tools import Session, ToolError
from bench.chaos_rig import W26_READERS, CardLoop, Verdict, lost, start_ingest, wait_for
from tests.agentproc import ROOT, AgentProcess
from tests.broker import Mosquitto, Observer
from tests.pki import BROKER_PLUGIN, GATE_A, SITE, GateBroker, Identity, Pki, make_pki

INGEST_SHARE = "$share/ingest/gate/v1/+/+/events"
INGEST_ID = "ingest-1"  # the reference ingest's client id here
ROGUE_FILTERS = (INGEST_SHARE, "#", "gate/v1/+/+/events")
RESEND_S = 30.0  # the gate's resend_after_s: an event the ingest never saw waits this long
STALL_S = RESEND_S / 2  # a decision not stored within this went astray (the stall of issue 9)


# --------------------------------------------------------------------------- the rig


def _plugin() -> Path:
    """mosquitto/gate_acl.so, (re)built by the Makefile; a rig that cannot build it fails."""
    done = subprocess.run(["make", "--no-print-directory", "broker-plugin"], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=300)
    source = BROKER_PLUGIN.with_name("gate_acl.c")
    if (done.returncode or not BROKER_PLUGIN.exists()
            or BROKER_PLUGIN.stat().st_mtime < source.stat().st_mtime):
        raise RuntimeError(f"the broker plugin was not built ({(done.stdout + done.stderr).strip()[-200:]}); "
                           "install mosquitto-dev, libmosquitto-dev, libssl-dev (scripts/setup-system.sh)")
    return BROKER_PLUGIN


def _tls_toml(identity: Identity, pki: Pki) -> str:
    return (f'[mqtt.tls]\nca_file = "{pki.ca_file}"\ncert_file = "{identity.cert}"\n'
            f'key_file = "{identity.key}"\n')


class _IngestLog(logging.Handler):
    """Takes the ingest's log lines (in this process) off the terminal, where `make chaos`
    prints one line per fault, and counts them: its CONFLICT lines are the regional alarm."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._logger = logging.getLogger("agent.ingest")
        self._saved = (self._logger.propagate, self._logger.level)
        self._logger.addHandler(self)
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, needle: str) -> int:
        return sum(1 for line in list(self.lines) if needle in line)

    def close(self) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate, level = self._saved
        self._logger.setLevel(level)
        super().close()


class _TlsRig:
    """The shipped broker with a test CA, gate A's agent over TLS on the gates' listener,
    the reference ingest as regional-ingest on the services' listener. Cards not started."""

    def __init__(self, work: Path) -> None:
        self.pki = make_pki(work / "pki")
        self.broker = GateBroker(work / "mq", self.pki, plugin=_plugin())
        self.agent = AgentProcess(work / "agent", broker=self.broker, gate=GATE_A,
                                  extra_toml=_tls_toml(self.pki.gate_a, self.pki) + W26_READERS)
        self.broker.start()
        self.ingest: Any = None
        self.ingest_log = _IngestLog()
        try:
            self.ingest = start_ingest(self.broker, work / "ingest.db", port=self.broker.services_port,
                                       tls=self.pki.ingest.tls(self.pki.ca_file), client_id=INGEST_ID)
            self.agent.start()
        except BaseException:
            self.close()
            raise

    def session(self, identity: Identity, port: int | None = None) -> Session:
        return Session(self.broker.host, port or self.broker.port, tls=identity.tls(self.pki.ca_file),
                       timeout=10)

    def close(self) -> None:
        self.agent.kill()
        if self.ingest is not None:
            self.ingest.stop()
        self.broker.kill()
        self.ingest_log.close()


class _StoreWatch:
    """When each event first appeared in the ingest's events table (polled from outside,
    every 0.1 s, through its own read-only connection)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.first_seen: dict[str, float] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="store-watch")
        self._thread.start()

    def _run(self) -> None:
        last = 0
        while not self._stop.wait(0.1):
            try:
                # A fresh connection each time, as the ingest's own readers do.
                with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True,
                                                        timeout=10)) as con:
                    rows = con.execute("SELECT rowid, id FROM events WHERE rowid > ? ORDER BY rowid",
                                       (last,)).fetchall()
            except sqlite3.Error as exc:
                self.errors.append(str(exc))  # busy, or not there yet: the next poll
                continue
            now = time.time()
            for rowid, rid in rows:
                last = max(last, rowid)
                self.first_seen.setdefault(rid, now)

    def delays(self, decisions: list[dict], stored: list[dict]) -> list[float]:
        """Seconds from each stored decision's ``ts`` (the gate's clock, this machine's) to
        its storage."""
        ts = {e["id"]: e["ts"] for e in stored}
        return [self.first_seen[d["id"]] - parse_rfc3339(ts[d["id"]]).timestamp()
                for d in decisions if d["id"] in self.first_seen and d["id"] in ts]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _log_count(agent: AgentProcess, pattern: str) -> int:
    try:
        text = agent.log_path.read_text(errors="replace")
    except OSError:
        return 0
    return len(re.findall(pattern, text))


def _connects(agent: AgentProcess) -> int:
    """How many times the agent's uplink has connected (its log says each one)."""
    return _log_count(agent, r"uplink: connected to ")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(nearest_rank(sorted(values), q), 2)


# --------------------------------------------------------------------------- share_hijack


def fault_share_hijack(work: Path, quick: bool, rng: random.Random) -> dict:
    """Gate B's certificate keeps trying to join the ingest's shared subscription (and to
    read every gate's events) on every listener, while gate A's cards are decided."""
    seconds = 12.0 if quick else 40.0
    rig = _TlsRig(work)
    watch = _StoreWatch(rig.ingest.db_path)
    stop = threading.Event()
    tries = {"attempts": 0, "granted": 0, "received": 0, "connect_refused": 0}

    def rogue() -> None:
        while not stop.is_set():
            for port in rig.broker.ports.values():
                try:
                    s = rig.session(rig.pki.gate_b, port)
                except ToolError:
                    tries["connect_refused"] += 1  # a gate on the services' listener
                    continue
                try:
                    for f in ROGUE_FILTERS:
                        tries["attempts"] += 1
                        try:
                            if s.subscribe(f, timeout=5) < 0x80:
                                tries["granted"] += 1
                        except ToolError:
                            pass  # dropped by the broker: the next round connects again
                    stop.wait(rng.uniform(0.2, 1.0))  # anything it was handed arrives meanwhile
                    tries["received"] += sum(1 for m in s.messages if m.topic.endswith("/events"))
                finally:
                    s.close()

    thread = threading.Thread(target=rogue, daemon=True, name="rogue")
    try:
        loop = CardLoop(rig.agent).start()
        thread.start()
        time.sleep(seconds)
        stop.set()
        thread.join(15)
        loop.stop()
        decided = loop.decided()
        wait_for(lambda: lost(decided, rig.ingest.events()) == 0, 2 * RESEND_S + 15)
        stored = rig.ingest.events()
        ids = {e["id"] for e in stored}
        wait_for(lambda: ids <= watch.first_seen.keys(), 5)  # its last poll
        delays = watch.delays(decided, stored)
        out = {"seconds": seconds, "rogue_subscribe_attempts": tries["attempts"],
               "rogue_granted": tries["granted"], "rogue_events_received": tries["received"],
               "rogue_connects_refused": tries["connect_refused"],
               "reads": len(loop.replies), "undecided": loop.undecided() + loop.errors,
               "lost": lost(decided, stored),
               "store_p50_s": _pct(delays, 0.5), "store_max_s": _pct(delays, 1.0)}
        if (out["rogue_granted"] or out["rogue_events_received"] or out["undecided"] or out["lost"]
                or not tries["attempts"]):
            raise Verdict(out)
        if out["store_max_s"] is None or out["store_max_s"] >= STALL_S:
            raise Verdict({**out, "why": f"a decision took {STALL_S:.0f} s or more to be stored: a stall"})
        return out
    finally:
        stop.set()
        watch.stop()
        rig.close()


# --------------------------------------------------------------------------- takeover


def _connack(broker: GateBroker, port: int, identity: Identity, ca: Path, client_id: str) -> int | None:
    """Connect as ``identity`` asking for ``client_id``; the CONNACK reason code (None: none
    came, e.g. the TLS handshake failed), then disconnect."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[int] = []
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=client_id)
    c.tls_set_context(identity.tls(ca).context())

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        got.append(reason_code.value)
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = lambda *a: done.set()
    try:
        c.connect(broker.host, port, keepalive=30)
    except OSError:
        return None
    c.loop_start()
    try:
        done.wait(10)
        time.sleep(0.05)  # a session taken over would be closed now, while this one holds it
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0] if got else None


def fault_takeover(work: Path, quick: bool, rng: random.Random) -> dict:
    """Gate B's and the services' certificates connect with gate A's possible client ids on
    both listeners while gate A runs: gate A is never disconnected and loses nothing."""
    rounds = 2 if quick else 5
    rig = _TlsRig(work)
    try:
        agent = rig.agent
        wait_for(lambda: _connects(agent) >= 1, 20)
        connects0 = _connects(agent)
        loop = CardLoop(agent).start()
        ids = (f"gate-{SITE}-{GATE_A}", f"{SITE}/{GATE_A}")  # the agent's default, its identity
        intruders = (rig.pki.gate_b, rig.pki.regional, rig.pki.ingest)
        attempts, sessions = 0, 0
        plan = [(port, ident, cid) for port in rig.broker.ports.values() for ident in intruders
                for cid in ids]
        # And a gate's certificate asking for the ingest's client id. (The services choose
        # their own ids on their listener, mosquitto/gate-broker.conf: one trust among them.)
        plan += [(port, rig.pki.gate_b, INGEST_ID) for port in rig.broker.ports.values()]
        plan *= rounds
        rng.shuffle(plan)
        for port, ident, cid in plan:
            rc = _connack(rig.broker, port, ident, rig.pki.ca_file, cid)
            attempts += 1
            sessions += rc == 0
            time.sleep(rng.uniform(0.0, 0.2))
        time.sleep(2.0)  # a disconnection shows in the agent's log within its backoff
        loop.stop()
        decided = loop.decided()
        wait_for(lambda: lost(decided, rig.ingest.events()) == 0, RESEND_S + 15)
        taken = len(re.findall(r"already connected, closing old connection", rig.broker.log_text()))
        out = {"attempts": attempts, "intruder_sessions": sessions,
               "a_disconnections": _connects(agent) - connects0,
               "ingest_disconnections": rig.ingest_log.count("ingest: disconnected"),
               "broker_takeovers": taken,
               "reads": len(loop.replies), "undecided": loop.undecided() + loop.errors,
               "lost": lost(decided, rig.ingest.events())}
        if (out["a_disconnections"] or out["ingest_disconnections"] or out["broker_takeovers"]
                or out["lost"] or out["undecided"]):
            raise Verdict(out)
        return out
    finally:
        rig.close()


# --------------------------------------------------------------------------- forgery


def _forge(template: dict, journal: str, seq: int, n: int) -> dict:
    """A record under ``journal``:``seq`` that differs from anything the gate makes."""
    rec = dict(template)
    rec.update(id=f"{journal}:{seq}", seq=seq, type="access.granted", person=f"forged-{n}",
               card="99,99999")
    return rec


def _publish_all(rig: _TlsRig, identity: Identity, topic: str, bodies: list[dict]) -> int:
    """Publish each body (QoS 1) as ``identity``, reconnecting when the session is taken
    back; how many the broker accepted (PUBACK below 0x80)."""
    left = list(bodies)
    accepted = 0
    for _ in range(20):
        if not left:
            break
        try:
            s = rig.session(identity)
        except ToolError:
            time.sleep(0.3)
            continue
        try:
            while left:
                rc = s.publish(topic, json.dumps(left[0]).encode(), timeout=5)
                left.pop(0)
                accepted += rc < 0x80
        except ToolError:
            time.sleep(0.3)  # the gate took its session back: again
        finally:
            s.close()
    return accepted


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def fault_forgery(work: Path, quick: bool, rng: random.Random) -> dict:
    """With gate A's certificate, records under A's journal id: some with seqs A already
    sent, some ahead of it, other content. No real record is lost, every collision is a
    conflict, and the gate raises ack_ahead when the ingest acks the forged future."""
    behind_n, ahead_gap, ahead_n = (6, 8, 40) if quick else (12, 10, 80)
    rig = _TlsRig(work)
    try:
        agent = rig.agent
        wait_for(lambda: _connects(agent) >= 1, 20)
        connects0 = _connects(agent)
        loop = CardLoop(agent).start()
        # A's journal id, from what the ingest stores (the forger could read the retained
        # status or the SD card just as well).
        if not wait_for(lambda: len(rig.ingest.events(SITE, GATE_A)) >= behind_n + 2, 60):
            raise RuntimeError("gate A's first records never reached the ingest")
        stored = rig.ingest.events(SITE, GATE_A)
        journal = stored[-1]["id"].rpartition(":")[0]
        template = next((e for e in stored if e.get("type") == "access.granted"), stored[-1])
        made = max(r["seq"] for r in agent.records())
        behind = [_forge(template, journal, s, n) for n, s in
                  enumerate(rng.sample([e["seq"] for e in stored if e["id"].startswith(journal)], behind_n))]
        first_ahead = made + ahead_gap
        ahead = [_forge(template, journal, first_ahead + i, behind_n + i) for i in range(ahead_n)]
        forged = behind + ahead
        # The forger's connections take gate A's session (one certificate, one client id):
        # what a stolen certificate can always do. The gate reconnects and resends.
        sent = _publish_all(rig, rig.pki.gate_a, topics(SITE, GATE_A)["events"], forged)
        if sent != len(forged):
            raise RuntimeError(f"the forger got only {sent} of {len(forged)} records through the broker")
        # A reaches half of the forged future, so the ingest holds forged records beyond it.
        target = first_ahead + ahead_n // 2
        if not wait_for(lambda: max(r["seq"] for r in agent.records()) >= target, 120):
            raise RuntimeError(f"gate A did not reach seq {target}")
        loop.stop()

        def settled() -> bool:
            records = agent.records()
            return (_real_lost(records, rig.ingest) == 0
                    and any(r["type"] == "alarm" and r.get("kind") == "ack_ahead" for r in records))

        wait_for(settled, RESEND_S + 15)
        records = agent.records()
        reached = max(r["seq"] for r in records)
        conflicts = rig.ingest.conflicts(SITE, GATE_A)
        flagged = {c["id"] for c in conflicts}
        real = {r["id"]: r for r in records}
        collisions = [f for f in forged if f["id"] in real]
        silent = [f for f in collisions if f["id"] not in flagged]
        events = {e["id"]: e for e in rig.ingest.events(SITE, GATE_A)}
        out = {"forged_sent": sent, "forged_behind": len(behind), "forged_ahead": len(ahead),
               "collisions": len(collisions), "conflicts_flagged": len(flagged),
               "forged_accepted_silently": len(silent),
               "forged_beyond_gate": sum(1 for f in ahead if f["seq"] > reached),
               "forged_in_events": sum(1 for f in forged if f["id"] in events and _same(events[f["id"]], f)),
               "real_records": len(records), "real_lost": _real_lost(records, rig.ingest),
               "ack_ahead": "yes" if any(r["type"] == "alarm" and r.get("kind") == "ack_ahead"
                                         and r.get("active") for r in records) else "no",
               "ingest_conflict_alarms": rig.ingest_log.count("CONFLICT"),
               "gate_reconnects": _connects(agent) - connects0,
               "reads": len(loop.replies), "undecided": loop.undecided() + loop.errors}
        if (out["real_lost"] or out["forged_accepted_silently"] or out["undecided"]
                or out["conflicts_flagged"] < out["collisions"] or out["ack_ahead"] != "yes"
                or (collisions and not out["ingest_conflict_alarms"])):
            raise Verdict(out)
        return out
    finally:
        rig.close()


def _real_lost(records: list[dict], ingest: Any) -> int:
    """The gate's records found neither in the ingest's events nor in its quarantine
    (same id and same content)."""
    kept: dict[str, list[dict]] = {}
    for e in ingest.events(SITE, GATE_A):
        kept.setdefault(e["id"], []).append(e)
    for c in ingest.conflicts(SITE, GATE_A):
        kept.setdefault(c["id"], []).append(c["record"])
    return sum(1 for r in records if not any(_same(r, k) for k in kept.get(r["id"], ())))


# --------------------------------------------------------------------------- clock


def _clockshift(work: Path) -> Path:
    """bench/chaos_clockshift.c built into ``work`` (see its comment for why not libfaketime)."""
    out = work / "clockshift.so"
    done = subprocess.run(["cc", "-std=c11", "-O2", "-fPIC", "-shared", "-o", str(out),
                           str(ROOT / "bench" / "chaos_clockshift.c"), "-ldl"],
                          check=False, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"bench/chaos_clockshift.c did not build: {done.stderr.strip()[-300:]}")
    return out


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """os.environ with ``extra`` while the agent is started (AgentProcess copies it then)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _SkewedAgent(AgentProcess):
    """The agent with bench/chaos_clockshift.c preloaded: its wall clock ``behind_s`` behind
    real time (its monotonic clock untouched); ``deny_adjtimex``: it cannot ask the kernel
    whether the clock is synchronised. Nothing else here or in the broker is skewed."""

    def __init__(self, *args: Any, lib: Path, behind_s: int, deny_adjtimex: bool, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fake_env = {"LD_PRELOAD": str(lib), "CHAOS_CLOCK_SHIFT_S": str(behind_s),
                         "CHAOS_DENY_ADJTIMEX": "1" if deny_adjtimex else "0"}

    def start(self, timeout: float = 30.0) -> AgentProcess:
        with _environ(self.fake_env):
            return super().start(timeout)


def _command(session: Session, key: Any, *, command: str, args: dict, counter: int, issued_at: float,
             ttl_s: float = 20.0, expiry_s: int = 60) -> tuple[str, str]:
    """Publish one signed command issued at ``issued_at`` (real epoch seconds), with a reply
    topic; (request_id, reply topic). The reply is looked for later."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.downlink.signing import make_command, sign_command

    fields = make_command(SITE, GATE_A, command, args, key_id="chaos-1", counter=counter,
                          now=issued_at, ttl_s=ttl_s)
    msg = sign_command(key, fields)
    reply = f"gate/v1/{SITE}/{GATE_A}/reply/{secrets.token_hex(6)}"
    session.subscribe(reply)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData, props.MessageExpiryInterval = reply, b"c", expiry_s
    rc = session.publish(topics(SITE, GATE_A)["cmd"], json.dumps(msg).encode(), properties=props)
    if rc >= 0x80 or rc == 0x10:
        raise RuntimeError(f"the broker did not deliver command {fields['request_id']} (0x{rc:02X})")
    return fields["request_id"], reply


def _reply(session: Session, topic: str, timeout: float) -> dict | None:
    def got() -> dict | None:
        for m in session.messages:
            if m.topic == topic:
                return json.loads(m.payload)
        return None

    session.wait_for(lambda: got() is not None, timeout)
    return got()


def _decided(agent: AgentProcess, card: str) -> dict:
    decision = agent.card(card, wait=10).get("decision")
    if not decision:
        raise Verdict({"why": f"card {card} got no decision within 10 s"})
    return decision


def _lag(records: list[dict], ids: set[str], at: dict[str, float]) -> float | None:
    """The largest (real time the record was seen) - (its ts), over ``ids``."""
    lags = [at[r["id"]] - parse_rfc3339(r["ts"]).timestamp() for r in records if r["id"] in ids]
    return round(max(lags), 1) if lags else None


def fault_clock(work: Path, quick: bool, rng: random.Random) -> dict:
    """The agent's clock an hour behind and not synchronised. A signed command issued at
    real time sets the time floor; then commands that expired 1 to 50 minutes ago (real
    time), which the agent's own clock would take as valid, are all refused ``expired``;
    a fresh one runs; records made after the floor moved carry real time."""
    from agent.downlink.signing import generate_keypair
    from agent.host import kernel_clock_synced

    lib = _clockshift(work)
    # Where this machine's clock is NTP-synchronised the agent would trust its skewed clock;
    # this fault is about an unsynchronised one, so the agent is then kept from asking.
    deny = kernel_clock_synced() is not False
    minutes = [1, 10, 25, 40, 50] if quick else sorted({1, 50, *rng.sample(range(2, 50), 10)})
    order = rng.sample(minutes, len(minutes))
    key, pub = generate_keypair()
    t = topics(SITE, GATE_A)
    # No TLS: with its clock an hour behind, the agent would find a certificate issued
    # minutes ago not yet valid. The broker is not what this fault is about.
    broker = Mosquitto(work / "mq").start()
    quiet = _IngestLog()
    ingest: Any = None
    agent: AgentProcess | None = None
    server: Session | None = None
    try:
        ingest = start_ingest(broker, work / "ingest.db")
        agent = _SkewedAgent(work / "agent", broker=broker, gate=GATE_A, telemetry_s=1,
                             extra_toml=f'[commands.trusted_keys]\nchaos-1 = "{pub}"\n' + W26_READERS,
                             lib=lib, behind_s=3600, deny_adjtimex=deny)
        with Observer(broker, t["status"]) as status, Observer(broker, t["telemetry"], qos=0) as tel:
            agent.start()
            if not wait_for(lambda: any(s.get("state") == "online" for s in status.records()), 20):
                raise RuntimeError("the agent never came online")
            before = _decided(agent, "100,60000")
            seen_before = time.time()
            server = Session(broker.host, broker.port, timeout=10)
            # 1. The floor: a signed status command issued now (real time).
            floor_at = time.time()
            floor_id, reply_topic = _command(server, key, command="status", args={}, counter=1000,
                                             issued_at=floor_at)
            first = _reply(server, reply_topic, 15)
            if (first or {}).get("result") != "done":
                # Without a floor an expired command is judged by its own issued_at: what a
                # gate that never heard the server's time cannot tell (docs/contract.md,
                # "Time floor").
                raise Verdict({"floor_command": (first or {}).get("result"),
                               "why": "the signed command issued now was not carried out: no time floor"})
            # 2. Commands that expired `m` minutes ago (real time), each valid for 20 s, with
            # counters above every accepted one: only their expiry can stop them.
            expired: dict[str, int] = {}
            topics_of: dict[str, str] = {}
            for n, m in enumerate(order):
                issued = time.time() - m * 60 - 20
                r, topic = _command(server, key, command="open", args={"direction": "in"},
                                    counter=2000 + n, issued_at=issued)
                expired[r] = m
                topics_of[r] = topic
            # 3. A fresh command, then a card: both after the floor moved.
            fresh_id, fresh_topic = _command(server, key, command="open", args={"direction": "in"},
                                             counter=3000, issued_at=time.time())
            fresh = _reply(server, fresh_topic, 15)
            seen_fresh = time.time()
            after = _decided(agent, "100,60001")
            seen_after = time.time()
            wait_for(lambda: any((s.get("downlink") or {}).get("refused", {}).get("expired", 0) >= len(minutes)
                                 for s in tel.records()), 15)
            samples = tel.records()
        refused = max(((s.get("downlink") or {}).get("refused", {}).get("expired", 0) for s in samples),
                      default=0)
        floor = max(((s.get("downlink") or {}).get("time_floor") or 0 for s in samples), default=0)
        records = agent.records()
        results = [r for r in records if r["type"] == "command.result"]
        executed = [r for r in results if r.get("request_id") in expired and r.get("result") == "done"]
        replies = [_reply(server, topics_of[r], 0) for r in expired]
        at = {before["id"]: seen_before, after["id"]: seen_after}
        at.update((r["id"], seen_fresh) for r in results if r.get("request_id") == fresh_id)
        # Every record made after the floor command's: how far its ts is behind that
        # command's issued_at (whole seconds: up to 1 s is the rounding).
        floor_seq = next((r["seq"] for r in results if r.get("request_id") == floor_id), None)
        later = [r for r in records if floor_seq is not None and r["seq"] > floor_seq]
        behind = max((floor_at - parse_rfc3339(r["ts"]).timestamp() for r in later), default=None)
        out = {"clock_behind_s": 3600, "agent_clock_synced": bool(records[-1].get("clock_synced")),
               "unsynchronised_by": "adjtimex denied" if deny else "kernel",
               "floor_command": (first or {}).get("result"),
               "expired_sent": len(minutes), "expired_minutes": f"{minutes[0]}-{minutes[-1]}",
               "expired_executed": len(executed),
               "refused_expired": refused,
               "expired_replies": sum(1 for r in replies if r is not None),
               "fresh_command": (fresh or {}).get("result"),
               "ts_lag_before_floor_s": _lag(records, {before["id"]}, at),
               "ts_lag_after_floor_s": _lag(records, set(at) - {before["id"]}, at),
               "records_after_floor": len(later),
               "records_after_floor_max_behind_s": None if behind is None else round(max(0.0, behind), 1),
               "time_floor_set": bool(floor)}
        if out["agent_clock_synced"] or (out["ts_lag_before_floor_s"] or 0) < 3000:
            raise RuntimeError(f"the agent's clock is not an hour behind and unsynchronised: {out}")
        if (executed or refused < len(minutes) or out["fresh_command"] != "done"
                or out["floor_command"] != "done"
                or out["ts_lag_after_floor_s"] is None or out["ts_lag_after_floor_s"] > 60
                or behind is None or behind > 60):
            raise Verdict(out)
        return out
    finally:
        if server is not None:
            server.close()
        if agent is not None:
            agent.kill()
        if ingest is not None:
            ingest.stop()
        broker.kill()
        quiet.close()


FAULTS = {
    "share_hijack": fault_share_hijack,
    "takeover": fault_takeover,
    "forgery": fault_forgery,
    "clock": fault_clock,
}
