"""Events into the core, commands out of it, and the time the caller gives.

Small frozen dataclasses (the h11 habit). Adapters and the simulator make
events; ``agent.core.turnstile.Gate.handle(event, now)`` consumes them and
returns a ``Step`` of records (to journal first) and commands (to drive after).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# What a console event may carry (docs/contract.md "console.action"): the core checks it, the
# agent's console socket refuses anything else first, and the console's accounts file holds
# only such names.
CONSOLE_ACCOUNT = re.compile(r"[A-Za-z0-9._@-]{1,64}")
CONSOLE_NOTES = ("enroll",)  # the actions a ConsoleNote may name
CONSOLE_NOTE_MAX = 200  # characters of a note's detail
# An I/O test's pulse (gate-agent io-test, the console's): the turnstile's control inputs
# need at least 100 ms; longer than 10 s is a hold, asked for deliberately.
PULSE_MIN_S, PULSE_MAX_S, PULSE_DEFAULT_S = 0.1, 10.0, 0.3


@dataclass(frozen=True)
class Now:
    """The time given to the core by its caller.

    mono: monotonic seconds (timeouts, deadlines); wall: UTC epoch seconds
    (schedules, dates, record timestamps); synced: whether the wall clock is
    synchronised (NTP).
    """

    mono: float
    wall: float
    synced: bool = True


# --- events -----------------------------------------------------------------


@dataclass(frozen=True)
class CardRead:
    """A card read that passed its frame checks, reduced to a key."""

    reader: str  # reader name from the config; it fixes the direction
    key: int
    format: str = "key"  # "w26", "w34", "w35", "w37", "rdm6300", "emline", "osdp", "key"
    raw: str | None = None  # the frame as read (bits or hex), for the log


@dataclass(frozen=True)
class ReaderError:
    """A frame that failed its checks: a reader.error record, never a decision."""

    reader: str
    kind: str  # parity, length, checksum, glitch, garbage, disconnected
    detail: str = ""
    raw: str | None = None


@dataclass(frozen=True)
class ReaderStatus:
    reader: str
    online: bool


@dataclass(frozen=True)
class Keypad:
    """A keypad burst (4-bit or 8-bit Wiegand); recorded, not a card."""

    reader: str
    keys: str


@dataclass(frozen=True)
class PassSensor:
    """A passage sensor opened: the arm turned past 60 degrees.

    side "A" is the entry direction (in), "B" the exit (out).
    """

    side: str


@dataclass(frozen=True)
class Button:
    """The guard's manual-pass button for one direction ("in" or "out")."""

    direction: str


@dataclass(frozen=True)
class RemoteOpen:
    """A verified remote command to open once in a direction."""

    direction: str
    request_id: str = ""


@dataclass(frozen=True)
class ConsoleOpen:
    """The local console (agent/consolesock.py) asks to open once in a direction,
    like the guard's button; ``account`` is the console account that asked."""

    direction: str
    account: str


@dataclass(frozen=True)
class ConsolePulse:
    """The local console asks to pulse an output line for ``seconds``. Only a
    reader's feedback line ("entry.led", "exit.beeper") is pulsed; ``wired`` says
    whether the board profile wires the line (the adapter knows the board)."""

    line: str
    seconds: float
    account: str
    wired: bool = True


@dataclass(frozen=True)
class ConsoleNote:
    """A console action the gate only journals (``enroll``: enrolment started or
    stopped at the console); ``detail`` at most 200 characters."""

    action: str
    account: str
    detail: str = ""


@dataclass(frozen=True)
class FireLoop:
    """The fire-alarm loop changed: open=True means alarm (free passage)."""

    open: bool


@dataclass(frozen=True)
class FireReset:
    """The fire-release reset (input or command)."""

    by: str = "input"  # "input" or "command"
    request_id: str = ""


@dataclass(frozen=True)
class ReadyLine:
    """The turnstile's Ready output: ok=False is a fault."""

    ok: bool


@dataclass(frozen=True)
class LockdownSwitch:
    """The guard's lockdown key switch."""

    on: bool


@dataclass(frozen=True)
class Tamper:
    active: bool


@dataclass(frozen=True)
class SetMode:
    """A mode change from a (verified) command or the simulator."""

    mode: str  # normal, entry_only, free, lockdown (never fire)
    by: str = "command"
    request_id: str = ""
    account: str = ""  # by "console": the console account that asked


@dataclass(frozen=True)
class SwapTable:
    """Swap in a new compiled access list (built off the gate thread)."""

    table: Any  # fastpath.Table
    kind: str = "snapshot"  # snapshot or delta
    base: str | None = None
    timezone: str | None = None  # the list's IANA time zone; schedules follow it from the swap on


@dataclass(frozen=True)
class SiblingRecord:
    """An event record of another gate of this site (its ``events`` topic), as it
    was published; ``gate`` is that gate's name from the topic. See agent/core/site.py."""

    gate: str
    record: Any


@dataclass(frozen=True)
class ResetFault:
    """Explicit reset of the latched core fault."""

    by: str = "command"


@dataclass(frozen=True)
class Report:
    """A record from an adapter (an uplink alarm, a refused command, a rejected
    access list): journalled on the gate thread, numbered in order with the
    rest. The core adds the envelope and changes nothing else."""

    type: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Tick:
    """Nothing happened; lets the core act on its deadline."""


# --- commands ---------------------------------------------------------------


@dataclass(frozen=True)
class SetOutput:
    """Drive an output line: unlock_a, unlock_b, stop, fire_release."""

    line: str
    active: bool


@dataclass(frozen=True)
class Feedback:
    """Reader LED/beeper signal: granted, denied or error."""

    reader: str
    signal: str


@dataclass
class Step:
    """What one call to the core produced. Journal the records, then drive
    the commands, in that order."""

    records: list[dict] = field(default_factory=list)
    commands: list[SetOutput | Feedback] = field(default_factory=list)
