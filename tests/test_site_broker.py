# ruff: noqa: F811 - pytest fixtures imported from tests.pki, used as arguments
"""The gates of one site on the broker (docs/site-broker.md): the site-scoped read right of
the shipped ACL, and the site broker bridged to the regional broker.

The ACL (mosquitto/acl.conf, ``pattern read gate/v1/%s/+/events``) lets every gate read and
subscribe to the events of every gate of its own site and nothing of another site; it still
writes only its own topics. A gate with a persistent session (MQTT 5 clean start off, a
session expiry interval) gets the sibling events published while it was away, at QoS 1, when
it comes back.

The site broker (mosquitto/site-broker.conf) runs on one board of the school with the same
ACL and plugin and forwards the site's topics to the regional broker over mosquitto's own
bridge, under the bridge's identity ``{site}/site-broker``, whose rights on the regional broker
are the block of mosquitto/site-bridge-acl.conf. While the regional side is away the gates of
the site still see each other's events, and the bridge keeps the events for the region.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.contract import topics
from tests.broker import Mosquitto, wait_until
from tests.pki import (  # noqa: F401  (fixtures)
    BROKER_ACL,
    GATE_A,
    GATE_B,
    ROOT,
    SITE,
    GateBroker,
    Identity,
    Pki,
    broker_plugin,
    gate_broker,
    pki,
    shipped_paths,
)

SITE_CONF = ROOT / "mosquitto" / "site-broker.conf"
BRIDGE_ACL = ROOT / "mosquitto" / "site-bridge-acl.conf"

NOT_AUTHORISED = 0x87
NO_SUBSCRIBERS = 0x10
A, B = topics(SITE, GATE_A), topics(SITE, GATE_B)
SITE_EVENTS = f"gate/v1/{SITE}/+/events"  # what a gate subscribes to for its siblings
OTHER_SITE = "school-99"
SESSION_EXPIRY_S = 3600


class Peer:
    """A paho MQTT 5 client presenting a certificate, with the session options a gate's
    sibling feed uses: ``clean_start`` and ``session_expiry`` (seconds; 0: none)."""

    def __init__(self, host: str, port: int, identity: Identity, ca: Path, *, clean_start: bool = True,
                 session_expiry: int = 0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._mqtt = mqtt
        self.host, self.port, self.identity, self.ca = host, port, identity, ca
        self.clean_start, self.session_expiry = clean_start, session_expiry
        self._cond = threading.Condition()
        self.messages: list = []
        self.connack: int | None = None
        self.session_present: bool | None = None
        self._subacks: dict[int, list[int]] = {}
        self._pubacks: dict[int, int] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"gate-{identity.name.replace('/', '-')}")
        self.client.tls_set_context(identity.tls(ca).context())
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.connect()

    def connect(self) -> Peer:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if self.session_expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        with self._cond:
            self.connack = None
        self.client.connect(self.host, self.port, keepalive=30, clean_start=self.clean_start,
                            properties=props)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self.connack is not None, 10), \
                f"no CONNACK for {self.identity.name}"
        assert self.connack == 0, f"{self.identity.name} refused: 0x{self.connack:02X}"
        return self

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.session_present = bool(flags.session_present)
            self.connack = reason_code.value
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subacks[mid] = [rc.value for rc in reason_codes]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._pubacks[mid] = reason_code.value
            self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def subscribe(self, topic: str, *, no_local: bool = True) -> int:
        """QoS 1 (no_local: not this connection's own publishes); the SUBACK reason code."""
        from paho.mqtt.subscribeoptions import SubscribeOptions

        rc, mid = self.client.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=no_local))
        assert rc == self._mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, 10), f"no SUBACK for {topic}"
            return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, properties=None) -> int:
        """QoS 1; the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._pubacks, 10), f"no PUBACK for {topic}"
            return self._pubacks[info.mid]

    def wait_for(self, pred, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(pred, timeout)

    def got(self, topic: str | None = None) -> list:
        """(topic, payload) of the messages received (on ``topic``), in arrival order."""
        with self._cond:
            return [(m.topic, m.payload) for m in self.messages if topic is None or m.topic == topic]


def event(gate: str, n: int) -> bytes:
    return json.dumps({"type": "passage", "id": f"{gate}-{n}", "direction": "in"}).encode()


@pytest.fixture
def peers():
    """``peers(broker, identity, port=None, **session)``: a connected Peer, closed at the end."""
    made: list[Peer] = []

    def make(broker, identity: Identity, port: int | None = None, **session) -> Peer:
        p = Peer(broker.host, broker.port if port is None else port, identity, broker.pki.ca_file, **session)
        made.append(p)
        return p

    yield make
    for p in made:
        p.disconnect()


# --- the site-scoped read right of the shipped ACL ----------------------------------------------


def test_a_gate_subscribes_to_its_site_events_and_gets_its_siblings_events(gate_broker, pki, peers):
    gate_a, gate_b = peers(gate_broker, pki.gate_a), peers(gate_broker, pki.gate_b)
    third = peers(gate_broker, pki.ca.issue(f"{SITE}/third"))
    for p in (gate_a, gate_b, third):
        assert p.subscribe(SITE_EVENTS) < 0x80, p.identity.name
    assert gate_b.publish(B["events"], event(GATE_B, 1)) < 0x80
    assert gate_a.publish(A["events"], event(GATE_A, 1)) < 0x80
    wait_until(lambda: len(third.got()) == 2, 10, "the third gate to get both siblings' events")
    wait_until(lambda: gate_a.got() and gate_b.got(), 10, "A and B to get each other's event")
    assert gate_a.got() == [(B["events"], event(GATE_B, 1))]
    # no_local: a gate does not get back what it published on the same connection.
    assert gate_b.got() == [(A["events"], event(GATE_A, 1))]
    assert sorted(third.got()) == sorted([(A["events"], event(GATE_A, 1)), (B["events"], event(GATE_B, 1))])
    assert all(m.qos == 1 for m in gate_a.messages + gate_b.messages + third.messages)


def test_a_gate_reads_nothing_of_another_site(gate_broker, pki, peers):
    gate_a = peers(gate_broker, pki.gate_a)
    stranger = peers(gate_broker, pki.ca.issue(f"{OTHER_SITE}/main"))
    other = topics(OTHER_SITE, "main")
    refused = [f"gate/v1/{OTHER_SITE}/+/events", other["events"], "gate/v1/+/+/events", "gate/v1/+/main/events",
               f"gate/v1/{SITE}/+/status", f"gate/v1/{SITE}/+/telemetry", f"gate/v1/{SITE}/+/+",
               f"gate/v1/{SITE}/#", B["cmd"], B["acl"], B["ack"], f"gate/v1/{SITE}/+/reply/#",
               f"$share/g/{SITE_EVENTS}"]
    assert {f: gate_a.subscribe(f) for f in refused} == dict.fromkeys(refused, NOT_AUTHORISED)
    assert gate_a.subscribe(SITE_EVENTS) < 0x80  # still connected, and listening to its own site
    assert stranger.subscribe(f"gate/v1/{OTHER_SITE}/+/events") < 0x80
    assert stranger.subscribe(SITE_EVENTS) == NOT_AUTHORISED
    assert stranger.publish(other["events"], event("stranger", 1)) < 0x80
    assert stranger.publish(other["status"], b'{"state": "online"}') < 0x80
    gate_b = peers(gate_broker, pki.gate_b)
    assert gate_b.publish(B["events"], event(GATE_B, 1)) < 0x80
    # Gate B's event came after the stranger's: once it is here, anything misrouted would be too.
    wait_until(lambda: gate_a.got(), 10, "gate B's event at gate A")
    assert gate_a.got() == [(B["events"], event(GATE_B, 1))]
    assert not stranger.wait_for(lambda: stranger.messages, 0.3)


@pytest.mark.parametrize("name", ["events", "status", "telemetry", "reply/x1"])
def test_a_gate_still_writes_only_its_own_topics(gate_broker, pki, peers, name):
    gate_a, third = peers(gate_broker, pki.gate_a), peers(gate_broker, pki.ca.issue(f"{SITE}/third"))
    assert third.subscribe(SITE_EVENTS) < 0x80
    sibling_topic = f"gate/v1/{SITE}/{GATE_B}/{name}"
    assert gate_a.publish(sibling_topic, b'{"forged": true}') == NOT_AUTHORISED
    assert gate_a.publish(f"gate/v1/{OTHER_SITE}/main/{name}", b'{"forged": true}') == NOT_AUTHORISED
    assert gate_a.publish(f"gate/v1/{SITE}/{GATE_A}/{name}", b'{"own": true}') < 0x80
    if name == "events":
        wait_until(lambda: third.got(), 10, "gate A's own event")
    assert not third.wait_for(lambda: any(b"forged" in p for _, p in third.got()), 0.3)


def test_a_persistent_session_gets_the_sibling_events_made_while_it_was_away(gate_broker, pki, peers):
    """Clean start off and a session expiry interval: the broker keeps the subscription and
    queues the siblings' events (QoS 1) while the gate is offline; at reconnect they come
    without a new SUBSCRIBE. A clean start gets nothing of them."""
    gate_a = peers(gate_broker, pki.gate_a, clean_start=False, session_expiry=SESSION_EXPIRY_S)
    assert gate_a.subscribe(SITE_EVENTS) < 0x80
    gate_b = peers(gate_broker, pki.gate_b)
    assert gate_b.publish(B["events"], event(GATE_B, 0)) < 0x80
    wait_until(lambda: len(gate_a.got()) == 1, 10, "the first event while connected")
    gate_a.disconnect()
    for n in range(1, 26):
        assert gate_b.publish(B["events"], event(GATE_B, n)) < 0x80
    gate_a.messages.clear()
    gate_a.connect()
    assert gate_a.session_present, "the broker did not keep gate A's session"
    wait_until(lambda: len(gate_a.got()) >= 25, 10, "the 25 events made while gate A was away")
    assert gate_a.got() == [(B["events"], event(GATE_B, n)) for n in range(1, 26)]
    assert all(m.qos == 1 for m in gate_a.messages)
    # The same with a clean start: the session and its queue are gone.
    gate_a.disconnect()
    assert gate_b.publish(B["events"], event(GATE_B, 26)) < 0x80
    gate_a.clean_start = True
    gate_a.messages.clear()
    gate_a.connect()
    assert not gate_a.session_present
    assert not gate_a.wait_for(lambda: gate_a.messages, 0.5)


# --- the site broker, bridged to the regional broker --------------------------------------------


def render_site_conf(pki: Pki, workdir: Path, port: int, regional_port: int, plugin: Path, *,
                     standalone: bool = True) -> str:
    """mosquitto/site-broker.conf with this machine's paths and ports, the regional broker on
    loopback, and the bridge retrying every second or two (as shipped: from 5 s to 60 s);
    every other line as shipped. standalone: plus what Debian's mosquitto.conf adds (log,
    persistence on), for a broker run on this file alone."""
    replace = {
        **shipped_paths(pki, workdir, plugin),
        "listener": f"listener {port} 127.0.0.1",
        "address": f"address 127.0.0.1:{regional_port}",
        "bridge_cafile": f"bridge_cafile {pki.ca.cert_path}",
        "bridge_certfile": f"bridge_certfile {pki.bridge.cert}",
        "bridge_keyfile": f"bridge_keyfile {pki.bridge.key}",
        "restart_timeout": "restart_timeout 1 2",
    }
    seen: list[str] = []
    out = []
    for line in SITE_CONF.read_text().splitlines():
        word = line.split(" ", 1)[0] if line and not line.startswith("#") else ""
        if word in replace:
            seen.append(word)
            out.append(replace[word])
        else:
            out.append(line)
    assert sorted(seen) == sorted(replace), f"mosquitto/site-broker.conf: {sorted(seen)}, expected {sorted(replace)}"
    if standalone:
        out = [f"log_dest file {workdir / 'mosquitto.log'}", "persistence true",
               f"persistence_location {workdir}/", *out, f"user {getpass.getuser()}"]
    out.append("log_type information")
    return "\n".join(out) + "\n"


class SiteBroker(Mosquitto):
    """mosquitto/site-broker.conf with mosquitto/acl.conf and the plugin, bridged to ``regional``."""

    def __init__(self, workdir: Path, pki: Pki, regional: GateBroker) -> None:
        super().__init__(workdir)
        self.pki = pki
        (self.workdir / "acl.conf").write_text(BROKER_ACL.read_text())
        self.conf_path.write_text(render_site_conf(pki, self.workdir, self.port, regional.port, broker_plugin()))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def regional_acl(site: str = SITE) -> str:
    """The shipped acl.conf with the bridge block of mosquitto/site-bridge-acl.conf appended for
    ``site``, as docs/site-broker.md tells the regional administrator to do."""
    return BROKER_ACL.read_text() + BRIDGE_ACL.read_text().replace("school-17", site)


@pytest.fixture
def regional(pki, tmp_path):
    b = GateBroker(tmp_path / "regional", pki, acl=regional_acl(), persistence=True).start()
    yield b
    b.stop()


@pytest.fixture
def site_broker(pki, tmp_path, regional):
    b = SiteBroker(tmp_path / "site", pki, regional).start()
    yield b
    b.stop()


def bridged(publisher: Peer, topic: str, payload: bytes, receiver: Peer, timeout: float = 20) -> None:
    """Publish ``payload`` until ``receiver`` has it: the first ones may go out before the bridge
    has connected and subscribed (nobody to take them, PUBACK 0x10)."""
    def arrived() -> bool:
        if (topic, payload) in receiver.got(topic):
            return True
        publisher.publish(topic, payload)
        return receiver.wait_for(lambda: (topic, payload) in receiver.got(topic), 0.5)

    wait_until(arrived, timeout, f"{topic} across the bridge")


def test_the_site_works_on_while_the_region_is_away_and_the_region_gets_every_event_after(
        pki, regional, site_broker, peers):
    """The regional broker stops (the school's link is down, or the region restarts): the gates
    on the site broker still get each other's events; once it is back, the bridge delivers every
    event made meanwhile, once, in order, to the ingest identity's persistent session."""
    receiver = peers(regional, pki.ingest, port=regional.services_port, clean_start=False,
                     session_expiry=SESSION_EXPIRY_S)
    assert receiver.subscribe("gate/v1/+/+/events", no_local=False) < 0x80
    gate_a, gate_b = peers(site_broker, pki.gate_a), peers(site_broker, pki.gate_b)
    assert gate_a.subscribe(SITE_EVENTS) < 0x80
    bridged(gate_b, B["events"], event(GATE_B, 0), receiver)
    receiver.disconnect()
    regional.stop()
    # More than mosquitto's default queue (1,000 a client) on both brokers.
    made = [(B["events"], event(GATE_B, n)) for n in range(1, 1201)]
    for topic, payload in made[:-1]:
        gate_b.client.publish(topic, payload, qos=1)
    assert gate_b.publish(*made[-1]) < 0x80  # and so the ones before it
    wait_until(lambda: made[-1] in gate_a.got(), 10, "gate A to get gate B's events with the region away")
    assert [m for m in gate_a.got() if m != (B["events"], event(GATE_B, 0))] == made
    regional.start()
    receiver.messages.clear()
    receiver.connect()
    assert receiver.session_present
    wait_until(lambda: made[-1] in receiver.got(), 30, "the bridge to deliver the events made meanwhile")
    # Event 0 straddled the stop: its acknowledgement (the bridge's from the region, or the
    # receiver's) may have been lost with the broker, and QoS 1 then delivers it again, first
    # (the ingest drops it by its id). Every event made meanwhile comes once, in order.
    first = (B["events"], event(GATE_B, 0))
    expected = [first, *made] if receiver.got()[:1] == [first] else made
    assert not receiver.wait_for(lambda: len(receiver.got()) > len(expected), 0.5)
    assert receiver.got() == expected
    assert f"as {SITE}/site-broker (" in regional.log_text()  # the bridge's own identity


def _cmd_props(response_topic: str):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    p = Properties(PacketTypes.PUBLISH)
    p.MessageExpiryInterval = 600
    p.ResponseTopic = response_topic
    p.CorrelationData = b"c-42"
    return p


def test_lists_commands_and_acks_from_the_region_reach_the_gate_through_the_bridge(
        pki, regional, site_broker, peers):
    """The regional server's list and command and the ingest's ack for gate B cross the bridge
    to gate B alone, the command with its MQTT 5 expiry, response topic and correlation data;
    gate B's reply goes back to the server. What the region sends while the link is down is not
    kept for the site (mosquitto 2.0's MQTT 5 bridge asks for no session expiry): the sender
    hears "no subscribers" (0x10), as for a gate offline today, and sends again once it is back.
    """
    server = peers(regional, pki.regional, port=regional.services_port)
    ingest = peers(regional, pki.ingest, port=regional.services_port)
    reply_topic = f"gate/v1/{SITE}/{GATE_B}/reply/r1"
    assert server.subscribe(reply_topic, no_local=False) < 0x80
    gate_a = peers(site_broker, pki.gate_a)
    gate_b = peers(site_broker, pki.gate_b, clean_start=False, session_expiry=SESSION_EXPIRY_S)
    for p, t in ((gate_a, A), (gate_b, B)):
        for name in ("acl", "cmd", "ack"):
            assert p.subscribe(t[name]) < 0x80
    acl = json.dumps({"version": "v-1", "cards": []}).encode()
    bridged(server, B["acl"], acl, gate_b)
    server.publish(B["cmd"], b'{"cmd": "open"}', properties=_cmd_props(reply_topic))
    ingest.publish(B["ack"], b'{"journal": "j", "upto": 7}')
    wait_until(lambda: len(gate_b.got(B["cmd"])) == 1 and gate_b.got(B["ack"]), 10, "the command and the ack")
    cmd = next(m for m in gate_b.messages if m.topic == B["cmd"])
    assert cmd.properties.ResponseTopic == reply_topic and cmd.properties.CorrelationData == b"c-42"
    assert 0 < cmd.properties.MessageExpiryInterval <= 600
    assert gate_b.got(B["ack"]) == [(B["ack"], b'{"journal": "j", "upto": 7}')]
    gate_b.publish(reply_topic, b'{"result": "done"}')
    wait_until(lambda: server.got(reply_topic), 20, "gate B's reply at the regional server")
    assert not gate_a.wait_for(lambda: gate_a.messages, 0.3), "gate A got gate B's messages"

    # The link is cut: the site broker is down. The region's list finds no subscriber ...
    gate_b.disconnect()
    site_broker.stop()
    acl2 = json.dumps({"version": "v-2", "cards": []}).encode()
    assert server.publish(B["acl"], acl2) == NO_SUBSCRIBERS
    site_broker.start()
    gate_b.messages.clear()
    gate_b.connect()
    assert gate_b.session_present  # the site broker kept gate B's session (persistence)
    # ... and sent again once the bridge is back, it arrives.
    bridged(server, B["acl"], acl2, gate_b)
    assert gate_b.got(B["acl"]) == [(B["acl"], acl2)]


def test_the_bridge_identity_may_touch_its_own_site_s_topics_only(pki, regional, peers):
    """On the regional broker (no site broker running: its session is not taken over here), the
    bridge's certificate writes what the site's gates write and reads what is sent to them, and
    nothing of another site; it may not forge lists, commands or acks, and the services'
    listener refuses it."""
    from agent.regional.tools import Session, ToolError

    bridge = peers(regional, pki.bridge)
    other = topics(OTHER_SITE, "main")
    assert {n: bridge.publish(B[n], b"{}") < 0x80 for n in ("events", "status", "telemetry")} == dict.fromkeys(
        ("events", "status", "telemetry"), True)
    assert bridge.publish(f"gate/v1/{SITE}/{GATE_B}/reply/r1", b"{}") < 0x80
    forged = [B["acl"], B["cmd"], B["ack"], other["events"], other["status"], other["ack"]]
    assert {t: bridge.publish(t, b"{}") for t in forged} == dict.fromkeys(forged, NOT_AUTHORISED)
    granted = [f"gate/v1/{SITE}/+/acl", f"gate/v1/{SITE}/+/cmd", f"gate/v1/{SITE}/+/ack", B["cmd"]]
    refused = ["gate/v1/+/+/acl", f"gate/v1/{OTHER_SITE}/+/cmd", other["ack"], f"gate/v1/{SITE}/#",
               "gate/v1/+/+/events", f"$share/ingest/gate/v1/{SITE}/+/events", "#"]
    assert {f: bridge.subscribe(f) < 0x80 for f in granted + refused} == {
        **dict.fromkeys(granted, True), **dict.fromkeys(refused, False)}
    with pytest.raises(ToolError):
        Session(regional.host, regional.services_port, tls=pki.bridge.tls(pki.ca_file), timeout=10)
    # Another site's bridge, with its own block in the regional ACL, cannot write this site's.
    regional.acl_file.write_text(regional_acl() + BRIDGE_ACL.read_text().replace("school-17", OTHER_SITE))
    regional.reload()
    other_bridge = peers(regional, pki.ca.issue(f"{OTHER_SITE}/site-broker"))
    wait_until(lambda: other_bridge.publish(other["events"], b"{}") < 0x80, 10, "the other site's block")
    assert other_bridge.publish(B["events"], b"{}") == NOT_AUTHORISED
    assert other_bridge.subscribe(B["cmd"]) == NOT_AUTHORISED


@contextlib.contextmanager
def site_uplink(pki, regional, site_broker, peers, tmp_path, *, records: int, resend_after_s: float):
    """Gate A's real Uplink (ack_mode ingest) on the site broker, the reference ingest on the
    regional broker, gate B listening to the site's events; ``records`` passages journalled
    and acknowledged through the bridge before it yields (ingest, journal, gate B, committed)."""
    from agent.regional.ingest import Ingest
    from agent.uplink.journal import Journal
    from agent.uplink.mqtt import Uplink
    from tests.broker import passage

    ingest = Ingest(regional.host, regional.services_port, db_path=tmp_path / "ingest.db",
                    tls=pki.ingest.tls(pki.ca_file), client_id="ingest-1").start()
    journal = Journal(tmp_path / "journal.db")
    up = None
    try:
        assert ingest.ready.wait(10)
        gate_b = peers(site_broker, pki.gate_b)
        assert gate_b.subscribe(SITE_EVENTS) < 0x80
        committed = journal.commit([passage(i) for i in range(records)])
        up = Uplink(journal, site=SITE, gate=GATE_A, host=site_broker.host, port=site_broker.port,
                    tls=pki.gate_a.tls(pki.ca_file), ack_mode="ingest", resend_after_s=resend_after_s,
                    backoff_min_s=0.1, backoff_max_s=0.5).start()
        wait_until(lambda: journal.backlog() == 0, 30, "the ingest's acks through the bridge")
        yield ingest, journal, gate_b, committed
    finally:
        if up is not None:
            up.stop()
        ingest.stop()
        journal.close()


def test_a_gate_s_uplink_through_the_site_broker_gets_every_event_acknowledged_by_the_ingest(
        pki, regional, site_broker, peers, tmp_path):
    """The production path: gate A's real uplink (ack_mode "ingest") on the site broker, the
    reference ingest on the regional broker. Events cross the bridge out, the ingest's acks
    cross it in, and the journal empties; events made while the regional broker is down reach
    gate B at once and the ingest once the region is back, each stored once."""
    from tests.broker import passage

    # resend_after_s short: the first events may reach the regional broker before the
    # bridge has subscribed there for the acks, or before the ingest is back.
    with site_uplink(pki, regional, site_broker, peers, tmp_path, records=10,
                     resend_after_s=2) as (ingest, journal, gate_b, committed):
        regional.stop()
        committed += journal.commit([passage(i) for i in range(10, 20)])
        wait_until(lambda: {json.loads(p)["seq"] for _, p in gate_b.got(A["events"])}
                   >= {r["seq"] for r in committed}, 10, "gate B to get gate A's events, region away")
        assert journal.backlog() == 10  # nobody acknowledged them
        regional.start()
        wait_until(lambda: journal.backlog() == 0, 60, "the events made meanwhile to be stored and acked")
        assert [e["seq"] for e in ingest.events(SITE, GATE_A)] == [r["seq"] for r in committed]


def test_the_site_broker_file_runs_included_by_debian_s_mosquitto_conf(pki, regional, tmp_path, peers):
    """As docs/site-broker.md installs it: /etc/mosquitto/conf.d/site-broker.conf under Debian's
    mosquitto.conf (persistence, log file, include_dir); its bridge connects to the region."""
    import subprocess

    from tests.broker import free_port, mosquitto_path

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "acl.conf").write_text(BROKER_ACL.read_text())
    port = free_port()
    (tmp_path / "conf.d" / "site-broker.conf").write_text(
        render_site_conf(pki, tmp_path, port, regional.port, broker_plugin(), standalone=False))
    log = tmp_path / "mosquitto.log"
    main = tmp_path / "mosquitto.conf"
    main.write_text(f"pid_file {tmp_path}/mosquitto.pid\npersistence true\n"
                    f"persistence_location {tmp_path}/data/\nlog_dest file {log}\n"
                    f"include_dir {tmp_path}/conf.d\nuser {getpass.getuser()}\n")
    receiver = peers(regional, pki.regional, port=regional.services_port)
    assert receiver.subscribe(f"gate/v1/{SITE}/+/status", no_local=False) < 0x80
    proc = subprocess.Popen([mosquitto_path(), "-c", str(main)], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: proc.poll() is not None or "running" in (log.read_text() if log.exists() else ""),
                   60, "mosquitto to start")
        assert proc.poll() is None, log.read_text()
        site = SimpleNamespace(host="127.0.0.1", port=port, pki=pki)  # what peers() needs
        gate_b = peers(site, pki.gate_b)
        bridged(gate_b, B["status"], b'{"v": 1, "state": "online"}', receiver)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def test_without_its_block_in_the_regional_acl_the_bridge_carries_nothing_and_the_region_logs_why(
        pki, tmp_path, peers):
    """docs/site-broker.md, "When something is wrong": the regional ACL lacks the school's block.
    The bridge connects, but its subscriptions are refused (logged with its identity) and its
    publishes too: nothing of the school reaches the region, nothing of the region the school."""
    regional = GateBroker(tmp_path / "regional", pki).start()  # the shipped ACL alone
    site = SiteBroker(tmp_path / "site", pki, regional).start()
    try:
        refusal = f'refused subscription "gate/v1/{SITE}/+/acl" for client "{SITE}/site-broker"'
        wait_until(lambda: refusal in regional.log_text(), 20, "the bridge's refused subscription")
        server = peers(regional, pki.regional, port=regional.services_port)
        assert server.subscribe(f"gate/v1/{SITE}/+/status", no_local=False) < 0x80
        gate_b = peers(site, pki.gate_b)
        assert gate_b.subscribe(B["acl"]) < 0x80
        assert gate_b.publish(B["status"], b'{"state": "online"}') < 0x80
        assert server.publish(B["acl"], b'{"version": "v-1"}') == NO_SUBSCRIBERS
        assert not server.wait_for(lambda: server.messages, 1.0)
        assert not gate_b.messages
    finally:
        site.stop()
        regional.stop()


