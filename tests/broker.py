"""A real mosquitto on a free loopback port, for tests and benchmarks.

``Mosquitto`` is a plain launcher (the benchmark uses it directly); the
``broker`` and ``make_broker`` fixtures wrap it. Test modules import them with
``from tests.broker import broker, make_broker  # noqa: F401``.

The broker can be stopped, killed with SIGKILL and started again on the same
port, so tests can take it away while events flow.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_path() -> str | None:
    """The mosquitto binary (Debian installs it in /usr/sbin, often not on PATH)."""
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("mosquitto")


def free_port() -> int:
    """A TCP port free on loopback right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """One mosquitto process with its config in ``workdir``.

    acl: text of an ACL file (mosquitto's acl_file syntax); anonymous clients
    get the rules before the first ``user`` line, a client connecting with a
    username gets that user's rules. persistence: keep messages across a
    restart (off by default: a restart then loses whatever it held, which is
    the harsher test).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path | str,
        *,
        port: int | None = None,
        acl: str | None = None,
        persistence: bool = False,
        extra_conf: str = "",
    ) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise FileNotFoundError(
                "mosquitto is not installed; install it with `apt-get install mosquitto`"
            )
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            # Slow consumers (an ingest under load) must not lose queued events.
            "max_queued_messages 0",
            "set_tcp_nodelay true",
        ]
        if acl is not None:
            self.acl_path = self.workdir / "acl"
            self.acl_path.write_text(acl)
            lines.append(f"acl_file {self.acl_path}")
        if extra_conf:
            lines.append(extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start (or start again, on the same port) and wait until it accepts."""
        if self.running:
            return self
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode} on port {self.port}: "
                    f"{err.strip()} {self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"mosquitto did not accept connections on {self.host}:{self.port} "
                        f"within {timeout} s; {self._log_tail()}"
                    ) from None
                time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Orderly stop (SIGTERM)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a word to its clients."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def _log_tail(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
        except OSError:
            return "(no mosquitto log)"
        return "log: " + " | ".join(tail)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _skip_without_mosquitto() -> None:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); broker tests skipped")


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """A factory: ``make_broker(acl=..., persistence=...)`` gives a started broker."""
    _skip_without_mosquitto()
    started: list[Mosquitto] = []

    def make(**options) -> Mosquitto:
        b = Mosquitto(tmp_path / f"mosquitto{len(started)}", **options)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(make_broker: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain anonymous mosquitto on a free loopback port."""
    return make_broker()


def wait_until(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
