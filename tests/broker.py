"""A real mosquitto on a free loopback port, for tests and benchmarks.

``Mosquitto`` is a plain launcher (the benchmark uses it directly); the
``broker`` and ``make_broker`` fixtures wrap it. Test modules import them with
``from tests.broker import broker, make_broker  # noqa: F401``.

The broker can be stopped, killed with SIGKILL and started again on the same
port, so tests can take it away while events flow.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_path() -> str | None:
    """The mosquitto binary (Debian installs it in /usr/sbin, often not on PATH)."""
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("mosquitto")


_issued: set[int] = set()  # this process's ports: a broker not started yet holds none
_issued_lock = threading.Lock()


def free_port() -> int:
    """A TCP port free on loopback right now (the kernel picks it), never one this process
    handed out before: the kernel may offer a closed port again, and a broker made but not
    yet started (or killed, to start again on its port) does not hold it. Workers of a
    parallel run are separate processes, each drawing from the kernel's random ports."""
    with _issued_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _issued:
                _issued.add(port)
                return port


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
            # Run as root, mosquitto switches to user "mosquitto", which cannot write here.
            f"user {getpass.getuser()}",
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

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its config and ACL file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

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

    def __enter__(self) -> Self:
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


class Observer:
    """A plain paho client that subscribes to ``topic`` and records every
    message as (topic, payload, retain). It reconnects (and resubscribes) on
    its own when the broker comes back, so it can watch through outages."""

    def __init__(self, broker: Mosquitto, topic: str = "#", *, qos: int = 1,
                 username: str | None = None, port: int | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topic = topic
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"observer-{id(self)}")
        if username is not None:
            self.client.username_pw_set(username)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.reconnect_delay_set(0.1, 0.5)

        def on_connect(client, userdata, flags, rc, props):
            client.subscribe(topic, qos=qos)

        def on_subscribe(client, userdata, mid, rcs, props):
            self.subscribed.set()

        def on_message(client, userdata, msg):
            with self._lock:
                self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        port = broker.port if port is None else port
        self.client.connect_async(broker.host, port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            self.stop()
            raise RuntimeError(f"observer could not subscribe to {topic} on {broker.host}:{port}")

    def records(self, topic: str | None = None) -> list[dict]:
        """The JSON payloads received (on ``topic`` if given), in arrival order."""
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if topic is None or t == topic]

    def all(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_subscribed(uplink, broker: Mosquitto, timeout: float = 10.0, *, port: int | None = None,
                    tls: ssl.SSLContext | None = None) -> None:
    """Wait until ``uplink`` (an agent.uplink.mqtt.Uplink) is connected AND its subscriptions
    (ack, acl, cmd) are in place on ``broker``.

    On each CONNACK the uplink sends its SUBSCRIBE and then its retained birth status on the
    same connection; mosquitto handles one client's packets in order, so once that status
    (naming this uplink's journal) is on the broker, the subscriptions are too. A message sent
    to the gate before then may find nobody subscribed. ``port``/``tls``: where and how an
    observer allowed to read the status connects (a broker with an ACL)."""
    topic = uplink.topics["status"]
    journal_id = uplink.journal.id
    with Observer(broker, topic, port=port, tls=tls) as status:
        wait_until(lambda: uplink.connected and any(
            r.get("state") == "online" and r.get("journal") == journal_id
            for r in status.records()), timeout, f"the uplink's birth status on {topic}")


# --- journal, uplink and ingest fixtures shared by the uplink test modules ----------

SITE, GATE = "school7", "gate1"
BOOT = "3f1c2d9e-boot"


def passage(i: int) -> dict:
    """A contract-valid record, as the core makes them (seq and id come from the journal)."""
    from agent.core.events import Now
    from agent.core.records import make_record

    return make_record("passage", Now(mono=100.0 + i, wall=1_790_000_000.0 + i), BOOT,
                       direction="in" if i % 2 == 0 else "out", source="button",
                       person=None, card=None, after_ms=800 + i)


@pytest.fixture
def journal(tmp_path: Path):
    """A real journal in tmp_path."""
    from agent.uplink.journal import Journal

    j = Journal(tmp_path / "journal.db")
    yield j
    close = getattr(j, "close", None)
    if close is not None:
        close()


@pytest.fixture
def uplinks() -> Iterator[Callable]:
    """``uplinks(journal, broker, **options)``: a started Uplink for SITE/GATE with
    short backoffs; every one is stopped at the end of the test."""
    import fastpath
    from agent.uplink.mqtt import Uplink

    made: list = []

    def make(journal, broker, **options):
        options.setdefault("backoff_min_s", 0.1)
        options.setdefault("backoff_max_s", 1.0)
        # What the agent tells its uplink about itself (the service's status fields).
        options.setdefault("status_fields", lambda: {"fastpath": fastpath.IMPLEMENTATION})
        up = Uplink(journal, site=SITE, gate=GATE, host=broker.host, port=broker.port,
                    boot=BOOT, **options)
        made.append(up)
        return up.start()

    yield make
    for up in made:
        up.stop()


@pytest.fixture
def ingest_at(tmp_path: Path) -> Iterator[Callable]:
    """``ingest_at(broker, **options)``: a started reference ingest, subscribed."""
    from agent.regional.ingest import Ingest

    made: list = []

    def make(broker, db_name: str = "ingest.db", **options):
        ing = Ingest(broker.host, broker.port, db_path=tmp_path / db_name, **options).start()
        made.append(ing)
        assert ing.ready.wait(10), "the ingest did not subscribe"
        return ing

    yield make
    for ing in made:
        ing.stop()
