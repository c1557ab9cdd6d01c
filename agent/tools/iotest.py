"""``gate-agent io-test``: check the turnstile wiring line by line.

Pulses each relay on request and prints every input change live, with the
pin, its level and what it means for the profile, so a technician can
press each button, turn the arm, open the fire loop and watch the line
change, and click each relay and watch the turnstile react.

Commands (typed, or given as a list):

    pulse LINE [SECONDS]   drive an output active for SECONDS (default 0.3)
    on LINE / off LINE     hold an output active / release it
    all off                every output inactive
    show                   every input and output now
    wait SECONDS           watch the inputs for a while (scripts)
    help, quit

Outputs are the profile's turnstile lines (unlock_a, unlock_b, stop,
fire_release) and the readers' feedback lines (entry.led, entry.beeper).
The outputs are built inactive (agent.hw.turnstile_io.TurnstileIO) and every
output is driven inactive when the tool ends, whatever ends it.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from agent.core.events import PULSE_DEFAULT_S, PULSE_MAX_S, PULSE_MIN_S
from agent.i18n import _
from agent.tools.words import error_text, io_state_text

from . import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PIN_FACTORIES,
    busy_message,
    is_busy_error,
    make_pin_factory,
)

HELP = """commands:
  pulse LINE [SECONDS]  drive an output active for SECONDS (default 0.3, 0.1 to 10)
  on LINE | off LINE    hold an output active | release it
  all off               every output inactive
  show                  every input and output now
  wait SECONDS          watch the inputs for a while
  help | quit"""


class CommandError(ValueError):
    """A command that cannot be run; the message says the right form."""


class _Bench:
    """The tool's state: the TurnstileIO, its outputs by name, a locked printer."""

    def __init__(self, tio: Any, out: TextIO) -> None:
        from agent.hw.profiles import INPUT_MEANING

        self.tio = tio
        self.out = out
        self.meaning = INPUT_MEANING
        self.profile = tio.profile
        self._print_lock = threading.Lock()
        self._stop = threading.Event()
        self.outputs: dict[str, Any] = dict(tio.outputs)
        self.specs = dict(self.profile.output_pins())
        for reader, lines in tio.feedback_lines.items():
            for line, dev in lines.items():
                self.outputs[f"{reader}.{line}"] = dev
        self._callbacks: list[Callable[[], None]] = []  # gpiozero holds callbacks weakly

    def say(self, text: str) -> None:
        with self._print_lock:
            print(text, file=self.out, flush=True)

    # -- inputs ---------------------------------------------------------------------------

    def watch_inputs(self) -> None:
        for name, dev in self.tio.inputs.items():
            cb = self._make_watch(name)
            self._callbacks.append(cb)
            dev.when_activated = cb
            dev.when_deactivated = cb

    def _make_watch(self, name: str) -> Callable[[], None]:
        def changed() -> None:
            self.say(_("input  {line}").format(line=self.input_line(name)))

        return changed

    def input_line(self, name: str) -> str:
        spec = self.profile.inputs[name]
        dev = self.tio.inputs[name]
        level = _word("high" if dev.pin.state else "low", ("high", "low"))
        asserted = self.tio.asserted(name)
        meaning = _(self.meaning.get(name, name))  # profiles.INPUT_MEANING, in the catalogue
        state = _word("ASSERTED" if asserted else "rest", ("ASSERTED", "rest"))
        text = meaning if asserted else _("not: {meaning}").format(meaning=meaning)
        return f"{name:<11} GPIO{spec.pin:<2} {level} {state} {text}"

    # -- outputs --------------------------------------------------------------------------

    def output_line(self, name: str) -> str:
        spec = self.specs[name]
        dev = self.outputs[name]
        level = _word("high" if dev.pin.state else "low", ("high", "low"))
        state = _word("ACTIVE" if dev.value else "inactive", ("ACTIVE", "inactive"))
        note = f"  {_(spec.note)}" if spec.note else ""  # a shipped profile's note is in the catalogue
        return f"{name:<13} GPIO{spec.pin:<2} {level:<4} {state}{note}"

    def output(self, name: str) -> Any:
        dev = self.outputs.get(name)
        if dev is None:
            raise CommandError(
                _("no output {name!r} on profile {profile}; outputs: {outputs}").format(
                    name=name, profile=self.profile.name, outputs=", ".join(self.outputs))
            )
        return dev

    def all_off(self) -> None:
        for dev in self.outputs.values():
            try:
                dev.off()
            except Exception as exc:  # noqa: BLE001 - one failing line must not keep the others on
                self.say(_("could not switch {dev!r} off: {error}").format(dev=dev, error=exc))

    def show(self) -> None:
        self.say(_("inputs:"))
        for name in self.tio.inputs:
            self.say("  " + self.input_line(name))
        self.say(_("outputs:"))
        for name in self.outputs:
            self.say("  " + self.output_line(name))

    # -- commands -------------------------------------------------------------------------

    def run(self, line: str) -> bool:
        """Run one command; False for quit. Raises CommandError for a bad command."""
        words = line.split("#", 1)[0].split()
        if not words:
            return True
        cmd, args = words[0].lower(), words[1:]
        if cmd in ("quit", "exit", "q"):
            return False
        if cmd in ("help", "?"):
            self.say(_(HELP))
        elif cmd == "show":
            self.show()
        elif cmd == "all" and [a.lower() for a in args] == ["off"]:
            self.all_off()
            self.say(_("all outputs inactive"))
        elif cmd == "pulse":
            if not 1 <= len(args) <= 2:
                raise CommandError(_("pulse LINE [SECONDS], e.g. pulse unlock_a 0.3"))
            self.pulse(args[0], _seconds(args[1]) if len(args) == 2 else PULSE_DEFAULT_S)
        elif cmd in ("on", "off"):
            if len(args) != 1:
                raise CommandError(_("{cmd} LINE, e.g. {cmd} stop").format(cmd=cmd))
            dev = self.output(args[0])
            dev.on() if cmd == "on" else dev.off()
            self.say(_("output {line}").format(line=self.output_line(args[0])))
        elif cmd == "wait":
            if len(args) != 1:
                raise CommandError(_("wait SECONDS, e.g. wait 5"))
            self._stop.wait(_seconds(args[0]))
        else:
            raise CommandError(_("unknown command {command!r}; type help").format(command=line.strip()))
        return True

    def pulse(self, name: str, seconds: float) -> None:
        if not PULSE_MIN_S <= seconds <= PULSE_MAX_S:
            raise CommandError(
                _("pulse length {seconds} s: give {min} to {max} s "
                  "(the turnstile needs at least 0.1 s; hold longer with on/off)").format(
                    seconds=seconds, min=PULSE_MIN_S, max=PULSE_MAX_S)
            )
        dev = self.output(name)
        try:
            dev.on()
            self.say(_("output {line}   (pulse {seconds} s)").format(line=self.output_line(name), seconds=f"{seconds:g}"))
            self._stop.wait(seconds)
        finally:
            dev.off()
        self.say(_("output {line}").format(line=self.output_line(name)))


