"""The turnstile state machine: one lane, its modes and its output lines.

Rules this module obeys (the h11 habit):

- Pure and deterministic: no threads, clocks, sockets or GPIO. The caller gives
  each event with the time (``Now``) and gets a ``Step``; the same calls give
  the same Steps. Timeouts come from ``next_deadline()``: the caller calls
  ``handle(Tick(), now)`` when it passes (any later event also runs them first).
- Records before commands: the caller journals ``Step.records``, then drives
  ``Step.commands``.
- Outputs only on change: the wanted level of every line is worked out from
  the state and only differences are emitted (releases before activations),
  so nothing ever pulses by accident.
- Nothing active at start: ``start()`` drives every line inactive. Unlock lines
  are never driven at start; only a configured ``initial_mode`` that holds a
  line (lockdown: Stop; free: the release) or a fire latch kept from before a
  restart (``fire_latched``: fire mode's lines) asserts it, after all went off.
- Transitions are a table (data, ``TRANSITIONS``): (lane state, event type) ->
  handler. Lane states: IDLE, PENDING (a passage was opened and not yet
  completed or timed out), FAULT.
- An illegal event (unknown type, unknown reader, bad direction/side/mode
  string, time going backwards) latches FAULT: ``turnstile.fault`` kind
  ``core``, the lane is cleared, unlock lines drop. In FAULT cards are refused
  (``gate_busy`` unless they have their own reason), buttons are ignored, fire
  still frees the gate; ``ResetFault`` clears it. Time going backwards is
  latched and the event is still handled in FAULT (so a fire loop is never
  lost); any other illegal event is not handled.
- Safety first: fire mode's lines (release, held unlocks) win over everything,
  FAULT included.
- Presence (agent/core/presence.py) is fed each call's own records at its
  end; the fire loop's ``rollcall`` record is journalled by the next call,
  due at once (``next_deadline``), never ahead of the release.

- The local console's actions (``SetMode`` by ``console``, ``ConsoleOpen``,
  ``ConsolePulse``, ``ConsoleNote``) each journal one ``console.action``
  record. Only a reader's feedback line is ever pulsed for the console, on
  its own deadline and cut by the fire alarm; the turnstile's lines never.

Some 1,000 lines on purpose: one state machine (the console's actions
included). Its handlers, deadlines and output rules read and write one lane,
one mode and one set of wanted lines, and the rules above hold only between
them; split, each part would reach into the others' state.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import agent
from fastpath import codes
from fastpath.columns import TableColumns

from . import events as ev
from .gateconfig import GateConfig, valid_timezone
from .presence import SITE_ALARM_LATE_S, Presence, record_wall
from .records import make_record
from .site import FUTURE_S as SIBLING_FUTURE_S
from .site import SiteView

IDLE = "idle"
PENDING = "pending"
FAULT = "fault"
LANE_STATES = (IDLE, PENDING, FAULT)

LINES = ("unlock_a", "unlock_b", "stop", "fire_release")
UNLOCK_LINE = {codes.IN: "unlock_a", codes.OUT: "unlock_b"}
SIDES = {"A": codes.IN, "B": codes.OUT}
DIRECTION_CODE = {name: i for i, name in enumerate(codes.DIRECTIONS)}
MODE_CODE = {name: i for i, name in enumerate(codes.MODES)}
COMMANDABLE_MODES = ("normal", "entry_only", "free", "lockdown")  # fire: only the loop
SET_MODE_BY = ("command", "switch", "simulator", "start", "console")
FIRE_RESET_BY = ("input", "command")
FREE_MODES = ("free", "fire")  # the gate is already free: buttons do nothing, PASS is "free"
MAX_KEY = 2**64 - 1
# After a pulse a line rests this long before the next one, so two pulses never merge
# into one (the turnstile needs 100 ms to see a level).
LINE_REST_S = 0.1
MAX_DETAIL = 500  # the contract allows 1000 characters; an event's repr can be longer

# command.result "command" names for the events that answer a command.
CMD_SET_MODE = "set_mode"
CMD_FIRE_RESET = "fire_reset"
CMD_OPEN = "open"

# The local console (agent/consolesock.py, docs/contract.md "console.action"): each action
# is journalled as one console.action record. A reader's feedback line may be pulsed; the
# turnstile's lines never are: an unlock is an open (journalled as one), Stop and the fire
# release are safety lines (tested with gate-agent io-test, the service stopped).
CONSOLE_LINE_REFUSALS = {"unlock_a": "use_open", "unlock_b": "use_open",
                         "stop": "safety_line", "fire_release": "safety_line"}
FEEDBACK_LINE_KINDS = ("led", "beeper")


@dataclass
class _Pending:
    """An opened passage waiting for its PASS (or the wait to run out)."""

    direction: int
    source: str  # card, button, remote
    person: str | None
    card: int | None
    guest: bool
    started: float  # monotonic s when the unlock was driven
    deadline: float  # started + wait_s
    drives: bool  # False for a grant in free mode: the gate is already open


class Gate:
    """One turnstile lane. ``handle(event, now) -> Step``; see the module rules."""

    def __init__(
        self,
        config: GateConfig,
        fp: Any,
        table: Any = None,
        state: Any = None,
        *,
        boot: str = "",
        implementation: str = "pure",
        version: str = agent.__version__,
        fire_latched: bool = False,
        presence: Presence | None = None,
    ) -> None:
        """fire_latched: fire mode was latched and not reset before a restart (the
        service keeps it on disk); ``start()`` enters fire mode again at once
        (``mode.changed`` by ``restored``), and only the reset with the loop closed
        ends it, as before the restart."""
        self._cfg = config
        self._fp = fp
        self._table = table
        self._state = state if state is not None else fp.GateState()
        self._boot = boot
        self._implementation = implementation
        self._version = version
        # Decisions need a table; with none, every card is unknown_card (DESIGN: new board).
        self._empty_table = fp.Table(TableColumns(version=""))
        self._apb = codes.APB_MODES.index(config.apb)
        self._tz_name: str | None = None
        self._zones: dict[str, ZoneInfo] = {}
        self._local_cache: tuple[int, str, int, int] | None = None  # (minute, tz, mow, day)

        self._commanded = config.initial_mode
        self._switch = False  # lockdown key switch
        self._fire = False  # fire mode latched (until FireReset with the loop closed)
        self._restore_fire = bool(fire_latched)  # applied by start(), which records it
        self._loop_open = False
        self._tamper = False
        self._ready = True

        self._lane = IDLE
        self._pending: _Pending | None = None
        # (direction, source, console account or ""), at most one per direction
        self._waiting: list[tuple[int, str, str]] = []
        self._pulses: dict[str, float] = {}  # line -> monotonic s when its pulse ends
        self._rest: dict[str, float] = {}  # line -> monotonic s when it may pulse again
        self._outputs: dict[str, bool] = {line: False for line in LINES}
        # Reader feedback lines the console pulses ("entry.led"): line -> monotonic end,
        # and each such line's level as last driven (kept after the pulse: stop drives it off).
        self._feedback_pulses: dict[str, float] = {}
        self._feedback_levels: dict[str, bool] = {}
        self._last_mono: float | None = None
        self._alarms: set[str] = set()  # raised alarm kinds the core clears itself
        self._site = SiteView(config.wait_s)  # what the other gates of the site said
        # Presence and the roll-call (see "presence" below); the service gives the one kept on disk.
        self._presence = presence if presence is not None else Presence(config.presence_reset)
        self._rollcall_due: tuple[float, dict[str, Any]] | None = None  # (mono, fields) to journal

    # --- read-only view -------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The effective mode: fire if latched, else lockdown if switched, else commanded."""
        if self._fire:
            return "fire"
        if self._switch:
            return "lockdown"
        return self._commanded

    @property
    def commanded_mode(self) -> str:
        """The mode last commanded (or configured), under any fire or lockdown switch:
        what the service keeps on disk so a remote lockdown survives a restart."""
        return self._commanded

    @property
    def fire_latched(self) -> bool:
        """Fire mode is latched until its reset (the loop may have closed already):
        what the service keeps on disk so a restart cannot end it."""
        return self._fire

    @property
    def pending(self) -> tuple[str, str] | None:
        """(direction, source) of the passage waiting for its PASS, or None."""
        p = self._pending
        return None if p is None else (codes.DIRECTIONS[p.direction], p.source)

    @property
    def waiting(self) -> tuple[tuple[str, str], ...]:
        """Buttons/remote opens waiting for the lane, as (direction, source)."""
        return tuple((codes.DIRECTIONS[d], s) for d, s, _ in self._waiting)

    @property
    def fire_loop_open(self) -> bool:
        """The fire loop is open now (the alarm sounds); fire mode may outlast it."""
        return self._loop_open

    @property
    def feedback_outputs(self) -> dict[str, bool]:
        """The reader feedback lines the console pulsed, each with its level now."""
        return dict(self._feedback_levels)

    @property
    def lane(self) -> str:
        return self._lane

    @property
    def faulted(self) -> bool:
        return self._lane == FAULT

    @property
    def outputs(self) -> dict[str, bool]:
        return dict(self._outputs)

    @property
    def table(self) -> Any:
        return self._table

    @property
    def state(self) -> Any:
        return self._state

    @property
    def config(self) -> GateConfig:
        return self._cfg

    @property
    def timezone(self) -> str:
        """The zone schedules are read in: set_timezone(), else the table's, else the config's."""
        return self._tz_name or getattr(self._table, "timezone", None) or self._cfg.timezone

    @timezone.setter
    def timezone(self, name: str | None) -> None:
        self.set_timezone(name)

    def set_timezone(self, name: str | None) -> None:
        """The access list's time zone (the runtime calls it when it swaps tables); None: config's."""
        if name is not None and not valid_timezone(name):
            raise ValueError(f"time zone {name!r} is not a known IANA zone; the access list must name "
                             "one like \"Europe/Moscow\" (is the tzdata package installed?)")
        self._tz_name = name or None

    def next_deadline(self) -> float | None:
        """Monotonic seconds of the next timeout (pulse end, passage wait), or None."""
        times = list(self._pulses.values())
        times += self._feedback_pulses.values()
        if self._waiting:
            # A line's rest only matters to an opener waiting for it; any later event ends it too.
            times += self._rest.values()
        if self._pending is not None:
            times.append(self._pending.deadline)
        if self._rollcall_due is not None:
            times.append(self._rollcall_due[0])  # at once: journalled by the next call
        return min(times) if times else None

    # --- entry points ------------------------------------------------------------------

    def start(self, now: ev.Now) -> ev.Step:
        """The agent started: say so, raise start-up alarms, drive every line inactive."""
        step = ev.Step()
        self._last_mono = now.mono
        has_table = self._has_table()
        self._record(step, now, "agent.started", version=self._version, fastpath=self._implementation,
                     acl_version=self._table.version if has_table else None, mode=self.mode)
        if self._restore_fire and not self._fire:
            # Fire was latched before the restart and nobody reset it: the gate starts free.
            # The loop's own state arrives as FireLoop (an open loop then records only alarm.fire).
            before = self.mode
            self._fire = True
            self._record(step, now, "mode.changed", **{"from": before, "to": "fire", "by": "restored"})
        if not has_table:
            self._alarms.add("acl_missing")
            self._record(step, now, "alarm", kind="acl_missing", active=True,
                         detail="no access list yet: every card is refused as unknown_card")
            self._record(step, now, "acl.requested", reason="missing", have=None)
        self._clock_alarm(now, step)
        # Explicitly off, whatever the lines were left at (a restart never pulses a relay).
        for line in LINES:
            step.commands.append(ev.SetOutput(line, False))
            self._outputs[line] = False
        self._sync_outputs(step)
        self._presence_step(now, step)
        return step

    def handle(self, event: Any, now: ev.Now) -> ev.Step:
        """One event at time `now`: records to journal, then commands to drive."""
        step = ev.Step()
        if self._last_mono is not None and now.mono < self._last_mono:
            self._latch_fault(now, step, f"monotonic time went backwards: {now.mono} after {self._last_mono}")
        self._last_mono = now.mono
        self._clock_alarm(now, step)
        self._rollcall_record(now, step)
        self._run_deadlines(now, step)
        self._sync_outputs(step)  # a pulse that ended must drop before a new one starts
        handler = TRANSITIONS.get((self._lane, type(event)))
        if handler is None or not _journalable(event):
            self._illegal(now, step, f"unknown event {type(event).__name__}: {event!r}")
        else:
            handler(self, event, now, step)
        self._sync_outputs(step)
        self._sync_feedback(now, step)
        self._presence_step(now, step)
        return step

    # --- handlers (named in TRANSITIONS) ----------------------------------------------------

    def _on_tick(self, event: ev.Tick, now: ev.Now, step: ev.Step) -> None:
        pass  # deadlines already ran in handle()

    def _on_ignore(self, event: Any, now: ev.Now, step: ev.Step) -> None:
        pass

    def _on_card(self, event: ev.CardRead, now: ev.Now, step: ev.Step) -> None:
        direction = self._reader_direction(event.reader, now, step)
        if direction is None:
            return
        key = event.key
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key <= MAX_KEY:
            self._illegal(now, step, f"card key {key!r} from reader {event.reader!r} is not a 0..2^64-1 integer")
            return
        dname = codes.DIRECTIONS[direction]
        table = self._table if self._table is not None else self._empty_table
        if self.mode == "fire":
            # Recorded with no check: the list of who evacuated. A blocked card names nobody: a
            # lost card carried out says nothing about its holder (docs/design.md#fire).
            idx = -1 if table.is_blocked(key) else table.lookup(key)
            self._record(step, now, "access.granted", reader=event.reader, direction=dname, card=key,
                         format=event.format, person=table.person_id(idx) if idx >= 0 else None,
                         check="none")
            step.commands.append(ev.Feedback(event.reader, "granted"))
            return
        busy = self._lane == FAULT or self._pending is not None or not self._line_free(direction)
        mow, day = self._local(now)
        result, idx, warning = self._fp.decide(
            table, self._state, key, direction, MODE_CODE[self.mode], math.floor(now.wall),
            mow, day, busy, self._apb, self._cfg.apb_window_s,
        )
        person = table.person_id(idx) if idx >= 0 else None
        if (result == codes.GRANTED and self._apb != codes.APB_OFF
                and self._site.granted_elsewhere(person, now.mono) is not None):
            # A grant in force at another gate of the site (docs/site.md): one card, one turnstile.
            if self._apb == codes.APB_SOFT:
                warning = codes.WARN_ANTIPASSBACK
            else:
                result = codes.ANTIPASSBACK
        if result != codes.GRANTED:
            self._record(step, now, "access.denied", reader=event.reader, direction=dname, card=key,
                         format=event.format, person=person, reason=codes.RESULTS[result])
            step.commands.append(ev.Feedback(event.reader, "denied"))
            return
        fields: dict[str, Any] = {"reader": event.reader, "direction": dname, "card": key,
                                  "format": event.format, "person": person}
        if warning == codes.WARN_ANTIPASSBACK:
            fields["warning"] = "antipassback"
        self._record(step, now, "access.granted", **fields)
        step.commands.append(ev.Feedback(event.reader, "granted"))
        self._open(now, direction, "card", person=person, card=key,
                   guest=bool(person is not None and table.is_guest(idx)))

    def _on_pass_pending(self, event: ev.PassSensor, now: ev.Now, step: ev.Step) -> None:
        direction = self._side_direction(event.side, now, step)
        if direction is None:
            return
        p = self._pending
        if p is None or p.direction != direction:
            # A pending grant the other way stays pending.
            self._unpaired_pass(direction, now, step)
            return
        self._record(step, now, "passage", direction=codes.DIRECTIONS[direction], source=p.source,
                     person=p.person, card=p.card, after_ms=_ms(now.mono - p.started))
        if p.source == "card" and p.person is not None:
            # Only card passages move people (anti-passback) and spend guest uses.
            _, day = self._local(now)
            self._state.record_passage(p.person, direction, math.floor(now.wall), day, p.guest)
            if now.synced:  # an unsynchronised clock's time must not outrank the siblings'
                self._site.moved(p.person, now.wall)
        self._close_lane()
        self._start_waiting(now, step)

    def _on_pass_unpaired(self, event: ev.PassSensor, now: ev.Now, step: ev.Step) -> None:
        direction = self._side_direction(event.side, now, step)
        if direction is not None:
            self._unpaired_pass(direction, now, step)

    def _on_button(self, event: ev.Button, now: ev.Now, step: ev.Step) -> None:
        direction = self._direction(event.direction, "Button", now, step)
        if direction is not None:
            self._request_open(direction, "button", now, step)

    def _on_remote_open(self, event: ev.RemoteOpen, now: ev.Now, step: ev.Step) -> None:
        direction = self._direction(event.direction, "RemoteOpen", now, step)
        if direction is None:
            return
        if event.request_id:
            # In fire/free the gate is already free: the open is done as asked.
            self._record(step, now, "command.result", request_id=event.request_id, command=CMD_OPEN,
                         result="done")
        self._request_open(direction, "remote", now, step)

    def _on_remote_open_fault(self, event: ev.RemoteOpen, now: ev.Now, step: ev.Step) -> None:
        if self._direction(event.direction, "RemoteOpen", now, step) is None:
            return
        if event.request_id:
            self._record(step, now, "command.result", request_id=event.request_id, command=CMD_OPEN,
                         result="refused", reason="invalid")

    def _on_reader_error(self, event: ev.ReaderError, now: ev.Now, step: ev.Step) -> None:
        if self._reader_direction(event.reader, now, step) is None:
            return
        self._record(step, now, "reader.error", reader=event.reader, kind=event.kind, detail=event.detail,
                     raw=event.raw)
        step.commands.append(ev.Feedback(event.reader, "error"))

    def _on_reader_status(self, event: ev.ReaderStatus, now: ev.Now, step: ev.Step) -> None:
        if self._reader_direction(event.reader, now, step) is None:
            return
        self._record(step, now, "reader.status", reader=event.reader, online=bool(event.online))

    def _on_keypad(self, event: ev.Keypad, now: ev.Now, step: ev.Step) -> None:
        self._reader_direction(event.reader, now, step)  # checked, otherwise ignored for now

    def _on_fire_loop(self, event: ev.FireLoop, now: ev.Now, step: ev.Step) -> None:
        if not event.open:
            if self._loop_open:
                self._loop_open = False
                self._record(step, now, "alarm.fire", active=False)
            return  # the mode stays fire until the release is reset
        if not self._loop_open:
            self._loop_open = True
            self._record(step, now, "alarm.fire", active=True)
        if self._fire:
            return
        before = self.mode
        self._fire = True
        self._record(step, now, "mode.changed", **{"from": before, "to": "fire", "by": "fire_loop"})
        p = self._pending
        if p is not None:
            self._record(step, now, "passage.timeout", direction=codes.DIRECTIONS[p.direction],
                         source=p.source, person=p.person, card=p.card,
                         waited_ms=_ms(now.mono - p.started), cancelled="fire")
        self._close_lane()
        self._waiting.clear()
        self._drop_pulses(now)  # fire's own lines take over at once
        self._feedback_pulses.clear()  # a console pulse never outlives the alarm (dropped at the end of this call)

    def _on_fire_reset(self, event: ev.FireReset, now: ev.Now, step: ev.Step) -> None:
        if event.by not in FIRE_RESET_BY:
            self._illegal(now, step, f"FireReset by {event.by!r}; allowed: {', '.join(FIRE_RESET_BY)}")
            return
        by_command = event.by == "command"
        if self._fire and self._loop_open:
            if by_command:
                self._record(step, now, "command.result", request_id=event.request_id,
                             command=CMD_FIRE_RESET, result="refused", reason="fire")
            return
        if self._fire:
            self._fire = False
            # Everybody went out, most without touching a reader: nobody is held "inside" by
            # anti-passback when they come back in (guest uses stay spent).
            self._state.forget_movements()
            self._record(step, now, "mode.changed", **{"from": "fire", "to": self.mode, "by": "fire_reset"})
        elif self._presence.close_rollcall(now.wall):
            # The reset here ends a roll-call a sibling's alarm opened (its own reset may
            # never come: the sibling lost power in the fire).
            self._state.forget_movements()
        if by_command:
            self._record(step, now, "command.result", request_id=event.request_id, command=CMD_FIRE_RESET,
                         result="done")

    def _on_set_mode(self, event: ev.SetMode, now: ev.Now, step: ev.Step) -> None:
        by_command = event.by == "command"
        by_console = event.by == "console"
        if event.by not in SET_MODE_BY:
            self._illegal(now, step, f"SetMode by {event.by!r}; allowed: {', '.join(SET_MODE_BY)}")
            return
        args = {"mode": str(event.mode)[:32]}
        if event.mode not in COMMANDABLE_MODES:
            if by_command:
                self._record(step, now, "command.result", request_id=event.request_id,
                             command=CMD_SET_MODE, result="refused", reason="invalid")
            elif by_console:
                self._console_action(now, step, event.account, "set_mode", args, "invalid")
            else:
                self._illegal(now, step, f"SetMode to {event.mode!r}; allowed: {', '.join(COMMANDABLE_MODES)}")
            return
        if self._fire:
            if by_command:
                self._record(step, now, "command.result", request_id=event.request_id,
                             command=CMD_SET_MODE, result="refused", reason="fire")
            elif by_console:
                self._console_action(now, step, event.account, "set_mode", args, "fire")
            return
        before = self.mode
        self._commanded = event.mode
        if self.mode != before:
            extra = {"account": event.account} if by_console else {}
            self._record(step, now, "mode.changed", **{"from": before, "to": self.mode, "by": event.by}, **extra)
        if by_command:
            self._record(step, now, "command.result", request_id=event.request_id, command=CMD_SET_MODE,
                         result="done")
        elif by_console:
            self._console_action(now, step, event.account, "set_mode", args)
        self._start_waiting(now, step)

    # --- the local console (agent/consolesock.py) ------------------------------------------------

    def _on_console_open(self, event: ev.ConsoleOpen, now: ev.Now, step: ev.Step) -> None:
        args = {"direction": str(event.direction)[:32]}
        direction = DIRECTION_CODE.get(event.direction) if isinstance(event.direction, str) else None
        if direction is None:
            self._console_action(now, step, event.account, "open", args, "invalid")
        elif self._lane == FAULT and self.mode != "fire":
            self._console_action(now, step, event.account, "open", args, "fault")
        else:
            # In free and fire modes the gate is already free: done, nothing to drive.
            self._request_open(direction, "console", now, step, event.account)
            self._console_action(now, step, event.account, "open", args)

    def _on_console_pulse(self, event: ev.ConsolePulse, now: ev.Now, step: ev.Step) -> None:
        line, seconds = event.line, event.seconds
        ok_seconds = (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                      and ev.PULSE_MIN_S <= seconds <= ev.PULSE_MAX_S)
        args = {"line": str(line)[:80], "seconds": float(seconds) if ok_seconds else None}
        reason = CONSOLE_LINE_REFUSALS.get(line) if isinstance(line, str) else None
        if reason is None and not (isinstance(line, str) and event.wired and self._feedback_line(line)):
            reason = "unknown_line"
        if reason is None and not ok_seconds:
            reason = "invalid"
        if reason is None and self._fire:
            reason = "fire"  # fire's own lines only; a pulse would be cut at once anyway
        if reason is None:
            end = now.mono + float(seconds)
            # A second pulse on a line still on makes it one longer pulse (no off-on in between).
            self._feedback_pulses[line] = max(end, self._feedback_pulses.get(line, end))
        self._console_action(now, step, event.account, "pulse", args, reason)

    def _on_console_note(self, event: ev.ConsoleNote, now: ev.Now, step: ev.Step) -> None:
        detail = event.detail if isinstance(event.detail, str) else ""
        self._console_action(now, step, event.account, event.action, {"detail": detail[:ev.CONSOLE_NOTE_MAX]})

    def _console_action(self, now: ev.Now, step: ev.Step, account: str, action: str, args: dict,
                        reason: str | None = None) -> None:
        fields: dict[str, Any] = {"account": account, "action": action, "args": args,
                                  "result": "done" if reason is None else "refused"}
        if reason is not None:
            fields["reason"] = reason
        self._record(step, now, "console.action", **fields)

    def _feedback_line(self, line: str) -> bool:
        """``line`` names a feedback line of a reader of this gate ("entry.led")."""
        reader, _, kind = line.rpartition(".")
        return kind in FEEDBACK_LINE_KINDS and reader in self._cfg.readers

    def _sync_feedback(self, now: ev.Now, step: ev.Step) -> None:
        """Pulses of reader feedback lines: on while their time runs, then off; after the
        turnstile's own lines (a lamp never delays a relay)."""
        for line, end in list(self._feedback_pulses.items()):
            if end <= now.mono:
                del self._feedback_pulses[line]
        for line in sorted(self._feedback_levels.keys() | self._feedback_pulses.keys()):
            wanted = line in self._feedback_pulses
            if self._feedback_levels.get(line, False) != wanted:
                self._feedback_levels[line] = wanted
                step.commands.append(ev.SetOutput(line, wanted))

    def _on_lockdown_switch(self, event: ev.LockdownSwitch, now: ev.Now, step: ev.Step) -> None:
        before = self.mode
        self._switch = bool(event.on)  # remembered under fire, applied at its reset
        if self.mode != before:
            self._record(step, now, "mode.changed", **{"from": before, "to": self.mode, "by": "switch"})
        self._start_waiting(now, step)

    def _on_ready_line(self, event: ev.ReadyLine, now: ev.Now, step: ev.Step) -> None:
        ok = bool(event.ok)
        if ok == self._ready:
            return
        self._ready = ok
        if ok:
            self._record(step, now, "turnstile.ready", kind="ready_restored")
        else:
            self._record(step, now, "turnstile.fault", kind="ready_lost",
                         detail="the turnstile's Ready line opened: unauthorised rotation, a passage "
                                "stalled over 30 s or a sensor fault; check the turnstile")

    def _on_tamper(self, event: ev.Tamper, now: ev.Now, step: ev.Step) -> None:
        active = bool(event.active)
        if active != self._tamper:
            self._tamper = active
            self._record(step, now, "alarm", kind="tamper", active=active)

    def _on_report(self, event: ev.Report, now: ev.Now, step: ev.Step) -> None:
        if not isinstance(event.type, str) or not event.type or not isinstance(event.fields, dict):
            self._illegal(now, step, f"Report with type {event.type!r}: it needs a record type and fields")
            return
        self._record(step, now, event.type, **event.fields)

    def _on_swap_table(self, event: ev.SwapTable, now: ev.Now, step: ev.Step) -> None:
        table = event.table
        if table is None or not isinstance(getattr(table, "version", None), str):
            self._illegal(now, step, f"SwapTable with {table!r}: it needs a fastpath Table")
            return
        if event.kind not in ("snapshot", "delta"):
            self._illegal(now, step, f"SwapTable kind {event.kind!r}; allowed: snapshot, delta")
            return
        if event.timezone is not None and not valid_timezone(event.timezone):
            self._illegal(now, step, f"SwapTable time zone {event.timezone!r} is not an IANA zone")
            return
        self._table = table  # the old table is simply dropped; pending passages hold their own ids
        if event.timezone is not None:
            self.set_timezone(event.timezone)
        self._local_cache = None
        self._record(step, now, "acl.applied", version=table.version, kind=event.kind, base=event.base,
                     cards=len(table), people=table.persons)
        if table.version and "acl_missing" in self._alarms:
            self._alarms.discard("acl_missing")
            self._record(step, now, "alarm", kind="acl_missing", active=False)

    def _on_sibling(self, event: ev.SiblingRecord, now: ev.Now, step: ev.Step) -> None:
        # Network input, checked in agent/core/site.py: a bad record is counted there,
        # never a fault of this gate. Nothing is journalled: the record is the sibling's.
        if not isinstance(event.gate, str) or not event.gate:
            self._site.counts["malformed"] += 1
            return
        if not self._site.admit(event.record):
            return  # a repeat (QoS 1, a resend): nothing of it is taken twice, the roll-call included
        self.apply_sibling(event.record, event.gate, now, step)  # presence and the roll-call
        # Without a synchronised clock this gate cannot tell a sibling's time is ahead.
        move = self._site.take(event.gate, event.record, now.mono, now.wall if now.synced else None)
        if move is None:
            return
        seen = self._presence.people.get(move.person)
        if seen is not None and move.epoch < seen.wall:
            # Presence (kept on disk) knows of a later movement: after a restart the order
            # rule's own memory is empty, and a resent older passage must not undo it.
            self._site.counts["stale"] += 1
            return
        table = self._table if self._table is not None else self._empty_table
        idx = table.person_index(move.person)
        guest = idx >= 0 and table.is_guest(idx)
        try:
            self._state.record_passage(move.person, DIRECTION_CODE[move.direction],
                                       math.floor(move.epoch), self._day_of(move.epoch), guest)
        except (ValueError, TypeError, OverflowError, OSError):
            self._site.counts["malformed"] += 1  # an id or a time no person or day can have

    @property
    def site(self) -> SiteView:
        """What the other gates of the site said (grants in force, counts)."""
        return self._site

    def _on_reset_fault(self, event: ev.ResetFault, now: ev.Now, step: ev.Step) -> None:
        self._lane = IDLE
        self._record(step, now, "turnstile.ready", kind="core_reset")

    # --- presence and the fire roll-call (agent/core/presence.py, docs/presence.md) ---------

    @property
    def presence(self) -> Presence:
        """Who is inside now and the current or last roll-call (the service saves it)."""
        return self._presence

    def apply_sibling(self, record: dict, sibling: str, now: ev.Now, step: ev.Step | None = None) -> bool:
        """A record of a sibling gate of this site (``sibling``: its gate id), for presence
        and the roll-call: a card passage or a fire-mode read moves its person (when newer,
        by ts and gate id, than what this gate holds for them); the sibling's alarm
        (``alarm.fire`` active, or its ``rollcall``) opens this gate's roll-call (``by:
        "site"``) unless one is open or the alarm is older than SITE_ALARM_LATE_S; its fire
        reset (``mode.changed`` from fire) closes the roll-call its alarm opened.

        Call it on the gate thread, from a handler with that call's ``step`` (the
        ``rollcall`` record goes into it), or outside ``handle`` without one (the record is
        journalled by the next ``handle``: ``next_deadline`` says now). True when presence
        or the roll-call changed; a malformed record, or this gate's own (the site's events
        include them), changes nothing."""
        if not isinstance(record, dict) or not isinstance(sibling, str) or not sibling \
                or sibling == self._cfg.gate:
            return False
        tz = self.timezone
        pr = self._presence
        pr.roll(now.wall, tz)
        rtype = record.get("type")
        wall = record_wall(record)
        if wall is not None and now.synced and wall > now.wall + SIBLING_FUTURE_S:
            return False  # stamped ahead of this gate's clock: one of the clocks is wrong
        if rtype in ("alarm.fire", "rollcall"):
            opening = record.get("active") is True if rtype == "alarm.fire" else record.get("by") == "fire_loop"
            if not (opening and wall is not None and abs(now.wall - wall) <= SITE_ALARM_LATE_S):
                return False
            last = pr.rollcall
            if last is not None and wall <= max(last.started, last.ended or last.started):
                return False  # that alarm, or an older one, was taken already
            opened = self._rollcall_open(now, "site", sibling)
            if opened and step is not None:
                self._rollcall_record(now, step)
            return opened
        if rtype == "mode.changed":
            closed = record.get("from") == "fire" and pr.close_rollcall(now.wall, gate=sibling)
            if closed:
                self._state.forget_movements()  # the sibling's evacuation ended: as at this gate's
            return closed
        return pr.apply_record(record, tz, gate=sibling)

    def _presence_step(self, now: ev.Now, step: ev.Step) -> None:
        """This gate's own records of the step, into presence; the fire loop opening starts
        the roll-call, the fire reset ends it."""
        tz = self.timezone
        pr = self._presence
        pr.roll(now.wall, tz)
        for rec in step.records:
            rtype = rec["type"]
            if rtype == "mode.changed":
                if rec["to"] == "fire" and rec["by"] == "fire_loop":
                    rc = pr.rollcall
                    if rc is not None and rc.active and rc.by == "site":
                        pr.close_rollcall(now.wall)  # this gate's own alarm takes over
                    self._rollcall_open(now, "fire_loop", self._cfg.gate)
                elif rec["from"] == "fire":
                    pr.close_rollcall(now.wall)
            elif rtype in ("passage", "access.granted"):
                pr.apply_record(rec, tz, gate=self._cfg.gate)

    def _rollcall_open(self, now: ev.Now, by: str, gate: str) -> bool:
        fields = self._presence.open_rollcall(now.wall, by, gate)
        if fields is None:
            return False
        # Journalled by the next call, due at once: the fire step's records (and the release
        # they precede) are not held back by a list of hundreds of people.
        self._rollcall_due = (now.mono, fields)
        return True

    def _rollcall_record(self, now: ev.Now, step: ev.Step) -> None:
        if self._rollcall_due is not None:
            fields, self._rollcall_due = self._rollcall_due[1], None
            self._record(step, now, "rollcall", **fields)

    # --- lane -------------------------------------------------------------------------------

    def _open(self, now: ev.Now, direction: int, source: str, *, person: str | None = None,
              card: int | None = None, guest: bool = False) -> None:
        """Open one passage: pending until its PASS or the wait ends."""
        drives = self.mode not in FREE_MODES
        self._pending = _Pending(direction, source, person, card, guest, now.mono,
                                 now.mono + self._cfg.wait_s, drives)
        self._lane = PENDING
        if drives and self._cfg.relay_mode == "pulse":
            self._pulses[UNLOCK_LINE[direction]] = now.mono + self._cfg.pulse_s

    def _close_lane(self) -> None:
        self._pending = None
        if self._lane == PENDING:
            self._lane = IDLE

    def _line_free(self, direction: int) -> bool:
        # A pulse still on its line (or just ended) would merge with a new one.
        line = UNLOCK_LINE[direction]
        return line not in self._pulses and line not in self._rest

    def _can_open(self, direction: int) -> bool:
        return self._lane == IDLE and self._line_free(direction)

    def _drop_pulses(self, now: ev.Now) -> None:
        for line in self._pulses:
            self._rest[line] = now.mono + LINE_REST_S
        self._pulses.clear()

    def _request_open(self, direction: int, source: str, now: ev.Now, step: ev.Step,
                      account: str = "") -> None:
        """A button, remote or console open: at once if the lane is free, else it waits its turn."""
        if self.mode in FREE_MODES:
            return  # the gate is already free
        if self._can_open(direction):
            self._open_manual(now, direction, source, step, account)
        elif all(d != direction for d, _, _ in self._waiting):
            self._waiting.append((direction, source, account))

    def _open_manual(self, now: ev.Now, direction: int, source: str, step: ev.Step,
                     account: str = "") -> None:
        # Journalled before the unlock is driven, like a card grant: a crash between the
        # open and its passage still leaves a trace that the guard (or the server) opened.
        extra = {"account": account} if source == "console" and account else {}
        self._record(step, now, "access.granted", reader=None, direction=codes.DIRECTIONS[direction],
                     card=None, format=None, person=None, source=source, **extra)
        self._open(now, direction, source)

    def _start_waiting(self, now: ev.Now, step: ev.Step) -> None:
        if self.mode in FREE_MODES or self._lane == FAULT:
            self._waiting.clear()
            return
        for i, (direction, source, account) in enumerate(self._waiting):
            if self._can_open(direction):
                del self._waiting[i]
                self._open_manual(now, direction, source, step, account)
                return

    def _unpaired_pass(self, direction: int, now: ev.Now, step: ev.Step) -> None:
        if self.mode in FREE_MODES:
            self._record(step, now, "passage", direction=codes.DIRECTIONS[direction], source="free",
                         person=None, card=None, after_ms=None)
        else:
            self._record(step, now, "passage.forced", direction=codes.DIRECTIONS[direction])

    def _run_deadlines(self, now: ev.Now, step: ev.Step) -> None:
        """Pulse ends, line rests and passage waits due by `now`, in time order."""
        while True:
            due: list[tuple[float, int, str]] = [(t, 0, line) for line, t in self._pulses.items()
                                                 if t <= now.mono]
            due += [(t, 2, line) for line, t in self._rest.items() if t <= now.mono]
            p = self._pending
            if p is not None and p.deadline <= now.mono:
                due.append((p.deadline, 1, ""))
            if not due:
                return
            _, kind, line = min(due)
            if kind == 0:
                del self._pulses[line]
                self._rest[line] = now.mono + LINE_REST_S  # rests from when it really drops
            elif kind == 2:
                del self._rest[line]
            else:
                self._record(step, now, "passage.timeout", direction=codes.DIRECTIONS[p.direction],
                             source=p.source, person=p.person, card=p.card,
                             waited_ms=_ms(p.deadline - p.started))
                self._close_lane()  # a grant that times out moves nobody
            self._start_waiting(now, step)

    # --- outputs ------------------------------------------------------------------------------

    def _wanted(self) -> dict[str, bool]:
        """The level each line should have now, from the mode and the lane."""
        cfg = self._cfg
        mode = self.mode
        out = {line: False for line in LINES}
        if mode in FREE_MODES:
            # The release relay drives the turnstile's Fire Alarm input; without one, hold both unlocks.
            out["fire_release"] = cfg.fire_release
            hold = not cfg.fire_release or (mode == "fire" and cfg.relay_mode == "potential")
            out["unlock_a"] = out["unlock_b"] = hold
        elif mode == "lockdown":
            p = self._pending
            # Stop is dropped only for a guard's (button/remote) passage.
            out["stop"] = not (p is not None and p.source != "card")
        p = self._pending
        if p is not None and p.drives and cfg.relay_mode == "potential":
            out[UNLOCK_LINE[p.direction]] = True
        for line in self._pulses:
            out[line] = True
        if self._lane == FAULT and mode != "fire":
            out["unlock_a"] = out["unlock_b"] = False
        return out

    def _sync_outputs(self, step: ev.Step) -> None:
        wanted = self._wanted()
        for level in (False, True):  # releases first, then activations
            for line in LINES:
                if wanted[line] == level and self._outputs[line] != level:
                    self._outputs[line] = level
                    step.commands.append(ev.SetOutput(line, level))

    # --- checks, faults, alarms -------------------------------------------------------------

    def _illegal(self, now: ev.Now, step: ev.Step, detail: str) -> None:
        self._latch_fault(now, step, detail)

    def _latch_fault(self, now: ev.Now, step: ev.Step, detail: str) -> None:
        if len(detail) > MAX_DETAIL:
            detail = detail[: MAX_DETAIL - 3] + "..."
        self._record(step, now, "turnstile.fault", kind="core", detail=detail)
        self._lane = FAULT
        self._pending = None
        self._waiting.clear()
        self._drop_pulses(now)

    def _reader_direction(self, reader: str, now: ev.Now, step: ev.Step) -> int | None:
        name = self._cfg.readers.get(reader) if isinstance(reader, str) else None
        if name is None:
            self._illegal(now, step, f"reader {reader!r} is not in the gate config "
                                     f"(readers: {', '.join(sorted(self._cfg.readers))})")
            return None
        return DIRECTION_CODE[name]

    def _direction(self, value: str, what: str, now: ev.Now, step: ev.Step) -> int | None:
        code = DIRECTION_CODE.get(value) if isinstance(value, str) else None
        if code is None:
            self._illegal(now, step, f"{what} direction {value!r}; allowed: \"in\", \"out\"")
        return code

    def _side_direction(self, side: str, now: ev.Now, step: ev.Step) -> int | None:
        code = SIDES.get(side) if isinstance(side, str) else None
        if code is None:
            self._illegal(now, step, f"PassSensor side {side!r}; allowed: \"A\" (in), \"B\" (out)")
        return code

    def _clock_alarm(self, now: ev.Now, step: ev.Step) -> None:
        raised = "clock_unsynced" in self._alarms
        if not now.synced and not raised:
            self._alarms.add("clock_unsynced")
            self._record(step, now, "alarm", kind="clock_unsynced", active=True,
                         detail="the wall clock is not synchronised (NTP); deciding with the best time there is")
        elif now.synced and raised:
            self._alarms.discard("clock_unsynced")
            self._record(step, now, "alarm", kind="clock_unsynced", active=False)

    def _has_table(self) -> bool:
        return self._table is not None and bool(self._table.version)

    def _zone(self, tz: str) -> ZoneInfo:
        zone = self._zones.get(tz)
        if zone is None:
            zone = self._zones[tz] = ZoneInfo(tz)
        return zone

    def _day_of(self, epoch: float) -> int:
        """The date ordinal of `epoch` in the schedule's zone."""
        return datetime.fromtimestamp(epoch, self._zone(self.timezone)).date().toordinal()

    def _local(self, now: ev.Now) -> tuple[int, int]:
        """(minute_of_week, date ordinal) in the schedule's zone; cached per minute."""
        tz = self.timezone
        minute = math.floor(now.wall / 60)
        c = self._local_cache
        if c is not None and c[0] == minute and c[1] == tz:
            return c[2], c[3]
        local = datetime.fromtimestamp(now.wall, self._zone(tz))
        mow = local.weekday() * 1440 + local.hour * 60 + local.minute
        day = local.date().toordinal()
        self._local_cache = (minute, tz, mow, day)
        return mow, day

    def _record(self, step: ev.Step, now: ev.Now, rtype: str, **fields: Any) -> None:
        step.records.append(make_record(rtype, now, self._boot, **fields))


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _journalable(event: Any) -> bool:
    """A console event must name an account its console.action record can carry (and a
    note an action the contract knows); the socket checks both first, so one that does
    not is a bug in the adapter: an illegal event like an unknown one."""
    if isinstance(event, ev.SetMode) and event.by != "console":
        return True
    if not isinstance(event, (ev.SetMode, ev.ConsoleOpen, ev.ConsolePulse, ev.ConsoleNote)):
        return True
    if not (isinstance(event.account, str) and ev.CONSOLE_ACCOUNT.fullmatch(event.account)):
        return False
    return not isinstance(event, ev.ConsoleNote) or event.action in ev.CONSOLE_NOTES


