# ruff: noqa: F811 - pytest fixtures imported from tests.pki, used as arguments
"""Per-device identity: the repository's mosquitto config (mutual TLS, the
certificate's CN as username, pattern ACLs on %u) against a real mosquitto
and a test CA made here.

Gate A ("school-17/main") may write only its own events/status/telemetry
and replies, and read only its own acl/cmd/ack; it cannot publish into gate
B's topics (PUBACK 0x87, not authorised), forge commands, or receive gate
B's commands. Revoked, foreign and missing certificates never get an MQTT
session.
"""
from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from agent.contract import topics
from agent.tools_regional import Session, collect_status
from tests.pki import GATE_A, GATE_B, SITE, TestCA, gate_broker, pki  # noqa: F401  (fixtures)

NOT_AUTHORISED = 0x87
A, B = topics(SITE, GATE_A), topics(SITE, GATE_B)


def session(broker, identity, pki) -> Session:
    return Session(broker.host, broker.port, tls=identity.tls(pki.ca_file), timeout=10)


@pytest.fixture
def as_(gate_broker, pki):
    """``as_(identity)``: a connected Session presenting that certificate; closed at the end."""
    made: list[Session] = []

    def connect(identity) -> Session:
        s = session(gate_broker, identity, pki)
        made.append(s)
        return s

    yield connect
    for s in made:
        s.close()


def test_a_gate_publishes_on_its_own_topics(as_, pki):
    gate_a = as_(pki.gate_a)
    for name in ("events", "status", "telemetry"):
        assert gate_a.publish(A[name], b"{}") < 0x80, name
    assert gate_a.publish(f"gate/v1/{SITE}/{GATE_A}/reply/x1", b"{}") < 0x80


@pytest.mark.parametrize("name", ["events", "status", "telemetry"])
def test_gate_a_cannot_publish_into_gate_b_topics(as_, pki, name):
    gate_a = as_(pki.gate_a)
    assert gate_a.publish(B[name], b'{"forged": true}') == NOT_AUTHORISED


@pytest.mark.parametrize("name", ["cmd", "acl", "ack"])
def test_a_gate_cannot_publish_commands_lists_or_acks_even_to_itself(as_, pki, name):
    gate_a = as_(pki.gate_a)
    assert gate_a.publish(A[name], b"{}") == NOT_AUTHORISED


def test_gate_a_does_not_receive_gate_b_commands_or_lists(as_, pki):
    gate_a, gate_b, server = as_(pki.gate_a), as_(pki.gate_b), as_(pki.regional)
    for topic in (B["cmd"], B["acl"], "gate/v1/#"):
        gate_a.subscribe(topic)  # mosquitto may grant it; it must deliver nothing of B's
    gate_a.subscribe(A["cmd"])
    gate_b.subscribe(B["cmd"])
    gate_b.subscribe(B["acl"])
    assert server.publish(B["cmd"], b'{"to": "B"}') < 0x80
    assert server.publish(B["acl"], b'{"to": "B"}') < 0x80
    assert server.publish(A["cmd"], b'{"to": "A"}') < 0x80
    # Gate B gets its two; gate A gets its own command (so it was listening) and nothing else.
    assert gate_b.wait_for(lambda: len(gate_b.messages) >= 2, 10)
    assert gate_a.wait_for(lambda: any(m.topic == A["cmd"] for m in gate_a.messages), 10)
    time.sleep(0.2)  # anything misrouted would have arrived with the rest
    assert sorted(m.topic for m in gate_b.messages) == sorted([B["cmd"], B["acl"]])
    # (twice: through "gate/v1/#" and through its own topic; both are its own)
    assert {(m.topic, m.payload) for m in gate_a.messages} == {(A["cmd"], b'{"to": "A"}')}


def test_the_server_sends_commands_and_reads_replies_and_status(as_, pki):
    gate_a, server = as_(pki.gate_a), as_(pki.regional)
    reply_topic = f"gate/v1/{SITE}/{GATE_A}/reply/r1"
    server.subscribe(reply_topic)
    gate_a.publish(A["status"], json.dumps({"v": 1, "state": "online"}).encode())
    assert gate_a.publish(reply_topic, b'{"result": "done"}') < 0x80
    assert server.wait_for(lambda: any(m.topic == reply_topic for m in server.messages), 10)
    # The server may not write into a gate's own topics.
    assert server.publish(A["events"], b"{}") == NOT_AUTHORISED


