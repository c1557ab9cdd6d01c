# ruff: noqa: F811 - pytest fixtures imported from tests.pki, used as arguments
"""Per-device identity: the repository's mosquitto config (mutual TLS, the
certificate's CN as username and client id, pattern ACLs on %u, the gate_acl
plugin) against a real mosquitto and a test CA made here.

Gate A ("school-17/main") may write only its own events/status/telemetry
and replies, and read only its own acl/cmd/ack; it cannot publish into gate
B's topics (PUBACK 0x87, not authorised), forge commands, or receive gate
B's commands. It may subscribe to nothing else (SUBACK 0x87): no shared
subscription, so it cannot stall the ingest by taking its share of the
events. No certificate can take over gate A's session on any listener.
Revoked, foreign and missing certificates never get an MQTT session.

Gates connect on the gates' listener (``gate_broker.port``, 8883 as
shipped), the regional services on theirs (``services_port``, 8884).
"""
from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from agent.contract import topics
from agent.regional.tools import Session, ToolError, collect_status
from tests.broker import passage, wait_until
from tests.pki import (  # noqa: F401  (fixtures)
    BROKER_ACL,
    BROKER_CONF,
    GATE_A,
    GATE_B,
    SITE,
    TestCA,
    gate_broker,
    pki,
)

NOT_AUTHORISED = 0x87
A, B = topics(SITE, GATE_A), topics(SITE, GATE_B)
INGEST_SHARE = "$share/ingest/gate/v1/+/+/events"


def port_for(broker, identity) -> int:
    """Gates ("{site}/{gate}") on the gates' listener, the regional services on theirs."""
    return broker.port if "/" in identity.name else broker.services_port


def session(broker, identity, pki, port: int | None = None) -> Session:
    return Session(broker.host, port or port_for(broker, identity), tls=identity.tls(pki.ca_file),
                   timeout=10)


