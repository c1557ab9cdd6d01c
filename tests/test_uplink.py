"""The MQTT uplink against a real mosquitto, a real journal and the reference ingest."""
# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from agent.contract import topics, validate
from agent.uplink.mqtt import TlsConfig, Uplink, UplinkError
from agent.uplink.telemetry import build_telemetry, read_cpu_temp_c
from tests.broker import (  # noqa: F401 - fixtures
    BOOT,
    GATE,
    SITE,
    Observer,
    broker,
    ingest_at,
    journal,
    make_broker,
    passage,
    uplinks,
    wait_until,
)

T = topics(SITE, GATE)


def pending_seqs(journal) -> list[int]:
    return [r["seq"] for r in journal.pending(after_seq=0, limit=10_000)]


# --- ack mode ingest ---------------------------------------------------------------


def test_events_go_out_in_seq_order_and_leave_the_journal_on_the_ingest_ack(
    broker, journal, uplinks, ingest_at
):
    committed = journal.commit([passage(i) for i in range(40)])
    ingest = ingest_at(broker)
    with Observer(broker, T["events"]) as wire:
        up = uplinks(journal, broker, window=5)
        inflight_seen: list[int] = []
        wait_until(lambda: inflight_seen.append(up.stats()["inflight"]) or journal.backlog() == 0,
                   15, "the ingest to acknowledge every event")
        wait_until(lambda: len(wire.records()) >= len(committed), 5, "the observer to see every event")

    assert pending_seqs(journal) == []
    assert ingest.events(SITE, GATE) == committed  # stored once each, as committed
    on_wire = [r["seq"] for r in wire.records()]
    assert on_wire == sorted(on_wire), "published out of seq order"
    assert all(validate("event", r) == [] for r in wire.records())
    assert max(inflight_seen) <= 5
    assert up.stats()["acked"] == len(committed)


def test_a_puback_alone_does_not_acknowledge_and_unacked_events_are_resent(
    broker, journal, uplinks, ingest_at
):
    committed = journal.commit([passage(i) for i in range(10)])
    with Observer(broker, T["events"]) as wire:  # a subscriber: the broker answers 0x00, not 0x10
        up = uplinks(journal, broker, resend_after_s=0.5)
        wait_until(lambda: up.stats()["published"] >= 10 and up.stats()["inflight"] == 0, 10,
                   "every event to be PUBACKed")
        assert pending_seqs(journal) == [r["seq"] for r in committed]

        ingest = ingest_at(broker)  # it missed the first round: the uplink must send again
        wait_until(lambda: journal.backlog() == 0, 15, "resent events to be acknowledged")
        seen = wire.records()

    assert [e["id"] for e in ingest.events()] == [r["id"] for r in committed]
    by_id: dict[str, list[dict]] = {}
    for rec in seen:
        by_id.setdefault(rec["id"], []).append(rec)
    assert any(len(v) > 1 for v in by_id.values()), "nothing was resent"
    for copies in by_id.values():  # a resend is the same record under the same id
        assert all(c == copies[0] for c in copies)


def test_events_nobody_received_are_resent_once_an_ingest_subscribes(broker, journal, uplinks,
                                                                      ingest_at):
    committed = journal.commit([passage(i) for i in range(8)])
    up = uplinks(journal, broker, resend_after_s=60.0)  # only the 0x10 answers can trigger a resend
    wait_until(lambda: up.stats()["published"] >= 8, 10, "events published to nobody")
    assert journal.backlog() == 8
    ingest = ingest_at(broker)
    wait_until(lambda: journal.backlog() == 0, 15, "the resend to reach the ingest")
    assert [e["id"] for e in ingest.events()] == [r["id"] for r in committed]


