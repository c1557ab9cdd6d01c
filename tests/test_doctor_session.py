# ruff: noqa: F811 - pytest fixtures imported from tests.pki and tests.test_site_broker
"""doctor's MQTT probe and a gate's kept session (mqtt.site_events, docs/site.md): the broker
names every client on the gates' port after its certificate, so doctor's probe with the gate's
certificate is the gate's own session. With site events it resumes that session and leaves it
as it was; a clean start would throw away the siblings' events queued for the gate."""
from __future__ import annotations

from agent.mqttclient import probe_connect
from tests.broker import wait_until
from tests.pki import GATE_B, gate_broker, pki  # noqa: F401 (fixtures)
from tests.test_site_broker import SESSION_EXPIRY_S, SITE_EVENTS, B, event, peers  # noqa: F401


def _queued_then_probed(gate_broker, pki, peers, keep_session_s):
    gate_a = peers(gate_broker, pki.gate_a, clean_start=False, session_expiry=SESSION_EXPIRY_S)
    assert gate_a.subscribe(SITE_EVENTS) < 0x80
    gate_a.disconnect()  # the service stopped
    gate_b = peers(gate_broker, pki.gate_b)
    for n in range(5):
        assert gate_b.publish(B["events"], event(GATE_B, n)) < 0x80
    # The technician's doctor run, with the gate's own certificate.
    code = probe_connect(gate_broker.host, gate_broker.port, "gate-doctor",
                         tls=pki.gate_a.tls(pki.ca_file).context(), keep_session_s=keep_session_s)
    assert code == 0
    gate_a.messages.clear()
    gate_a.connect()  # the service starts again
    return gate_a


def test_doctor_leaves_the_gates_kept_session_and_its_queue_alone(gate_broker, pki, peers):
    gate_a = _queued_then_probed(gate_broker, pki, peers, SESSION_EXPIRY_S)
    assert gate_a.session_present
    wait_until(lambda: len({p for _, p in gate_a.got()}) >= 5, 10, "the five queued events")
    assert sorted({p for _, p in gate_a.got()}) == sorted(event(GATE_B, n) for n in range(5))


def test_a_clean_start_probe_loses_the_queue(gate_broker, pki, peers):
    """Why doctor does not: what a clean start (and mosquitto_sub with the gate's certificate) does."""
    gate_a = _queued_then_probed(gate_broker, pki, peers, None)
    assert not gate_a.session_present
    assert not gate_a.wait_for(lambda: gate_a.messages, 0.5)
