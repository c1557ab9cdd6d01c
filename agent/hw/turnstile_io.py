"""Turnstile I/O with gpiozero: relays out, contacts in, reader feedback.

Built from a board profile (agent.hw.profiles) with the pin factory passed
in. Outputs are ``DigitalOutputDevice(initial_value=False)``: inactive from
the moment the pin is claimed, so a start or a restart never pulses a relay.
Input callbacks (run on gpiozero's threads) only call ``submit(event)``.

``TurnstileIO`` is the runtime's OutputDriver: ``set(line, active)`` and
``feedback(reader, signal)``.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

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

from .profiles import InputPin, OutputPin, Profile

log = logging.getLogger(__name__)

# Reader feedback as blink patterns: (line, on_s, off_s, n). gpiozero background
# blinks, started by a small feedback thread: starting a blink starts a thread,
# which the gate thread must not wait for.
FEEDBACK_PATTERNS: dict[str, tuple[tuple[str, float, float, int], ...]] = {
    "granted": (("led", 1.0, 0.0, 1), ("beeper", 0.1, 0.0, 1)),
    "denied": (("beeper", 0.1, 0.1, 2),),
    "error": (("beeper", 0.04, 0.06, 3),),
}


def _edge_events(name: str, asserted: bool) -> Any:
    """The core event for an input changing to asserted / not asserted, or None."""
    if name == "pass_a":
        return PassSensor(side="A") if asserted else None
    if name == "pass_b":
        return PassSensor(side="B") if asserted else None
    if name == "ready":
        return ReadyLine(ok=asserted)
    if name == "fire_loop":
        return FireLoop(open=asserted)
    if name == "fire_reset":
        return FireReset(by="input") if asserted else None
    if name == "lockdown":
        return LockdownSwitch(on=asserted)
    if name == "button_in":
        return Button(direction="in") if asserted else None
    if name == "button_out":
        return Button(direction="out") if asserted else None
    if name == "tamper":
        return Tamper(active=asserted)
    raise ValueError(f"unknown input {name!r}")


# Inputs that are states, not moments: their level at start is reported when
# it is not the quiet one (the core assumes ready, loop closed, no lockdown,
# no tamper).
_STATE_AT_START = {"fire_loop": True, "ready": False, "lockdown": True, "tamper": True}


class TurnstileIO:
    """The turnstile's lines on GPIO, per a board profile.

    factory: the gpiozero pin factory (MockFactory in tests, LGPIOFactory on
    a Pi). submit: where input events go (GateRuntime.submit).
    feedback_patterns: signal -> ((line, on_s, off_s, n), ...), default
    FEEDBACK_PATTERNS. Devices are
    built here (outputs first, all inactive); ``start()`` attaches the input
    callbacks and reports the fire loop (and the other state inputs) if they
    are already away from rest; ``close()`` drives every output inactive and
    releases the pins.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        factory: Any,
        submit: Callable[[Any], Any],
        feedback_patterns: dict[str, tuple[tuple[str, float, float, int], ...]] | None = None,
    ) -> None:
        self.profile = profile
        self.feedback_patterns = dict(FEEDBACK_PATTERNS if feedback_patterns is None else feedback_patterns)
        self.factory = factory
        self._submit = submit
        self.counters: dict[str, int] = {"events": 0, "unwired_outputs": 0, "feedback": 0,
                                         "feedback_superseded": 0}
        self.input_edges: dict[str, int] = {name: 0 for name in profile.inputs}
        self.outputs: dict[str, DigitalOutputDevice] = {}
        self.feedback_lines: dict[str, dict[str, DigitalOutputDevice]] = {}
        self.inputs: dict[str, DigitalInputDevice] = {}
        # gpiozero holds pin callbacks weakly: every device (and callback) is kept here.
        self._callbacks: list[Callable[[], None]] = []
        self._started = False
        self._closed = False
        # Latest signal per reader: a newer signal replaces a waiting one (as a
        # new blink replaces a running one), so a burst never builds a backlog.
        self._fb_cond = threading.Condition()
        self._fb_pending: dict[str, str] = {}
        self._fb_markers: list[threading.Event] = []
        self._fb_stop = False
        self._feedback_thread: threading.Thread | None = None
        try:
            for line, spec in profile.outputs.items():
                self.outputs[line] = self._output(spec)
            for reader, pins in profile.readers.items():
                lines = {}
                if pins.led:
                    lines["led"] = self._output(pins.led)
                if pins.beeper:
                    lines["beeper"] = self._output(pins.beeper)
                if lines:
                    self.feedback_lines[reader] = lines
            for name, spec in profile.inputs.items():
                self.inputs[name] = self._input(spec)
        except Exception:
            self.close()
            raise
        if self.feedback_lines:
            self._feedback_thread = threading.Thread(target=self._feedback_loop, name="feedback", daemon=True)
            self._feedback_thread.start()

    # -- construction ------------------------------------------------------------

    def _output(self, spec: OutputPin) -> DigitalOutputDevice:
        # initial_value=False: claimed straight into the inactive level (lgpio
        # claims the line with its level in one call), so it never glitches.
        return DigitalOutputDevice(
            spec.pin, active_high=spec.active_high, initial_value=False, pin_factory=self.factory
        )

    def _input(self, spec: InputPin) -> DigitalInputDevice:
        if spec.pull == "none":
            dev = DigitalInputDevice(spec.pin, pull_up=None, active_state=spec.active_high,
                                     bounce_time=spec.bounce_s, pin_factory=self.factory)
        else:
            dev = DigitalInputDevice(spec.pin, pull_up=spec.pull == "up",
                                     bounce_time=spec.bounce_s, pin_factory=self.factory)
        return dev

    def _asserted_when_active(self, spec: InputPin) -> bool:
        """Whether the profile's 'asserted' is gpiozero's 'active' for this input.

        gpiozero ties 'active' to the pull (pull-up: active when low), while a
        profile states the level at which the input means something.
        """
        if spec.pull == "none":
            return True
        device_active_high = spec.pull == "down"
        return device_active_high == spec.active_high

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Attach the input callbacks, then report state inputs away from rest.

        Attach first, read second: an edge between the two is reported twice
        (harmless, the core treats a repeated state as no change) rather
        than missed. An open fire loop is reported before anything else.
        """
        if self._started:
            return
        self._started = True
        for name, dev in self.inputs.items():
            flag = self._asserted_when_active(self.profile.inputs[name])
            on_active = self._make_callback(name, flag)
            on_inactive = self._make_callback(name, not flag)
            self._callbacks += [on_active, on_inactive]
            dev.when_activated = on_active
            dev.when_deactivated = on_inactive
        for name in sorted(_STATE_AT_START, key=lambda n: n != "fire_loop"):
            if name in self.inputs and self.asserted(name) == _STATE_AT_START[name]:
                self._emit(_edge_events(name, _STATE_AT_START[name]))

    def _make_callback(self, name: str, asserted: bool) -> Callable[[], None]:
        def callback() -> None:
            self.input_edges[name] += 1
            self._emit(_edge_events(name, asserted))

        return callback

    def _emit(self, event: Any) -> None:
        if event is None:
            return
        self.counters["events"] += 1
        self._submit(event)

    def asserted(self, name: str) -> bool:
        """The input's current meaning (see profiles.INPUT_MEANING)."""
        dev = self.inputs[name]
        return bool(dev.is_active) == self._asserted_when_active(self.profile.inputs[name])

    def levels(self) -> dict[str, bool]:
        """Every input's current asserted state (for io-test and telemetry)."""
        return {name: self.asserted(name) for name in self.inputs}

    def close(self) -> None:
        """Every output inactive first, then release every pin."""
        if self._closed:
            return
        self._closed = True
        with self._fb_cond:
            self._fb_stop = True
            self._fb_cond.notify()
        thread = self._feedback_thread
        if thread is not None:
            thread.join(timeout=2.0)
        for dev in self._all_outputs():
            try:
                dev.off()  # also stops a running feedback blink
            except Exception:  # a closed pin must not stop the others going inactive
                log.exception("could not drive output %r inactive", dev)
        for dev in [*self._all_outputs(), *self.inputs.values()]:
            try:
                dev.close()
            except Exception:
                log.exception("could not close %r", dev)
        self._callbacks.clear()

    def _all_outputs(self) -> list[DigitalOutputDevice]:
        devs = list(self.outputs.values())
        for lines in self.feedback_lines.values():
            devs += lines.values()
        return devs

    # -- OutputDriver ------------------------------------------------------------

    def set(self, line: str, active: bool) -> None:
        """Drive a turnstile output; a line the board does not wire is ignored
        (e.g. fire_release when no fire-release relay is fitted)."""
        if self._closed:
            log.debug("output %s set to %s after close; ignored", line, active)
            return
        dev = self.outputs.get(line)
        if dev is None:
            self.counters["unwired_outputs"] += 1
            log.debug("output %s is not wired on profile %s; ignored", line, self.profile.name)
            return
        if active:
            dev.on()
        else:
            dev.off()

    def feedback(self, reader: str, signal: str) -> None:
        """Show granted / denied / error on the reader's LED and beeper lines.

        Only queues the signal: the feedback thread starts the blinks.
        """
        if signal not in self.feedback_patterns:
            log.warning("unknown feedback signal %r for reader %s; allowed: %s",
                        signal, reader, ", ".join(self.feedback_patterns))
            return
        if self._closed or reader not in self.feedback_lines:
            return
        self.counters["feedback"] += 1
        with self._fb_cond:
            if reader in self._fb_pending:
                self.counters["feedback_superseded"] += 1
            self._fb_pending[reader] = signal
            self._fb_cond.notify()

    def _feedback_loop(self) -> None:
        while True:
            with self._fb_cond:
                self._fb_cond.wait_for(lambda: self._fb_pending or self._fb_markers or self._fb_stop)
                if self._fb_stop:
                    return
                pending, self._fb_pending = self._fb_pending, {}
                markers, self._fb_markers = self._fb_markers, []
            for reader, signal in pending.items():
                lines = self.feedback_lines[reader]
                for line, on_s, off_s, n in self.feedback_patterns[signal]:
                    dev = lines.get(line)
                    if dev is None:
                        continue
                    try:
                        dev.blink(on_time=on_s, off_time=off_s, n=n, background=True)
                    except Exception:  # a failing line must not end the thread
                        log.exception("reader %s: feedback %s on %s failed", reader, signal, line)
            for marker in markers:
                marker.set()

    def wait_feedback(self, timeout: float = 5.0) -> bool:
        """Wait until every queued feedback signal has finished blinking (tests, io-test)."""
        if self._feedback_thread is None or self._closed:
            return True
        marker = threading.Event()
        with self._fb_cond:
            self._fb_markers.append(marker)  # set once every signal queued before it was started
            self._fb_cond.notify()
        if not marker.wait(timeout):
            return False
        for lines in self.feedback_lines.values():
            for dev in lines.values():
                thread = getattr(dev, "_blink_thread", None)  # gpiozero's running blink, if any
                if thread is not None:
                    thread.join(timeout)
                    if thread.is_alive():
                        return False
        return True