def test_only_a_wellformed_ack_for_this_journal_acknowledges(broker, journal, uplinks):
    journal.commit([passage(i) for i in range(10)])
    with Observer(broker, T["events"]) as server:
        up = uplinks(journal, broker)
        wait_until(lambda: up.stats()["published"] >= 10, 10, "events published")
        server.publish(T["ack"], json.dumps({"journal": "someone-else", "upto": 10}))
        server.publish(T["ack"], b"not json")
        server.publish(T["ack"], json.dumps({"journal": journal.id, "upto": "10"}))
        server.publish(T["ack"], json.dumps({"journal": journal.id, "upto": 4}))
        # Acks are handled in arrival order: once the good one took effect, the bad ones had their turn.
        wait_until(lambda: journal.backlog() == 6, 10, "the valid ack")
    assert pending_seqs(journal) == [5, 6, 7, 8, 9, 10]


def test_records_committed_while_running_are_published_after_wake(broker, journal, uplinks, ingest_at):
    ingest = ingest_at(broker)
    up = uplinks(journal, broker)
    wait_until(lambda: up.connected, 10, "the uplink to connect")
    committed = []
    for i in range(5):
        committed += journal.commit([passage(i)])
        up.wake()
    wait_until(lambda: journal.backlog() == 0, 10, "acknowledgement")
    assert [e["id"] for e in ingest.events()] == [r["id"] for r in committed]


# --- ack mode broker ------------------------------------------------------------------


def test_broker_mode_acknowledges_on_puback_when_someone_subscribes(broker, journal, uplinks):
    alarms: list[tuple] = []
    committed = journal.commit([passage(i) for i in range(12)])
    with Observer(broker, T["events"]) as wire:
        uplinks(journal, broker, ack_mode="broker", on_alarm=lambda *a: alarms.append(a))
        wait_until(lambda: journal.backlog() == 0, 10, "PUBACKs to acknowledge")
        wait_until(lambda: len(wire.records()) == 12, 5, "delivery")
    assert wire.records() == committed
    assert alarms == []


def test_broker_mode_without_subscriber_acks_but_raises_broker_dropped(broker, journal, uplinks):
    alarms: list[tuple] = []
    journal.commit([passage(i) for i in range(6)])
    uplinks(journal, broker, ack_mode="broker", on_alarm=lambda *a: alarms.append(a))
    wait_until(lambda: journal.backlog() == 0, 10, "0x10 PUBACKs to acknowledge")
    assert [(kind, active) for kind, active, _ in alarms] == [("broker_dropped", True)]
    assert "0x10" in alarms[0][2]


def test_bad_settings_are_refused_with_a_message(journal):
    with pytest.raises(UplinkError, match="ack_mode"):
        Uplink(journal, site=SITE, gate=GATE, host="127.0.0.1", ack_mode="puback")
    with pytest.raises(UplinkError, match="window"):
        Uplink(journal, site=SITE, gate=GATE, host="127.0.0.1", window=0)
    with pytest.raises(ValueError, match="topic level"):
        Uplink(journal, site="a/b", gate=GATE, host="127.0.0.1")


# --- status ---------------------------------------------------------------------------


def cut_connection(up: Uplink) -> None:
    """Break the uplink's TCP connection without an MQTT DISCONNECT (a lost link)."""
    sock = up._client.socket()  # the test plays the network failing
    sock.shutdown(socket.SHUT_RDWR)


