"""The real agent in its own process, driven from outside: for black-box tests
and `make chaos` (bench/chaos.py).

``ConsoleProcess(agent)`` is `gate-agent console serve` beside it, as a board
runs the two; ``RawClient(path)`` speaks a line socket (sim.sock, console.sock)
byte by byte, malformed requests included.

``AgentProcess(workdir, broker=...)`` writes a config (mock pins, the broker,
a short pulse), keeps an access list on disk (cards ``100,60000`` to
``100,60019`` allowed, ``7,1234`` blocked), starts ``python -m agent.cli run``
and waits for its ``gate-agent sim`` socket. Cards, PASS and the fire loop go
in through that socket (agent.simctl), the same path a real reader's frame
takes; what the gate did is read back from its journal and from /proc.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.core.acl import AccessList
from agent.downlink.aclfiles import ACL_FILE, store_list
from agent.simctl import SimClientError, request, socket_path

ROOT = Path(__file__).resolve().parent.parent
SITE, GATE = "school-17", "main-1"
CARDS = [f"100,{60000 + i}" for i in range(20)]
BLOCKED = ["7,1234"]
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def acl_snapshot(site: str = SITE) -> dict:
    people = [{"id": f"p-{i}", "cards": [c], "groups": ["pupils"]} for i, c in enumerate(CARDS)]
    return {"kind": "snapshot", "version": "rig.1", "site": site, "timezone": "UTC",
            "schedules": {"always": {"week": ALWAYS}},
            "groups": {"pupils": {"entry": "always", "exit": "always"}},
            "people": people, "blocked": BLOCKED}


def journal_records(path: Path) -> list[dict]:
    """Every record in a journal database, in seq order (read-only: the agent may run)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        return [json.loads(b) for (b,) in db.execute("SELECT body FROM events ORDER BY seq")]


class AgentProcess:
    """One `gate-agent run` process on simulated hardware (module doc)."""

    def __init__(self, workdir: Path, *, broker: Any = None, site: str = SITE, gate: str = GATE,
                 extra_toml: str = "", telemetry_s: float = 0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.site, self.gate = site, gate
        self.state = self.workdir / "state"
        self.journal_path = self.workdir / "data" / "journal.db"
        self.log_path = self.workdir / "agent.log"
        self.config = self.workdir / "agent.toml"
        self.proc: subprocess.Popen | None = None
        self.state.mkdir(mode=0o700, exist_ok=True)
        store_list(self.state / ACL_FILE, AccessList.from_snapshot(acl_snapshot(site)), applied_at=time.time())
        lines = ["[site]", f'id = "{site}"', f'gate = "{gate}"',
                 "[gate]", "pulse_s = 0.1", "wait_s = 1.0",
                 "[hardware]", 'pin_factory = "mock"',
                 "[journal]", 'path = "data/journal.db"', "sync_interval_s = 0.2",
                 "[service]", 'state_dir = "state"', "state_save_s = 1"]
        if broker is not None:
            lines += ["[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}",
                      "backoff_max_s = 1", f"telemetry_interval_s = {telemetry_s:g}"]
        self.config.write_text("\n".join(lines) + "\n" + extra_toml)

    @property
    def socket(self) -> Path:
        return socket_path(self.state)

    def start(self, timeout: float = 30.0) -> AgentProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        env["PYTHONPATH"] = str(ROOT)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd=self.workdir, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if request(self.socket, {"op": "ping"}, timeout=2).get("ok"):
                    return self
            except (SimClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent's sim socket did not answer in {timeout} s: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def sim(self, doc: dict, timeout: float = 10.0) -> dict:
        return request(self.socket, doc, timeout=timeout)

    def card(self, card: str, reader: str = "entry", wait: float = 3.0) -> dict:
        """Present a card; the reply's ``decision`` is the record the gate made, or None.
        A busy socket (its own request budget) is retried."""
        for _ in range(50):
            reply = self.sim({"op": "card", "reader": reader, "card": card, "wait": wait},
                             timeout=wait + 10)
            if reply.get("error") != "busy":
                return reply
            time.sleep(0.05)
        return reply

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (a clean stop); the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def records(self) -> list[dict]:
        """Every record in the journal (read-only; the agent may be running)."""
        return journal_records(self.journal_path)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class ConsoleProcess:
    """`gate-agent console serve` for an AgentProcess's config, on a free loopback port:
    plain HTTP, or HTTPS with the console's own certificate (``tls``). ``add_user``
    before ``start``; ``base`` is the address; ``stop()`` ends it."""

    def __init__(self, agent: AgentProcess, *, tls: bool = False) -> None:
        self.agent, self.tls = agent, tls
        self.log_path = agent.workdir / "console.log"
        self.proc: subprocess.Popen | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def _env(self) -> dict:
        return {**os.environ, "PYTHONPATH": str(ROOT), "LANGUAGE": "en", "LC_ALL": "C.UTF-8"}

    def add_user(self, name: str, role: str, password: str) -> None:
        done = subprocess.run([sys.executable, "-m", "agent.cli", "console", "user", "add", name, "--role", role,
                               "--password-stdin", "--config", str(self.agent.config)], input=password + "\n",
                              text=True, capture_output=True, cwd=self.agent.workdir, env=self._env(),
                              timeout=60, check=False)
        if done.returncode:
            raise RuntimeError(f"console user add {name}: {done.stderr}")

    def start(self, timeout: float = 30.0) -> ConsoleProcess:
        cmd = [sys.executable, "-m", "agent.cli", "console", "serve", "--config", str(self.agent.config),
               "--bind", "127.0.0.1", "--port", str(self.port), *([] if self.tls else ["--no-tls"])]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, cwd=self.agent.workdir, env=self._env(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        context = ssl._create_unverified_context() if self.tls else None  # its own certificate
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/login", timeout=2, context=context) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the console did not start: {self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class RawClient:
    """A client speaking a line socket by hand (malformed requests included)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict | None:
        """The next reply line, or None when the server closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:  # closed with our flood still unread: the kernel says reset
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()