def test_the_events_waiting_for_the_region_survive_a_restart_of_the_site_broker(
        pki, regional, site_broker, peers):
    """The bridge's local session and its queue are persistent (local_cleansession false, and
    persistence on as Debian's mosquitto.conf sets it): an orderly restart of the site broker
    while the region is away loses nothing."""
    receiver = peers(regional, pki.ingest, port=regional.services_port, clean_start=False,
                     session_expiry=SESSION_EXPIRY_S)
    assert receiver.subscribe("gate/v1/+/+/events", no_local=False) < 0x80
    gate_b = peers(site_broker, pki.gate_b)
    bridged(gate_b, B["events"], event(GATE_B, 0), receiver)
    receiver.disconnect()
    regional.stop()
    made = [(B["events"], event(GATE_B, n)) for n in range(1, 6)]
    for topic, payload in made:
        assert gate_b.publish(topic, payload) < 0x80
    gate_b.disconnect()
    site_broker.stop()
    site_broker.start()
    regional.start()
    receiver.messages.clear()
    receiver.connect()
    wait_until(lambda: made[-1] in receiver.got(), 30, "the queued events after the restart")
    # QoS 1 is at least once: event 0, delivered before the receiver went away, may come
    # again if its PUBACK was still on the way (seen under load); the queued ones come in order.
    assert [m for m in receiver.got() if m != (B["events"], event(GATE_B, 0))] == made


