"""``gate-agent doctor``: one line per check, what is wrong and what to do.

    sudo gate-agent doctor [--config /etc/gate-agent/agent.toml] [--wait-card 30]

The checks, in the order a technician fixes things:

    config     the file is valid (every problem listed)
    service    is the agent running (systemd)
    gpio       a GPIO chip exists and is usable; the profile's pins are free
               (claimed with the configured pin factory, every output at its
               inactive level; skipped while the service holds them)
    boot       config.txt drives the profile's relay pins to their "off"
               level from power-on (the profile's boot_config line,
               gpio=4-7=op,dh for pi4-relay4): in /boot/firmware/config.txt
               (bookworm and later) or /boot/config.txt (older)
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

The checks live by subject: hardware.py (gpio, boot, readers, serial),
network.py (clock, broker), storage.py (disk, journal, acl); base.py holds
what they share. Doctor mixes them together with the config, service and
fastpath lines and runs them in the order above.
"""
from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, TextIO

from agent.i18n import _
from agent.tools.doctor.base import (
    DEFAULT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    DoctorEnv,
)
from agent.tools.doctor.hardware import HardwareChecks
from agent.tools.doctor.network import NetworkChecks
from agent.tools.doctor.storage import StorageChecks
from agent.tools.words import config_message

__all__ = [
    "FAIL",
    "OK",
    "SKIP",
    "WARN",
    "Check",
    "Doctor",
    "DoctorEnv",
    "add_doctor_parser",
    "check_label",
    "format_checks",
    "run_doctor",
]


class Doctor(HardwareChecks, NetworkChecks, StorageChecks):
    """The checklist for one config; run() gives every line in order."""

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
        for step in (self.check_config, self.check_service, self.check_gpio, self.check_boot, self.check_readers,
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
            hints = [f"{where}: {config_message(msg)}" if where else config_message(msg) for where, msg in exc.errors[:12]]
            if len(exc.errors) > 12:
                hints.append(_("... and {n} more").format(n=len(exc.errors) - 12))
            hints.append(_("fix them, then check again: gate-agent check-config {path}").format(path=self.config_path))
            return Check(FAIL, "config", _("{path}: problems: {n}").format(path=self.config_path, n=len(exc.errors)),
                         tuple(hints))
        c = self.cfg
        return Check(OK, "config", _("{path}: valid (site {site}, gate {gate})").format(
            path=self.config_path, site=c.site, gate=c.gate_id), tuple(config_message(w) for w in c.warnings()))

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

    def check_fastpath(self) -> Check:
        impl = self.env.implementation()
        if impl == "compiled":
            return Check(OK, "fastpath", _("compiled"))
        required = self.cfg is not None and self.cfg.service.require_compiled
        return Check(FAIL if required else WARN, "fastpath", _("the pure-Python twin is loaded (slower)"), (
            _("rebuild with its compiled fastpath: sudo ./install.sh (needs gcc and python3-dev)"),
            *((_("service.require_compiled = true: the service refuses to start like this"),) if required else ()),
        ))


# --------------------------------------------------------------------------- output, CLI


def check_label(name: str) -> str:
    """A check's name for people: "reader entry" -> "считыватель entry" (the reader's or port's name kept)."""
    head, sep, rest = name.partition(" ")
    words = {
        "config": _("config"), "service": _("service"), "gpio": _("gpio"), "boot": _("boot"),
        "readers": _("readers"), "reader": _("reader"), "serial": _("serial"), "clock": _("clock"),
        "broker": _("broker"), "disk": _("disk"), "journal": _("journal"), "fastpath": _("fastpath"),
        "acl": _("acl"), "fallback": _("fallback"),
    }
    return words.get(head, head) + sep + rest


def format_checks(checks: list[Check]) -> str:
    labels = [check_label(c.name) for c in checks]
    width = max((len(x) for x in labels), default=8)
    lines = []
    for c, label in zip(checks, labels, strict=True):
        lines.append(f"{c.status:<4}  {label:<{width}}  {c.summary}")
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
