"""Bench tools for technicians: ``gate-agent enroll`` and ``gate-agent io-test``.

Shared here: exit codes, the pin factory by name, telling "the running
service holds this pin or port" apart from other failures, so both tools
can say plainly what to do, and one key of the agent's config read leniently
(``config_path``) for the tools that read the service's files.

Exit codes: 0 done; 1 the check failed (fewer cards than asked, a command
that failed); 2 bad input (unknown pin, port or profile); 3 busy (the
service or another program holds the pins or the port).
"""

from __future__ import annotations

import errno
import os
import tomllib
from pathlib import Path
from typing import Any

from agent.exits import Exit
from agent.i18n import _

EXIT_OK = Exit.OK
EXIT_FAILED = Exit.FAILED
EXIT_USAGE = Exit.USAGE
EXIT_BUSY = Exit.UNAVAILABLE

SERVICE = "gate-agent"
STOP_SERVICE_HINT = (
    f"stop the service: sudo systemctl stop {SERVICE}, then run again "
    f"(and start it afterwards: sudo systemctl start {SERVICE})"
)
PIN_FACTORIES = ("lgpio", "mock")
_BUSY_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK}
_LOCK_DIRS = (Path("/run/lock"), Path("/var/lock"))


class DeviceBusy(RuntimeError):
    """The pins or the port are held by another program (normally the service)."""


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_busy_error(exc: BaseException) -> bool:
    """Whether an error means "someone else holds this pin or port".

    gpiozero's GPIOPinInUse (another device in this process, or the mock
    factory), lgpio's "GPIO busy" (another process, such as the service),
    pyserial's failed exclusive lock, EBUSY.
    """
    for e in _chain(exc):
        if type(e).__name__ in ("GPIOPinInUse", "DeviceBusy"):
            return True
        text = str(e).lower()
        if "busy" in text or "exclusively lock" in text or "already in use" in text:
            return True
        if isinstance(e, OSError) and e.errno == errno.EBUSY:
            return True
    return False


def busy_message(what: str, exc: BaseException) -> str:
    """The plain message for a busy pin or port."""
    return _("{what} is busy ({error}): the {service} service (or another program) is using it. "
             "To use this tool, {hint}.").format(what=what, error=exc, service=SERVICE, hint=_(STOP_SERVICE_HINT))


def serial_lock_holder(port: str) -> int | None:
    """The pid holding a UUCP lock file (/run/lock/LCK..ttyUSB0) on the port, if alive."""
    name = os.path.basename(os.path.realpath(port))
    for d in _LOCK_DIRS:
        path = d / f"LCK..{name}"
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass  # alive, owned by someone else
        return pid
    return None


def check_serial_port(port: str) -> None:
    """Open and close the port once, as the reader will: raise DeviceBusy if it is
    held, or ValueError saying what to fix when it cannot be opened."""
    import serial

    pid = serial_lock_holder(port)
    if pid is not None:
        raise DeviceBusy(_("{port} is locked by process {pid}").format(port=port, pid=pid))
    try:
        ser = serial.Serial(port, 9600, timeout=0, exclusive=True)
    except (serial.SerialException, OSError) as exc:
        code = getattr(exc, "errno", None)
        if is_busy_error(exc) or code in _BUSY_ERRNOS:
            raise DeviceBusy(str(exc)) from exc
        if code == errno.ENOENT or not os.path.exists(port):
            raise ValueError(
                _("no serial port {port}: check the reader's cable and the udev rule "
                  "(hardware/99-gate-reader.rules); list the ports with: ls -l /dev/serial/by-id/ /dev/gate-reader")
                .format(port=port)
            ) from exc
        if code == errno.EACCES:
            raise ValueError(
                _("no permission to open {port}: add yourself to the dialout group "
                  "(sudo usermod -aG dialout $USER, then log in again) or run with sudo").format(port=port)
            ) from exc
        raise ValueError(_("cannot open {port}: {error}").format(port=port, error=exc)) from exc
    ser.close()


def make_pin_factory(name: str = "lgpio") -> Any:
    """A gpiozero pin factory by name: "lgpio" on a Pi 4 or 5, "mock" for a dry run (agent.hw.pins)."""
    from agent.hw.pins import PinFactoryError
    from agent.hw.pins import make_pin_factory as _make

    if name not in PIN_FACTORIES:
        raise ValueError(_("pin factory {name!r}: allowed: {allowed}").format(name=name, allowed=", ".join(PIN_FACTORIES)))
    try:
        return _make(name)
    except PinFactoryError as exc:
        if isinstance(exc.cause, ImportError):
            raise ValueError(  # noqa: TRY004 - the tools' one error type for a pin factory they cannot use
                _("the lgpio pin library is missing: on the Pi, sudo apt install python3-lgpio, and run "
                  "gate-agent from the system Python or a venv made with --system-site-packages "
                  "({error})").format(error=exc.cause)
            ) from exc.cause
        raise exc.cause from None  # no GPIO chip, or busy: the caller tells these apart (is_busy_error)




def config_path(config: str | os.PathLike[str] | None, default_config: Path, section: str, key: str,
                *, error: Any, instead: str) -> Path | None:
    """The path ``[section] key`` of the agent's config (relative to the config's folder), or
    None where the default config is missing or the key is not set. Only that one key is read
    (not the whole config checked), so a tool still works when another part of the config is
    wrong, which is exactly when a technician needs it. ``error(message)`` is raised when the
    config given cannot be read; ``instead`` says what to give instead (translated, e.g.
    "the journal file with --db")."""
    cfg = Path(config) if config is not None else default_config
    try:
        doc = tomllib.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if config is not None:
            raise error(_("config {path} does not exist; give the right --config, or {instead}")
                        .format(path=cfg, instead=instead)) from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(_("config {path} cannot be read ({error}); run with sudo, or give {instead}")
                    .format(path=cfg, error=exc, instead=instead)) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(_("config {path} is not valid TOML ({error}); give {instead}")
                    .format(path=cfg, error=exc, instead=instead)) from None
    part = doc.get(section)
    text = part.get(key) if isinstance(part, dict) else None
    if not isinstance(text, str) or not text:
        return None
    p = Path(text).expanduser()
    return p if p.is_absolute() else cfg.resolve().parent / p
