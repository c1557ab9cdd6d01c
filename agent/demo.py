"""``gate-agent demo``: a school morning on simulated hardware, live.

    gate-agent demo [--duration S] [--plain] [--rate N] [--fire-after S] [--seed N] [--keep]
                    [--console-port N]

What runs, all in one process and one temporary directory:

* a mosquitto broker on a free loopback port, started here (when
  /usr/sbin/mosquitto is missing the demo runs offline and says so: events
  then stay in the journal, which is what a gate does without its broker);
* the real ``Service`` (agent/service.py) with ``pin_factory = "mock"``:
  journal, core, gate thread, readers, uplink, downlink, unchanged;
* a signed access list (examples/acl/school.json, its schedules opened all
  day so the demo works at any hour), signed with a throwaway key the
  gate's config trusts, handed to the downlink as if it came from the
  server: ``acl.applied``. The key is kept in the working directory
  (``demo-signing.key``, id ``demo``, with the list as ``demo-acl.json``)
  and the demo prints the ``gate-agent acl push`` and ``gate-agent cmd``
  lines that use it, so the regional tools can be tried against the demo;
* simulated hardware (agent/simhw.py) on the other side of the mock pins: a
  turnstile that turns when unlocked, two Wiegand readers, a crowd at about
  30 people a minute with unknown and blocked cards, and a fire drill
  (``--fire-after``, default 60 s: the loop opens, everyone walks out
  free, the loop closes, the guard resets the release);
* the reference ingest (agent/regional/ingest.py), storing every event and
  acknowledging it, as the regional server does;
* the monitor's view (agent/tools/monitor.py), fed from the broker like the
  regional server sees the gate (or from the journal when offline);
* with ``--console-port N`` (``gate-agent demo`` sets 8080; 0: none) the web
  console (agent/console) in its own process, as on a board, on
  http://127.0.0.1:N with two demo accounts: ``demo``/``demo`` (technician)
  and ``guard``/``guard`` (guard).

Ctrl-C (SIGINT) or SIGTERM, or ``--duration``, ends it cleanly: the crowd
stops, the service stops (outputs inactive, offline status, journal closed),
the ingest and mosquitto stop, the temporary directory is removed (``--keep``
keeps it and says where). The last line is the summary, e.g.::

    demo: 41 events stored by the ingest (passages 12, denials 4), 0 pending

Exit codes: 0 ended cleanly; 1 the demo could not start.
"""
from __future__ import annotations

import argparse
import copy
import getpass
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from agent.exits import Exit
from agent.i18n import _

__all__ = ["Demo", "DemoError", "add_demo_parser", "demo_access_list", "main"]

SITE, GATE = "school-17", "main-1"
KEY_ID = "demo"
ROOT = Path(__file__).resolve().parent.parent
ACL_SOURCES = (ROOT / "examples" / "acl" / "school.json", Path("/usr/share/gate-agent/acl/school.json"))
MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
FIRE_OPEN_S = 8.0  # the drill: loop open this long, then closed, then the release reset
CONSOLE_PORT = 8080  # `make run`'s console: http://127.0.0.1:8080 (docs/console.md)
DRAIN_S = 5.0  # at the end: how long the ingest gets to confirm what is still in flight
EXIT_OK = Exit.OK
EXIT_FAILED = Exit.FAILED

log = logging.getLogger("agent.demo")


class DemoError(RuntimeError):
    """The demo cannot start; the message says why and what to do."""


# --------------------------------------------------------------------------- pieces