def test_fleet_status_lists_the_retained_status_of_each_gate(as_, pki, gate_broker):
    for ident, gate in ((pki.gate_a, GATE_A), (pki.gate_b, GATE_B)):
        s = as_(ident)
        birth = {"v": 1, "state": "online", "version": "0.1.0", "fastpath": "compiled",
                 "acl_version": f"v-{gate}", "started_at": "2026-09-01T05:02:11.480Z"}
        s.client.publish(topics(SITE, gate)["status"], json.dumps(birth), qos=1,
                         retain=True).wait_for_publish(5)
    rows = collect_status(as_(pki.regional), SITE)
    assert [(r["site"], r["gate"], r["acl_version"]) for r in rows] == [
        (SITE, GATE_A, f"v-{GATE_A}"), (SITE, GATE_B, f"v-{GATE_B}")]
    # The same through `gate-agent fleet status`: a header and one line per gate.
    import io
    from contextlib import redirect_stdout

    from agent.tools_regional import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["fleet", "status", "--host", gate_broker.host, "--port", str(gate_broker.port),
                     "--tls-ca", str(pki.ca_file), "--tls-cert", str(pki.regional.cert),
                     "--tls-key", str(pki.regional.key), "--wait", "3"])
    assert code == 0
    header, *lines = out.getvalue().splitlines()
    assert header.split() == ["site", "gate", "state", "version", "fastpath", "acl_version", "started_at"]
    assert [line.split()[:3] for line in lines[:2]] == [[SITE, GATE_A, "online"], [SITE, GATE_B, "online"]]
    assert lines[-1] == "2 gate(s), 2 online"


def test_the_ingest_identity_reads_events_and_writes_acks_only(as_, pki):
    ingest = as_(pki.ingest)
    assert ingest.publish(A["ack"], b'{"journal": "j", "upto": 1}') < 0x80
    assert ingest.publish(A["cmd"], b"{}") == NOT_AUTHORISED


# --- TLS handshake refusals -------------------------------------------------------------------


def _handshake(broker, ca_file, cert=None, key=None, max_version=ssl.TLSVersion.TLSv1_2) -> bytes:
    """TLS handshake then an MQTT 5 CONNECT; returns the first bytes read (a CONNACK)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.maximum_version = max_version
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    with (socket.create_connection((broker.host, broker.port), timeout=5) as raw,
          ctx.wrap_socket(raw, server_hostname="localhost") as tls):
        # CONNECT: protocol "MQTT" v5, clean start, keepalive 30, no properties, empty client id.
        tls.sendall(bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([5, 0x02, 0, 30, 0, 0, 0]))
        return tls.recv(16)


def test_a_valid_certificate_gets_a_connack(gate_broker, pki):
    assert _handshake(gate_broker, pki.ca_file, pki.gate_a.cert, pki.gate_a.key)[:1] == b"\x20"


def test_a_revoked_certificate_is_refused_at_the_tls_handshake(gate_broker, pki):
    # TLS 1.2: the broker's verdict comes inside the handshake itself.
    with pytest.raises(ssl.SSLError, match="(?i)revoked"):
        _handshake(gate_broker, pki.ca_file, pki.revoked.cert, pki.revoked.key)
    # TLS 1.3 reports a client certificate failure after the client's side completes:
    # the connection is closed before any CONNACK.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        got = _handshake(gate_broker, pki.ca_file, pki.revoked.cert, pki.revoked.key,
                         max_version=ssl.TLSVersion.TLSv1_3)
        if not got:
            raise ConnectionError("closed without a CONNACK")
    assert "certificate verify failed" in gate_broker.log_text()


def test_a_client_without_a_certificate_is_refused(gate_broker, pki):
    with pytest.raises(ssl.SSLError, match="(?i)handshake failure|certificate required"):
        _handshake(gate_broker, pki.ca_file)


def test_a_certificate_from_another_ca_is_refused(gate_broker, pki, tmp_path):
    rogue = TestCA(tmp_path / "rogue").issue(f"{SITE}/{GATE_B}")  # claims to be gate B
    with pytest.raises(ssl.SSLError):
        _handshake(gate_broker, pki.ca_file, rogue.cert, rogue.key)


def test_the_gate_uplink_connects_with_its_certificate(gate_broker, pki, tmp_path):
    from agent.uplink.journal import Journal
    from agent.uplink.mqtt import Uplink

    journal = Journal(tmp_path / "journal.db")
    up = Uplink(journal, site=SITE, gate=GATE_A, host=gate_broker.host, port=gate_broker.port,
                tls=pki.gate_a.tls(pki.ca_file), ack_mode="broker", backoff_min_s=0.1,
                backoff_max_s=0.5).start()
    try:
        server = session(gate_broker, pki.regional, pki)
        try:
            rows = []
            deadline = time.monotonic() + 10
            while not any(r["gate"] == GATE_A and r.get("state") == "online" for r in rows):
                assert time.monotonic() < deadline, "gate A's birth record never arrived"
                rows = collect_status(server, SITE, max_s=1.0)
                server.messages.clear()
        finally:
            server.close()
    finally:
        up.stop()
        journal.close()
