"""``gate-agent demo`` as a newcomer runs it: a bounded run whose passages and
denials reach the ingest (on each fastpath twin), and Ctrl-C (SIGINT) stopping
everything cleanly: exit 0, broker gone, working directory removed."""
from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.broker import mosquitto_path

ROOT = Path(__file__).resolve().parent.parent
RUN = "import sys; from agent.demo import main; sys.exit(main(sys.argv[1:]))"
SUMMARY = re.compile(r"^demo: (\d+) events stored by the ingest \(passages (\d+), denials (\d+)\), (\d+) pending$")
OFFLINE = re.compile(r"^demo: offline, (\d+) events in the journal \(passages (\d+), denials (\d+)\), (\S+) pending$")


def demo_env(pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k != "GATE_PUREPYTHON"}
    env["LANG"] = "C.UTF-8"
    env["PYTHONUNBUFFERED"] = "1"
    if pure:
        env["GATE_PUREPYTHON"] = "1"
        env.pop("GATE_REQUIRE_COMPILED", None)  # CI requires the compiled twin; this run asks for the pure one
    return env


@pytest.mark.long(16)
def test_a_bounded_demo_sends_passages_and_denials_to_the_ingest(fp):
    pure = fp.__name__.endswith("_pure")
    res = subprocess.run([sys.executable, "-c", RUN, "--duration", "15", "--plain", "--seed", "7",
                          "--fire-after", "5"], cwd=ROOT, env=demo_env(pure), capture_output=True, text=True,
                         timeout=90, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    started = next(line for line in lines if "agent.started" in line)
    assert f"fastpath={'pure' if pure else 'compiled'}" in started
    # The signed list was applied, the scripted unknown and blocked cards were refused.
    assert any("acl.applied" in line for line in lines)
    assert any("reason=unknown_card" in line for line in lines)
    # The fire drill: the loop opens, people walk out free, the guard resets the release.
    assert any("alarm.fire" in line and "active=True" in line for line in lines)
    assert any("passage" in line and "source=free" in line for line in lines)
    last = lines[-1]
    if mosquitto_path() is None:
        m = OFFLINE.match(last)
        assert m, last
    else:
        m = SUMMARY.match(last)
        assert m, last
        events, passages, denials, pending = map(int, m.groups())
        assert passages >= 1 and denials >= 1 and events >= passages + denials
        assert pending == 0  # everything the gate did was confirmed by the ingest
        printed = sum(1 for line in lines if re.match(r"^\d\d:\d\d:\d\d\.\d{3} #\d+", line))
        assert events >= printed  # the regional view saw no event the ingest lacks
    assert "Traceback" not in res.stderr


def _read_until(proc: subprocess.Popen, pred, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    buf = ""
    while time.monotonic() < deadline:
        ready, _w, _x = select.select([proc.stdout], [], [], 0.2)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        buf += chunk
        *done, buf = buf.split("\n")
        lines += done
        if pred(lines):
            return lines
    raise AssertionError("the demo did not get there in time:\n" + "\n".join(lines[-30:]))


@pytest.mark.long(6)
def test_ctrl_c_stops_the_demo_cleanly():
    proc = subprocess.Popen([sys.executable, "-c", RUN, "--plain", "--seed", "3"], cwd=ROOT,
                            env=demo_env(pure=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = _read_until(proc, lambda ls: any(" passage " in f" {line} " for line in ls), timeout=40)
        work = next(re.search(r"working in (\S+)", line).group(1) for line in lines if "working in" in line)
        assert Path(work).is_dir()
        # The command the demo prints presents a card through the running agent's sim socket.
        hint = next(line for line in lines if "gate-agent sim --config" in line)
        argv = hint.split("gate-agent ", 1)[1].split()
        sim = subprocess.run([sys.executable, "-m", "agent.cli", *argv], cwd=ROOT, env=demo_env(pure=False),
                             capture_output=True, text=True, timeout=60, check=False)
        assert sim.returncode == 0, sim.stdout + sim.stderr
        assert "access" in sim.stdout  # the decision the gate made for the card
        if mosquitto_path() is not None:
            # The demo keeps its signing key and prints the regional tools' lines that use it:
            # a list pushed and a command sent are taken by the demo's gate.
            key = Path(work) / "demo-signing.key"
            assert key.is_file() and key.stat().st_mode & 0o077 == 0
            tries = {}
            for line in lines:
                if "try: gate-agent " in line:
                    argv = line.split("try: gate-agent ", 1)[1].split()
                    tries[argv[0]] = argv
            assert set(tries) == {"acl", "cmd"}, lines
            push = subprocess.run([sys.executable, "-m", "agent.cli", *tries["acl"], "--wait", "20"], cwd=ROOT,
                                  env=demo_env(pure=False), capture_output=True, text=True, timeout=60, check=False)
            assert push.returncode == 0 and "applied" in push.stdout, push.stdout + push.stderr
            cmd = subprocess.run([sys.executable, "-m", "agent.cli", *tries["cmd"]], cwd=ROOT,
                                 env=demo_env(pure=False), capture_output=True, text=True, timeout=60, check=False)
            assert cmd.returncode == 0 and '"result": "done"' in cmd.stdout, cmd.stdout + cmd.stderr
        # The web console beside it, as `make run` says: the demo technician logs in.
        console = next(re.search(r"console: (http://127\.0\.0\.1:\d+)", line).group(1)
                       for line in lines if "console: http://" in line)
        import httpx

        with httpx.Client(timeout=10, follow_redirects=True) as web:
            deadline = time.monotonic() + 30
            while True:  # the console's process may still be starting
                try:
                    page = web.get(console + "/login")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the demo's console did not answer"
                    time.sleep(0.2)
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            login = web.post(console + "/login", data={"csrf": token, "account": "demo", "password": "demo"})
            assert login.status_code == 200 and "/status" in str(login.url), login.text[:500]
            assert "main-1" in web.get(console + "/status").text  # the gate's own state, through its socket
        broker_pid = None
        for line in lines:
            m = re.search(r"mosquitto pid (\d+)", line)
            if m:
                broker_pid = int(m.group(1))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = out.decode(errors="replace").splitlines()
    assert proc.returncode == 0, "\n".join(rest[-20:]) + err.decode(errors="replace")[-2000:]
    assert rest and rest[-1].startswith("demo: ")
    assert not Path(work).exists()  # the temporary directory is gone
    with pytest.raises(OSError):  # the console stopped with the demo
        socket.create_connection(("127.0.0.1", int(console.rsplit(":", 1)[1])), timeout=2).close()
    if broker_pid is not None:
        assert not Path(f"/proc/{broker_pid}").exists()  # mosquitto stopped (and reaped)
        assert SUMMARY.match(rest[-1]), rest[-1]
    assert "Traceback" not in err.decode(errors="replace")
