"""The composition root: ``gate-agent run`` builds the agent from its config.

Wiring only: it builds each part from the config, connects them (the hooks
between the gate thread, the journal, the uplink and the downlink), starts and
stops their threads in order, and runs the process (signals, exit codes).
What the parts do lives with them: the log format and queue in
agent/logsetup.py, the clock-sync cache in agent/runtime.py (``ClockSync``), the
mode kept across a restart in agent/statefile.py (``StateFile.start_config``),
a reply's MQTT options in agent/uplink/mqtt.py (``Uplink.reply``), the
telemetry figures in agent/uplink/telemetry.py. Some 840 lines on purpose,
over the ~500 the others keep: the start order, the stop order and the hooks
are read together; each step below is there for a principle (docs/design.md,
principles 1-3), and split across modules the order would no longer be
visible in one place.

``Service(config).start()`` puts the pieces together in this order, so the
gate never depends on the network or on anything slower than the disk:

1. the fastpath twin is logged (and refused when the config requires the
   compiled one and only the pure one loaded);
2. the journal is opened (a damaged one is salvaged by the journal itself,
   which commits its own ``journal.recovered`` record) and its sync thread
   started;
3. the access list kept on disk is loaded (``Downlink.load_persisted``), and
   the gate state (anti-passback positions, guest uses) from the state file;
4. the core ``Gate`` and the gate thread (``GateRuntime``: sink = journal,
   ``on_record`` wakes the uplink and lets the downlink see command results,
   ``on_idle`` runs journal maintenance and saves the state, ``watchdog``
   sends systemd's WATCHDOG=1 from the gate thread's own loop);
5. the hardware: board profile + pin factory (``mock``: gpiozero's
   MockFactory, simulated hardware with every input at rest), turnstile I/O,
   card readers;
6. with simulated hardware (``mock``) the socket ``gate-agent sim`` drives
   the mock pins through (agent/simctl.py); then systemd is told READY=1:
   the journal is open and the persisted list (if any) loaded; a new board
   with no list is ready too (the core raises ``acl_missing`` and refuses
   cards);
7. the console's local socket, ``<state_dir>/console.sock`` (agent/consolesock.py),
   on any pin factory: the web console reads the status and watches the records
   through it and asks for its actions, which go through the gate thread and the
   core like any event; a socket that cannot be opened is logged, the gate works;
8. the uplink (paho; its alarms become ``alarm`` records through the gate
   thread) and a housekeeping thread for telemetry, STATUS= and the clock
   check.

``stop()`` undoes it: the console and sim sockets and the readers first (no new events),
the uplink (publishes the retained ``offline`` status; no new downlink
message), the downlink (its flood guard's last summary goes to the gate), the
gate thread (what is queued, then every output inactive), the pins, the state
file (with the commanded mode and the fire latch), the journal (flushed,
synced and closed).

Logs go to stderr one line per message, with journald's priorities under
systemd (``setup_logging``, agent/logsetup.py).

``add_run_parser(subparsers)`` adds ``gate-agent run``; ``main(argv)`` runs it
standalone (``python -c "from agent.service import main; main()"``).
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import fastpath
from agent import __version__
from agent.config import DEFAULT_PATH, Config, ConfigError, load_config
from agent.core import aclstore
from agent.core.events import Report
from agent.core.turnstile import Gate
from agent.exits import Exit
from agent.host import boot_id, kernel_clock_synced
from agent.hw.pins import rest_mock_inputs
from agent.logsetup import setup_logging
from agent.presencefile import PRESENCE_FILE, PresenceFile
from agent.runtime import Clock, ClockSync, GateRuntime
from agent.sdnotify import Notifier, watchdog_interval
from agent.statefile import StateFile
from agent.uplink.telemetry import ReaderErrorTally, build_telemetry, gate_figures

log = logging.getLogger("agent.service")

__all__ = [
    "ClockSync",
    "Service",
    "ServiceError",
    "add_run_parser",
    "main",
    "setup_logging",
]

STATE_FILE = "gate-state.json"
HOUSEKEEPING_S = 1.0  # STATUS= and telemetry checks
CLOCK_CHECK_S = 10.0  # how often the kernel's clock-sync flag is read
ACL_AGE_CHECK_S = 60.0  # how often the list's age is checked (the downlink raises acl_stale)
MAX_DETAIL = 1000  # alarm detail limit in the contract
GIL_SWITCH_S = 0.001  # sys.setswitchinterval for the service process (see run())
STOP_DRAIN_S = 2.0  # at stop, queued records (the flood guard's last summary) get this long
PACKET_MARGIN_BYTES = 64 << 10  # MQTT header, topic and properties around the largest list

EXIT_OK = Exit.OK
EXIT_FAILED = Exit.FAILED  # could not start (journal, GPIO, fastpath) or crashed
EXIT_CONFIG = Exit.USAGE  # the config cannot be used


class ServiceError(RuntimeError):
    """The service cannot start; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------- hardware


