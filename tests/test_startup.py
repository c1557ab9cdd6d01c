"""What `gate-agent run` loads before READY (issue 12: footprint on a small board).

The service must not pay at start for what only some paths use: paho without a
broker, cryptography before a signed message comes, the technician's and the
regional side's tools, the simulator. And what it defers must not be what a card
or the fire loop needs: those are fully loaded at READY. Behaviour, not speed:
these tests read sys.modules, never a clock.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.simctl import SimClientError, request
from tests.agentproc import ROOT, AgentProcess

# A trusted key configured (every real board has one): its loading must not map cryptography.
PUB = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="

# Loaded by `run` before READY only when the feature is used.
NOT_AT_START = ("paho", "cryptography", "agent.tools.doctor", "agent.tools.bundle", "agent.tools.provision",
                "agent.tools.monitor", "agent.tools.journaltool", "agent.tools.enroll", "agent.tools.iotest",
                "agent.tools.wiring", "agent.regional.tools", "agent.demo", "agent.simulator",
                "agent.uplink.mqtt", "agent.regional.ingest")
# What deciding a card and the fire loop run on: loaded before READY, never after.
DECIDING = ("agent.core", "agent.runtime", "agent.hw", "fastpath", "agent.uplink.journal",
            "agent.uplink.failover", "agent.statefile", "zoneinfo")

# `gate-agent run` as systemd starts it, with sys.modules written at READY and at exit.
WRAPPER = """
import atexit, json, os, sys
from agent import sdnotify
out = sys.argv[1]
def dump(path):
    with open(path + ".tmp", "w") as f:
        json.dump(sorted(sys.modules), f)
    os.replace(path + ".tmp", path)
ready = sdnotify.Notifier.ready
def at_ready(self, *a, **k):
    dump(out + ".ready")
    return ready(self, *a, **k)
sdnotify.Notifier.ready = at_ready
atexit.register(lambda: dump(out + ".exit"))
from agent.cli import main
sys.exit(main(["run", "--config", sys.argv[2]]))
"""


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_run_loads_no_broker_crypto_or_tools_before_ready_and_decides_with_what_it_loaded(tmp_path):
    agent = AgentProcess(tmp_path, extra_toml=f'[commands]\ntrusted_keys = {{ region = "{PUB}" }}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "modules"
    with open(agent.log_path, "ab") as log:
        agent.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(out), str(agent.config)],
                                      cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert agent.proc.poll() is None, agent.log_tail()
            try:
                # The sim socket answers just before READY=1: wait for both.
                if request(agent.socket, {"op": "ping"}, timeout=2).get("ok") and Path(f"{out}.ready").exists():
                    break
            except (SimClientError, OSError):
                pass
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.05)
        at_ready = set(json.loads(Path(f"{out}.ready").read_text()))
        # The gate works on what it loaded: an allowed card, a blocked one, the fire loop.
        assert agent.card("100,60000")["decision"]["type"] == "access.granted"
        assert agent.card("7,1234")["decision"]["type"] == "access.denied"
        agent.sim({"op": "fire", "loop": "open"})
        deadline = time.monotonic() + 20
        while not any(r["type"] == "alarm.fire" for r in agent.records()):
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.05)
        agent.sim({"op": "fire", "loop": "closed"})
        assert agent.stop() == 0, agent.log_tail()
    finally:
        agent.kill()
    at_exit = set(json.loads(Path(f"{out}.exit").read_text()))
    assert not sorted(m for m in at_ready if _under(m, NOT_AT_START))
    assert not sorted(m for m in at_exit if _under(m, NOT_AT_START))
    late = sorted(m for m in at_exit - at_ready if _under(m, DECIDING))
    assert not late, f"loaded after READY by a card or the fire loop: {late}"


def test_the_parser_of_run_is_built_without_importing_any_tool():
    code = ("import sys; from agent.cli import build_parser; "
            "a = build_parser(['run', '--config', 'x.toml']).parse_args(['run', '--config', 'x.toml']); "
            "assert a.config == 'x.toml', a; "
            "print(sorted(m for m in sys.modules if m.startswith(('agent.tools', 'agent.demo', 'agent.simctl'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_help_lists_every_tool_and_each_tool_adds_the_subcommands_the_table_names():
    from agent.cli import TOOLS, build_parser

    for module, function, names in TOOLS:
        sub = argparse.ArgumentParser().add_subparsers()
        getattr(importlib.import_module(module), function)(sub)
        assert tuple(sub.choices) == names, module
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False, env={**os.environ, "LANG": "C", "LC_ALL": "C"})
    assert res.returncode == 0, res.stderr
    for _, _, names in TOOLS:
        for name in names:
            assert name in res.stdout, name
    # The full parser has every subcommand; one built for a tool's word parses it alike.
    full = build_parser()
    for _, _, names in TOOLS:
        for name in names:
            args = [name, "--help"]
            assert build_parser(args) is not None
            with pytest.raises(SystemExit) as exc:
                full.parse_args([name, "--no-such-option-here"])
            assert exc.value.code == 2


def test_an_unknown_subcommand_still_lists_every_tool():
    res = subprocess.run([sys.executable, "-m", "agent.cli", "no-such-tool"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False, env={**os.environ, "LANG": "C", "LC_ALL": "C"})
    assert res.returncode == 2
    for name in ("run", "doctor", "keygen", "sim", "check-config"):
        assert name in res.stderr


def test_trusted_keys_load_without_cryptography_and_verify_maps_it_then(tmp_path):
    code = f"""
