"""Doctor's checks of the board itself: GPIO and the profile's pins, the boot
config (config.txt), the readers (a card at each) and the serial ports.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from agent.i18n import _
from agent.tools.doctor.base import (
    _STUB_MARK,
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
)


class HardwareChecks:
    """gpio, boot, readers, serial (mixed into Doctor, which holds cfg and env)."""

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
        from agent.hw.pins import make_pin_factory

        return make_pin_factory(name)

    def _claim_pins(self, chips: list[str]) -> Check:
        from agent.tools import is_busy_error

        hw = self.cfg.hardware
        try:
            factory = self._factory(hw.pin_factory)
        except Exception as exc:  # noqa: BLE001 - PinFactoryError (no lgpio, no chip), lgpio errors
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

    # -- boot (config.txt) ---------------------------------------------------------

    def check_boot(self) -> Check:
        from agent.hw.profiles import boot_drive_levels

        if self.cfg is None:
            return Check(SKIP, "boot", _("config.txt not checked (the config is not valid)"))
        board = self.cfg.hardware.board
        need = boot_drive_levels(board.boot_config)
        if not need:
            return Check(SKIP, "boot", _("profile {profile} needs no line in config.txt").format(profile=board.name))
        files: list[tuple[Path, str]] = []
        unreadable: list[tuple[Path, str]] = []
        for d in self.env.boot_dirs:
            path = Path(d) / "config.txt"
            try:
                files.append((path, path.read_text(encoding="utf-8", errors="replace")))
            except FileNotFoundError:
                continue
            except OSError as exc:
                unreadable.append((path, exc.strerror or str(exc)))
        real = [(p, t) for p, t in files if _STUB_MARK not in t]  # the firmware reads the first
        if not real:
            if unreadable:
                path, why = unreadable[0]
                return Check(WARN, "boot", _("{path} cannot be read ({error}): run the doctor with sudo").format(
                    path=path, error=why))
            where = ", ".join(str(Path(d) / "config.txt") for d in self.env.boot_dirs)
            if self._pin_factory_name() == "mock" or not self.env.gpio_chips():
                return Check(SKIP, "boot", _("no Raspberry Pi boot partition here (no {where})").format(where=where))
            return Check(WARN, "boot", _("config.txt not found ({where}): the relay pins at power-on cannot be "
                                         "checked").format(where=where),
                         (_("is the boot partition mounted? sudo mount -a; then run the doctor again"),))
        path, text = real[0]
        effective, conditional = _config_txt_levels(text)
        lines = "; ".join(board.boot_config)
        wrong = sorted(p for p, lvl in need.items() if effective.get(p) not in (None, lvl))
        missing = sorted(p for p, lvl in need.items() if effective.get(p) is None)
        if not wrong and not missing:
            hints: tuple[str, ...] = ()
            booted = self.env.boot_time()
            try:
                changed = path.stat().st_mtime
            except OSError:
                changed = None
            if booted is not None and changed is not None and changed > booted:
                hints = (_("changed since this start: the firmware applies it at the next start; reboot once and "
                           "watch the relays stay off"),)
            return Check(OK, "boot", _("{path}: {lines} (profile {profile}): the relays stay off from power-on")
                         .format(path=path, lines=lines, profile=board.name), hints)
        if wrong:
            pins = ", ".join(f"BCM {p} {effective[p]}" for p in wrong)
            return Check(FAIL, "boot", _("{path} drives {pins} at power-on, against profile {profile}: the relays "
                                         "switch at every start").format(path=path, pins=pins, profile=board.name), (
                _("remove that gpio= line from {path}, add under [all] at its end: {lines}, then reboot")
                .format(path=path, lines=lines),))
        hints_l = [_("add under [all] at the end of {path}: {lines}, then reboot").format(path=path, lines=lines),
                   _boot_fix(board.boot_config, path)]
        elsewhere = [p for p, t in files if p != path and _config_txt_levels(t)[0].keys() & set(missing)]
        if elsewhere:
            hints_l.insert(0, _("it is in {other}, which the firmware does not read on this system").format(
                other=", ".join(str(p) for p in elsewhere)))
        elif set(missing) & conditional:
            hints_l.insert(0, _("it is there, but under a section filter ([pi4], [cm4]...) that may not match "
                                "this board"))
        pins = ", ".join(f"BCM {p}" for p in missing)
        return Check(FAIL, "boot", _("{path}: no line drives {pins} at power-on (profile {profile} needs {lines}): "
                                     "the relays are not held off while the Pi starts").format(
            path=path, pins=pins, profile=board.name, lines=lines), tuple(hints_l))

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
            # OSDP readers sharing a port are one bus, opened as the service opens it (Secure Channel).
            buses: dict[str, list[Any]] = {}
            for r in readers:
                if r.type == "osdp":
                    buses.setdefault(r.port, []).append(r)
            for port, on_bus in buses.items():
                from agent.hw.osdp_reader import OsdpBus, OsdpReaderSpec

                bus = OsdpBus(port, [OsdpReaderSpec(r.name, r.address, r.scbk) for r in on_bus], submit=submit,
                              baudrate=on_bus[0].baudrate, key_width=self.cfg.key_width)
                bus.start()
                built.append(bus)
                testable.extend(on_bus)
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
                        _("check the RS-485 pair (A/B), the reader's address and baud rate, and that its "
                          "Secure Channel key is the one in scbk_file") if r.type == "osdp" else
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


# --------------------------------------------------------------------------- config.txt


def _gpio_pins(spec: str) -> list[int]:
    pins: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                pins.extend(range(lo, hi + 1))
            elif part:
                pins.append(int(part))
        except ValueError:
            continue
    return pins


def _config_txt_levels(text: str) -> tuple[dict[int, str | None], set[int]]:
    """(pin -> "high"/"low"/None: what config.txt's gpio= lines leave each pin driven to, for
    every board (top of the file and [all] sections; a later line wins, as the firmware does);
    the pins gpio= lines name only under a section filter ([pi4], [cm4], [none]...))."""
    from agent.hw.profiles import boot_drive_levels

    effective: dict[int, str | None] = {}
    conditional: set[int] = set()
    every_board = True
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            every_board = line.lower() == "[all]"
            continue
        if not line.startswith("gpio") or "=" not in line:
            continue
        key, _sep, rest = line.partition("=")
        if key.strip() != "gpio":
            continue
        spec = rest.partition("=")[0]
        levels = boot_drive_levels([line])
        for pin in _gpio_pins(spec):
            if every_board:
                effective[pin] = levels.get(pin)  # a gpio= line without op,dh/dl undoes an earlier drive
            else:
                conditional.add(pin)
    return effective, conditional


def _boot_fix(lines: tuple[str, ...], path: Path) -> str:
    """A command that appends the lines under [all] to config.txt."""
    body = "\\n".join(["", "[all]", *lines])  # a newline first: the file may not end with one
    return _("or run: printf '{body}\\n' | sudo tee -a {path}").format(body=body, path=path)
