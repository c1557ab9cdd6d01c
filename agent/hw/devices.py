"""The turnstile's lines as small gpiozero devices, one class per kind of line.

As gpiozero's ``Button`` is a ``DigitalInputDevice`` that knows it is a
button, each class here is a gpiozero device that knows what its line is
on a turnstile: it claims its pin from a profile entry (agent.hw.profiles),
owns the line's electrical meaning (the level at which it is asserted,
whatever the pull), its debounce, and the core event it stands for.
``TurnstileIO`` (agent.hw.turnstile_io) builds one per line the profile
wires and composes them.

Inputs: ``PassageSensor``, ``ReadyContact``, ``FireLoopContact``,
``FireResetButton``, ``LockdownKey``, ``GuardButton``, ``TamperSwitch``;
``INPUT_DEVICES`` maps each profile input name to its kind. Outputs:
``Relay`` (unlock, stop, fire release) and ``FeedbackLine`` (a reader's LED
or beeper), both claimed straight into their inactive level; ``ReaderFeedback``
is one reader's feedback lines together.

The relays only follow the core's commands (``on``/``off``): how long an
unlock is held is the core's timer, not the device's.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar

from gpiozero import DigitalInputDevice, DigitalOutputDevice

from agent.core.events import (
    Button,
    FireLoop,
    FireReset,
    LockdownSwitch,
    PassSensor,
    ReadyLine,
    Tamper,
)

from .profiles import InputPin, OutputPin

__all__ = [
    "INPUT_DEVICES",
    "FeedbackLine",
    "FireLoopContact",
    "FireResetButton",
    "GuardButton",
    "LockdownKey",
    "PassageSensor",
    "ReaderFeedback",
    "ReadyContact",
    "Relay",
    "TamperSwitch",
    "TurnstileInput",
    "TurnstileOutput",
    "input_device",
]

log = logging.getLogger(__name__)

# One (line, on_s, off_s, n) step of a feedback pattern (agent.hw.turnstile_io.FEEDBACK_PATTERNS).
FeedbackStep = tuple[str, float, float, int]


# --- inputs ------------------------------------------------------------------------------


class TurnstileInput(DigitalInputDevice):
    """An input line read as the profile means it: asserted or at rest.

    gpiozero ties "active" to the pull (pull-up: active when low), while a
    profile states the level at which the input means something; the device
    holds that translation, so ``is_asserted`` and the events always follow
    the profile. ``watch(emit)`` sends the line's core event on each edge.

    A subclass says which event an edge means (``event``) and, for a line
    that is a state rather than a moment, the asserted value that is worth
    reporting at start (``AT_START``: the core assumes the quiet one) and
    the order of that report (``START_RANK``: the fire loop first).
    """

    AT_START: ClassVar[bool | None] = None
    START_RANK: ClassVar[int] = 99

    def __init__(self, spec: InputPin, *, pin_factory: Any) -> None:
        # Set before gpiozero's __init__: gpiozero freezes the attribute set after it.
        self.spec = spec
        self.edges = 0
        self._emit: Callable[[Any], None] | None = None
        if spec.pull == "none":
            # No internal pull: gpiozero needs the active level stated, and it is the profile's.
            self._asserted_when_active = True
            super().__init__(spec.pin, pull_up=None, active_state=spec.active_high,
                             bounce_time=spec.bounce_s, pin_factory=pin_factory)
        else:
            self._asserted_when_active = (spec.pull == "down") == spec.active_high
            super().__init__(spec.pin, pull_up=spec.pull == "up",
                             bounce_time=spec.bounce_s, pin_factory=pin_factory)

    def event(self, asserted: bool) -> Any:
        """The core event for this line becoming asserted / returning to rest, or None."""
        raise NotImplementedError

    @property
    def is_asserted(self) -> bool:
        """The line's current meaning (see profiles.INPUT_MEANING)."""
        return bool(self.is_active) == self._asserted_when_active

    def watch(self, emit: Callable[[Any], None]) -> None:
        """Send this line's event to ``emit`` on every edge (from gpiozero's thread)."""
        self._emit = emit
        self.when_activated = self._activated
        self.when_deactivated = self._deactivated

    def event_at_start(self) -> Any:
        """The event to report at start when the line is away from its quiet state, else None."""
        if self.AT_START is None or self.is_asserted != self.AT_START:
            return None
        return self.event(self.AT_START)

    def _activated(self) -> None:
        self._edge(self._asserted_when_active)

    def _deactivated(self) -> None:
        self._edge(not self._asserted_when_active)

    def _edge(self, asserted: bool) -> None:
        self.edges += 1
        event = self.event(asserted)
        if event is not None and self._emit is not None:
            self._emit(event)


class PassageSensor(TurnstileInput):
    """A passage sensor (PASS A / PASS B): the arm turned towards its side."""

    def __init__(self, spec: InputPin, *, side: str, pin_factory: Any) -> None:
        self.side = side
        super().__init__(spec, pin_factory=pin_factory)

    def event(self, asserted: bool) -> Any:
        return PassSensor(side=self.side) if asserted else None


class ReadyContact(TurnstileInput):
    """The turnstile's Ready output: asserted while it reports no fault."""

    AT_START = False
    START_RANK = 1

    def event(self, asserted: bool) -> Any:
        return ReadyLine(ok=asserted)


