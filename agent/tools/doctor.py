"""``gate-agent doctor``: one line per check, what is wrong and what to do.

    sudo gate-agent doctor [--config /etc/gate-agent/agent.toml] [--wait-card 30]

The checks, in the order a technician fixes things:

    config     the file is valid (every problem listed)
    service    is the agent running (systemd)
    gpio       a GPIO chip exists and is usable; the profile's pins are free
               (claimed with the configured pin factory, every output at its
               inactive level; skipped while the service holds them)
    readers    each reader sends a card (--wait-card S: present one at each)
    serial     every serial reader's port exists and can be opened
    broker     name resolves, TCP, TLS with the configured certificates, the
               broker accepts an MQTT connection; days the certificate has left
    clock      synchronised (the kernel's flag, as timedatectl shows it)
    disk       free space where the journal lives; a filesystem the kernel
               remounted read-only (a failing SD card) is a FAIL
    journal    integrity (quick_check, read-only) and the backlog to the server;
               the fallback journal in the runtime directory while the card
               is read-only
    fastpath   the compiled twin is loaded
    acl        an access list is on the board and how old it is

Each line is OK, WARN or FAIL (or -- when the check does not apply). Exit 0
when nothing FAILs, 1 otherwise. Nothing here changes the gate: files are
opened read-only, the journal with a read-only connection, the broker gets a
connection under its own client id (the service's session is not taken
over), outputs are only ever claimed at their inactive level.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from agent.i18n import _
from agent.tools.words import age_text

__all__ = [
    "Check",
    "Doctor",
    "DoctorEnv",
    "add_doctor_parser",
    "mqtt_connect",
    "run_doctor",
]

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "--"
EXIT_OK = 0
EXIT_FAILED = 1
SERVICE = "gate-agent"
DEFAULT_CONFIG = Path("/etc/gate-agent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/gate-agent")
DEFAULT_RUNTIME_DIR = Path("/run/gate-agent")  # agent.uplink.failover.DEFAULT_RUNTIME_DIR
NET_TIMEOUT_S = 5.0
CERT_WARN_DAYS = 30
DISK_FAIL_BYTES = 50 * 1024 * 1024  # below this the journal soon stops keeping records
BACKLOG_WARN_S = 3600.0  # an hour of events not confirmed: the line to the server is broken
MIN_SANE_YEAR = 2024  # a clock before this is certainly wrong (fake-hwclock, no RTC)


@dataclass(frozen=True)
class Check:
    """One line of the checklist. hints: what to do, one per line."""

    status: str
    name: str
    summary: str
    hints: tuple[str, ...] = ()


def _service_active_default() -> bool | None:
    """True/False when systemd can say whether the agent runs, else None."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return None
    try:
        res = subprocess.run(["systemctl", "is-active", "--quiet", SERVICE], timeout=5, check=False,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.returncode == 0


def _clock_synced_default() -> bool | None:
    from agent.service import kernel_clock_synced

    synced = kernel_clock_synced()
    if synced is not None:
        return synced
    if shutil.which("timedatectl") is None:
        return None
    try:
        res = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = res.stdout.strip()
    return {"yes": True, "no": False}.get(value)


@dataclass
class DoctorEnv:
    """What the doctor asks the machine; tests replace parts of it."""

    gpio_chips: Callable[[], list[str]] = lambda: sorted(glob.glob("/dev/gpiochip*"))
    service_active: Callable[[], bool | None] = _service_active_default
    clock_synced: Callable[[], bool | None] = _clock_synced_default
    wall: Callable[[], float] = time.time
    pin_factory: Callable[[str], Any] | None = None  # name -> gpiozero factory (default: the service's)
    implementation: Callable[[], str] = field(default=lambda: __import__("fastpath").IMPLEMENTATION)
    runtime_dir: Path = DEFAULT_RUNTIME_DIR  # where the service keeps its fallback journal


def _days(seconds: float) -> float:
    return seconds / 86400.0


# --------------------------------------------------------------------------- MQTT probe


def _mqtt_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


def mqtt_connect(sock: socket.socket, client_id: str, username: str | None = None,
                 password: str | None = None) -> int:
    """Send an MQTT 5 CONNECT on an open socket and return the CONNACK reason
    code (0 success, 0x80 and above refused); then DISCONNECT. A probe of a
    few bytes: no client library, no thread, no session left behind."""
    flags = 0x02  # clean start
    payload = _mqtt_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
    if password is not None:
        flags |= 0x40
        payload += _mqtt_string(password)
    variable = _mqtt_string("MQTT") + bytes([5, flags]) + struct.pack("!H", 30) + b"\x00"
    body = variable + payload
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    head = _recv_exact(sock, 1)
    if head[0] >> 4 != 2:
        raise ConnectionError(f"the broker answered packet type {head[0] >> 4}, not CONNACK")
    length, shift = 0, 0
    while True:
        b = _recv_exact(sock, 1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    rest = _recv_exact(sock, length)
    code = rest[1] if len(rest) > 1 else 0
    if code < 0x80:
        try:
            sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
        except OSError:
            pass
    return code


def _connack_hint(code: int) -> str:
    """What an MQTT 5 CONNACK refusal means, in the technician's words."""
    hints = {
        0x84: _("the broker does not speak MQTT 5; update it"),
        0x85: _("client id refused"),
        0x86: _("bad user name or password"),
        0x87: _("not authorised: the certificate or user is not allowed on this broker"),
        0x88: _("server unavailable"),
        0x89: _("server busy"),
        0x8A: _("banned"),
        0x8C: _("bad authentication method"),
    }
    return hints.get(code, "")


# --------------------------------------------------------------------------- the checks


class Doctor:
    """Runs the checks for one config; ``run()`` returns the Check lines."""

    def __init__(self, config_path: str | os.PathLike[str] = DEFAULT_CONFIG, *,
                 wait_card_s: float | None = None, env: DoctorEnv | None = None,
                 out: TextIO | None = None) -> None:
        self.config_path = Path(config_path)
        self.wait_card_s = wait_card_s
        self.env = env or DoctorEnv()
        self.out = out  # progress messages while waiting for cards
        self.cfg: Any = None
        self.raw: dict = {}
        self.service_running: bool | None = None
        self.clock_ok: bool | None = None

    def run(self) -> list[Check]:
        checks: list[Check] = []
        for step in (self.check_config, self.check_service, self.check_gpio, self.check_readers,
                     self.check_serial, self.check_clock, self.check_broker, self.check_disk,
                     self.check_journal, self.check_fastpath, self.check_acl):
            try:
                result = step()
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
                result = Check(FAIL, step.__name__.removeprefix("check_"),
                               _("the check itself failed: {error}").format(error=f"{type(exc).__name__}: {exc}"),
                               (_("please report this with the output of gate-agent doctor"),))
            checks.extend(result if isinstance(result, list) else [result])
        return checks

    # -- config --------------------------------------------------------------------

    def check_config(self) -> Check:
        from agent.config import ConfigError, load_config

        try:
            self.raw = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            self.raw = {}
        try:
            self.cfg = load_config(self.config_path)
        except ConfigError as exc:
            hints = [f"{where}: {msg}" if where else msg for where, msg in exc.errors[:12]]
            if len(exc.errors) > 12:
                hints.append(_("... and {n} more").format(n=len(exc.errors) - 12))
            hints.append(_("fix them, then check again: gate-agent check-config {path}").format(path=self.config_path))
            return Check(FAIL, "config", _("{path}: problems: {n}").format(path=self.config_path, n=len(exc.errors)),
                         tuple(hints))
        c = self.cfg
        return Check(OK, "config", _("{path}: valid (site {site}, gate {gate})").format(
            path=self.config_path, site=c.site, gate=c.gate_id), tuple(_(w) for w in c.warnings()))

    def _raw(self, *keys: str, default: Any = None) -> Any:
        node: Any = self.raw
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    def _pin_factory_name(self) -> str:
        if self.cfg is not None:
            return self.cfg.hardware.pin_factory
        value = self._raw("hardware", "pin_factory", default="auto")
        return value if isinstance(value, str) else "auto"

    # -- service -------------------------------------------------------------------

    def check_service(self) -> Check:
        self.service_running = self.env.service_active()
        if self.service_running is None:
            return Check(SKIP, "service", _("systemd is not running here: cannot tell whether the agent runs"))
        if self.service_running:
            return Check(OK, "service", _("gate-agent is running"))
        return Check(WARN, "service", _("gate-agent is not running"), (
            _("start it: sudo systemctl start gate-agent"),
            _("why it stopped: journalctl -u gate-agent -n 50"),
        ))

    # -- gpio ----------------------------------------------------------------------

    def check_gpio(self) -> Check:
        factory_name = self._pin_factory_name()
        if factory_name == "mock":
            return Check(WARN, "gpio", _("hardware.pin_factory = \"mock\": simulated pins, no relay is driven"),
                         (_("on a real gate set hardware.pin_factory = \"auto\""),))
        chips = self.env.gpio_chips()
        if not chips:
            return Check(FAIL, "gpio", _("no GPIO on this machine: there is no /dev/gpiochip*"), (
                _("on a Raspberry Pi: the GPIO driver is missing; use Raspberry Pi OS (Bookworm or newer)"),
                _("on a laptop or server the agent cannot drive a turnstile; for a trial use "
                  "hardware.pin_factory = \"mock\" or gate-agent demo"),
            ))
        usable = [c for c in chips if os.access(c, os.R_OK | os.W_OK)]
        if not usable:
            return Check(FAIL, "gpio", _("{chips}: no permission").format(chips=", ".join(chips)), (
                _("run the doctor with sudo; the service user needs group gpio (install.sh sets it)"),))
        if self.service_running:
            return Check(OK, "gpio", _("{chips} present; the pins are held by the running service, as they "
                                       "should be").format(chips=", ".join(chips)),
                         (_("to test the pins themselves: sudo systemctl stop gate-agent, then gate-agent "
                            "io-test; start the service again afterwards"),))
        if self.cfg is None:
            return Check(WARN, "gpio", _("{chips} present; pins not checked (the config is not valid)")
                         .format(chips=", ".join(chips)))
        return self._claim_pins(chips)

    def _factory(self, name: str) -> Any:
        if self.env.pin_factory is not None:
            return self.env.pin_factory(name)
        from agent.service import make_pin_factory

        return make_pin_factory(name)

    def _claim_pins(self, chips: list[str]) -> Check:
        from agent.tools import is_busy_error

        hw = self.cfg.hardware
        try:
            factory = self._factory(hw.pin_factory)
        except Exception as exc:  # noqa: BLE001 - ServiceError, ImportError, lgpio errors
            return Check(FAIL, "gpio", _("the pin library cannot start: {error}").format(error=exc), (
                _("on the Pi: sudo apt install python3-lgpio; the agent's venv needs --system-site-packages "
                  "(install.sh does it)"),))
        claimed: list[Any] = []
        try:
            from agent.hw.turnstile_io import TurnstileIO

            # Outputs are built at their inactive level, exactly as the service does.
            tio = TurnstileIO(hw.board, factory=factory, submit=lambda event: None)
            claimed.append(tio)
            for r in hw.readers:
                if r.type == "wiegand" and r.d0 is not None:
                    for pin in (r.d0, r.d1):
                        p = factory.pin(f"GPIO{pin}")
                        p.function = "input"
                        claimed.append(p)
        except Exception as exc:  # noqa: BLE001
            if is_busy_error(exc):
                return Check(FAIL, "gpio", _("pins are busy: {error}").format(error=exc), (
                    _("another program holds them (a second agent, io-test, enroll?): stop it"),))
            return Check(FAIL, "gpio", _("the profile's pins cannot be claimed: {error}").format(error=exc), (
                _("check hardware.profile and that the board is a Pi 4 or 5"),))
        finally:
            for item in reversed(claimed):
                try:
                    item.close()
                except Exception:  # noqa: BLE001, S110 - releasing must go on
                    pass
            close = getattr(factory, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001, S110
                    pass
        return Check(OK, "gpio", _("{chips}: profile {profile}, every pin free and claimed with the {factory} "
                                   "pin factory").format(chips=", ".join(chips), profile=hw.profile,
                                                         factory=hw.pin_factory))

    # -- readers -------------------------------------------------------------------

    def check_readers(self) -> list[Check] | Check:
        if self.cfg is None:
            return Check(SKIP, "readers", _("not checked: the config is not valid"))
        readers = self.cfg.hardware.readers
        listing = ", ".join(f"{r.name} ({r.type})" for r in readers) or _("none")
        if not readers:
            return Check(WARN, "readers", _("no readers configured"), (
                _("add them to [gate.readers] and [[hardware.readers]] (docs/readers.md)"),))
        if self.wait_card_s is None:
            return Check(SKIP, "readers", _("{readers}: not tested").format(readers=listing), (
                _("to test: gate-agent doctor --wait-card 30, then present a card at each reader"),))
        if self.service_running:
            return Check(WARN, "readers", _("{readers}: the running service holds them").format(readers=listing), (
                _("to test: sudo systemctl stop gate-agent, run the doctor again, start the service afterwards; "
                  "or watch the cards arrive with gate-agent monitor"),))
        return self._wait_for_cards(readers)

    def _wait_for_cards(self, readers: Any) -> list[Check]:
        from agent.core.cards import format_key
        from agent.core.events import CardRead, ReaderError

        seen: dict[str, list[Any]] = {r.name: [] for r in readers}
        lock = threading.Lock()
        got_card = threading.Event()

        def submit(event: Any) -> bool:
            name = getattr(event, "reader", None)
            if name in seen and isinstance(event, (CardRead, ReaderError)):
                with lock:
                    seen[name].append(event)
                    if all(any(isinstance(e, CardRead) for e in evs) for evs in seen.values()):
                        got_card.set()
            return True

        built: list[Any] = []
        out: list[Check] = []
        factory = None
        testable = [r for r in readers if r.type in ("wiegand", "rdm6300", "emline")]
        try:
            for r in testable:
                if r.type == "wiegand":
                    from agent.hw.wiegand_gpio import WiegandReader

                    if factory is None:
                        factory = self._factory(self.cfg.hardware.pin_factory)
                    kwargs: dict[str, Any] = {"key_width": self.cfg.key_width}
                    if r.format is not None:
                        kwargs["fixed_bits"] = r.format
                    built.append(WiegandReader(r.name, r.d0, r.d1, factory=factory, submit=submit,
                                               decoder_kwargs=kwargs))
                else:
                    from agent.hw.serial_reader import SerialReader

                    sr = SerialReader(r.name, r.port, protocol=r.type, baudrate=r.baudrate, submit=submit,
                                      key_width=self.cfg.key_width, number=r.number)
                    sr.start()
                    built.append(sr)
            if self.out is not None:
                print(_("present a card at each reader now ({names}); waiting up to {s} s...").format(
                    names=", ".join(r.name for r in testable), s=self.wait_card_s), file=self.out, flush=True)
            got_card.wait(self.wait_card_s)
        except Exception as exc:  # noqa: BLE001
            return [Check(FAIL, "readers", _("cannot listen to the readers: {error}").format(error=exc))]
        finally:
            for b in built:
                try:
                    (getattr(b, "stop", None) or b.close)()
                except Exception:  # noqa: BLE001, S110
                    pass
            if factory is not None and hasattr(factory, "close"):
                try:
                    factory.close()
                except Exception:  # noqa: BLE001, S110
                    pass
        for r in readers:
            if r.type == "osdp":
                out.append(Check(SKIP, f"reader {r.name}", _("OSDP: watch reader.status with the service "
                                                             "running (gate-agent monitor)")))
                continue
            with lock:
                events = list(seen[r.name])
            cards = [e for e in events if isinstance(e, CardRead)]
            errors = [e for e in events if isinstance(e, ReaderError)]
            if cards:
                c = cards[-1]
                shown = format_key(c.key, self.cfg.key_width)["facility_card"]
                out.append(Check(OK, f"reader {r.name}", _("card {card} ({format})").format(card=shown, format=c.format)))
            elif errors:
                kinds = sorted({e.kind for e in errors})
                out.append(Check(WARN, f"reader {r.name}", _("signals arrive but no valid card: {kinds}")
                                 .format(kinds=", ".join(kinds)), (
                    _("parity/length: D0 and D1 swapped, or the reader's format differs from the config "
                      "(hardware.readers format); glitch: noise on the lines, check the ground"),)))
            else:
                hint = (_("check the reader's 12 V supply, D0/D1 through the level shifter, the common ground")
                        if r.type == "wiegand" else
                        _("check the cable and the port; hold the card flat against the reader"))
                out.append(Check(FAIL, f"reader {r.name}", _("nothing received in {s} s").format(s=self.wait_card_s),
                                 (hint,)))
        return out

    # -- serial --------------------------------------------------------------------

    def check_serial(self) -> list[Check] | Check:
        if self.cfg is None:
            return Check(SKIP, "serial", _("not checked: the config is not valid"))
        ports: dict[str, list[str]] = {}
        for r in self.cfg.hardware.readers:
            if r.port:
                ports.setdefault(r.port, []).append(r.name)
        if not ports:
            return Check(SKIP, "serial", _("no serial readers configured"))
        from agent.tools import DeviceBusy, check_serial_port

        out = []
        for port, names in ports.items():
            label = f"serial {port}"
            who = ", ".join(names)
            if not os.path.exists(port):
                hints = [_("plug in the reader's USB adapter; list the ports: ls -l /dev/serial/by-id/")]
                if os.path.islink(port):
                    hints.append(_("{port} is a link to a device that is gone: the udev rule "
                                   "(/etc/udev/rules.d/99-gate-reader.rules) names another adapter; fix its "
                                   "idVendor/idProduct").format(port=port))
                elif "gate-reader" in port:
                    hints.append(_("the udev rule (/etc/udev/rules.d/99-gate-reader.rules) did not match the "
                                   "adapter: compare with udevadm info -a -n /dev/ttyUSB0"))
                out.append(Check(FAIL, label, _("missing (reader {names})").format(names=who), tuple(hints)))
                continue
            if self.service_running:
                out.append(Check(OK, label, _("present (reader {names}; in use by the service)").format(names=who)))
                continue
            try:
                check_serial_port(port)
            except DeviceBusy as exc:
                out.append(Check(WARN, label, _("present but busy: {error}").format(error=exc), (
                    _("another program holds it; stop it (io-test, enroll, a terminal program)"),)))
                continue
            except ValueError as exc:
                out.append(Check(FAIL, label, str(exc)))
                continue
            out.append(Check(OK, label, _("present and free (reader {names})").format(names=who)))
        return out

    # -- clock ---------------------------------------------------------------------

    def check_clock(self) -> Check:
        now = self.env.wall()
        year = datetime.fromtimestamp(now, tz=UTC).year
        self.clock_ok = self.env.clock_synced()
        shown = datetime.fromtimestamp(now).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        if year < MIN_SANE_YEAR:
            return Check(FAIL, "clock", _("the clock says {time}: certainly wrong").format(time=shown), (
                _("connect the network (NTP sets it) or set it: sudo date -s 'YYYY-MM-DD HH:MM'; without "
                  "a right clock TLS fails and schedules go wrong; a Pi 4 has no battery clock: fit an RTC"),))
        if self.clock_ok is None:
            return Check(WARN, "clock", _("{time}; cannot tell whether it is synchronised").format(time=shown),
                         (_("check with: timedatectl"),))
        if not self.clock_ok:
            return Check(WARN, "clock", _("{time}; NOT synchronised").format(time=shown), (
                _("records are marked clock_synced=false and the alarm clock_unsynced is raised; the gate "
                  "still decides"),
                _("check the network and NTP: timedatectl timesync-status; a Pi 4 after a power cut "
                  "without network has only the time saved at shutdown"),
            ))
        return Check(OK, "clock", _("{time}, synchronised").format(time=shown))

    # -- broker --------------------------------------------------------------------

    def check_broker(self) -> Check:
        if self.cfg is None:
            return Check(SKIP, "broker", _("not checked: the config is not valid"))
        m = self.cfg.mqtt
        if not m.enabled:
            return Check(WARN, "broker", _("no mqtt.host: the agent runs offline, events stay in the journal"),
                         (_("set it: sudo gate-agent provision --site S --gate G --broker HOST ..."),))
        where = f"{m.host}:{m.port}"
        hints: list[str] = []
        cert_note = ""
        status = OK
        if m.tls is not None and m.tls.cert_file:
            status, cert_note, more = self._cert_days(m.tls.cert_file)
            hints.extend(more)
        try:
            infos = socket.getaddrinfo(m.host, m.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return Check(FAIL, "broker", _("{where}: the name does not resolve ({error})").format(where=where, error=exc),
                         (_("check mqtt.host and the board's DNS (cat /etc/resolv.conf)"),))
        sock = None
        try:
            family, kind, proto, _canon, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(NET_TIMEOUT_S)
            try:
                sock.connect(addr)
            except OSError as exc:
                return Check(FAIL, "broker", _("{where}: cannot connect ({error})").format(
                    where=where, error=exc.strerror or exc), (
                    _("check the network cable, the school's firewall (port {port} outbound) and "
                      "mqtt.port").format(port=m.port),))
            if m.tls is not None:
                try:
                    ctx = m.tls.to_uplink().context()
                    sock = ctx.wrap_socket(sock, server_hostname=m.tls.server_name or m.host)
                except ssl.SSLCertVerificationError as exc:
                    more = [_("the broker's certificate was refused: {reason}").format(reason=exc.verify_message)]
                    if self.clock_ok is False or "not yet valid" in str(exc) or "expired" in str(exc):
                        more.append(_("a wrong clock makes valid certificates look expired or not yet valid: "
                                      "fix the clock first (see clock)"))
                    more.append(_("check mqtt.tls.ca_file (the region's CA) and mqtt.tls.server_name"))
                    return Check(FAIL, "broker", _("{where}: TLS failed").format(where=where), (*more, *hints))
                except (ssl.SSLError, OSError) as exc:
                    return Check(FAIL, "broker", _("{where}: TLS failed ({error})").format(where=where, error=exc), (
                        _("the broker refused this gate's certificate, or it is not a TLS port: check "
                          "mqtt.tls.cert_file/key_file and mqtt.port"), *hints))
            client_id = f"{self.cfg.mqtt.client_id or f'gate-{self.cfg.site}-{self.cfg.gate_id}'}-doctor"
            try:
                code = mqtt_connect(sock, client_id[:64], m.username, m.password)
            except (OSError, ConnectionError) as exc:
                return Check(FAIL, "broker", _("{where}: no MQTT answer ({error})").format(where=where, error=exc), (
                    _("the broker closed the connection: it may refuse this certificate (revoked?) or "
                      "this is not an MQTT port"), *hints))
        finally:
            if sock is not None:
                sock.close()
        if code >= 0x80:
            return Check(FAIL, "broker", _("{where}: the broker refused the connection (0x{code:02X} {why})")
                         .format(where=where, code=code, why=_connack_hint(code)), (
                _("ask the regional office to check this gate's certificate or account"), *hints))
        tls_text = "TLS" if m.tls is not None else _("no TLS")
        summary = _("{where}: connected ({tls}), MQTT accepted").format(where=where, tls=tls_text) + cert_note
        if m.tls is None:
            status = WARN if status == OK else status
            hints.append(_("without TLS events and commands cross the network in clear: set [mqtt.tls]"))
        return Check(status, "broker", summary, tuple(hints))

    def _cert_days(self, cert_file: str) -> tuple[str, str, list[str]]:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            crt = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        except (OSError, ValueError) as exc:
            return FAIL, "", [_("cannot read the certificate {path}: {error}").format(path=cert_file, error=exc)]
        left = _days(crt.not_valid_after_utc.timestamp() - self.env.wall())
        cns = crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else "?"
        hints = []
        status = OK
        if cn != f"{self.cfg.site}/{self.cfg.gate_id}":
            status = WARN
            hints.append(_("the certificate is made out to {cn!r}, but this gate is {ident!r}: the broker will "
                           "refuse this gate's topics").format(cn=cn, ident=f"{self.cfg.site}/{self.cfg.gate_id}"))
        if left <= 0:
            return FAIL, _("; certificate EXPIRED"), [
                _("the certificate expired on {date}: ask the regional office for a new one and install it with "
                  "gate-agent provision").format(date=crt.not_valid_after_utc.date().isoformat())]
        if left < CERT_WARN_DAYS:
            status = WARN
            hints.append(_("the certificate expires on {date}: ask the regional office for a new one")
                         .format(date=crt.not_valid_after_utc.date().isoformat()))
        return status, _("; certificate {cn}: days left: {days}").format(cn=cn, days=int(left)), hints

    # -- disk, journal -------------------------------------------------------------

    def _journal_path(self) -> Path:
        if self.cfg is not None:
            return self.cfg.journal.path
        from agent.tools.journaltool import journal_path

        try:
            return journal_path(self.config_path)
        except Exception:  # noqa: BLE001 - the config is broken; look where the default puts it
            from agent.tools.journaltool import DEFAULT_JOURNAL

            return DEFAULT_JOURNAL

    def check_disk(self) -> Check:
        path = self._journal_path()
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            usage = shutil.disk_usage(probe)
        except OSError as exc:
            return Check(WARN, "disk", _("cannot measure {path}: {error}").format(path=probe, error=exc))
        free_mb = usage.free / 1024 / 1024
        budget = self.cfg.journal.disk_budget_bytes if self.cfg is not None else None
        used = 0
        for f in (path, Path(str(path) + "-wal")):
            try:
                used += f.stat().st_size
            except OSError:
                pass
        summary = _("{path}: free {free} MB of {total} MB").format(
            path=probe, free=int(free_mb), total=int(usage.total / 1024 / 1024))
        from agent.uplink.journal import readonly_dir

        if readonly_dir(probe):
            return Check(FAIL, "disk", _("{path} is read-only: the SD card is failing (the kernel remounted "
                                         "it after errors)").format(path=probe), (
                _("the gate still decides; its records go to a temporary journal in {run} and still reach "
                  "the server, but a reboot or a power cut loses those the server has not confirmed")
                .format(run=self.env.runtime_dir),
                _("see the errors: sudo dmesg | grep -i -e mmc -e ext4 -e 'I/O error'"),
                _("see the mount: findmnt -no OPTIONS -T {path} (ro: read-only)").format(path=probe),
                _("replace the SD card: first save the records still waiting on it (journal line below; they "
                  "are sent by themselves if the card recovers): sudo gate-agent journal export --pending > "
                  "/run/pending.jsonl and copy that file off the board for the regional office; wait until the "
                  "fallback line shows nothing waiting for the server; then switch off and put in a new card "
                  "with a fresh image and this gate's config"),
            ))
        if usage.free < DISK_FAIL_BYTES:
            return Check(FAIL, "disk", summary, (
                _("the journal cannot keep records much longer: free space (old logs: sudo journalctl "
                  "--vacuum-size=100M; apt: sudo apt clean) or use a bigger card"),))
        if budget is not None and usage.free < budget - used:
            return Check(WARN, "disk", summary, (
                _("the journal may grow to journal.disk_budget_mb = {mb} MB but the disk has less left: "
                  "free space or lower the budget").format(mb=budget // 1024 // 1024),))
        return Check(OK, "disk", summary)

    def check_journal(self) -> list[Check]:
        checks = [self._check_journal_file(self._journal_path())]
        fallback = self._check_fallback()
        if fallback is not None:
            checks.append(fallback)
        return checks

    def _check_fallback(self) -> Check | None:
        """The journal the service writes while the card is read-only, if any."""
        from agent.tools.journaltool import JournalReadError, journal_stats, open_readonly
        from agent.uplink.failover import fallback_path

        path = fallback_path(self._journal_path(), self.env.runtime_dir)
        try:
            if not path.exists():
                return None
        except PermissionError:
            return None
        try:
            conn = open_readonly(path)
        except JournalReadError as exc:
            return Check(WARN, "fallback", str(exc))
        try:
            stats = journal_stats(conn, path, self.env.wall())
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors
            return Check(WARN, "fallback", _("{path} cannot be read: {error}").format(path=path, error=exc))
        finally:
            conn.close()
        return Check(WARN, "fallback", _("{path}: records go here while the card is read-only; waiting for "
                                         "the server: {n}").format(path=path, n=stats["pending"]), (
            _("kept across restarts of the agent, lost on a reboot or a power cut: do not switch the gate "
              "off while records wait for the server"),
            _("when the card takes writes again the agent copies them back into {path} by itself")
            .format(path=self._journal_path()),
        ))

    def _check_journal_file(self, path: Path) -> Check:
        from agent.tools.journaltool import JournalReadError, journal_stats, open_readonly
        from agent.uplink.journal import readonly_dir

        try:
            conn = open_readonly(path)
        except JournalReadError as exc:
            if Path(path).parent.exists() and readonly_dir(Path(path).parent):
                return Check(FAIL, "journal", _("{path} is on the read-only card (see disk): {error}").format(
                    path=path, error=exc))
            status = WARN if not Path(path).exists() or "permission" in str(exc).lower() else FAIL
            return Check(status, "journal", str(exc))
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                return Check(FAIL, "journal", _("{path} is damaged: {problem}").format(path=path, problem=result), (
                    _("restart the service: it rebuilds the journal, keeps every record it can read and the "
                      "damaged file beside it (sudo systemctl restart gate-agent)"),))
            stats = journal_stats(conn, path, self.env.wall())
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors on a damaged file
            return Check(FAIL, "journal", _("{path} cannot be read: {error}").format(path=path, error=exc), (
                _("restart the service: it checks and rebuilds a damaged journal at start"),))
        finally:
            conn.close()
        pending, oldest = stats["pending"], stats["oldest_pending_s"]
        summary = _("{path}: intact; last seq {seq}; waiting for the server: {n}").format(
            path=path, seq=stats["last_seq"], n=pending)
        if oldest is not None:
            summary += _(" (oldest {age})").format(age=age_text(oldest))
        if pending and oldest is not None and oldest > BACKLOG_WARN_S:
            hints = [_("events are not reaching the server: check the broker line above")]
            if self.cfg is not None and self.cfg.mqtt.ack_mode == "ingest":
                hints.append(_("if the broker is fine, the region's ingest is not confirming: tell the regional "
                               "office"))
            return Check(WARN, "journal", summary, tuple(hints))
        return Check(OK, "journal", summary)

    # -- fastpath, acl -------------------------------------------------------------

    def check_fastpath(self) -> Check:
        impl = self.env.implementation()
        if impl == "compiled":
            return Check(OK, "fastpath", _("compiled"))
        required = self.cfg is not None and self.cfg.service.require_compiled
        return Check(FAIL if required else WARN, "fastpath", _("the pure-Python twin is loaded (slower)"), (
            _("rebuild with its compiled fastpath: sudo ./install.sh (needs gcc and python3-dev)"),
            *((_("service.require_compiled = true: the service refuses to start like this"),) if required else ()),
        ))

    def check_acl(self) -> Check:
        import json

        state_dir = self.cfg.service.state_dir if self.cfg is not None else DEFAULT_STATE_DIR
        path = Path(state_dir) / "acl.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            try:
                os.stat(path.parent)
            except PermissionError:
                return Check(WARN, "acl", _("{dir} cannot be read: run the doctor with sudo").format(dir=path.parent))
            except FileNotFoundError:
                pass
            return Check(WARN, "acl", _("no access list on this board yet: every card is refused"), (
                _("the server sends one once the gate is online (see broker); ask the regional office to "
                  "push the school's list"),))
        except PermissionError:
            return Check(WARN, "acl", _("{path} cannot be read: run the doctor with sudo").format(path=path))
        except (OSError, ValueError) as exc:
            return Check(FAIL, "acl", _("{path} is damaged ({error})").format(path=path, error=exc), (
                _("restart the service: it moves the damaged file aside and asks the server for a new list"),))
        lst = data.get("list") if isinstance(data, dict) else None
        version = lst.get("version") if isinstance(lst, dict) else None
        applied_at = data.get("applied_at") if isinstance(data, dict) else None
        if not isinstance(applied_at, (int, float)):
            return Check(FAIL, "acl", _("{path} is damaged (no applied_at)").format(path=path), (
                _("restart the service: it moves the damaged file aside and asks the server for a new list"),))
        age = max(0.0, self.env.wall() - applied_at)
        people = len(lst.get("people", [])) if isinstance(lst, dict) else 0
        summary = _("version {version}, people: {n}, received {age} ago").format(
            version=version, n=people, age=age_text(age))
        max_h = self.cfg.acl.max_age_h if self.cfg is not None else None
        if max_h is not None and age > max_h * 3600:
            return Check(WARN, "acl", summary, (
                _("older than acl.max_age_h = {h} h: the server has not refreshed it; check the broker line and "
                  "tell the regional office").format(h=max_h),))
        return Check(OK, "acl", summary)


# --------------------------------------------------------------------------- output, CLI


def format_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=8)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.summary}")
        for h in c.hints:
            lines.append(f"{'':<4}  {'':<{width}}  -> {h}")
    counts = {s: sum(1 for c in checks if c.status == s) for s in (OK, WARN, FAIL)}
    lines.append("")
    lines.append(_("OK: {ok}, WARN: {warn}, FAIL: {fail}").format(ok=counts[OK], warn=counts[WARN], fail=counts[FAIL]))
    return "\n".join(lines)


def run_doctor(config_path: str | os.PathLike[str] = DEFAULT_CONFIG, *, wait_card_s: float | None = None,
               env: DoctorEnv | None = None, out: TextIO | None = None) -> int:
    """Print the checklist; 0 when nothing FAILs, else 1."""
    out = out or sys.stdout
    checks = Doctor(config_path, wait_card_s=wait_card_s, env=env, out=out).run()
    print(format_checks(checks), file=out, flush=True)
    return EXIT_FAILED if any(c.status == FAIL for c in checks) else EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    return run_doctor(args.config, wait_card_s=args.wait_card)


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``doctor`` (func: args -> exit code) to a ``gate-agent`` subparsers object."""
    p = subparsers.add_parser(
        "doctor",
        help=_("check this gate: config, GPIO, readers, serial, broker, clock, disk, journal, access list"),
        description=_("Run a checklist: one line per check with OK, WARN or FAIL, what is wrong and what to "
                      "do. Exit code 0 when nothing fails, 1 otherwise. Run it with sudo to see everything."),
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE",
                   help=_("config file (default {path})").format(path=DEFAULT_CONFIG))
    p.add_argument("--wait-card", type=float, default=None, metavar="S",
                   help=_("wait up to S seconds for a card at each reader (stop the service first)"))
    p.set_defaults(func=_cmd_doctor)
    return p