def _word(word: str, column: tuple[str, ...]) -> str:
    """A state or level word in the user's language (words.io_state_text), padded to
    the widest word of its column so the lines stay aligned."""
    return io_state_text(word).ljust(max(len(io_state_text(w)) for w in column))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandError(_("{text!r} is not a number of seconds").format(text=text)) from None
    if value < 0:
        raise CommandError(_("{text!r}: seconds cannot be negative").format(text=text))
    return value


def _interactive(stream: TextIO, out: TextIO) -> Iterator[str]:
    prompt = hasattr(stream, "isatty") and stream.isatty()
    while True:
        if prompt:
            out.write("io-test> ")
            out.flush()
        line = stream.readline()
        if not line:
            return
        yield line


def run_iotest(
    profile: Any,
    *,
    factory: Any,
    commands: Iterable[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    input_stream: TextIO | None = None,
    rest_mock: bool = False,
) -> int:
    """Run io-test commands against a board profile (a Profile, or a name/path).

    rest_mock: on gpiozero's mock pins, start with every input at rest as the
    service's simulated hardware does (turnstile ready, fire loop closed), so a
    dry run does not show a fire alarm and an open arm that no wire made.

    commands: the commands to run; None reads them from input_stream
    (default stdin) until end of input or "quit". Returns an exit code
    (agent.tools EXIT_*): 1 when a given command failed.
    """
    from agent.hw.profiles import load_profile
    from agent.hw.turnstile_io import TurnstileIO

    out = out or sys.stdout  # looked up per call, so a redirected stdout is honoured
    err = err or sys.stderr
    try:
        if isinstance(profile, str):
            profile = load_profile(profile)
    except ValueError as exc:  # ProfileError, ProfileNotFound
        print(f"gate-agent io-test: {error_text(exc)}", file=err)
        return EXIT_USAGE
    try:
        tio = TurnstileIO(profile, factory=factory, submit=lambda event: None)
    except Exception as exc:  # noqa: BLE001 - any GPIO library error is shown to the technician
        if is_busy_error(exc):
            print(
                "gate-agent io-test: " + busy_message(_("a pin of profile {profile}").format(profile=profile.name), exc),
                file=err,
            )
            return EXIT_BUSY
        print(
            "gate-agent io-test: " + _("cannot claim the pins of profile {profile}: {error}").format(
                profile=profile.name, error=exc), file=err
        )
        return EXIT_USAGE
    if rest_mock and type(factory).__name__ == "MockFactory":
        from agent.hw.pins import rest_mock_inputs

        rest_mock_inputs(factory, profile)
    bench = _Bench(tio, out)
    failed = 0
    scripted = commands is not None
    try:
        bench.say(_("io-test on profile {profile}: {description}").format(profile=profile.name, description=_(profile.description)))
        bench.say(_("every output is inactive; input changes are printed as they happen. Type help."))
        bench.show()
        bench.watch_inputs()
        lines = commands if scripted else _interactive(input_stream or sys.stdin, out)
        for line in lines:
            try:
                if not bench.run(line):
                    break
            except CommandError as exc:
                failed += 1
                bench.say(_("error: {error}").format(error=exc))
    except KeyboardInterrupt:
        bench.say(_("interrupted"))
    finally:
        # Every output inactive, whatever ended the run; close() does it again and releases the pins.
        bench.all_off()
        tio.close()
    if failed and scripted:
        return EXIT_FAILED
    return EXIT_OK


# --- command line -------------------------------------------------------------------------


def _cmd_iotest(args: argparse.Namespace) -> int:
    from agent.tools.board import BoardConfigError, board_or_none, factory_name, read_board

    profile, factory_choice = args.profile, args.pin_factory
    if profile is None:
        # The board's own config gives what was not given: its profile and its pin factory.
        try:
            board = read_board(args.config)
        except BoardConfigError as exc:
            print(f"gate-agent io-test: {exc}", file=sys.stderr)
            return EXIT_USAGE
    else:
        board = board_or_none(args.config) if factory_choice is None else None  # not needed
    if board is not None:
        profile = profile or board.profile
        factory_choice = factory_choice or factory_name(board.pin_factory)
    try:
        factory = make_pin_factory(factory_choice or "lgpio")
    except Exception as exc:  # noqa: BLE001 - lgpio missing, no /dev/gpiochip, no permission
        if is_busy_error(exc):
            print(f"gate-agent io-test: {busy_message(_('the GPIO chip'), exc)}", file=sys.stderr)
            return EXIT_BUSY
        print("gate-agent io-test: " + _("cannot use the GPIO pins: {error}").format(error=exc), file=sys.stderr)
        return EXIT_USAGE
    return run_iotest(profile, factory=factory, commands=args.commands, rest_mock=True)


def add_iotest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``io-test`` subcommand (func: args -> exit code) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "io-test",
        help="pulse relays and watch inputs live, to check the wiring",
        description="Pulse each relay on request and print every input change live.\n"
        "Stop the service first (sudo systemctl stop gate-agent).\n\n" + HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from agent.tools.board import DEFAULT_PATH

    p.add_argument(
        "--config",
        default=str(DEFAULT_PATH),
        metavar="FILE",
        help=_("the board's config: its hardware profile and pin factory are used (default {path})").format(
            path=DEFAULT_PATH),
    )
    p.add_argument(
        "--profile",
        help=_("hardware profile name or .toml path, e.g. pi4-relay4 (default: the config's hardware.profile)"),
    )
    p.add_argument(
        "-c",
        "--command",
        dest="commands",
        action="append",
        metavar="COMMAND",
        help="run this command instead of reading commands interactively (repeatable), "
        'e.g. -c "pulse unlock_a 0.3" -c show',
    )
    p.add_argument(
        "--pin-factory",
        choices=PIN_FACTORIES,
        default=None,
        help=_("GPIO library: lgpio, or mock for a dry run (default: the config's hardware.pin_factory, "
               "else lgpio)"),
    )
    p.set_defaults(func=_cmd_iotest)
    return p
