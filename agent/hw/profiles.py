"""Board profiles: which BCM pin does what, as data (hardware/profiles/*.toml).

A profile names every turnstile line (outputs unlock_a, unlock_b, stop,
fire_release; inputs pass_a, pass_b, ready, fire_loop, fire_reset, lockdown,
button_in, button_out, tamper) and each Wiegand reader's D0/D1 and optional
LED/beeper lines, with the electrical level at which each line is active.

The format is documented in hardware/profiles.md and fixed by the JSON Schema
agent/schemas/profile.schema.json (copy in docs/schemas/). ``load_profile``
checks the whole profile and reports every problem at once: the schema's
(unknown names, bad pins, missing lines), said in plain words, then what a
schema cannot say: a pin used twice, and an output that would be active at
power-on. At power-on, before any software runs, BCM GPIO 0 to 8 are pulled
up and 9 to 27 pulled down (docs/design.md#raspberry-pi): an active-low relay on a pulled-down
pin energises at once and pulses the turnstile on every reboot. So an
active-low output must sit on a pulled-up pin, an active-high output on a
pulled-down pin, unless the profile's boot lines (``gpio=N=op,dh`` /
``dl`` in config.txt) drive the pin to its inactive level early in boot.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from agent.core import schemas
from agent.core.problems import ProblemsError

OUTPUT_LINES = ("unlock_a", "unlock_b", "stop", "fire_release")
REQUIRED_OUTPUTS = ("unlock_a", "unlock_b", "stop")
# What "asserted" means for each input (the level given as `active`):
INPUT_MEANING = {
    "pass_a": "passage sensor A opened (the arm turned, entry)",
    "pass_b": "passage sensor B opened (the arm turned, exit)",
    "ready": "the turnstile reports ready (no fault)",
    "fire_loop": "the fire-alarm loop is open (alarm)",
    "fire_reset": "the fire-release reset is pressed",
    "lockdown": "the guard's lockdown key switch is on",
    "button_in": "the guard's entry button is pressed",
    "button_out": "the guard's exit button is pressed",
    "tamper": "the enclosure is open (tamper)",
}
INPUT_LINES = tuple(INPUT_MEANING)
REQUIRED_INPUTS = ("pass_a", "pass_b")
PULLS = ("up", "down", "none")
READER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as gate.readers names them (config.schema.json)
LEVELS = ("high", "low")
BCM_PINS = range(28)
# The HAT ID EEPROM lines: a HAT's EEPROM (or its absence) must not be disturbed.
RESERVED_PINS = {0: "ID_SD (HAT EEPROM)", 1: "ID_SC (HAT EEPROM)"}

ENV_PROFILE_DIR = "GATE_PROFILE_DIR"
# Searched in order after $GATE_PROFILE_DIR: the site's own, the packaged, the source tree.
SYSTEM_PROFILE_DIRS = (Path("/etc/gate-agent/profiles"), Path("/usr/share/gate-agent/profiles"))
SOURCE_PROFILE_DIR = Path(__file__).resolve().parents[2] / "hardware" / "profiles"


def power_on_pull(pin: int) -> str:
    """The pull a BCM pin has from power-on until software changes it."""
    return "up" if pin <= 8 else "down"


class ProfileError(ProblemsError):
    """A profile that cannot be used; ``errors`` lists each problem with where it is."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"hardware profile {source}: {len(errors)} problem(s); fix these:", errors)