import sys
from agent.downlink.signing import KeyLoadError, SignatureError, load_trusted_keys, verify
keys = load_trusted_keys({{"region": "{PUB}"}})
assert "cryptography" not in sys.modules, "loading a base64 key imported cryptography"
try:
    load_trusted_keys({{"short": "AAAA"}})
except KeyLoadError as exc:
    assert "32" in str(exc), exc
else:
    raise AssertionError("a 3-byte key was taken")
msg = {{"v": 1, "key_id": "region", "sig": "A" * 86 + "==", "command": "open"}}
try:
    verify(msg, keys)
except SignatureError as exc:
    assert exc.reason == "bad_signature" and "does not match" in exc.detail, exc.detail
print("cryptography" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"  # the first signed message brought it in


def test_a_missing_cryptography_refuses_signed_messages_saying_why():
    code = f"""
import sys
sys.modules["cryptography"] = None  # as if the package were not installed
from agent.downlink.signing import SignatureError, load_trusted_keys, verify
keys = load_trusted_keys({{"region": "{PUB}"}})
msg = {{"v": 1, "key_id": "region", "sig": "A" * 86 + "==", "command": "open"}}
try:
    verify(msg, keys)
except SignatureError as exc:
    print(exc.reason, "|", exc.detail)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    reason, detail = res.stdout.strip().split(" | ", 1)
    assert reason == "bad_signature"
    assert "cryptography" in detail and "install" in detail


def test_a_broker_configured_without_its_mqtt_client_leaves_the_gate_working_and_says_why(
        tmp_path, services, monkeypatch):
    from agent.core import events as ev
    from tests.agentproc import journal_records

    # paho not installed: its import, which now happens only once a broker is configured, fails.
    for name in [m for m in sys.modules if m == "paho" or m.startswith("paho.") or m == "agent.uplink.mqtt"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "paho", None)
    config = tmp_path / "agent.toml"
    config.write_text('[site]\nid = "school-17"\ngate = "main-1"\n[hardware]\npin_factory = "mock"\n'
                      '[journal]\npath = "data/journal.db"\nsync_interval_s = 0.2\n'
                      '[service]\nstate_dir = "state"\n[mqtt]\nhost = "127.0.0.1"\nport = 1\n')
    svc = services(config)
    assert svc.ready.is_set() and svc.uplink is None
    svc.runtime.submit(ev.Button("in"))
    spec = svc.config.hardware.board.outputs["unlock_a"]
    deadline = time.monotonic() + 20
    while svc.factory.pin(f"GPIO{spec.pin}").state != spec.active_high:
        assert time.monotonic() < deadline, "the button did not open the gate without an uplink"
        time.sleep(0.01)
    svc.stop()
    alarms = [r for r in journal_records(tmp_path / "data" / "journal.db") if r["type"] == "alarm"]
    hit = [a for a in alarms if a["kind"] == "uplink_config" and a["active"]]
    assert hit and "paho-mqtt" in hit[0]["detail"] and "MQTT client" in hit[0]["detail"], alarms
