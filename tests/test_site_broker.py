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

import json
import re
import threading
from pathlib import Path

import pytest

from agent.contract import topics
from tests.broker import wait_until
from tests.pki import (  # noqa: F401  (fixtures)
    BROKER_ACL,
    GATE_A,
    GATE_B,
    SITE,
    GateBroker,
    Identity,
    Pki,
    gate_broker,
    pki,
)

NOT_AUTHORISED = 0x87
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