Handler = Callable[[Gate, Any, ev.Now, ev.Step], None]


def _every_state(event_type: type, handler: Handler) -> dict[tuple[str, type], Handler]:
    return {(state, event_type): handler for state in LANE_STATES}


# (lane state, event type) -> handler. A pair not listed is an illegal event.
TRANSITIONS: dict[tuple[str, type], Handler] = {
    (IDLE, ev.CardRead): Gate._on_card,
    (PENDING, ev.CardRead): Gate._on_card,  # decided busy: gate_busy unless it has its own reason
    (FAULT, ev.CardRead): Gate._on_card,  # decided busy, as while pending
    (IDLE, ev.PassSensor): Gate._on_pass_unpaired,
    (PENDING, ev.PassSensor): Gate._on_pass_pending,
    (FAULT, ev.PassSensor): Gate._on_pass_unpaired,
    (IDLE, ev.Button): Gate._on_button,
    (PENDING, ev.Button): Gate._on_button,  # waits for the lane
    (FAULT, ev.Button): Gate._on_ignore,
    (IDLE, ev.RemoteOpen): Gate._on_remote_open,
    (PENDING, ev.RemoteOpen): Gate._on_remote_open,  # waits for the lane
    (FAULT, ev.RemoteOpen): Gate._on_remote_open_fault,
    (IDLE, ev.ResetFault): Gate._on_ignore,
    (PENDING, ev.ResetFault): Gate._on_ignore,
    (FAULT, ev.ResetFault): Gate._on_reset_fault,
    **_every_state(ev.Tick, Gate._on_tick),
    **_every_state(ev.ReaderError, Gate._on_reader_error),
    **_every_state(ev.ReaderStatus, Gate._on_reader_status),
    **_every_state(ev.Keypad, Gate._on_keypad),
    **_every_state(ev.FireLoop, Gate._on_fire_loop),
    **_every_state(ev.FireReset, Gate._on_fire_reset),
    **_every_state(ev.SetMode, Gate._on_set_mode),
    **_every_state(ev.ConsoleOpen, Gate._on_console_open),
    **_every_state(ev.ConsolePulse, Gate._on_console_pulse),
    **_every_state(ev.ConsoleNote, Gate._on_console_note),
    **_every_state(ev.LockdownSwitch, Gate._on_lockdown_switch),
    **_every_state(ev.ReadyLine, Gate._on_ready_line),
    **_every_state(ev.Tamper, Gate._on_tamper),
    **_every_state(ev.SwapTable, Gate._on_swap_table),
    **_every_state(ev.Report, Gate._on_report),
    **_every_state(ev.SiblingRecord, Gate._on_sibling),
}