def test_an_uplink_on_the_site_broker_backs_off_its_resends_while_the_region_is_away(
        pki, regional, site_broker, peers, tmp_path):
    """docs/site-broker.md, "While the internet link is down": the site broker still answers
    PUBACK but no ingest ack comes back, so gate A's uplink sends its unacknowledged events
    again, and gate B gets every copy. Each resend round that brings no ack waits twice as long
    as the one before (agent/uplink/window.py), so an outage of E seconds after the last ack
    costs each event at most 2 + log2(E / resend_after_s) copies at the sibling (the first
    send and the rounds), not one per resend_after_s. Once the region is back the ingest
    stores each event once and the journal empties."""
    import collections
    import math
    import time

    from tests.broker import passage

    resend_s, outage_s = 1.0, 8.0
    with site_uplink(pki, regional, site_broker, peers, tmp_path, records=5,
                     resend_after_s=resend_s) as (ingest, journal, gate_b, committed):
        # The uplink's last ack progress comes after this mark: the ack for the record below.
        mark = time.monotonic()
        committed += journal.commit([passage(5)])
        wait_until(lambda: journal.backlog() == 0, 30, "the ack for the last record before the outage")
        regional.stop()
        during = journal.commit([passage(i) for i in range(6, 26)])
        ids = {r["id"] for r in during}
        time.sleep(outage_s)
        at_b = collections.Counter(json.loads(p)["id"] for _, p in gate_b.got(A["events"]))
        elapsed = time.monotonic() - mark
        copies = {i: at_b[i] for i in ids}
        assert journal.backlog() == len(during)  # nobody acknowledged them
        assert min(copies.values()) >= 1, "gate B did not get every event with the region away"
        bound = 2 + math.floor(math.log2(elapsed / resend_s))
        assert max(copies.values()) <= bound, (
            f"gate B got up to {max(copies.values())} copies of an event in {elapsed:.1f} s "
            f"without an ack (resend_after_s {resend_s}); backed-off resends allow {bound}")
        regional.start()
        wait_until(lambda: journal.backlog() == 0, 60, "the events made meanwhile to be stored and acked")
        assert [e["seq"] for e in ingest.events(SITE, GATE_A)] == [r["seq"] for r in committed + during]
