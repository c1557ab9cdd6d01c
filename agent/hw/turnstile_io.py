"""Turnstile I/O with gpiozero: relays out, contacts in, reader feedback.

Built from a board profile (agent.hw.profiles) with the pin factory passed
in, as a composition of the small devices of agent.hw.devices: one per
line the profile wires (a ``Relay`` per output, a ``TurnstileInput`` of
the line's kind per input, a ``ReaderFeedback`` per reader with LED or
beeper lines). Outputs are claimed inactive, so a start or a restart never
pulses a relay. Input callbacks (run on gpiozero's threads) only call
``submit(event)``.

``TurnstileIO`` is the runtime's OutputDriver: ``set(line, active)`` and
``feedback(reader, signal)``.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .devices import FeedbackLine, FeedbackStep, ReaderFeedback, Relay, TurnstileInput, input_device
from .profiles import Profile

log = logging.getLogger(__name__)

# Reader feedback as blink patterns: (line, on_s, off_s, n). gpiozero background
# blinks, started by a small feedback thread: starting a blink starts a thread,
# which the gate thread must not wait for.
FEEDBACK_PATTERNS: dict[str, tuple[FeedbackStep, ...]] = {
    "granted": (("led", 1.0, 0.0, 1), ("beeper", 0.1, 0.0, 1)),
    "denied": (("beeper", 0.1, 0.1, 2),),
    "error": (("beeper", 0.04, 0.06, 3),),
}


class TurnstileIO:
    """The turnstile's lines on GPIO, per a board profile.

    factory: the gpiozero pin factory (MockFactory in tests, LGPIOFactory on
    a Pi). submit: where input events go (GateRuntime.submit).
    feedback_patterns: signal -> ((line, on_s, off_s, n), ...), default
    FEEDBACK_PATTERNS. The devices are built here (outputs first, all
    inactive); ``start()`` attaches the input callbacks and reports the fire
    loop (and the other state inputs) if they are already away from rest;
    ``close()`` drives every output inactive and releases the pins.

    ``outputs``: line -> Relay; ``inputs``: line -> its TurnstileInput;
    ``feedback``: reader -> ReaderFeedback (``feedback_lines`` the same as
    plain line dicts, for io-test).
    """

    def __init__(
        self,
        profile: Profile,
        *,
        factory: Any,
        submit: Callable[[Any], Any],
        feedback_patterns: dict[str, tuple[FeedbackStep, ...]] | None = None,
    ) -> None:
        self.profile = profile
        self.feedback_patterns = dict(FEEDBACK_PATTERNS if feedback_patterns is None else feedback_patterns)
        self.factory = factory
        self._submit = submit
        self.counters: dict[str, int] = {"events": 0, "unwired_outputs": 0, "feedback": 0,
                                         "feedback_superseded": 0}
        # gpiozero holds pin callbacks weakly: every device is kept here, and holds its own callbacks.
        self.outputs: dict[str, Relay] = {}
        self.readers: dict[str, ReaderFeedback] = {}
        self.inputs: dict[str, TurnstileInput] = {}
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
                self.outputs[line] = Relay(spec, pin_factory=factory)
            for reader, pins in profile.readers.items():
                lines = {}
                if pins.led:
                    lines["led"] = FeedbackLine(pins.led, pin_factory=factory)
                if pins.beeper:
                    lines["beeper"] = FeedbackLine(pins.beeper, pin_factory=factory)
                if lines:
                    self.readers[reader] = ReaderFeedback(reader, lines)
            for name, spec in profile.inputs.items():
                self.inputs[name] = input_device(name, spec, pin_factory=factory)
        except Exception:
            self.close()
            raise
        if self.readers:
            self._feedback_thread = threading.Thread(target=self._feedback_loop, name="feedback", daemon=True)
            self._feedback_thread.start()

    @property
    def feedback_lines(self) -> dict[str, dict[str, FeedbackLine]]:
        """reader -> {"led"/"beeper": device}, for the lines the profile wires."""
        return {reader: dict(fb.lines) for reader, fb in self.readers.items()}

    @property
    def input_edges(self) -> dict[str, int]:
        """Edges seen per input since start (telemetry, tests)."""
        return {name: dev.edges for name, dev in self.inputs.items()}

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
        for dev in self.inputs.values():
            dev.watch(self._emit)
        for dev in sorted(self.inputs.values(), key=lambda d: d.START_RANK):
            self._emit(dev.event_at_start())

    def _emit(self, event: Any) -> None:
        if event is None:
            return
        self.counters["events"] += 1
        self._submit(event)

    def asserted(self, name: str) -> bool:
        """The input's current meaning (see profiles.INPUT_MEANING)."""
        return self.inputs[name].is_asserted

    def levels(self) -> dict[str, bool]:
        """Every input's current asserted state (for io-test and telemetry)."""
        return {name: dev.is_asserted for name, dev in self.inputs.items()}

    def output_levels(self) -> dict[str, bool]:
        """Every output the profile wires ("unlock_a", "entry.led"...) with whether it is
        active now (the console's status)."""
        out = {line: bool(dev.is_active) for line, dev in self.outputs.items()}
        for reader, fb in self.readers.items():
            for kind, dev in fb.lines.items():
                out[f"{reader}.{kind}"] = bool(dev.is_active)
        return out

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
        outputs = self._all_outputs()
        for dev in outputs:
            dev.safe_off()  # also stops a running feedback blink
        for dev in [*outputs, *self.inputs.values()]:
            try:
                dev.close()
            except Exception:
                log.exception("could not close %r", dev)

    def _all_outputs(self) -> list[Relay | FeedbackLine]:
        devs: list[Relay | FeedbackLine] = list(self.outputs.values())
        for fb in self.readers.values():
            devs += fb.lines.values()
        return devs

    # -- OutputDriver ------------------------------------------------------------

    def set(self, line: str, active: bool) -> None:
        """Drive a turnstile output; a line the board does not wire is ignored
        (e.g. fire_release when no fire-release relay is fitted)."""
        if self._closed:
            log.debug("output %s set to %s after close; ignored", line, active)
            return
        dev: Relay | FeedbackLine | None = self.outputs.get(line)
        if dev is None and "." in line:
            # A reader's feedback line ("entry.led") the console pulses through the core.
            reader, _, kind = line.rpartition(".")
            fb = self.readers.get(reader)
            dev = fb.lines.get(kind) if fb is not None else None
        if dev is None:
            self.counters["unwired_outputs"] += 1
            log.debug("output %s is not wired on profile %s; ignored", line, self.profile.name)
            return
        if isinstance(dev, FeedbackLine):
            dev.hold(active)  # a card's blink does not cut the console's pulse short
        elif active:
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
        if self._closed or reader not in self.readers:
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
                self.readers[reader].show(signal, self.feedback_patterns[signal])
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
        return all(fb.wait_quiet(timeout) for fb in self.readers.values())
