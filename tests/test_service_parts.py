"""The pieces that left agent/service.py for the modules they belong to (issue 13, item 4):
the kept mode at start (StateFile.start_config), a reply's MQTT options (Uplink.reply's
reply_options), the readers' error tally and the gate's telemetry figures. The service
tests (tests/test_service.py) check them wired together; these check each alone."""
from __future__ import annotations

import logging

import pytest

import fastpath
from agent.core.gateconfig import GateConfig
from agent.statefile import StateFile
from agent.uplink.telemetry import ReaderErrorTally, gate_figures


@pytest.fixture
def statefile(tmp_path):
    return StateFile(tmp_path / "gate-state.json", fastpath)


def test_a_mode_commanded_before_the_restart_holds_over_the_configured_one(statefile, caplog):
    statefile.save(fastpath.GateState(), mode="lockdown")
    statefile.load()
    configured = GateConfig(site="s", gate="g", initial_mode="normal")
    with caplog.at_level(logging.WARNING, logger="agent.statefile"):
        start = statefile.start_config(configured)
    assert start.initial_mode == "lockdown"
    assert configured.initial_mode == "normal"  # the config itself is not changed
    assert "mode lockdown was commanded before this start" in caplog.text


@pytest.mark.parametrize("kept", [None, "normal", "fire", "no-such-mode"])
def test_no_kept_mode_or_one_that_cannot_be_commanded_starts_as_configured(statefile, kept):
    statefile.save(fastpath.GateState(), mode=kept)
    statefile.load()
    configured = GateConfig(site="s", gate="g", initial_mode="normal")
    assert statefile.start_config(configured) is configured


def test_a_kept_fire_latch_is_said_at_start(statefile, caplog):
    statefile.save(fastpath.GateState(), fire=True)
    statefile.load()
    with caplog.at_level(logging.WARNING, logger="agent.statefile"):
        statefile.start_config(GateConfig(site="s", gate="g"))
    assert "fire mode was latched before this start" in caplog.text


def test_reply_options_become_mqtt5_publish_properties():
    from paho.mqtt.properties import Properties

    from agent.uplink.mqtt import reply_options

    assert reply_options(None) == (1, None)
    assert reply_options({"qos": 0}) == (0, None)
    assert reply_options({"qos": 1, "correlation_data": None}) == (1, None)
    qos, props = reply_options({"qos": 1, "correlation_data": b"\x01req", "message_expiry_interval": 30})
    assert qos == 1 and props.CorrelationData == b"\x01req" and props.MessageExpiryInterval == 30
    given = Properties(props.packetType)
    assert reply_options(given) == (1, given)  # paho's own Properties pass through


def test_the_reader_error_tally_counts_per_reader_and_kind_and_starts_again_when_taken():
    tally = ReaderErrorTally()
    for reader, kind in [("entry", "parity"), ("entry", "parity"), ("entry", "bits"), ("exit", "parity")]:
        tally.count({"type": "reader.error", "reader": reader, "kind": kind})
    assert tally.take() == {"entry": {"parity": 2, "bits": 1}, "exit": {"parity": 1}}
    assert tally.take() == {}


class _Runtime:
    def latency_percentiles(self):
        return {"p50_ms": 0.2, "p99_ms": 0.9, "p999_ms": 1.5}

    def queue_stats(self):
        return {"depth": {"fire": 0}, "dropped": {"fire": 0}}

    def gate_stall(self):
        return {"interval_ms": 3.0, "max_ms": 7.0}


class _Downlink:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def status(self):
        if self.fail:
            raise RuntimeError("broken")
        return {"acl_version": "v9", "acl_age_s": 12.0, "acl_stale": True}

    def stats(self):
        return {"refused": 1}


def _figures(downlink):
    return gate_figures(_Runtime(), downlink, boot="b", uptime_s=5.0, clock_synced=True,
                        table_version="v8", reader_errors={"entry": {"parity": 1}})


def test_the_gate_figures_take_the_lists_fields_from_the_downlink():
    got = _figures(_Downlink())
    assert got["acl_version"] == "v9" and got["acl_age_s"] == 12.0 and got["acl_stale"] is True
    assert got["decision_ms"] == {"p50": 0.2, "p99": 0.9, "p999": 1.5}
    assert got["gate_stall"] == {"interval_ms": 3.0, "max_ms": 7.0} and got["downlink"] == {"refused": 1}
    assert got["reader_errors"] == {"entry": {"parity": 1}} and got["boot"] == "b"


def test_without_a_downlink_or_when_its_status_fails_the_figures_name_the_table_in_use(caplog):
    assert _figures(None)["acl_version"] == "v8" and "downlink" not in _figures(None)
    with caplog.at_level(logging.ERROR, logger="agent.uplink.telemetry"):
        got = _figures(_Downlink(fail=True))
    assert got["acl_version"] == "v8" and got["acl_stale"] is False
    assert "downlink status failed" in caplog.text


def test_the_site_figures_add_what_the_downlink_and_the_core_each_counted():
    """A record can be malformed on the way in (not JSON) or in the core (no person or time):
    telemetry's site.malformed is both, not one hiding the other."""
    from types import SimpleNamespace

    from agent.core.site import SiteView

    view = SiteView(wait_s=5)
    view.counts.update(malformed=2, passages=3)
    runtime = _Runtime()
    runtime.gate = SimpleNamespace(site=view)
    downlink = _Downlink()
    downlink.site_counts = {"received": 9, "accepted": 6, "malformed": 3}
    got = gate_figures(runtime, downlink, boot="b", uptime_s=5.0, clock_synced=True,
                       table_version="v8", reader_errors={})
    assert got["site"]["malformed"] == 5
    assert got["site"]["received"] == 9 and got["site"]["passages"] == 3