def mosquitto_binary() -> str | None:
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("mosquitto")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Broker:
    """mosquitto on loopback with its config and log in ``workdir``."""

    host = "127.0.0.1"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        last = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port()
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join([
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                # Started as root, mosquitto would switch to user mosquitto, who cannot write here.
                f"user {getpass.getuser()}",
                "persistence false",
                f"log_dest file {self.workdir / 'mosquitto.log'}",
                "log_type error",
                "log_type warning",
                "max_queued_messages 0",
            ]) + "\n")
            self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last = (self.proc.stderr.read() or b"").decode(errors="replace").strip() if self.proc.stderr else ""
                    break
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return
                except OSError:
                    time.sleep(0.05)
            else:
                self.stop()
                raise DemoError(_("mosquitto did not accept connections on port {port}").format(port=self.port))
        raise DemoError(_("mosquitto would not start: {error}").format(error=last or "?"))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def demo_access_list() -> dict:
    """examples/acl/school.json with every schedule open all day and no holidays:
    the demo works at whatever hour and day it is run."""
    for path in ACL_SOURCES:
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            break
    else:
        raise DemoError(_("the example access list examples/acl/school.json is missing; run the demo from "
                          "the source tree"))
    doc = copy.deepcopy(doc)
    all_day = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
    for sched in doc.get("schedules", {}).values():
        sched["week"] = dict(all_day)
        sched["holidays"] = True
    doc["holidays"] = []
    doc["version"] = f"{doc.get('version', 'demo')}-demo"
    return doc


def _config_text(work: Path, port: int | None, public_key: str) -> str:
    mqtt = (f'host = "127.0.0.1"\nport = {port}\nack_mode = "ingest"\ntelemetry_interval_s = 5\n'
            if port else "")
    return (
        "# gate-agent demo: simulated hardware, a local broker\n"
        f'[site]\nid = "{SITE}"\ngate = "{GATE}"\n'
        '[gate]\nreaders = { entry = "in", exit = "out" }\nwait_s = 5.0\n'
        '[hardware]\nprofile = "pi4-relay4"\npin_factory = "mock"\n'
        f'[journal]\npath = "{work / "state" / "journal.db"}"\n'
        f"[mqtt]\n{mqtt}"
        f'[commands]\n[commands.trusted_keys]\n{KEY_ID} = "{public_key}"\n'
        f'[service]\nstate_dir = "{work / "state"}"\nwatchdog = false\nstate_save_s = 5\n'
    )


# --------------------------------------------------------------------------- the demo