class FireLoopContact(TurnstileInput):
    """The fire-alarm loop: asserted while the loop is open (alarm); reported first."""

    AT_START = True
    START_RANK = 0

    def event(self, asserted: bool) -> Any:
        return FireLoop(open=asserted)


class FireResetButton(TurnstileInput):
    """The fire-release reset button."""

    def event(self, asserted: bool) -> Any:
        return FireReset(by="input") if asserted else None


class LockdownKey(TurnstileInput):
    """The guard's lockdown key switch."""

    AT_START = True
    START_RANK = 2

    def event(self, asserted: bool) -> Any:
        return LockdownSwitch(on=asserted)


class GuardButton(TurnstileInput):
    """A guard's entry or exit button: one passage that way on each press."""

    def __init__(self, spec: InputPin, *, direction: str, pin_factory: Any) -> None:
        self.direction = direction
        super().__init__(spec, pin_factory=pin_factory)

    def event(self, asserted: bool) -> Any:
        return Button(direction=self.direction) if asserted else None


class TamperSwitch(TurnstileInput):
    """The enclosure's tamper switch: asserted while the enclosure is open."""

    AT_START = True
    START_RANK = 3

    def event(self, asserted: bool) -> Any:
        return Tamper(active=asserted)


# Profile input name -> the device for it (every name of profiles.INPUT_LINES; a test checks).
INPUT_DEVICES: Mapping[str, Callable[..., TurnstileInput]] = {
    "pass_a": partial(PassageSensor, side="A"),
    "pass_b": partial(PassageSensor, side="B"),
    "ready": ReadyContact,
    "fire_loop": FireLoopContact,
    "fire_reset": FireResetButton,
    "lockdown": LockdownKey,
    "button_in": partial(GuardButton, direction="in"),
    "button_out": partial(GuardButton, direction="out"),
    "tamper": TamperSwitch,
}


def input_device(name: str, spec: InputPin, *, pin_factory: Any) -> TurnstileInput:
    """The device for the profile's input ``name``; ValueError for a name no kind has."""
    kind = INPUT_DEVICES.get(name)
    if kind is None:
        raise ValueError(f"unknown input {name!r}; known: {', '.join(INPUT_DEVICES)}")
    return kind(spec, pin_factory=pin_factory)


# --- outputs -----------------------------------------------------------------------------


class TurnstileOutput(DigitalOutputDevice):
    """An output line, claimed at its inactive level and driven inactive before release.

    initial_value=False: the pin is claimed straight into the inactive level
    (lgpio claims the line with its level in one call), so building the
    device at a start or a restart never glitches the line.
    """

    def __init__(self, spec: OutputPin, *, pin_factory: Any) -> None:
        self.spec = spec
        super().__init__(spec.pin, active_high=spec.active_high, initial_value=False,
                         pin_factory=pin_factory)

    def safe_off(self) -> None:
        """Drive the line inactive (also stops a running blink); never raises.

        A closed or failing pin must not stop the caller driving the other
        lines inactive, so the failure is logged, not raised.
        """
        try:
            self.off()
        except Exception:
            log.exception("could not drive output %r inactive", self)


class Relay(TurnstileOutput):
    """A turnstile relay (unlock A/B, stop, fire release), on and off as the core commands."""


class FeedbackLine(TurnstileOutput):
    """A reader's LED or beeper line, blinked in the background, or held by the console's
    I/O test (``hold``): while it is held, a card's blink leaves it alone, so the line under
    test stays as the technician set it (a blink ends with the line off)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held = False
        self._hold_lock = threading.Lock()

    def play(self, on_s: float, off_s: float, n: int) -> None:
        """Blink n times in the background (replacing a running blink), unless held."""
        with self._hold_lock:
            if not self._held:
                self.blink(on_time=on_s, off_time=off_s, n=n, background=True)

    def hold(self, active: bool) -> None:
        """Drive the line on (held: blinks wait) or off (released), stopping a running blink."""
        with self._hold_lock:
            self._held = bool(active)
            if active:
                self.on()
            else:
                self.off()

    def wait_quiet(self, timeout: float) -> bool:
        """Wait for a running blink to finish; False if it still runs after timeout."""
        thread = getattr(self, "_blink_thread", None)  # gpiozero's running blink, if any
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()


class ReaderFeedback:
    """One reader's feedback lines (``led``, ``beeper``; either may be missing)."""

    def __init__(self, reader: str, lines: Mapping[str, FeedbackLine]) -> None:
        self.reader = reader
        self.lines: dict[str, FeedbackLine] = dict(lines)

    def show(self, signal: str, pattern: tuple[FeedbackStep, ...]) -> None:
        """Start the pattern's blinks on the lines this reader has; never raises."""
        for line, on_s, off_s, n in pattern:
            dev = self.lines.get(line)
            if dev is None:
                continue
            try:
                dev.play(on_s, off_s, n)
            except Exception:  # a failing line must not stop the caller (the feedback thread)
                log.exception("reader %s: feedback %s on %s failed", self.reader, signal, line)

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no blink runs on this reader's lines."""
        return all(dev.wait_quiet(timeout) for dev in self.lines.values())
