# ruff: noqa: F811 - pytest fixtures imported from other test modules, used as arguments
"""Deltas kept in an append-only log beside acl.bin (docs/access-list.md, "How a
gate holds the list"): a delta does not rewrite the stored list; a restart
replays the log; a torn last record is left out, a damaged one refused with
``acl_corrupt`` while the gate keeps what it can trust; the log is folded into
acl.bin; kill -9 of the real service never loses a delta acknowledged with
``acl.applied``."""
from __future__ import annotations

import json
import random
import time

import pytest

from agent.contract import topics
from agent.core.cards import parse_card_string
from agent.downlink import acl_sync
from agent.downlink.aclfiles import ACL_FILE, DELTA_LOG, stored_summary
from agent.downlink.signing import sign_acl
from tests.broker import broker, ingest_at, make_broker, wait_until  # noqa: F401
from tests.test_downlink_acl import (  # noqa: F401
    DELTA,
    KEY,
    KEY_ID,
    NEWCOMER,
    PUB,
    PUPIL,
    SCHOOL,
    live,
    signed,
)


def chain(base: str, k: int, group: str = "staff") -> dict:
    """Delta k: a new member n-k of `group` with card 200,k."""
    return {"kind": "delta", "version": f"d.{k}", "base": base,
            "people": [{"id": f"n-{k:03d}", "cards": [f"200,{k}"], "groups": [group]}]}


def card(k: int) -> int:
    return parse_card_string(f"200,{k}", 24)


def test_a_delta_goes_to_the_log_and_the_stored_list_is_not_rewritten(live, tmp_path):
    g = live()
    g.push(signed(SCHOOL))
    stored = (tmp_path / "state" / ACL_FILE).read_bytes()
    g.push(signed(DELTA))
    assert (tmp_path / "state" / ACL_FILE).read_bytes() == stored
    assert (tmp_path / "state" / DELTA_LOG).stat().st_size > 0
    # What the doctor reads: the stored list and the log after it.
    assert stored_summary(tmp_path / "state")[1]["version"] == DELTA["version"]
    g.stop()
    # A fold cut short by a stop or a crash leaves a temporary file: gone at start.
    leftover = tmp_path / "state" / f".{ACL_FILE}.tmp-1-2"
    leftover.write_bytes(b"half a list")
    again = live(from_disk=True)
    assert not leftover.exists()
    assert again.dl.status()["acl_version"] == DELTA["version"]
    assert again.card(NEWCOMER)["type"] == "access.granted"
    assert again.card(PUPIL)["reason"] == "blocked"
    assert again.all("alarm") == []


def test_a_torn_last_record_is_left_out_and_cut_off(live, tmp_path, caplog):
    g = live()
    g.push(signed(SCHOOL))
    g.push(signed(chain(SCHOOL["version"], 1)))
    log_path = tmp_path / "state" / DELTA_LOG
    whole = log_path.read_bytes()
    g.push(signed(chain("d.1", 2)))
    g.stop()
    second = log_path.read_bytes()[len(whole):]
    for cut in (10, len(second) - 5):  # the header cut short, then the body
        log_path.write_bytes(whole + second[:cut])
        again = live(from_disk=True)
        assert again.dl.status()["acl_version"] == "d.1"
        assert again.card(card(1))["type"] == "access.granted"
        assert again.card(card(2))["reason"] == "unknown_card"
        assert [a for a in again.all("alarm") if a["kind"] == "acl_corrupt"] == []
        # The torn bytes are cut off (and a replayed delta folded into acl.bin at start).
        again.dl.acl.fold(wait=True)
        assert stored_summary(tmp_path / "state")[1]["version"] == "d.1"
        assert len(log_path.read_bytes()) in (0, len(whole))
        again.stop()
    assert "cut short" in caplog.text
    again = live(from_disk=True)
    again.push(signed(chain("d.1", 3)))
    again.stop()
    third = live(from_disk=True)
    assert third.dl.status()["acl_version"] == "d.3"
    assert third.card(card(3))["type"] == "access.granted"


def test_a_damaged_record_is_refused_and_the_gate_keeps_what_it_can_trust(live, tmp_path):
    g = live()
    g.push(signed(SCHOOL))
    g.push(signed(chain(SCHOOL["version"], 1)))
    log_path = tmp_path / "state" / DELTA_LOG
    first = len(log_path.read_bytes())
    g.push(signed(chain("d.1", 2)))
    g.push(signed(chain("d.2", 3)))
    g.stop()
    data = bytearray(log_path.read_bytes())
    data[first + 40] ^= 0x20  # inside the second record's body; a third follows
    log_path.write_bytes(bytes(data))
    again = live(from_disk=True)
    # The stored list and the one record before the damage.
    assert again.dl.status()["acl_version"] == "d.1"
    assert again.card(card(1))["type"] == "access.granted"
    assert again.card(card(2))["reason"] == "unknown_card"
    assert not log_path.exists()
    assert len(list((tmp_path / "state").glob(f"{DELTA_LOG}.corrupt-*"))) == 1
    # The server's next delta misses its base: the gate asks for a snapshot.
    again.push(signed(chain("d.3", 4)))
    assert again.all("acl.requested")[-1]["reason"] == "base_mismatch"
    [alarm] = [a for a in again.all("alarm") if a["kind"] == "acl_corrupt"]
    assert alarm["active"] is True and "delta log" in alarm["detail"] and "checksum" in alarm["detail"]