def test_status_online_retained_offline_will_on_loss_and_offline_on_stop(broker, journal, uplinks):
    fields = {"fastpath": "compiled", "acl_version": "2026-09-01.3"}  # the agent says what it runs
    up = uplinks(journal, broker, status_fields=lambda: dict(fields))
    wait_until(lambda: up.connected, 10, "connect")
    with Observer(broker, T["status"]) as late:  # subscribes after the birth: sees it retained
        wait_until(lambda: late.all(), 5, "the retained status")
        _, payload, retained = late.all()[0]
    birth = json.loads(payload)
    assert retained
    assert validate("status", birth) == []
    assert birth["state"] == "online"
    assert birth["journal"] == journal.id and birth["acl_version"] == "2026-09-01.3"
    assert birth["boot"] == BOOT

    with Observer(broker, T["status"]) as watch:
        fields["acl_version"] = "2026-09-02.1"  # a new access list: the status says so
        up.refresh_status()
        wait_until(lambda: any(r.get("acl_version") == "2026-09-02.1" for r in watch.records()), 5,
                   "the new status")

        cut_connection(up)
        wait_until(lambda: [r["state"] for r in watch.records()][-2:] == ["offline", "online"], 10,
                   "the will, then a new birth")
        will = next(r for r in watch.records() if r["state"] == "offline")
        assert will["reason"] == "will" and validate("status", will) == []

        up.stop()
        wait_until(lambda: watch.records()[-1]["state"] == "offline", 5, "offline on stop")
        assert watch.records()[-1]["reason"] == "shutdown"
    with Observer(broker, T["status"]) as after:
        wait_until(lambda: after.all(), 5, "the retained status")
        assert json.loads(after.all()[-1][1])["state"] == "offline" and after.all()[-1][2]


# --- telemetry ---------------------------------------------------------------------------


def test_cpu_temperature_read_when_readable(tmp_path: Path):
    zone = tmp_path / "temp"
    zone.write_text("47312\n")
    assert read_cpu_temp_c(zone) == pytest.approx(47.3)
    assert read_cpu_temp_c(tmp_path / "missing") is None
    zone.write_text("garbage")
    assert read_cpu_temp_c(zone) is None


def test_telemetry_follows_the_contract_and_is_published_unretained(broker, journal, uplinks, tmp_path):
    journal.commit([passage(i) for i in range(3)])
    zone = tmp_path / "temp"
    zone.write_text("51000")
    runtime = {
        "boot": BOOT, "uptime_s": 12.5, "clock_synced": False, "acl_version": "v7", "acl_age_s": 30.0,
        "reader_errors": {"entry": {"parity": 2}},
        "decision_ms": {"p50": 0.3, "p99": 0.4, "p999": 0.4},
    }
    tele = build_telemetry(journal, runtime, now_wall=1_790_000_100.0, cpu_temp_path=zone)
    assert validate("telemetry", tele) == []
    assert tele["backlog"] == 3 and tele["cpu_temp_c"] == pytest.approx(51.0)
    assert tele["reader_errors"] == {"entry": {"parity": 2}} and tele["clock_synced"] is False
    assert tele["decision_ms"]["p50"] == pytest.approx(0.3)

    idle = build_telemetry(journal, {}, now_wall=1_790_000_100.0, cpu_temp_path=tmp_path / "none")
    assert idle["cpu_temp_c"] is None and idle["decision_ms"]["p99"] is None

    up = uplinks(journal, broker, ack_mode="broker")
    wait_until(lambda: up.connected, 10, "connect")
    with Observer(broker, T["telemetry"]) as watch:
        up.publish_telemetry(tele)
        wait_until(lambda: watch.all(), 5, "telemetry")
        _, payload, retained = watch.all()[0]
    assert json.loads(payload) == tele and not retained


# --- TLS ------------------------------------------------------------------------------------


def test_tls_settings_name_the_missing_file(tmp_path: Path):
    with pytest.raises(UplinkError, match="ca_file"):
        TlsConfig(str(tmp_path / "nope.pem")).context()
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(UplinkError, match="both cert_file and key_file"):
        TlsConfig(str(ca), cert_file=str(ca)).context()