@pytest.fixture
def as_(gate_broker, pki):
    """``as_(identity)``: a connected Session presenting that certificate; closed at the end."""
    made: list[Session] = []

    def connect(identity, port: int | None = None) -> Session:
        s = session(gate_broker, identity, pki, port)
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
        gate_a.subscribe(topic)  # refused (below); were it granted, it must deliver nothing of B's
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

    from agent.regional.tools import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["fleet", "status", "--host", gate_broker.host, "--port", str(gate_broker.services_port),
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


LISTENERS = ["gates", "services"]


def listener_port(broker, listener: str) -> int:
    return broker.port if listener == "gates" else broker.services_port


def _handshake(broker, ca_file, cert=None, key=None, max_version=ssl.TLSVersion.TLSv1_2,
               port: int | None = None) -> bytes:
    """TLS handshake then an MQTT 5 CONNECT; returns the first bytes read (a CONNACK)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.maximum_version = max_version
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    with (socket.create_connection((broker.host, port or broker.port), timeout=5) as raw,
          ctx.wrap_socket(raw, server_hostname="localhost") as tls):
        # CONNECT: protocol "MQTT" v5, clean start, keepalive 30, no properties, empty client id.
        tls.sendall(bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([5, 0x02, 0, 30, 0, 0, 0]))
        return tls.recv(16)


def test_a_valid_certificate_gets_a_connack(gate_broker, pki):
    assert _handshake(gate_broker, pki.ca_file, pki.gate_a.cert, pki.gate_a.key)[:1] == b"\x20"
    got = _handshake(gate_broker, pki.ca_file, pki.ingest.cert, pki.ingest.key, port=gate_broker.services_port)
    assert got[:1] == b"\x20" and got[3] == 0  # CONNACK, success


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_revoked_certificate_is_refused_at_the_tls_handshake(gate_broker, pki, listener):
    port = listener_port(gate_broker, listener)
    # TLS 1.2: the broker's verdict comes inside the handshake itself.
    with pytest.raises(ssl.SSLError, match="(?i)revoked"):
        _handshake(gate_broker, pki.ca_file, pki.revoked.cert, pki.revoked.key, port=port)
    # TLS 1.3 reports a client certificate failure after the client's side completes:
    # the connection is closed before any CONNACK.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        got = _handshake(gate_broker, pki.ca_file, pki.revoked.cert, pki.revoked.key,
                         max_version=ssl.TLSVersion.TLSv1_3, port=port)
        if not got:
            raise ConnectionError("closed without a CONNACK")
    assert "certificate verify failed" in gate_broker.log_text()


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_client_without_a_certificate_is_refused(gate_broker, pki, listener):
    with pytest.raises(ssl.SSLError, match="(?i)handshake failure|certificate required"):
        _handshake(gate_broker, pki.ca_file, port=listener_port(gate_broker, listener))


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_certificate_from_another_ca_is_refused(gate_broker, pki, tmp_path, listener):
    rogue = TestCA(tmp_path / "rogue").issue("regional-ingest")  # claims to be the ingest
    with pytest.raises(ssl.SSLError):
        _handshake(gate_broker, pki.ca_file, rogue.cert, rogue.key, port=listener_port(gate_broker, listener))


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


# --- subscriptions (the gate_acl plugin) --------------------------------------------------------


def verdicts(s: Session, filters: list[str]) -> dict[str, str]:
    """Subscribe to each filter; "granted" or "refused" (SUBACK reason code >= 0x80) for each."""
    return {f: "refused" if s.subscribe(f) >= 0x80 else "granted" for f in filters}


# Its own site's events are its to read too (tests/test_site_broker.py).
GATE_A_MAY = [A["ack"], A["acl"], A["cmd"], f"gate/v1/{SITE}/+/events", A["events"]]
GATE_A_MAY_NOT = [
    INGEST_SHARE,  # the stall of issue 9
    "$share/x/gate/v1/#",
    f"$share/ingest/{A['cmd']}",  # even its own topic, shared
    "#", "+/#", "$SYS/#",
    "gate/v1/+/+/events", "gate/v1/#", f"gate/v1/{SITE}/+/cmd",
    B["cmd"], B["acl"], B["ack"],
    A["status"],  # its own, but it writes it; it may not read it
    f"gate/v1/{SITE}/{GATE_A}/#",  # covers its events too
    f"gate/v1/{SITE}/{GATE_A}/+",
]


def test_a_gate_may_subscribe_to_its_own_ack_acl_cmd_and_site_events_and_nothing_else(as_, pki):
    gate_a = as_(pki.gate_a)
    got = verdicts(gate_a, GATE_A_MAY + GATE_A_MAY_NOT)
    assert got == {**dict.fromkeys(GATE_A_MAY, "granted"), **dict.fromkeys(GATE_A_MAY_NOT, "refused")}


def test_the_services_may_subscribe_to_what_they_read_and_only_the_ingest_to_its_share(as_, pki):
    ingest, server = as_(pki.ingest), as_(pki.regional)
    assert verdicts(ingest, [INGEST_SHARE, "gate/v1/+/+/events", f"$share/ingest/gate/v1/{SITE}/+/events",
                             "$share/other/gate/v1/+/+/events", "$share/ingest/gate/v1/#",
                             "$share/ingest/#", "#", "gate/v1/+/+/cmd", "gate/v1/+/+/ack"]) == {
        INGEST_SHARE: "granted", "gate/v1/+/+/events": "granted",
        f"$share/ingest/gate/v1/{SITE}/+/events": "granted",
        "$share/other/gate/v1/+/+/events": "refused", "$share/ingest/gate/v1/#": "refused",
        "$share/ingest/#": "refused", "#": "refused", "gate/v1/+/+/cmd": "refused",
        "gate/v1/+/+/ack": "refused"}
    assert verdicts(server, ["gate/v1/+/+/status", f"gate/v1/{SITE}/+/status", "gate/v1/+/+/reply/#",
                             f"gate/v1/{SITE}/{GATE_A}/reply/r1", A["events"], INGEST_SHARE,
                             "gate/v1/+/+/ack", "gate/v1/#"]) == {
        "gate/v1/+/+/status": "granted", f"gate/v1/{SITE}/+/status": "granted",
        "gate/v1/+/+/reply/#": "granted", f"gate/v1/{SITE}/{GATE_A}/reply/r1": "granted",
        A["events"]: "granted", INGEST_SHARE: "refused", "gate/v1/+/+/ack": "refused",
        "gate/v1/#": "refused"}


def test_a_refused_subscription_leaves_the_session_working(as_, pki):
    gate_a, server = as_(pki.gate_a), as_(pki.regional)
    assert gate_a.subscribe("#") == NOT_AUTHORISED
    assert gate_a.subscribe(A["cmd"]) < 0x80
    assert server.publish(A["cmd"], b'{"after": "refusal"}') < 0x80
    assert gate_a.wait_for(lambda: any(m.topic == A["cmd"] for m in gate_a.messages), 10)


def test_malformed_identities_and_filters_are_refused_and_the_broker_lives_on(as_, pki, gate_broker):
    # A CN holding a wildcard must not widen its own pattern ("gate/v1/%u/cmd").
    for cn, wide in ((f"{SITE}/+", f"gate/v1/{SITE}/+/cmd"), (f"{SITE}/#", f"gate/v1/{SITE}/#"),
                     ("+/+", "gate/v1/+/+/cmd"), (f"{SITE}/", f"gate/v1/{SITE}/+/cmd")):
        s = as_(pki.ca.issue(cn))
        assert s.subscribe(wide) == NOT_AUTHORISED, cn
    gate_a = as_(pki.gate_a)
    # Long and deep, within mosquitto's own limits (65,535 bytes; it drops a client whose
    # filter has more than 200 levels before any ACL check).
    long_filters = [
        "gate/v1/" + "/".join(["a" * 300] * 190) + "/cmd",  # 57 KB
        "/".join(["+"] * 199),
        f"gate/v1/{SITE}/{GATE_A}/cmd" + "/x" * 190,
        "$share/" + "g" * 60_000 + "/gate/v1/+/+/events",
        "$share/ingest/" + "+/" * 190 + "#",
        f"$share/ingest/gate/v1/{SITE}/{GATE_A}/" + "c" * 60_000,
        f"gate/v1/{SITE}//cmd", "/", "//#", "$share/ingest/", "$share//gate/v1/+/+/events",
    ]
    for f in long_filters:
        assert gate_a.subscribe(f) == NOT_AUTHORISED, f[:40]
    assert gate_a.subscribe(A["cmd"]) < 0x80  # still connected, still served
    # No client the broker had identified was dropped. A connection it never identified may
    # log "<unknown> disconnected: Protocol error": the start's port probes open and close
    # bare TCP connections on the TLS listeners (seen under load).
    dropped = [ln for ln in gate_broker.log_text().splitlines()
               if "disconnect" in ln and "<unknown>" not in ln]
    assert dropped == []


def test_a_gate_in_the_ingest_share_cannot_stall_the_ingest(gate_broker, pki, tmp_path):
    """Gate B's certificate tries the ingest's shared subscription on every listener (and the
    regional server tries it too) while gate A sends 40 events: every one is stored and acked.
    Resends are pushed out of reach (resend_after_s=600), so an event handed to a rogue
    subscriber and dropped there would never be acked within the test."""
    from agent.regional.ingest import Ingest
    from agent.uplink.journal import Journal
    from agent.uplink.mqtt import Uplink

    ingest = Ingest(gate_broker.host, gate_broker.services_port, db_path=tmp_path / "ingest.db",
                    tls=pki.ingest.tls(pki.ca_file), client_id="ingest-1").start()
    rogues: list[Session] = []
    journal = Journal(tmp_path / "journal.db")
    up = None
    try:
        assert ingest.ready.wait(10), "the ingest did not get its shared subscription"
        for ident in (pki.gate_b, pki.regional):
            for port in gate_broker.ports.values():
                try:
                    rogue = session(gate_broker, ident, pki, port)
                except ToolError:
                    continue  # refused at CONNECT (a gate on the services' listener)
                rogues.append(rogue)
                rogue.subscribe(INGEST_SHARE)
        assert rogues, "no rogue connection at all: the test would prove nothing"
        committed = journal.commit([passage(i) for i in range(40)])
        up = Uplink(journal, site=SITE, gate=GATE_A, host=gate_broker.host, port=gate_broker.port,
                    tls=pki.gate_a.tls(pki.ca_file), ack_mode="ingest", window=5,
                    resend_after_s=600, backoff_min_s=0.1, backoff_max_s=0.5).start()
        wait_until(lambda: journal.backlog() == 0, 20, "the ingest to store and acknowledge all 40 events")
        assert [e["seq"] for e in ingest.events(SITE, GATE_A)] == [r["seq"] for r in committed]
        assert all(not r.messages for r in rogues), "a rogue subscriber received events"
    finally:
        if up is not None:
            up.stop()
        for r in rogues:
            r.close()
        ingest.stop()
        journal.close()


def test_two_ingests_with_one_certificate_run_side_by_side(gate_broker, pki, tmp_path):
    from agent.regional.ingest import Ingest
    from agent.uplink.journal import Journal
    from agent.uplink.mqtt import Uplink

    db = tmp_path / "ingest.db"
    ingests = [Ingest(gate_broker.host, gate_broker.services_port, db_path=db,
                      tls=pki.ingest.tls(pki.ca_file), client_id=f"ingest-{n}").start() for n in (1, 2)]
    journal = Journal(tmp_path / "journal.db")
    up = None
    try:
        assert all(i.ready.wait(10) for i in ingests)
        committed = journal.commit([passage(i) for i in range(40)])
        up = Uplink(journal, site=SITE, gate=GATE_A, host=gate_broker.host, port=gate_broker.port,
                    tls=pki.gate_a.tls(pki.ca_file), ack_mode="ingest", resend_after_s=600,
                    backoff_min_s=0.1, backoff_max_s=0.5).start()
        wait_until(lambda: journal.backlog() == 0, 20, "both ingests to store and acknowledge all 40")
        assert [e["seq"] for e in ingests[0].events(SITE, GATE_A)] == [r["seq"] for r in committed]
        assert all(i.received > 0 for i in ingests), "the shared subscription did not share"
        assert all(i.ready.is_set() for i in ingests), "an ingest lost its connection"
        assert "already connected" not in gate_broker.log_text()
    finally:
        if up is not None:
            up.stop()
        for i in ingests:
            i.stop()
        journal.close()


# --- client ids: the certificate's identity -----------------------------------------------------


class Client:
    """A paho MQTT 5 client presenting ``identity`` with the client id (and username) it asks
    for; records its CONNACK reason code and counts its disconnections."""

    def __init__(self, broker, port: int, identity, ca: Path, client_id: str,
                 username: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.connack: int | None = None
        self.disconnects = 0
        self._done = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=client_id)
        self.client.tls_set_context(identity.tls(ca).context())
        if username is not None:
            self.client.username_pw_set(username)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(broker.host, port, keepalive=30)
        self.client.loop_start()
        assert self._done.wait(10), f"no CONNACK for {identity.name} as {client_id!r}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code.value
        self._done.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnects += 1
        self._done.set()

    def publish(self, topic: str, payload: bytes) -> bool:
        """QoS 1; True once the broker acknowledged it (PUBACK) within 10 s."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return info.rc == 0 and info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_no_certificate_takes_over_a_gate_session_on_any_listener(gate_broker, pki):
    """Gate A connects as the agent does (client id "gate-school-17-main"); gate B, the regional
    server and the ingest then connect on every listener with each id gate A could hold, three
    times each. Gate A is never disconnected and publishes after every attempt."""
    agent_id = f"gate-{SITE}-{GATE_A}"
    a = Client(gate_broker, gate_broker.port, pki.gate_a, pki.ca_file, agent_id)
    connacks: list[int | None] = []
    try:
        assert a.connack == 0
        for port in gate_broker.ports.values():
            for ident in (pki.gate_b, pki.regional, pki.ingest):
                for stolen in (agent_id, f"{SITE}/{GATE_A}", f"{SITE}/{GATE_B}"):
                    for _ in range(3):
                        intruder = Client(gate_broker, port, ident, pki.ca_file, stolen)
                        connacks.append(intruder.connack)
                        intruder.close()
                        payload = json.dumps({"attempt": len(connacks)}).encode()
                        assert a.publish(A["events"], payload)
        assert a.disconnects == 0, "gate A lost its session to another certificate"
        assert a.client.is_connected()
        assert len(connacks) == 2 * 3 * 3 * 3
        # Gate B got no session on the services' listener (9), nor did a service asking for an
        # id with "/" there (2 identities x 2 ids x 3).
        assert connacks.count(NOT_AUTHORISED) == 9 + 12
    finally:
        a.close()
    # Mosquitto names a gate's session by its identity, whatever id the client asked for.
    sessions = re.findall(r"New client connected from \S+ as (.+) \(p\d, c\d, k\d+, u'(.+)'\)\.",
                          gate_broker.log_text())
    gates = {(cid, user) for cid, user in sessions if "/" in user}
    assert gates == {(f"{SITE}/{GATE_A}", f"{SITE}/{GATE_A}"), (f"{SITE}/{GATE_B}", f"{SITE}/{GATE_B}")}


def test_the_services_listener_admits_only_service_identities(gate_broker, pki):
    port = gate_broker.services_port
    made = []

    def connect(identity, client_id: str, username: str | None = None) -> Client:
        c = Client(gate_broker, port, identity, pki.ca_file, client_id, username)
        made.append(c)
        return c

    try:
        assert connect(pki.gate_a, "tools-1").connack == NOT_AUTHORISED
        assert connect(pki.ca.issue("regional-unknown"), "tools-2").connack == NOT_AUTHORISED
        assert connect(pki.regional, f"{SITE}/{GATE_A}").connack == NOT_AUTHORISED
        assert connect(pki.regional, "a+b").connack == NOT_AUTHORISED
        # A certificate without a CN, or with two (which one would count?), is no identity.
        assert connect(pki.ca.issue("no-cn", common_names=[]), "tools-4").connack == NOT_AUTHORISED
        two = pki.ca.issue("two", common_names=["school-17/main", "regional-server"])
        assert connect(two, "tools-5").connack == NOT_AUTHORISED
        # The username a client sends counts for nothing: the certificate says who it is.
        server = connect(pki.regional, "tools-3", username="regional-ingest")
        assert server.connack == 0
        assert server.publish(A["ack"], b'{"journal": "j", "upto": 1}')  # sent ...
        ack_reader = Session(gate_broker.host, gate_broker.port, tls=pki.gate_a.tls(pki.ca_file))
        try:
            assert ack_reader.subscribe(A["ack"]) < 0x80
            server.publish(A["ack"], b'{"journal": "j", "upto": 2}')
            ingest = connect(pki.ingest, "ingest-x")
            ingest.publish(A["ack"], b'{"journal": "j", "upto": 3}')
            assert ack_reader.wait_for(lambda: ack_reader.messages, 10)
            time.sleep(0.2)
            # ... but only the real ingest's ack reached the gate.
            assert [json.loads(m.payload)["upto"] for m in ack_reader.messages] == [3]
        finally:
            ack_reader.close()
    finally:
        for c in made:
            c.close()


def test_the_uplink_keeps_working_with_the_identity_as_client_id_and_reconnects(gate_broker, pki, tmp_path):
    from agent.uplink.journal import Journal
    from agent.uplink.mqtt import Uplink

    journal = Journal(tmp_path / "journal.db")
    up = Uplink(journal, site=SITE, gate=GATE_A, host=gate_broker.host, port=gate_broker.port,
                tls=pki.gate_a.tls(pki.ca_file), ack_mode="broker", backoff_min_s=0.1,
                backoff_max_s=0.5).start()
    try:
        journal.commit([passage(i) for i in range(5)])
        wait_until(lambda: journal.backlog() == 0, 10, "the first five events to go out")
        gate_broker.stop()
        journal.commit([passage(i) for i in range(5, 10)])
        gate_broker.start()
        wait_until(lambda: up.stats()["reconnects"] >= 1 and up.connected, 20, "the uplink to reconnect")
        wait_until(lambda: journal.backlog() == 0, 10, "the next five events to go out")
        assert up.stats()["acked"] == 10
        assert f" as {SITE}/{GATE_A} (" in gate_broker.log_text()
    finally:
        up.stop()
        journal.close()


# --- %s: a gate's own site (for the gates of a site sharing passages later) ---------------------


SITE_RULE = "pattern read gate/v1/%s/+/events\n"


def test_a_site_rule_added_at_a_reload_lets_a_gate_read_its_own_site_events(gate_broker, pki, as_):
    site_events = f"gate/v1/{SITE}/+/events"
    assert SITE_RULE in BROKER_ACL.read_text()  # shipped; taken out, then put back at a reload
    gate_broker.acl_file.write_text(BROKER_ACL.read_text().replace(SITE_RULE, ""))
    gate_broker.reload()
    gate_a = as_(pki.gate_a)
    wait_until(lambda: gate_a.subscribe(site_events) == NOT_AUTHORISED, 10, "the rules without it")
    gate_broker.acl_file.write_text(BROKER_ACL.read_text())
    gate_broker.reload()
    wait_until(lambda: gate_a.subscribe(site_events) < 0x80, 10, "the reloaded rules")
    other = as_(pki.ca.issue("school-99/gate"))
    assert other.subscribe(site_events) == NOT_AUTHORISED  # another site's gate
    assert other.subscribe("gate/v1/school-99/+/events") < 0x80
    assert verdicts(gate_a, ["gate/v1/+/+/events", "gate/v1/school-99/+/events",
                             f"$share/ingest/{site_events}"]) == dict.fromkeys(
        ["gate/v1/+/+/events", "gate/v1/school-99/+/events", f"$share/ingest/{site_events}"], "refused")
    # Delivered too: mosquitto cannot expand %s, the plugin answers those reads.
    gate_b = as_(pki.gate_b)
    assert gate_b.publish(B["events"], b'{"from": "B"}') < 0x80
    assert gate_a.wait_for(lambda: any(m.topic == B["events"] for m in gate_a.messages), 10)
    assert not other.wait_for(lambda: other.messages, 0.3)


def test_rules_that_do_not_load_grant_nothing(gate_broker, pki, as_, tmp_path):
    from tests.pki import GateBroker

    gate_a = as_(pki.gate_a)
    assert gate_a.subscribe(A["cmd"]) < 0x80
    # %s may not grant writing: mosquitto would take it literally. At a reload the plugin then
    # holds no rules (mosquitto's reading of the file failed as well, or it would not know).
    bad = BROKER_ACL.read_text() + "pattern write gate/v1/%s/+/x\n"
    gate_broker.acl_file.write_text(bad)
    gate_broker.reload()
    wait_until(lambda: "did not load at reload" in gate_broker.log_text(), 10, "the failed reload")
    assert "%s is for read rules only" in gate_broker.log_text()
    assert gate_a.subscribe(A["ack"]) == NOT_AUTHORISED
    with pytest.raises(ToolError):
        as_(pki.ingest)  # no service identity is known either
    gate_broker.acl_file.write_text(BROKER_ACL.read_text())
    gate_broker.reload()
    wait_until(lambda: gate_a.subscribe(A["ack"]) < 0x80, 10, "the repaired rules")
    assert as_(pki.ingest).subscribe(INGEST_SHARE) < 0x80
    # At start-up the broker does not start at all, and says why.
    for text, why in ((bad, "%s is for read rules only"), ("user\n", '"user" without a name'),
                      ("topic read gate/#/x\n", "not a valid topic filter"),
                      ("topic sometimes gate/x\n", "is not read, write")):
        broken = GateBroker(tmp_path / f"broken{len(why)}", pki, acl=text)
        with pytest.raises(RuntimeError):
            broken.start(timeout=5)
        assert why in broken.log_text()


# --- the shipped configuration ------------------------------------------------------------------


def _conf_blocks(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(global options, one dict per listener) of a mosquitto config without comments."""
    glob: dict[str, str] = {}
    listeners: list[dict[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            listeners.append({"listener": value})
        elif listeners:
            listeners[-1][key] = value
        else:
            glob[key] = value
    return glob, listeners


def test_every_shipped_listener_binds_sessions_to_certificates():
    glob, listeners = _conf_blocks(BROKER_CONF.read_text())
    assert glob["per_listener_settings"] == "false" and glob["allow_anonymous"] == "false"
    # The plugin reads the very file mosquitto reads: one list of rules.
    assert glob["plugin_opt_acl_file"] == glob["acl_file"]
    assert glob["plugin"].endswith("/gate_acl.so")
    for lst in listeners:
        assert lst.get("require_certificate") == "true" and "crlfile" in lst, lst
        # Either the client id is the certificate's CN (the gates), or the plugin checks the
        # identity (no use_identity_as_username, so mosquitto asks it): nothing else.
        bound = lst.get("use_identity_as_username") == "true" and lst.get("use_username_as_clientid") == "true"
        by_plugin = "use_identity_as_username" not in lst and "use_username_as_clientid" not in lst
        assert bound or by_plugin, lst
        assert "psk_hint" not in lst and "use_subject_as_username" not in lst, lst
    assert sorted(int(lst["listener"].split()[0]) for lst in listeners) == [8883, 8884]
    # The services' identities are the "user" blocks; none may look like a gate.
    users = re.findall(r"^user (.+)$", BROKER_ACL.read_text(), re.MULTILINE)
    assert users and all("/" not in u for u in users)


def test_the_shipped_file_runs_included_by_debian_s_mosquitto_conf(pki, tmp_path):
    """As installed (docs/security.md): /etc/mosquitto/conf.d/gate-broker.conf under Debian's
    mosquitto.conf, which sets persistence and the log file itself."""
    import getpass
    import subprocess

    from tests.broker import free_port, mosquitto_path
    from tests.pki import broker_plugin, render_broker_conf

    plugin = broker_plugin()
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "acl.conf").write_text(BROKER_ACL.read_text())
    ports = {8883: free_port(), 8884: free_port()}
    (tmp_path / "conf.d" / "gate-broker.conf").write_text(
        render_broker_conf(pki, tmp_path, ports, plugin, standalone=False))
    log = tmp_path / "mosquitto.log"
    main = tmp_path / "mosquitto.conf"
    main.write_text(f"pid_file {tmp_path}/mosquitto.pid\npersistence true\n"
                    f"persistence_location {tmp_path}/data/\nlog_dest file {log}\n"
                    f"include_dir {tmp_path}/conf.d\nuser {getpass.getuser()}\n")
    proc = subprocess.Popen([mosquitto_path(), "-c", str(main)], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: proc.poll() is not None or "running" in (log.read_text() if log.exists() else ""),
                   60, "mosquitto to start")  # a loaded or emulated machine is slow to start it
        assert proc.poll() is None, log.read_text()
        for port in ports.values():
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