class Demo:
    """Everything the demo runs; ``start()``, ``run()``, ``stop()`` (idempotent)."""

    def __init__(self, *, duration_s: float | None = None, plain: bool = False, rate_per_min: float = 30.0,
                 fire_after_s: float | None = 60.0, seed: int | None = None, keep: bool = False,
                 out: TextIO | None = None, console_port: int | None = None) -> None:
        self.duration_s = duration_s
        self.plain = plain
        self.rate = rate_per_min
        self.fire_after_s = fire_after_s
        self.rng = random.Random(seed)
        self.keep = keep
        self.out = out or sys.stdout
        self.stop_event = threading.Event()
        self.work: Path | None = None
        self.broker: Broker | None = None
        self.service: Any = None
        self.ingest: Any = None
        self.source: Any = None
        self.view: Any = None
        self.turnstile: Any = None
        self.factory: Any = None
        self.crowd: Any = None
        self._threads: list[threading.Thread] = []
        self._log_handler: logging.Handler | None = None
        self._stopped = False
        self.pending: int | None = None
        self.stored: list[dict] = []
        self.console_port = console_port
        self.console: Any = None  # the web console's process (agent/console), beside the gate

    def say(self, text: str) -> None:
        """A line for the person watching: printed in plain mode, a note in the live view."""
        if self.view is not None:
            self.view.note(text)
        if self.plain or self.view is None:
            print(f"demo: {text}", file=self.out, flush=True)

    # -- start -----------------------------------------------------------------------

    def start(self) -> None:
        from gpiozero.pins.mock import MockFactory

        from agent.config import ConfigError, load_config
        from agent.downlink.signing import generate_keypair, sign_acl
        from agent.service import ClockSync, Service, ServiceError
        from agent.tools.monitor import GateView

        self.work = Path(tempfile.mkdtemp(prefix="gate-agent-demo-"))
        (self.work / "state").mkdir(mode=0o700)
        self._logging_to_file(self.work / "agent.log")
        self.view = GateView(SITE, GATE, lines=12)
        self.say(_("working in {dir} (removed at the end)").format(dir=self.work) if not self.keep
                 else _("working in {dir} (kept at the end)").format(dir=self.work))

        binary = mosquitto_binary()
        if binary is None:
            self.say(_("mosquitto is not installed (sudo apt install mosquitto): running OFFLINE, events stay in "
                       "the gate's journal"))
        else:
            self.broker = Broker(binary, self.work)
            try:
                self.broker.start()
            except DemoError as exc:
                self.say(_("{error}: running OFFLINE, events stay in the gate's journal").format(error=exc))
                self.broker.stop()
                self.broker = None
            else:
                pid = self.broker.proc.pid if self.broker.proc else "?"
                self.say(_("broker: mosquitto pid {pid} on 127.0.0.1:{port}").format(pid=pid, port=self.broker.port))

        key, public = generate_keypair()  # throwaway: only this demo's gate trusts it
        # Kept (0600) so acl push and cmd can be tried against this gate; gone with the directory.
        from agent.downlink.signing import private_key_pem

        key_path = self.work / "demo-signing.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_key_pem(key))
        port = self.broker.port if self.broker else None
        (self.work / "agent.toml").write_text(_config_text(self.work, port, public), encoding="utf-8")
        try:
            config = load_config(self.work / "agent.toml")
        except ConfigError as exc:
            raise DemoError(str(exc)) from None

        if self.broker is not None:
            from agent.regional.ingest import Ingest

            self.ingest = Ingest(self.broker.host, self.broker.port, db_path=self.work / "ingest.db")
            self.ingest.start()
            if not self.ingest.ready.wait(10):
                raise DemoError(_("the ingest could not subscribe on the local broker"))

        self.factory = MockFactory()
        board = config.hardware.board
        from agent.simhw import SimulatedTurnstile

        self.turnstile = SimulatedTurnstile(self.factory, board, rng=random.Random(self.rng.random()))
        # The demo's clock counts as synchronised: no clock_unsynced alarm on a laptop without NTP.
        self.service = Service(config, factory=self.factory, clock_sync=ClockSync(lambda: True), env={})
        try:
            self.service.start()
        except ServiceError as exc:
            raise DemoError(str(exc)) from None

        if self.broker is not None:
            from agent.tools.monitor import MqttSource

            self.source = MqttSource(self.view, self.broker.host, self.broker.port, site=SITE, gate=GATE).start()
            self.source.ready.wait(5)
        else:
            from agent.tools.monitor import JournalSource

            self.source = JournalSource(self.view, config.journal.path, history=0, status_text=self.service.status_line,
                                        service_state=lambda: None)  # the demo's service runs in this process
            self.source.load()
            self.source.start()

        acl = demo_access_list()
        envelope = sign_acl(key, acl, key_id=KEY_ID, site=SITE, gate=GATE, counter=int(time.time()))
        from agent.contract import topics

        # Handed to the downlink as the uplink would hand it over from the acl topic.
        self.service.downlink.on_message(topics(SITE, GATE)["acl"], json.dumps(envelope).encode())
        self.say(_("signed access list {version} handed to the gate (people: {n})").format(
            version=acl["version"], n=len(acl.get("people", []))))
        acl_path = self.work / "demo-acl.json"
        acl_path.write_text(json.dumps(acl, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self._start_people(acl, board)
        self.say(_("signing key: {path} (id {id}); only this demo's gate trusts it").format(
            path=key_path, id=KEY_ID))
        if self.broker is not None:
            conn = f"--site {SITE} --gate {GATE} --port {self.broker.port} --key {key_path} --key-id {KEY_ID}"
            self.say(_("try: gate-agent acl push {acl} {conn}").format(acl=acl_path, conn=conn))
            self.say(_("try: gate-agent cmd open in {conn}").format(conn=conn))
        self._start_console()
        self.say(_("present a card yourself: gate-agent sim --config {config} card entry {card}").format(
            config=self.work / "agent.toml", card=next(iter(c for p in acl.get("people", [])
                                                            for c in p.get("cards", [])), "100,60179")))

    def _start_console(self) -> None:
        """The web console in its own process, as on a board (docs/console.md), reaching the
        gate through its socket; on the port asked for, or a free one when that one is taken."""
        if not self.console_port or self.work is None:
            return
        from agent.console.demo import start_demo_console

        port = self.console_port if _port_free(self.console_port) else _free_port()
        with open(self.work / "console.log", "ab") as log_file:  # the child keeps its own descriptor
            self.console = start_demo_console(self.work / "agent.toml", port, log=log_file.fileno())
        self.say(_("console: http://127.0.0.1:{port} (technician demo / demo, guard guard / guard)").format(
            port=port))

    def _stop_console(self) -> None:
        self.console.terminate()
        try:
            self.console.wait(10)
        except subprocess.TimeoutExpired:
            self.console.kill()
            self.console.wait(5)

    def _logging_to_file(self, path: Path) -> None:
        # The service logs as it does under systemd; here into a file, so the screen stays the view.
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        self._log_handler = handler

    def _start_people(self, acl: dict, board: Any) -> None:
        from agent.simhw import Crowd, SimulatedReader

        cards = [c for p in acl.get("people", []) for c in p.get("cards", [])]
        blocked = list(acl.get("blocked", []))
        readers = {name: SimulatedReader(self.factory, board, name, adapter=self.service.readers[name],
                                         rng=random.Random(self.rng.random()))
                   for name in self.service.readers}
        self.crowd = Crowd(readers, self.turnstile, cards=cards, blocked_cards=blocked, rate_per_min=self.rate,
                           unknown_ratio=0.08, blocked_ratio=0.05, weights={"entry": 4, "exit": 1},
                           rng=random.Random(self.rng.random()))

        def people() -> None:
            # A scripted start, so every kind of answer shows within seconds: a pupil, a
            # card nobody knows, a lost (blocked) card; then the crowd at its rate.
            first = [("entry", cards[0] if cards else None), ("entry", 0x7FFFFE), ("entry", blocked[0] if blocked else None)]
            for name, card in first:
                if self.stop_event.wait(1.0):
                    return
                if card is not None and name in readers:
                    try:
                        self.turnstile.wait_idle(10)
                        readers[name].present(card)
                    except Exception:  # noqa: BLE001 - the service is stopping
                        return
            self.crowd.run(stop_event=self.stop_event)

        self._spawn("demo-crowd", people)
        if self.fire_after_s is not None and (self.duration_s is None or self.fire_after_s < self.duration_s):
            self._spawn("demo-fire-drill", lambda: self._fire_drill(board))

    def _fire_drill(self, board: Any) -> None:
        from agent.simhw import drive_fire_loop, press_input

        if self.stop_event.wait(self.fire_after_s or 0):
            return
        try:
            self.say(_("FIRE DRILL: the fire loop opens; the turnstile is free both ways"))
            drive_fire_loop(self.factory, board, True)
            for _i in range(6):
                self.turnstile.enqueue("out", 1)  # a class walks out
            if self.stop_event.wait(FIRE_OPEN_S):
                return
            drive_fire_loop(self.factory, board, False)
            self.say(_("the fire loop closes; the gate stays free until the guard resets the release"))
            if self.stop_event.wait(3.0):
                return
            self.turnstile.wait_idle(5.0)  # the guard resets once nobody is in the arm
            press_input(self.factory, board, "fire_reset")
            self.say(_("the guard resets the fire release: back to normal"))
        except Exception:  # pins closed under us: the service is stopping
            log.debug("fire drill interrupted", exc_info=True)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- run, stop ---------------------------------------------------------------------

    def run(self) -> None:
        from agent.tools.monitor import run_view

        live = not self.plain and self.out.isatty()
        self.say(_("running{until}; Ctrl-C stops").format(
            until=_(" for {s} s").format(s=int(self.duration_s)) if self.duration_s else ""))
        run_view(self.view, self.out, stop=self.stop_event, live=live, duration_s=self.duration_s,
                 plain_summary_s=10.0)

    def request_stop(self) -> None:
        self.stop_event.set()

    def stop(self) -> None:
        """Stop everything in order; idempotent, never raises."""
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        for t in self._threads:
            t.join(12)
        if self.service is not None and self.service.journal is not None and self.ingest is not None:
            # Give the uplink and the ingest a moment to confirm what is in flight.
            deadline = time.monotonic() + DRAIN_S
            while time.monotonic() < deadline:
                try:
                    if self.service.journal.backlog() == 0:
                        break
                except Exception:  # noqa: BLE001
                    break
                time.sleep(0.1)
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.console is not None:
            steps.append(("console", self._stop_console))
        if self.turnstile is not None:
            steps.append(("turnstile", self.turnstile.close))
        if self.service is not None:
            steps.append(("pending", self._count_pending))
            steps.append(("service", self.service.stop))
        if self.source is not None:
            steps.append(("monitor", self.source.stop))
        if self.ingest is not None:
            steps.append(("ingest", self._stop_ingest))
        if self.broker is not None:
            steps.append(("broker", self.broker.stop))
        for what, step in steps:
            try:
                step()
            except Exception:  # stopping must go on
                log.exception("demo: stopping %s failed", what)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
        if self.work is not None and not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def _count_pending(self) -> None:
        self.pending = self.service.journal.backlog() if self.service.journal is not None else None

    def _stop_ingest(self) -> None:
        self.stored = self.ingest.events(SITE, GATE)
        self.ingest.stop()

    def summary(self) -> str:
        pending = "?" if self.pending is None else str(self.pending)
        if self.ingest is None:
            s = self.view.summary() if self.view is not None else {}
            return _("demo: offline, {n} events in the journal (passages {p}, denials {d}), {pending} pending").format(
                n=s.get("events", 0), p=s.get("passages", 0), d=s.get("denied", 0), pending=pending)
        types = [r.get("type") for r in self.stored]
        return _("demo: {n} events stored by the ingest (passages {p}, denials {d}), {pending} pending").format(
            n=len(types), p=types.count("passage"), d=types.count("access.denied"), pending=pending)


# --------------------------------------------------------------------------- CLI


def run_demo(*, duration_s: float | None = None, plain: bool = False, rate_per_min: float = 30.0,
             fire_after_s: float | None = 60.0, seed: int | None = None, keep: bool = False,
             out: TextIO | None = None, console_port: int | None = None) -> int:
    """Run the demo until the duration passes or SIGINT/SIGTERM; the exit code."""
    out = out or sys.stdout
    demo = Demo(duration_s=duration_s, plain=plain, rate_per_min=rate_per_min, fire_after_s=fire_after_s,
                seed=seed, keep=keep, out=out, console_port=console_port)

    def on_signal(signum: int, frame: Any) -> None:
        demo.request_stop()

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = EXIT_OK
    try:
        demo.start()
        if not demo.stop_event.is_set():
            demo.run()
    except DemoError as exc:
        print(f"gate-agent demo: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        pass
    finally:
        if demo.view is not None and not plain and out.isatty():
            from agent.tools.monitor import CLEAR

            out.write(CLEAR + "\n".join(demo.view.render()) + "\n")
        demo.stop()
        for s, h in handlers.items():
            signal.signal(s, h)
    if code == EXIT_OK:
        print(demo.summary(), file=out, flush=True)
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(duration_s=args.duration, plain=args.plain, rate_per_min=args.rate,
                    fire_after_s=None if args.fire_after <= 0 else args.fire_after, seed=args.seed, keep=args.keep,
                    console_port=args.console_port or None)


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` (func: args -> exit code) to a ``gate-agent`` subparsers object."""
    p = subparsers.add_parser(
        "demo",
        help=_("a school morning on simulated hardware with a local broker, live (Ctrl-C stops)"),
        description=_("Run the real agent on simulated hardware: a turnstile, two readers, a crowd with unknown "
                      "and blocked cards, a fire drill; events flow to a local mosquitto and the reference "
                      "ingest. Ctrl-C stops everything cleanly."),
    )
    p.add_argument("--duration", type=float, default=None, metavar="S", help=_("stop after S seconds"))
    p.add_argument("--plain", action="store_true", help=_("print events as lines (no screen redraw)"))
    p.add_argument("--rate", type=float, default=30.0, metavar="N", help=_("people per minute (default 30)"))
    p.add_argument("--fire-after", type=float, default=60.0, metavar="S",
                   help=_("start the fire drill after S seconds (default 60; 0: no drill)"))
    p.add_argument("--seed", type=int, default=None, help=_("random seed, for a repeatable crowd"))
    p.add_argument("--keep", action="store_true", help=_("keep the working directory (logs, journal, ingest)"))
    p.add_argument("--console-port", type=int, default=CONSOLE_PORT, metavar="N",
                   help=_("the web console's port on 127.0.0.1 (default 8080, a free one if taken; 0: no console)"))
    p.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """``gate-agent demo`` on its own: python -c "from agent.demo import main; main()"."""
    parser = argparse.ArgumentParser(prog="gate-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