def test_the_log_is_folded_into_the_stored_list(live, tmp_path, monkeypatch):
    monkeypatch.setattr(acl_sync, "FOLD_RECORDS", 3)
    g = live()
    g.push(signed(SCHOOL))
    base = SCHOOL["version"]
    for k in range(1, 4):
        g.push(signed(chain(base, k)))
        base = f"d.{k}"
    g.dl.acl.fold(wait=True)
    state = tmp_path / "state"
    assert stored_summary(state)[1]["version"] == "d.3"
    assert (state / DELTA_LOG).stat().st_size == 0
    g.push(signed(chain("d.3", 4)))  # on the folded list, mapped from the new acl.bin
    g.stop()
    again = live(from_disk=True)
    assert again.dl.status()["acl_version"] == "d.4"
    assert all(again.card(card(k))["type"] == "access.granted" for k in range(1, 5))


def test_a_snapshot_empties_the_log(live, tmp_path):
    g = live()
    g.push(signed(SCHOOL))
    g.push(signed(chain(SCHOOL["version"], 1)))
    g.push(signed(dict(SCHOOL, version="s.2")))
    assert (tmp_path / "state" / DELTA_LOG).stat().st_size == 0
    g.stop()
    again = live(from_disk=True)
    assert again.dl.status()["acl_version"] == "s.2"
    assert again.card(card(1))["reason"] == "unknown_card"


def test_a_log_with_no_stored_list_is_moved_aside(live, tmp_path):
    g = live()
    g.push(signed(SCHOOL))
    g.push(signed(chain(SCHOOL["version"], 1)))
    g.stop()
    (tmp_path / "state" / ACL_FILE).unlink()
    again = live(from_disk=True)
    assert again.dl.status()["acl_version"] is None
    assert not (tmp_path / "state" / DELTA_LOG).exists()


# --------------------------------------------------------------------------- kill -9


def known(agent, k: int) -> bool:
    """Card 200,k is in the agent's list (granted, or refused for another reason than
    being unknown: a repeat read may meet anti-passback or a busy lane)."""
    decision = agent.card(f"200,{k}")["decision"]
    return decision["type"] == "access.granted" or decision.get("reason") != "unknown_card"


@pytest.mark.long(12)
def test_kill_9_while_deltas_arrive_loses_no_acknowledged_delta(tmp_path, broker):
    from tests.agentproc import AgentProcess
    from tests.broker import Observer

    key_toml = f'[commands.trusted_keys]\n{KEY_ID} = "{PUB}"\n'
    agent = AgentProcess(tmp_path / "agent", broker=broker, extra_toml=key_toml)
    t = topics(agent.site, agent.gate)
    rng = random.Random(7)
    counter = 100
    held = "rig.1"  # the version the gate holds for sure (acknowledged)
    acked: list[int] = []
    k = 0
    with Observer(broker, t["acl"].rsplit("/", 1)[0] + "/#") as obs:
        def start() -> None:
            seen = len(obs.all())
            agent.start()
            # Online (its status published) means subscribed to the acl topic too.
            wait_until(lambda: any(tp == t["status"] for tp, _, _ in obs.all()[seen:]), 20,
                       "the agent's status")

        for cycle in range(6):
            start()
            # Which version did the restart come back with? Every acknowledged delta.
            for j in acked:
                assert known(agent, j), (cycle, j)
            if k and held != f"d.{k}":
                # The delta in flight at the kill: applied before it, or redelivered now (QoS 1)?
                time.sleep(1.0)
                if known(agent, k):
                    held = f"d.{k}"
            for step in range(rng.randint(1, 3)):
                k += 1
                counter += 1
                doc = chain(held, k, "pupils")
                env = sign_acl(KEY, doc, key_id=KEY_ID, site=agent.site, gate=agent.gate,
                               counter=counter)
                n_before = len(obs.records())
                obs.publish(t["acl"], json.dumps(env))
                if step and rng.random() < 0.4:  # the first of a run is always waited for
                    time.sleep(rng.uniform(0, 0.05))
                    break  # killed with this delta in flight
                wait_until(lambda n=n_before, v=doc["version"]: any(
                    r.get("type") == "acl.applied" and r.get("version") == v
                    for r in obs.records()[n:]), 20, f"acl.applied {doc['version']}")
                acked.append(k)
                held = doc["version"]
            agent.proc.kill()  # SIGKILL
            agent.proc.wait(10)
        start()
        try:
            for j in acked:
                assert known(agent, j), j
        finally:
            agent.stop()
    assert len(acked) >= 6
    assert (agent.state / DELTA_LOG).exists()  # the deltas went through the log