def make_pin_factory(kind: str) -> Any:
    """The gpiozero pin factory for hardware.pin_factory; ServiceError with the fix when none."""
    from agent.hw.pins import PinFactoryError
    from agent.hw.pins import make_pin_factory as _make

    try:
        return _make(kind)
    except PinFactoryError as exc:
        raise ServiceError(
            f"no GPIO: the lgpio pin factory could not start ({type(exc.cause).__name__}: {exc.cause}). On a "
            "Raspberry Pi install python3-lgpio (the venv needs --system-site-packages) and check "
            "that the service user is in group gpio; on another machine set "
            'hardware.pin_factory = "mock" for simulated hardware'
        ) from exc.cause


# --------------------------------------------------------------------------- downlink


def _load_downlink_class() -> Any:
    """agent.downlink.Downlink when it is installed, else None (the agent then
    runs without access lists over MQTT or remote commands, and says so)."""
    try:
        from agent.downlink import Downlink  # type: ignore[attr-defined]
    except ImportError as exc:
        log.warning("access lists over MQTT and remote commands are unavailable (%s)", exc)
        return None
    return Downlink


# --------------------------------------------------------------------------- service


class Service:
    """The agent, composed from a Config. ``start()``, then ``stop()`` (idempotent).

    notifier: the sd_notify client (default from $NOTIFY_SOCKET); env: where
    WATCHDOG_USEC is read; clock_sync: the clock-sync check (default the
    kernel's flag); factory: a gpiozero pin factory to use instead of the
    one the config names (tests, the demo). The parts are attributes:
    journal, gate, runtime, io, readers, buses, uplink, downlink, factory.
    """

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        env: Mapping[str, str] | None = None,
        clock_sync: ClockSync | None = None,
        factory: Any = None,
    ) -> None:
        self.config = config
        self.env = os.environ if env is None else env
        self.notifier = notifier if notifier is not None else Notifier(self.env)
        self.clock_sync = clock_sync
        self.factory = factory
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.boot: str = ""
        self.journal: Any = None
        self.gate: Any = None
        self.runtime: Any = None
        self.io: Any = None
        self.readers: dict[str, Any] = {}
        self.buses: list[Any] = []
        self.uplink: Any = None
        self.downlink: Any = None
        self.statefile: StateFile | None = None
        self.presencefile: PresenceFile | None = None
        self.simctl: Any = None  # the simulated hardware's socket (pin_factory = "mock" only)
        self.consolesock: Any = None  # the console's local socket (agent/consolesock.py)
        self.acl: Any = None
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._stopped = False
        self._housekeeper: threading.Thread | None = None
        self._acl_stale = False
        self._reader_errors = ReaderErrorTally()
        self._last_status = ""
        self._last_clock_check = 0.0
        # What the console's status shows that only the records tell, kept from _on_record
        # on the gate thread (a few dict writes per record): reader health, active alarms.
        self._reader_seen: dict[str, dict[str, Any]] = {}
        self._alarms: set[str] = set()
        self._last_seq = 0

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        """Build and start everything (see the module doc); ServiceError when it cannot."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        cfg = self.config
        self._check_fastpath()
        for warning in cfg.warnings():
            log.warning("config: %s", warning)
        self.boot = boot_id()
        state_dir = cfg.service.state_dir
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"state directory {state_dir} cannot be created ({exc.strerror}); create it "
                               "(owner gate-agent, mode 0700) or fix service.state_dir") from exc
        from agent.uplink.failover import DEFAULT_RUNTIME_DIR, FailoverJournal
        from agent.uplink.journal import JournalError, readonly_dir

        if not os.access(state_dir, os.W_OK | os.X_OK):
            if not readonly_dir(state_dir):
                raise ServiceError(f"state directory {state_dir} is not writable by this user; "
                                   "chown gate-agent:gate-agent and chmod 0700 it")
            # An SD card the kernel remounted read-only after errors: the gate still decides.
            log.error("state directory %s is on a read-only filesystem: the SD card is failing; the "
                      "gate keeps working (journal in the runtime directory, state not saved): "
                      "replace the card (see gate-agent doctor)", state_dir)
        if self.clock_sync is None:
            self.clock_sync = ClockSync(kernel_clock_synced)
        # The wall time is never below the floor the server's signed issued_at proved
        # (a Pi without RTC after a power cut with no NTP); see docs/contract.md "Time floor".
        clock = Clock(self.clock_sync, wall=self._wall)

        # Journal first: nothing the gate does may happen before it can be recorded.
        jc = cfg.journal
        runtime_dir = (self.env.get("RUNTIME_DIRECTORY") or "").split(":")[0]
        try:
            self.journal = FailoverJournal(jc.path, fallback_dir=Path(runtime_dir) if runtime_dir
                                           else DEFAULT_RUNTIME_DIR,
                                           sync_interval_s=jc.sync_interval_s,
                                           capacity_events=jc.capacity_events,
                                           disk_budget_bytes=jc.disk_budget_bytes,
                                           retention_days=jc.retention_days, clock=clock.now, boot=self.boot,
                                           progress=self._salvaging)
        except (JournalError, OSError) as exc:
            raise ServiceError(f"the journal {jc.path} cannot be opened: {exc}") from exc
        self.journal.start_sync_thread()
        if self.journal.recovered_record is not None:
            # Already committed by the journal itself; the uplink sends it like any other.
            log.error("journal was damaged and rebuilt: %s", self.journal.recovered_record)
        log.info("journal %s open (id %s, backlog %d)", jc.path, self.journal.id, self.journal.backlog())

        # The access list kept on disk, before the broker is reachable.
        table = None
        downlink_cls = _load_downlink_class()
        if downlink_cls is not None:
            self.downlink = downlink_cls(
                site=cfg.site, gate=cfg.gate_id, fp=fastpath, state_dir=state_dir,
                submit=self._submit, publish=self._publish,
                trusted_keys=dict(cfg.commands.trusted_keys),
                allow_unsigned=cfg.commands.allow_unsigned, max_age_s=cfg.commands.max_age_s,
                acl_max_age_s=cfg.acl.max_age_s, clock_synced=self.clock_sync,
                max_list_bytes=cfg.acl.max_list_bytes,
                status_snapshot=self._status_snapshot,
            )
            self.acl, table = self.downlink.load_persisted()
        if table is not None:
            log.info("access list %s loaded from %s (%d cards)", table.version, state_dir, len(table))
        else:
            log.warning("no access list on this board yet: every card is refused (unknown_card) "
                        "until the server sends one")

        self.statefile = StateFile(state_dir / STATE_FILE, fastpath, interval_s=cfg.service.state_save_s)
        state = self.statefile.load()
        self.presencefile = PresenceFile(state_dir / PRESENCE_FILE, site=cfg.site, gate=cfg.gate_id,
                                         interval_s=cfg.service.state_save_s)
        self.gate = Gate(self.statefile.start_config(cfg.gate), fastpath, table, state, boot=self.boot,
                         implementation=fastpath.IMPLEMENTATION, version=__version__,
                         fire_latched=self.statefile.fire,
                         presence=self.presencefile.load(cfg.gate.presence_reset))
        if self.acl is not None and getattr(self.acl, "timezone", None):
            self.gate.set_timezone(self.acl.timezone)

        # Hardware: outputs are claimed inactive; inputs are attached after the runtime exists.
        self._build_hardware()
        outputs: Any = self.io
        if self.buses:
            from agent.hw.osdp_reader import FeedbackRouter

            outputs = FeedbackRouter(self.io, *self.buses)

        wd = watchdog_interval(self.env) if cfg.service.watchdog else None
        if wd is not None and not self.notifier.enabled:
            wd = None
        self.runtime = GateRuntime(
            self.gate, self.journal, outputs=outputs, clock=clock,
            on_record=self._on_record, on_idle=self._on_idle,
            watchdog=self.notifier.watchdog if wd is not None else None,
            watchdog_interval_s=wd or 1.0,
        )
        self.runtime.start()  # agent.started (and acl_missing on a new board), every line inactive
        # Lists checked and built beside the gate wait for its events between chunks.
        aclstore.use_pacer(self.runtime.yield_to_gate)
        self.io.start()
        for reader in self.readers.values():
            start = getattr(reader, "start", None)
            if start is not None and not hasattr(reader, "decoder"):  # Wiegand readers run already
                start()
        for bus in self.buses:
            bus.start()

        self._start_sim_socket()
        self.notifier.ready(self.status_line())
        self.ready.set()
        log.info("ready: gate %s/%s, fastpath %s, %s", cfg.site, cfg.gate_id, fastpath.IMPLEMENTATION,
                 f"watchdog every {wd:.1f} s" if wd else "no systemd watchdog")
        self._start_console_socket()

        if cfg.mqtt.enabled:
            self._start_uplink()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        self._housekeeper.start()

    def _salvaging(self) -> None:
        # A damaged journal of a million records takes minutes to salvage on a Pi:
        # more than systemd's start timeout, which would kill and restart the salvage.
        self.notifier.notify("EXTEND_TIMEOUT_USEC=60000000", "STATUS=salvaging the damaged journal")

    def _check_fastpath(self) -> None:
        impl = fastpath.IMPLEMENTATION
        log.info("gate-agent %s starting; fastpath: %s", __version__, impl)
        if self.config.service.require_compiled and impl != "compiled":
            why = ("GATE_PUREPYTHON is set" if os.environ.get("GATE_PUREPYTHON", "") in ("1", "true", "yes")
                   else "the compiled module did not import")
            raise ServiceError(
                f"service.require_compiled = true but the pure-Python fastpath is loaded ({why}); "
                "rebuild the agent with its compiled fastpath (sudo ./install.sh, which needs gcc and "
                "python3-dev) or set service.require_compiled = false"
            )

    def _build_hardware(self) -> None:
        cfg = self.config
        hw = cfg.hardware
        if self.factory is None:
            self.factory = make_pin_factory(hw.pin_factory)
        from agent.hw.turnstile_io import TurnstileIO

        self.io = TurnstileIO(hw.board, factory=self.factory, submit=self._submit)
        if hw.pin_factory == "mock" or type(self.factory).__name__ == "MockFactory":
            rest_mock_inputs(self.factory, hw.board)
        osdp: dict[str, list[Any]] = {}
        for r in hw.readers:
            if r.type == "wiegand":
                from agent.hw.wiegand_gpio import WiegandReader

                kwargs: dict[str, Any] = {"key_width": cfg.key_width}
                if r.format is not None:
                    kwargs["fixed_bits"] = r.format
                pull = hw.board.readers[r.name].pull if r.name in hw.board.readers else "up"
                self.readers[r.name] = WiegandReader(r.name, r.d0, r.d1, factory=self.factory,
                                                     submit=self._submit, decoder_kwargs=kwargs, pull=pull,
                                                     max_lag_s=hw.wiegand_max_lag_s)
            elif r.type in ("rdm6300", "emline"):
                from agent.hw.serial_reader import SerialReader

                self.readers[r.name] = SerialReader(
                    r.name, r.port, protocol=r.type, baudrate=r.baudrate, submit=self._submit,
                    repeat_window_s=r.repeat_window_s, key_width=cfg.key_width, number=r.number)
            else:
                osdp.setdefault(r.port, []).append(r)
        for port, specs in osdp.items():
            try:
                from agent.hw.osdp_reader import OsdpBus, OsdpReaderSpec
            except ImportError as exc:
                raise ServiceError(f"OSDP readers are configured but the OSDP adapter is missing ({exc})") from exc
            try:
                bus = OsdpBus(port, [OsdpReaderSpec(r.name, r.address, r.scbk) for r in specs],
                              submit=self._submit, baudrate=specs[0].baudrate, key_width=cfg.key_width)
            except (ImportError, ValueError) as exc:
                raise ServiceError(f"OSDP bus {port}: {exc}") from exc
            self.buses.append(bus)

    def _start_sim_socket(self) -> None:
        """Simulated hardware only: the socket `gate-agent sim` drives the mock pins through
        (agent/simctl.py). Never on real pins; a failure leaves the gate working."""
        cfg = self.config
        if cfg.hardware.pin_factory != "mock":
            return
        from agent.simctl import SimServer, socket_path

        path = socket_path(cfg.service.state_dir)
        server = SimServer(path, factory=self.factory, profile=cfg.hardware.board, readers=self.readers,
                           reader_settings=cfg.hardware.readers, key_width=cfg.key_width,
                           site=cfg.site, gate=cfg.gate_id)
        try:
            server.start()
        except OSError as exc:
            log.error("simulated hardware: %s; the gate works, gate-agent sim cannot reach it", exc)
            return
        self.simctl = server
        log.info("simulated hardware: gate-agent sim drives the mock pins through %s", path)

    def _start_console_socket(self) -> None:
        """The console's local socket (agent/consolesock.py), on any pin factory: the
        console is for real boards. A failure is logged; the gate works without it."""
        cfg = self.config
        try:
            from agent.consolesock import ConsoleServer, socket_path

            path = socket_path(cfg.service.state_dir)
            server = ConsoleServer(path, submit=self._submit, status=self.console_status,
                                   lines=tuple(cfg.hardware.board.output_pins()))
            server.start()
        except OSError as exc:
            log.error("console: %s; the gate works, the console cannot reach it", exc)
            return
        except Exception:  # a bug here must not stop a gate that is ready
            log.exception("console: the local interface did not start; the gate works without it")
            return
        self.consolesock = server
        log.info("console: local interface on %s", path)

    def console_status(self) -> dict:
        """The console's STATUS object (agent/consolesock.py): every key present, null
        where unknown. Built on the console socket's threads from values the gate
        thread writes whole (the gate's mode, the pins, the counters kept here)."""
        from agent.core.records import rfc3339_ms
        from agent.hw.profiles import INPUT_MEANING

        cfg = self.config
        gate, io, up = self.gate, self.io, self.uplink
        table = gate.table if gate is not None else None
        version = getattr(table, "version", None) or None
        acl_sync = getattr(self.downlink, "acl", None)
        age, stale = acl_sync.freshness() if acl_sync is not None else (None, False)
        directions = dict(cfg.gate.readers)
        readers = []
        for r in cfg.hardware.readers:
            seen = self._reader_seen.get(r.name, {})
            readers.append({"name": r.name, "type": r.type, "direction": directions.get(r.name),
                            "online": seen.get("online"), "errors": seen.get("errors", 0),
                            "last_read": seen.get("last_read")})
        return {
            "site": cfg.site, "gate": cfg.gate_id, "version": __version__, "fastpath": fastpath.IMPLEMENTATION,
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "mode": gate.mode if gate is not None else None,
            "commanded_mode": gate.commanded_mode if gate is not None else None,
            "fire": {"latched": bool(gate is not None and gate.fire_latched),
                     "loop_open": bool(gate is not None and gate.fire_loop_open)},
            "outputs": io.output_levels() if io is not None else {},
            "inputs": {name: {"active": bool(active), "meaning": INPUT_MEANING.get(name, "")}
                       for name, active in (io.levels() if io is not None else {}).items()},
            "readers": readers,
            "journal": {"backlog": self.journal.backlog() if self.journal is not None else 0,
                        "last_seq": self._last_seq},
            "acl": {"version": version, "cards": len(table) if version else None, "age_s": age, "stale": bool(stale)},
            "clock": {"synced": bool(self.clock_sync()) if self.clock_sync is not None else False,
                      "now": rfc3339_ms(self._wall())},
            "uplink": {"enabled": cfg.mqtt.enabled, "connected": up.connected if up is not None else None},
            "alarms": sorted(self._alarms),
            "key_width": cfg.key_width,
            "directions": directions,
        }

    def _start_uplink(self) -> None:
        # paho is imported here, only when a broker is configured (not before READY).
        try:
            from agent.uplink.mqtt import Uplink, UplinkError
        except ImportError as exc:
            self._uplink_unavailable(f"the MQTT client does not import ({exc}): reinstall the agent "
                                     "(sudo ./install.sh) or `pip install paho-mqtt`")
            return
        m = self.config.mqtt
        try:
            self.uplink = Uplink(
                self.journal, site=self.config.site, gate=self.config.gate_id, host=m.host, port=m.port,
                client_id=m.client_id, ack_mode=m.ack_mode, window=m.window, keepalive=m.keepalive,
                tls=m.tls.to_uplink() if m.tls is not None else None, username=m.username,
                password=m.password, backoff_max_s=m.backoff_max_s, status_fields=self._status_fields,
                on_alarm=self._on_uplink_alarm,
                on_message=self.downlink.on_message if self.downlink is not None else None,
                boot=self.boot, started_at=self.started_at,
                max_packet_bytes=self._max_packet_bytes(),
                site_events=m.site_events, session_expiry_s=m.session_expiry_s,
            )
        except (UplinkError, OSError, ValueError) as exc:
            self._uplink_unavailable(exc)
            return
        self.uplink.start()
        log.info("uplink to %s:%d started (%s)", m.host, m.port, "TLS" if m.tls else "no TLS")

    def _uplink_unavailable(self, exc: object) -> None:
        # The gate works without its uplink (principle 1): decide, journal, raise the alarm.
        self.uplink = None
        log.error("uplink not started: %s. The gate keeps deciding and journalling; fix [mqtt] "
                  "and restart the agent to send the backlog", exc)
        self._submit(Report("alarm", {"kind": "uplink_config", "active": True,
                                      "detail": f"uplink not started: {exc}"[:MAX_DETAIL]}))

    # -- hooks ---------------------------------------------------------------------

    def _submit(self, event: Any) -> Any:
        runtime = self.runtime
        if runtime is None:
            log.warning("event %r before the gate thread exists; dropped", event)
            return False
        return runtime.submit(event)

    def _publish(self, topic: str, payload: bytes, properties: Any = None) -> None:
        """The downlink's replies (command results) go out through the uplink."""
        if self.uplink is None:
            log.info("no uplink: reply on %s dropped (the result is in the journal)", topic)
            return
        self.uplink.reply(topic, payload, properties)

    def _status_snapshot(self) -> dict:
        """Extra fields for the status command's reply."""
        up = self.uplink
        return {
            "mode": self.gate.mode if self.gate is not None else None,
            "backlog": self.journal.backlog() if self.journal is not None else None,
            "broker": None if up is None else ("connected" if up.connected else "disconnected"),
            "clock_synced": self.clock_sync() if self.clock_sync is not None else None,
            "version": __version__,
        }

    def _on_record(self, record: dict) -> None:
        """Gate thread, after each committed record."""
        rtype = record.get("type")
        self._note_for_status(rtype, record)
        if self.consolesock is not None:
            self.consolesock.on_record(record)  # appends to its watchers' queues; never waits
        if self.simctl is not None:
            self.simctl.on_record(record)
        if rtype == "reader.error":
            self._reader_errors.count(record)
        if rtype in ("alarm", "alarm.fire", "mode.changed", "turnstile.fault", "journal.overflow"):
            log.warning("%s %s", rtype, {k: v for k, v in record.items() if k not in
                                         ("v", "boot", "mono", "clock_synced")})
        else:
            log.debug("record %s", record)
        if self.uplink is not None:
            self.uplink.wake()
            if rtype == "acl.applied":
                self.uplink.refresh_status()  # the retained status names the list now in use
        if self.downlink is not None:
            self.downlink.on_record(record)

    def _note_for_status(self, rtype: Any, record: dict) -> None:
        """Gate thread: what the console's status shows from the records."""
        seq = record.get("seq")
        if isinstance(seq, int) and seq > self._last_seq:
            self._last_seq = seq
        if rtype == "alarm":
            kind = record.get("kind")
            if record.get("active"):
                self._alarms.add(kind)
            else:
                self._alarms.discard(kind)
            return
        reader = record.get("reader")
        if not reader or rtype not in ("access.granted", "access.denied", "reader.error", "reader.status"):
            return
        seen = self._reader_seen.get(reader)
        if seen is None:
            if len(self._reader_seen) >= 64:  # only configured readers reach the core; a bound anyway
                return
            seen = self._reader_seen[reader] = {"online": None, "errors": 0, "last_read": None}
        if rtype == "reader.status":
            seen["online"] = bool(record.get("online"))
        elif rtype == "reader.error":
            seen["errors"] += 1
        else:
            seen["last_read"] = record.get("ts")

    def _on_idle(self, now: Any) -> list[dict]:
        committed = self.journal.maintenance(now.wall)
        if self.statefile is not None:
            self.statefile.maybe_save(self.gate.state, now.mono, self.gate.commanded_mode,
                                      fire=self.gate.fire_latched)
        if self.presencefile is not None:
            # The nightly reset comes on time even when nobody passes (the file says it).
            self.gate.presence.roll(now.wall, self.gate.timezone)
            self.presencefile.maybe_save(self.gate.presence, now)
        return committed

    def _on_uplink_alarm(self, kind: str, active: bool, detail: str) -> None:
        fields: dict[str, Any] = {"kind": kind, "active": bool(active)}
        if detail:
            fields["detail"] = detail[:MAX_DETAIL]
        self._submit(Report("alarm", fields))

    def _wall(self) -> float:
        """The gate's wall time: the system clock, never below the signed time floor."""
        dl = self.downlink
        now = time.time()
        return max(now, dl.wall_floor()) if dl is not None else now

    def _max_packet_bytes(self) -> int:
        """The largest message the broker may send this gate: the list cap plus a margin
        (commands are far smaller); anything bigger is dropped by the broker."""
        return self.config.acl.max_list_bytes + PACKET_MARGIN_BYTES

    def _status_fields(self) -> dict:
        table = self.gate.table if self.gate is not None else None
        version = getattr(table, "version", None) or None
        return {"fastpath": fastpath.IMPLEMENTATION, "acl_version": version, "acl_stale": self._acl_stale}

    # -- housekeeping: clock, STATUS=, telemetry ------------------------------------------

    def status_line(self) -> str:
        """The systemd STATUS= text: mode, backlog, broker, access list."""
        mode = self.gate.mode if self.gate is not None else "starting"
        backlog = self.journal.backlog() if self.journal is not None else 0
        if not self.config.mqtt.enabled:
            broker = "offline (no mqtt.host)"
        elif self.uplink is None:
            broker = "starting"
        else:
            broker = "connected" if self.uplink.connected else "disconnected"
        table = self.gate.table if self.gate is not None else None
        acl = getattr(table, "version", None) or "none"
        return f"mode {mode}; backlog {backlog}; broker {broker}; acl {acl}"

    def _housekeeping(self) -> None:
        interval = self.config.mqtt.telemetry_interval_s
        next_telemetry = time.monotonic() + interval if interval > 0 else None
        next_age_check = time.monotonic()
        while not self._stopping.wait(HOUSEKEEPING_S):
            try:
                now = time.monotonic()
                if now - self._last_clock_check >= CLOCK_CHECK_S and self.clock_sync is not None:
                    self._last_clock_check = now
                    self.clock_sync.refresh()
                if self.downlink is not None and now >= next_age_check:
                    # Also offline and without telemetry: a stale list must raise its alarm.
                    next_age_check = now + ACL_AGE_CHECK_S
                    stale = bool(self.downlink.status().get("acl_stale", False))
                    if stale != self._acl_stale:
                        # The retained status says it too: the fleet view shows a stale gate.
                        self._acl_stale = stale
                        if self.uplink is not None:
                            self.uplink.refresh_status()
                line = self.status_line()
                if line != self._last_status:
                    self._last_status = line
                    self.notifier.status(line)
                if next_telemetry is not None and now >= next_telemetry and self.uplink is not None:
                    next_telemetry = now + interval
                    self.uplink.publish_telemetry(self.telemetry())
            except Exception:
                log.exception("housekeeping failed; trying again")

    def telemetry(self) -> dict:
        """One telemetry message (agent/schemas/telemetry.schema.json)."""
        table = self.gate.table
        stats = gate_figures(self.runtime, self.downlink, boot=self.boot,
                             uptime_s=time.monotonic() - self.started_mono,
                             clock_synced=self.clock_sync() if self.clock_sync is not None else False,
                             table_version=getattr(table, "version", None) or None,
                             reader_errors=self._reader_errors.take())
        return build_telemetry(self.journal, stats, time.time(),
                               uplink_stats=self.uplink.stats() if self.uplink is not None else None)

    # -- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop cleanly: console and sim sockets and readers (no new input), uplink (offline
        status; no new downlink message), downlink (its last flood summary), gate
        thread (what is queued, then every output inactive), pins, state, journal
        (flushed and closed). Idempotent; never raises."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self.notifier.stopping("stopping")
        log.info("stopping")
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.consolesock is not None:
            steps.append(("console socket", self.consolesock.stop))  # no console action while stopping
        if self.simctl is not None:
            steps.append(("sim socket", self.simctl.stop))  # no simulated input while stopping
        for name, reader in self.readers.items():
            # SerialReader.stop ends its thread; WiegandReader.close its timer and pins.
            steps.append((f"reader {name}", getattr(reader, "stop", None) or reader.close))
        for bus in self.buses:
            steps.append((f"OSDP bus {bus.port_name}", bus.stop))
        if self._housekeeper is not None:
            steps.append(("housekeeping", lambda: self._housekeeper.join(5)))
        if self.uplink is not None:
            steps.append(("uplink", self.uplink.stop))  # no new downlink messages from here on
        if self.downlink is not None:
            # Before the gate thread stops: the flood guard's last summary is journalled.
            steps.append(("downlink", self.downlink.close))
        if self.runtime is not None:
            steps.append(("gate thread", lambda: (self.runtime.wait_idle(STOP_DRAIN_S),
                                                  self.runtime.stop())))
            if aclstore.pacer() == self.runtime.yield_to_gate:
                aclstore.use_pacer(None)
        if self.io is not None:
            steps.append(("turnstile I/O", self.io.close))
        if self.statefile is not None and self.gate is not None:
            steps.append(("gate state", lambda: (self.statefile.close(),
                                                 self.statefile.save(self.gate.state,
                                                                     mode=self.gate.commanded_mode,
                                                                     fire=self.gate.fire_latched))))
        if self.presencefile is not None and self.gate is not None:
            steps.append(("presence", lambda: (self.presencefile.close(),
                                               self.presencefile.save(self.gate.presence, time.time()))))
        if self.journal is not None:
            steps.append(("journal", self.journal.close))
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("stopping %s failed; going on", what)
        if self.factory is not None and type(self.factory).__name__ == "MockFactory":
            try:
                self.factory.reset()  # simulated pins: free them for the next Service in this process
            except Exception:  # stopping must go on
                log.debug("mock pin factory reset failed", exc_info=True)
        log.info("stopped")
        self.notifier.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() was called (or a signal asked for it); False on timeout."""
        return self._stopping.wait(timeout)

    def request_stop(self) -> None:
        """Ask the main loop to stop (signal handlers: only sets a flag)."""
        self._stopping.set()


# --------------------------------------------------------------------------- CLI


def _cmd_run(args: argparse.Namespace) -> int:
    return run(args.config)


def run(config_path: str | os.PathLike[str] = DEFAULT_PATH) -> int:
    """Load the config, start the service, wait for SIGTERM/SIGINT, stop. Exit code."""
    # The gate thread waits for the GIL whenever another thread (the uplink under a
    # broker flood, say) holds it: at most one switch interval per hand-over. 1 ms
    # instead of CPython's 5 ms keeps a card's decision well inside 10 ms.
    sys.setswitchinterval(GIL_SWITCH_S)
    setup_logging("info")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        # One log line per problem: journald keeps each with its priority.
        log.error("config %s cannot be used: %d problem(s); fix them and start again (check with: "
                  "gate-agent check-config %s)", exc.source, len(exc.errors), exc.source)
        for path, msg in exc.errors:
            log.error("  %s: %s", path or exc.source, msg)
        return EXIT_CONFIG
    setup_logging(config.service.log_level)
    service = Service(config)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s received", signal.Signals(signum).name)
        service.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Start-up makes objects that live as long as the process (the config, the gate,
        # the list's small parts): no collection runs while they are made (~25 of them,
        # a few ms), and after READY they are out of the collector's sight, so a full
        # collection later walks only what is new and its pause on the gate thread stays short.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            service.start()
        except ServiceError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_FAILED
        except Exception:
            log.exception("cannot start: unexpected error (a bug: please report it with this log)")
            return EXIT_FAILED
        finally:
            gc.freeze()
            if gc_was_enabled:
                gc.enable()
        while not service.wait(1.0):
            if service.runtime is not None and not service.runtime.running:
                log.error("the gate thread has ended; exiting so systemd restarts the agent")
                service.stop()
                return EXIT_FAILED
        service.stop()
        return EXIT_OK
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `run [--config FILE]` to a `gate-agent` subparsers object."""
    p = subparsers.add_parser(
        "run",
        help="run the agent (what the systemd unit starts)",
        description="Run the gate agent: open the journal, load the access list kept on disk, "
        "drive the turnstile, report events over MQTT. Stops cleanly on SIGTERM or Ctrl-C. "
        "Exit codes: 0 stopped cleanly, 1 could not start or failed, 2 the config cannot be used.",
    )
    p.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE",
                   help=f"config file (default {DEFAULT_PATH})")
    p.set_defaults(func=_cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """`gate-agent run` on its own: python -c "from agent.service import main; main(['run'])"."""
    parser = argparse.ArgumentParser(prog="gate-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    from agent.config import add_check_config_parser

    add_check_config_parser(sub)
    args = parser.parse_args(argv)
    code = args.func(args)
    sys.exit(code)


if __name__ == "__main__":
    main()