def _pki(tmp_path: Path, *, server_not_before_days: float = -1.0) -> dict[str, str]:
    """A CA, a server certificate for broker.test and a client certificate."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> str:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return str(path)

    def write_cert(cert, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, not_before: dt.datetime, san: list | None):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(not_before).not_valid_after(now + dt.timedelta(days=20)))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    skey, scert = leaf("broker.test", now + dt.timedelta(days=server_not_before_days),
                       [x509.DNSName("broker.test")])
    ckey, ccert = leaf("gate1", now - dt.timedelta(days=1), None)
    return {
        "ca": write_cert(ca, tmp_path / "ca.pem"),
        "server_cert": write_cert(scert, tmp_path / "server.pem"),
        "server_key": write_key(skey, tmp_path / "server.key"),
        "client_cert": write_cert(ccert, tmp_path / "client.pem"),
        "client_key": write_key(ckey, tmp_path / "client.key"),
    }


class _TlsBroker:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


def _tls_broker(make_broker, pki: dict[str, str]):
    from tests.broker import free_port

    port = free_port()
    conf = (f"listener {port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
            f"keyfile {pki['server_key']}\nrequire_certificate true\n")
    plain = make_broker(extra_conf=conf)
    wait_until(lambda: _accepts(port), 10, "the TLS listener")
    return plain, _TlsBroker("127.0.0.1", port)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_mutual_tls_with_a_server_name(make_broker, journal, uplinks, tmp_path):
    pki = _pki(tmp_path)
    plain, tls_broker = _tls_broker(make_broker, pki)
    journal.commit([passage(i) for i in range(4)])
    tls = TlsConfig(pki["ca"], pki["client_cert"], pki["client_key"], server_name="broker.test")
    with Observer(plain, T["events"]) as wire:
        uplinks(journal, tls_broker, tls=tls, ack_mode="broker")
        wait_until(lambda: journal.backlog() == 0, 10, "events over mutual TLS")
        wait_until(lambda: len(wire.records()) == 4, 5, "delivery")


def test_certificate_not_yet_valid_by_the_board_clock_is_retried_and_journalling_goes_on(
    make_broker, journal, uplinks, tmp_path, caplog
):
    pki = _pki(tmp_path, server_not_before_days=2)  # as if the board's clock were 2 days behind
    _, tls_broker = _tls_broker(make_broker, pki)
    alarms: list[tuple] = []
    tls = TlsConfig(pki["ca"], pki["client_cert"], pki["client_key"], server_name="broker.test")
    journal.commit([passage(0)])
    up = uplinks(journal, tls_broker, tls=tls, on_alarm=lambda *a: alarms.append(a))
    wait_until(lambda: alarms, 10, "the tls_rejected alarm")
    wait_until(lambda: up.stats()["last_error"] and "check the clock" in up.stats()["last_error"], 5,
               "the clock hint")
    kind, active, detail = alarms[0]
    assert (kind, active) == ("tls_rejected", True)
    assert "not yet valid" in detail and "check the clock" in detail
    journal.commit([passage(1)])  # the gate goes on journalling
    assert journal.backlog() == 2 and not up.connected
    assert len(alarms) == 1  # retries do not repeat the alarm


# --- what the broker may send the gate ------------------------------------------------------


def test_the_broker_drops_a_message_bigger_than_the_gates_maximum_packet_size(
    broker, journal, uplinks
):
    got: list[tuple[str, int]] = []
    up = uplinks(journal, broker, max_packet_bytes=4096,
                 on_message=lambda topic, payload, props, retain: got.append((topic, len(payload))))
    wait_until(lambda: up.connected, 10, "the uplink to connect")
    with Observer(broker, "nothing/here") as server:
        server.publish(T["cmd"], b"x" * 100_000)  # never reaches the board
        server.publish(T["cmd"], b"y" * 1000)  # fits: delivered, after the big one
        wait_until(lambda: got, 10, "the small command to arrive")
    assert got == [(T["cmd"], 1000)]
    assert up.connected  # the broker dropped the message, not the gate


def test_a_maximum_packet_size_outside_mqtts_range_is_refused(journal):
    with pytest.raises(UplinkError, match="max_packet_bytes"):
        Uplink(journal, site=SITE, gate=GATE, host="127.0.0.1", max_packet_bytes=10)
