"""A big PUBLISH reaches on_message without paho's copies (agent.mqttclient).

paho 2.2 copies a received payload several times under the interpreter lock;
a PUBLISH of BIG_PUBLISH_BYTES or more is decoded by agent.mqttclient instead
and handed over as the bytearray it was read into. These tests hold that
decoder to paho's own, field by field, and send big and small messages
through a real mosquitto.
"""
from __future__ import annotations

import os
import threading

import pytest

from agent.mqttclient import BIG_PUBLISH_BYTES, _install_big_publish, new_client

paho_packet = pytest.importorskip("paho.mqtt._packet")
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import broker, make_broker  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not _install_big_publish(),
                                reason="this paho has no _packet.decode_publish to stand in for")


def _paho_decode(header, packet, protocol):
    """paho's own decoder (the one the stand-in wraps)."""
    return paho_packet.decode_publish.paho(header, packet, protocol)


def _publish_packet(topic: bytes, payload: bytes, qos: int, props: Properties | None) -> bytes:
    """A PUBLISH's variable header and payload, as paho has it after the fixed header."""
    out = len(topic).to_bytes(2, "big") + topic
    if qos:
        out += (4711).to_bytes(2, "big")
    out += props.pack() if props is not None else b"\x00"  # MQTT 5: a properties length, 0
    return out + payload


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("with_props", [False, True])
@pytest.mark.parametrize("size", [10, BIG_PUBLISH_BYTES + 3])
def test_the_stand_in_decodes_as_paho_does(qos, with_props, size):
    props = None
    if with_props:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("k", "v" * 300), ("sig", "x")]
        props.ContentType = "application/json"
        props.MessageExpiryInterval = 3600
    payload = os.urandom(size)
    raw = _publish_packet(b"gate/v1/s1/g1/acl", payload, qos, props)
    header = 0x30 | (qos << 1) | 0x01
    want = _paho_decode(header, bytearray(raw), MQTTProtocolVersion.MQTTv5)
    got = paho_packet.decode_publish(header, bytearray(raw), MQTTProtocolVersion.MQTTv5)
    assert (got.dup, got.qos, got.retain, got.topic, got.mid) == (want.dup, want.qos, want.retain,
                                                                  want.topic, want.mid)
    assert bytes(got.payload) == bytes(want.payload) == payload
    assert str(got.properties) == str(want.properties)
    # Big: the very buffer read from the socket, no copy; small: paho's own result.
    assert isinstance(got.payload, bytearray) == (len(raw) >= BIG_PUBLISH_BYTES)


def test_a_malformed_big_packet_is_left_to_paho():
    raw = bytearray((60000).to_bytes(2, "big") + b"t" * (BIG_PUBLISH_BYTES - 10))  # topic past the end
    with pytest.raises(Exception) as theirs:
        _paho_decode(0x32, bytearray(raw), MQTTProtocolVersion.MQTTv5)
    with pytest.raises(type(theirs.value)):
        paho_packet.decode_publish(0x32, raw, MQTTProtocolVersion.MQTTv5)


def test_big_and_small_messages_arrive_whole_through_mosquitto(broker):  # noqa: F811
    got: list = []
    done = threading.Event()

    def on_message(client, userdata, message):
        got.append((message.topic, message.payload, message.qos,
                    getattr(message.properties, "UserProperty", None)))
        if len(got) == 3:
            done.set()

    sub = new_client("sub-big")
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    pub = new_client("pub-big")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        sub.subscribe("big/#", qos=1)
        assert subscribed.wait(10)
        big = os.urandom(3 * BIG_PUBLISH_BYTES)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("n", "1")]
        for topic, payload, qos in (("big/a", big, 1), ("big/b", b"small", 1), ("big/c", big[:BIG_PUBLISH_BYTES], 0)):
            pub.publish(topic, payload, qos=qos, properties=props).wait_for_publish(10)
        assert done.wait(20), got
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    by_topic = {t: (p, q, up) for t, p, q, up in got}
    assert bytes(by_topic["big/a"][0]) == big and isinstance(by_topic["big/a"][0], bytearray)
    assert by_topic["big/b"][0] == b"small" and isinstance(by_topic["big/b"][0], bytes)
    assert bytes(by_topic["big/c"][0]) == big[:BIG_PUBLISH_BYTES]
    assert [by_topic[t][1] for t in ("big/a", "big/b", "big/c")] == [1, 1, 0]
    assert all(by_topic[t][2] == [("n", "1")] for t in by_topic)