class ProfileNotFound(ProfileError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class OutputPin:
    """An output line. active_high: the pin is high while the line is active."""

    pin: int
    active_high: bool
    note: str = ""

    @property
    def inactive_level(self) -> str:
        return "low" if self.active_high else "high"


@dataclass(frozen=True)
class InputPin:
    """An input line. pull: the Pi's internal resistor ("none" when the board
    has its own); active_high: the level at which the input is asserted (see
    INPUT_MEANING); bounce_s: debounce time, None for none."""

    pin: int
    pull: str
    active_high: bool
    bounce_s: float | None = None
    note: str = ""


@dataclass(frozen=True)
class WiegandPins:
    """A Wiegand reader's data lines (after level shifting) and feedback lines."""

    d0: int
    d1: int
    pull: str = "up"
    led: OutputPin | None = None
    beeper: OutputPin | None = None
    note: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    source: str
    outputs: Mapping[str, OutputPin]
    inputs: Mapping[str, InputPin]
    readers: Mapping[str, WiegandPins] = field(default_factory=dict)
    boot_config: tuple[str, ...] = ()

    def pin_uses(self) -> dict[int, str]:
        """BCM pin -> what it is used for."""
        return {pin: use for use, pin in _all_pins(self)}

    def output_pins(self) -> dict[str, OutputPin]:
        """Every output, turnstile lines and reader feedback lines ("entry.led")."""
        out = dict(self.outputs)
        for name, r in self.readers.items():
            if r.led:
                out[f"{name}.led"] = r.led
            if r.beeper:
                out[f"{name}.beeper"] = r.beeper
        return out


def _all_pins(p: Profile) -> list[tuple[str, int]]:
    uses: list[tuple[str, int]] = [(f"outputs.{n}", o.pin) for n, o in p.outputs.items()]
    uses += [(f"inputs.{n}", i.pin) for n, i in p.inputs.items()]
    for name, r in p.readers.items():
        uses += [(f"readers.{name}.d0", r.d0), (f"readers.{name}.d1", r.d1)]
        if r.led:
            uses.append((f"readers.{name}.led", r.led.pin))
        if r.beeper:
            uses.append((f"readers.{name}.beeper", r.beeper.pin))
    return uses


# --- boot config ---------------------------------------------------------------

_GPIO_LINE = re.compile(r"^\s*gpio\s*=\s*([0-9,\-\s]+)=([a-z0-9,\s]+)$")


def boot_drive_levels(lines: tuple[str, ...] | list[str]) -> dict[int, str]:
    """Pins a config.txt `gpio=` line sets as outputs driven high or low early in boot."""
    levels: dict[int, str] = {}
    for line in lines:
        m = _GPIO_LINE.match(line)
        if not m:
            continue
        opts = {o.strip() for o in m.group(2).split(",")}
        if "op" not in opts or not ({"dh", "dl"} & opts):
            continue
        level = "high" if "dh" in opts else "low"
        for part in m.group(1).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                levels.update({n: level for n in range(lo, hi + 1)})
            elif part:
                levels[int(part)] = level
    return levels


# --- parsing -------------------------------------------------------------------


def _level(v: Any, where: str, errors: list[str]) -> bool:
    if v not in LEVELS:
        errors.append(f"{where}: active = {v!r}; allowed: \"high\" or \"low\" (the pin level while active)")
        return True
    return v == "high"


def _pin(v: Any, where: str, errors: list[str]) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v not in BCM_PINS:
        errors.append(f"{where}: pin = {v!r}; allowed: a BCM GPIO number from 2 to 27")
        return -1
    if v in RESERVED_PINS:
        errors.append(f"{where}: BCM {v} is {RESERVED_PINS[v]}; pick another pin")
    return v


def _unknown(d: Mapping, allowed: tuple[str, ...], where: str, errors: list[str]) -> None:
    for k in d:
        if k not in allowed:
            errors.append(f"{where}: unknown key {k!r}; allowed: {', '.join(allowed)}")


def _table(v: Any, where: str, errors: list[str]) -> Mapping:
    if not isinstance(v, Mapping):
        errors.append(f"{where}: expected a table, got {v!r}")
        return {}
    return v


def _output(d: Any, where: str, errors: list[str]) -> OutputPin:
    d = _table(d, where, errors)
    _unknown(d, ("pin", "active", "note"), where, errors)
    if "pin" not in d or "active" not in d:
        errors.append(f"{where}: needs pin and active, e.g. {{ pin = 4, active = \"low\" }}")
    return OutputPin(pin=_pin(d["pin"], where, errors) if "pin" in d else -1,
                     active_high=_level(d.get("active", "high"), where, errors),
                     note=str(d.get("note", "")))


def _input(d: Any, where: str, errors: list[str]) -> InputPin:
    d = _table(d, where, errors)
    _unknown(d, ("pin", "pull", "active", "bounce_ms", "note"), where, errors)
    if "pin" not in d or "active" not in d:
        errors.append(f"{where}: needs pin and active, e.g. {{ pin = 17, pull = \"up\", active = \"high\" }}")
    pull = d.get("pull", "up")
    if pull not in PULLS:
        errors.append(f"{where}: pull = {pull!r}; allowed: \"up\", \"down\", \"none\" (the board has its own)")
        pull = "up"
    bounce = d.get("bounce_ms")
    if bounce is not None and (not isinstance(bounce, (int, float)) or isinstance(bounce, bool)
                               or not 0 <= bounce <= 1000):
        errors.append(f"{where}: bounce_ms = {bounce!r}; allowed: milliseconds from 0 to 1000")
        bounce = None
    return InputPin(pin=_pin(d["pin"], where, errors) if "pin" in d else -1, pull=pull,
                    active_high=_level(d.get("active", "high"), where, errors),
                    bounce_s=(bounce / 1000.0) if bounce else None, note=str(d.get("note", "")))


def _reader(d: Any, where: str, errors: list[str]) -> WiegandPins:
    d = _table(d, where, errors)
    _unknown(d, ("d0", "d1", "pull", "led", "beeper", "note"), where, errors)
    if "d0" not in d or "d1" not in d:
        errors.append(f"{where}: needs d0 and d1 (BCM pins after the 5 V to 3.3 V level shifter)")
    pull = d.get("pull", "up")
    if pull not in PULLS:
        errors.append(f"{where}: pull = {pull!r}; allowed: \"up\", \"down\", \"none\"")
        pull = "up"
    return WiegandPins(
        d0=_pin(d["d0"], f"{where}.d0", errors) if "d0" in d else -1,
        d1=_pin(d["d1"], f"{where}.d1", errors) if "d1" in d else -1,
        pull=pull,
        led=_output(d["led"], f"{where}.led", errors) if "led" in d else None,
        beeper=_output(d["beeper"], f"{where}.beeper", errors) if "beeper" in d else None,
        note=str(d.get("note", "")),
    )


# --- the schema ------------------------------------------------------------------


def profile_schema() -> dict:
    """The JSON Schema of a profile document (agent/schemas/profile.schema.json), a fresh copy."""
    return schemas.load("profile")


# Said after an unknown key: the page that lists every line and key a profile may have.
UNKNOWN_KEY_HINT = "see hardware/profiles.md"


def schema_problems(doc: Any) -> list[tuple[str, str]]:
    """(where, problem) for each way ``doc`` breaks profile.schema.json, in plain words
    (agent/core/schemas.py's, the config's).

    ``where`` is the TOML key path ("outputs.unlock_a.pin"), the place in
    the file the technician has to look.
    """
    # TOML can hold dates and times JSON cannot; as text they fail the schema with a clear message.
    plain = json.loads(json.dumps(doc, default=str))
    out: list[tuple[str, str]] = []
    for err in schemas.validator("profile").iter_errors(plain):
        p = schemas.problem(err, "profile", doc=plain, unknown_hint=UNKNOWN_KEY_HINT)
        out.append((schemas.key_path(p.parts) or "top level", p.message))
    return out


def _location(message: str) -> str:
    """The key path a parser message is about ("outputs.stop: ..." -> "outputs.stop")."""
    where, _, rest = message.partition(": ")
    m = re.match(r"unknown key '([^']*)'", rest)
    if m:
        return m.group(1) if where == "top level" else f"{where}.{m.group(1)}"
    return where


def _covered(path: str, locations: list[str]) -> bool:
    return any(loc == path or loc.startswith(path + ".") or path.startswith(loc + ".")
               for loc in locations)


def parse_profile(doc: Mapping[str, Any], source: str) -> Profile:
    """Check a profile document; raise ProfileError listing every problem."""
    errors: list[str] = []
    _unknown(doc, ("name", "description", "outputs", "inputs", "readers", "boot_config"), "top level", errors)
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        errors.append("name: give the profile a name, e.g. name = \"pi4-relay4\"")
        name = str(name)
    outputs_doc = _table(doc.get("outputs", {}), "outputs", errors)
    inputs_doc = _table(doc.get("inputs", {}), "inputs", errors)
    readers_doc = _table(doc.get("readers", {}), "readers", errors)
    for line in REQUIRED_OUTPUTS:
        if line not in outputs_doc:
            errors.append(f"outputs.{line}: missing; every turnstile needs {', '.join(REQUIRED_OUTPUTS)}")
    for line in REQUIRED_INPUTS:
        if line not in inputs_doc:
            errors.append(f"inputs.{line}: missing; the passage sensors are required")
    outputs = {}
    for k, v in outputs_doc.items():
        if k not in OUTPUT_LINES:
            errors.append(f"outputs.{k}: unknown output; allowed: {', '.join(OUTPUT_LINES)}")
            continue
        outputs[k] = _output(v, f"outputs.{k}", errors)
    inputs = {}
    for k, v in inputs_doc.items():
        if k not in INPUT_LINES:
            errors.append(f"inputs.{k}: unknown input; allowed: {', '.join(INPUT_LINES)}")
            continue
        inputs[k] = _input(v, f"inputs.{k}", errors)
    readers = {}
    for k, v in readers_doc.items():
        if not isinstance(k, str) or not READER_NAME.fullmatch(k):
            errors.append(f"readers: reader name {k!r}; use 1 to 64 letters, digits, '_', '.' or '-', "
                          "the name gate.readers gives it (e.g. entry, exit)")
            continue
        readers[k] = _reader(v, f"readers.{k}", errors)
    boot = doc.get("boot_config", [])
    if not isinstance(boot, list) or not all(isinstance(x, str) for x in boot):
        errors.append(f"boot_config: {boot!r}; give a list of config.txt lines")
        boot = []
    profile = Profile(
        name=name,
        description=str(doc.get("description", "")),
        source=source,
        outputs=MappingProxyType(outputs),
        inputs=MappingProxyType(inputs),
        readers=MappingProxyType(readers),
        boot_config=tuple(boot),
    )
    # The schema is the letter of the format; the checks above say the same in
    # plainer words. Anything the schema refuses that they did not report (a
    # drift between the two) is still reported, so no problem goes unsaid.
    said = [_location(e) for e in errors]
    if any(e.startswith("readers: reader name") for e in errors):
        said.append("readers")  # a bad name garbles the schema's paths below it; the name comes first
    errors += [f"{where}: {what}" for where, what in schema_problems(doc) if not _covered(where, said)]
    errors += check_profile(profile)
    if errors:
        raise ProfileError(source, errors)
    return profile


def check_profile(p: Profile) -> list[str]:
    """Problems a parsed profile has: a pin used twice, an output active at power-on."""
    errors: list[str] = []
    seen: dict[int, str] = {}
    for use, pin in _all_pins(p):
        if pin < 0:
            continue  # already reported as a bad pin
        if pin in seen:
            errors.append(f"{use}: BCM {pin} is already used by {seen[pin]}; every line needs its own pin")
        else:
            seen[pin] = use
    boot = boot_drive_levels(p.boot_config)
    for line, out in p.output_pins().items():
        if out.pin < 0:
            continue
        at_power_on = "high" if power_on_pull(out.pin) == "up" else "low"
        if boot.get(out.pin, at_power_on) != out.inactive_level:
            if out.active_high:
                fix = "pick a pin from BCM 9 to 27 (pulled down at power-on) or add a boot line gpio=N=op,dl"
            else:
                fix = "pick a pin from BCM 2 to 8 (pulled up at power-on) or add a boot line gpio=N=op,dh"
            where = f"outputs.{line}" if line in p.outputs else f"readers.{line}"
            errors.append(
                f"{where}: BCM {out.pin} is {at_power_on} at power-on, which is this active-"
                f"{'high' if out.active_high else 'low'} output's ACTIVE level: the relay would "
                f"switch on every boot before the agent runs; {fix}"
            )
    return errors


# --- loading -------------------------------------------------------------------


def profile_dirs() -> list[Path]:
    """Where named profiles are looked up, in order."""
    dirs = []
    env = os.environ.get(ENV_PROFILE_DIR)
    if env:
        dirs.append(Path(env))
    dirs += [*SYSTEM_PROFILE_DIRS, SOURCE_PROFILE_DIR]
    return dirs


def available_profiles() -> list[str]:
    """Names of the profiles found in profile_dirs()."""
    names = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A profile by name (searched in profile_dirs()) or by path to a .toml file."""
    text = str(name_or_path)
    candidates: list[Path]
    if text.endswith(".toml") or os.sep in text:
        candidates = [Path(text)]
    else:
        candidates = [d / f"{text}.toml" for d in profile_dirs()]
    for path in candidates:
        if path.is_file():
            try:
                doc = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ProfileError(str(path), [f"not valid TOML: {exc}"]) from None
            profile = parse_profile(doc, str(path))
            if not (text.endswith(".toml") or os.sep in text) and profile.name != text:
                raise ProfileError(str(path), [(f"name = {profile.name!r} but the file is {path.name}; "
                                               "make them agree")])
            return profile
    available = ", ".join(available_profiles()) or "none found"
    where = ", ".join(str(d) for d in profile_dirs())
    raise ProfileNotFound(text, [(f"no such profile; available: {available} (searched {where}); "
                                 "set hardware.profile to one of them or to a .toml path")])
