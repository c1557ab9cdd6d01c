"""`gate-agent presence` and `gate-agent rollcall`: who is inside, and the fire roll-call.

For the guard (docs/presence.md). Both read only the file the service keeps,
``presence.json`` in the state directory (agent/presencefile.py): the
service need not answer, and the lists are there even when the network is
not. A file saved before the nightly reset shows nobody inside, as the gate
will count it.

Person ids are pseudonyms. An optional names file, the school's own export
(``--names FILE``, default /etc/gate-agent/names.csv when it exists), puts
names beside them on the screen and on paper; it must be mode 0600 (or
stricter) and is never sent anywhere. Text for people, in Russian or English
(agent/i18n.py); ``--csv`` for a spreadsheet, with fixed English column names.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import stat
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from agent.config import DEFAULT_PATH as DEFAULT_CONFIG
from agent.core.presence import Presence
from agent.exits import Exit
from agent.i18n import _
from agent.presencefile import PRESENCE_FILE
from agent.tools import config_path

__all__ = [
    "DEFAULT_NAMES",
    "PresenceReadError",
    "add_presence_parsers",
    "load_names",
    "presence_path",
    "read_presence",
]

DEFAULT_STATE_DIR = Path("/var/lib/gate-agent")
DEFAULT_NAMES = Path("/etc/gate-agent/names.csv")
MAX_NAMES_BYTES = 16 << 20
_HEADER_WORDS = {"person", "person_id", "id", "персона", "ид", "идентификатор"}


class PresenceReadError(RuntimeError):
    """The presence file or the names file cannot be used; the message says what to do.
    ``code``: the exit code (FAILED: nothing yet; USAGE: a file that cannot be used)."""

    def __init__(self, message: str, code: int = Exit.USAGE) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- reading


def presence_path(config: str | os.PathLike[str] | None = None, file: str | os.PathLike[str] | None = None) -> Path:
    """The presence file: ``file`` when given, else ``presence.json`` in the config's
    ``service.state_dir``. Only that key is read, so the guard still gets the lists when
    another part of the config is wrong."""
    if file is not None:
        return Path(file)
    found = config_path(config, DEFAULT_CONFIG, "service", "state_dir", error=PresenceReadError,
                        instead=_("the presence file with --file"))
    return (found if found is not None else DEFAULT_STATE_DIR) / PRESENCE_FILE


def read_presence(path: str | os.PathLike[str], now: float | None = None) -> dict[str, Any]:
    """The presence file as the tools show it: its fields, checked, with ``people`` emptied
    (and ``stale`` true) when the nightly reset passed since it was saved."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PresenceReadError(_("no presence file at {path}: the service writes it within seconds of "
                                  "the first passage; is the service running (systemctl status gate-agent)? "
                                  "Or give the right --config or --file").format(path=p), Exit.FAILED) from None
    except PermissionError:
        raise PresenceReadError(_("cannot read {path} (permission denied): presence is personal data and "
                                  "belongs to the service user; run the command with sudo").format(path=p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PresenceReadError(_("cannot read {path} ({error})").format(path=p, error=exc)) from None
    try:
        doc = json.loads(text)
        presence = Presence.from_dict(doc)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise PresenceReadError(_("{path} is not a presence file ({error}); the service moves a damaged "
                                  "one aside at its next start").format(path=p, error=str(exc)[:200])) from None
    now = time.time() if now is None else now
    resets_at = presence.resets_at
    stale = resets_at is not None and now >= resets_at
    people = {} if stale else {k: (s.inside, s.wall, s.gate) for k, s in presence.people.items()}
    return {"site": doc.get("site") or "", "gate": doc.get("gate") or "", "saved": doc.get("saved"),
            "timezone": presence.timezone or "UTC", "day": doc.get("day"), "reset": presence.reset,
            "resets_at": resets_at, "stale": stale, "people": people, "rollcall": presence.rollcall}


def load_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """person id -> the name to print, from the school's own export (docs/presence.md#names):
    CSV in UTF-8, ``;`` ``,`` or tab between columns: person id, name, and optionally a class
    or group (printed after the name); a header row and ``#`` lines are skipped. The file must
    not be readable by group or others (chmod 600)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise PresenceReadError(_("names file {path} does not exist").format(path=p)) from None
    except OSError as exc:
        raise PresenceReadError(_("names file {path} cannot be read ({error}); run with sudo, or leave "
                                  "out --names").format(path=p, error=exc)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PresenceReadError(_("names file {path} is not a regular file").format(path=p))
        if st.st_mode & 0o077:
            raise PresenceReadError(_("names file {path} can be read by others (mode {mode:o}): it holds "
                                      "pupils' names; chmod 600 {path} and run again").format(
                                          path=p, mode=stat.S_IMODE(st.st_mode)))
        raw = f.read(MAX_NAMES_BYTES + 1)
    if len(raw) > MAX_NAMES_BYTES:
        raise PresenceReadError(_("names file {path} is over {mb} MB: is it the right file?").format(
            path=p, mb=MAX_NAMES_BYTES >> 20))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PresenceReadError(_("names file {path} is not UTF-8: save it from the spreadsheet as "
                                  "\"CSV UTF-8\"").format(path=p)) from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return {}
    first = lines[0]
    delimiter = max((";", ",", "\t"), key=first.count)
    names: dict[str, str] = {}
    for i, row in enumerate(csv.reader(lines, delimiter=delimiter)):
        cells = [c.strip() for c in row]
        if not cells or not cells[0]:
            continue
        if i == 0 and cells[0].lower() in _HEADER_WORDS:
            continue
        name = " ".join(c for c in cells[1:3] if c)
        names[cells[0]] = name
    return names


# --------------------------------------------------------------------------- output


def _clock(t: float | None, tz: str, day: str | None = None) -> str:
    if t is None:
        return ""
    local = datetime.fromtimestamp(t, ZoneInfo(tz))
    if day is not None and local.date().isoformat() == day:
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M:%S")


def _iso(t: float | None, tz: str) -> str:
    return "" if t is None else datetime.fromtimestamp(t, ZoneInfo(tz)).isoformat(timespec="seconds")


def _who(person: str, names: dict[str, str]) -> str:
    name = names.get(person)
    return f"{person}  {name}" if name else person


def _sorted(persons: Any, names: dict[str, str]) -> list[str]:
    # By name when there are names (the paper list is read by name), else by id.
    return sorted(persons, key=lambda p: (names.get(p, "\uffff").casefold(), p))


def _title(view: dict[str, Any]) -> str:
    where = "/".join(x for x in (view["site"], view["gate"]) if x)
    return _("Gate {gate}; presence day {day} (starts afresh at {reset}); saved {saved}").format(
        gate=where or "?", day=view["day"] or "-", reset=view["reset"],
        saved=_clock(view["saved"], view["timezone"]) or "-")


def print_presence(view: dict[str, Any], names: dict[str, str], out: TextIO, *, as_csv: bool = False) -> None:
    people = view["people"]
    inside = [p for p, (i, _w, _g) in people.items() if i]
    if as_csv:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["person", "name", "since", "gate"])
        for p in _sorted(inside, names):
            w.writerow([p, names.get(p, ""), _iso(people[p][1], view["timezone"]), people[p][2] or view["gate"]])
        return
    print(_title(view), file=out)
    if view["stale"]:
        print(_("the nightly reset ({reset}) passed since this was saved: nobody counts as inside "
                "until the next passage").format(reset=view["reset"]), file=out)
    print(_("inside: {inside}; left: {left}; seen this day: {seen}").format(
        inside=len(inside), left=len(people) - len(inside), seen=len(people)), file=out)
    for p in _sorted(inside, names):
        _i, wall, gate = people[p]
        print("  " + _("{who}  since {time}  (gate {gate})").format(
            who=_who(p, names), time=_clock(wall, view["timezone"], view["day"]), gate=gate or view["gate"]),
              file=out)


def rollcall_lists(rc: Any) -> dict[str, list[str]]:
    """The three lists of a roll-call: inside at the alarm, left since, not yet seen leaving."""
    return {"inside_at_alarm": list(rc.inside), "left": list(rc.left), "not_seen_leaving": rc.not_seen_leaving()}


def print_rollcall(view: dict[str, Any], names: dict[str, str], out: TextIO, *, as_csv: bool = False) -> None:
    rc = view["rollcall"]
    tz = view["timezone"]
    lists = rollcall_lists(rc)
    alarm_day = datetime.fromtimestamp(rc.started, ZoneInfo(tz)).date().isoformat()  # times on it: no date
    if as_csv:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["list", "person", "name", "time"])
        for key in ("inside_at_alarm", "left", "not_seen_leaving"):
            for p in _sorted(lists[key], names):
                t = rc.left.get(p) if key == "left" else rc.entered.get(p)
                w.writerow([key, p, names.get(p, ""), _iso(t, tz)])
        return
    whose = _("this gate's fire loop") if rc.by == "fire_loop" else _("the alarm of gate {gate}").format(gate=rc.gate)
    print(_title(view), file=out)
    print(_("Roll-call: fire alarm at {time} ({whose})").format(time=_clock(rc.started, tz), whose=whose), file=out)
    print(_("still open: exits are being recorded") if rc.active
          else _("ended at {time} (fire reset)").format(time=_clock(rc.ended, tz, alarm_day)), file=out)
    sections = (
        ("inside_at_alarm", _("Inside at the alarm: {n}")),
        ("left", _("Left since: {n}")),
        ("not_seen_leaving", _("Not yet seen leaving: {n}")),
    )
    for key, heading in sections:
        print(file=out)
        print(heading.format(n=len(lists[key])), file=out)
        for p in _sorted(lists[key], names):
            t = rc.left.get(p) if key == "left" else rc.entered.get(p)
            extra = ""
            if t is not None:
                extra = "  " + (_("left at {time}") if key == "left" else _("came in at {time}")).format(
                    time=_clock(t, tz, alarm_day))
            print(f"  {_who(p, names)}{extra}", file=out)


# --------------------------------------------------------------------------- command line


def _names_from(args: argparse.Namespace) -> dict[str, str]:
    if args.names is not None:
        return load_names(args.names)
    if DEFAULT_NAMES.exists():
        return load_names(DEFAULT_NAMES)
    return {}


def _run(args: argparse.Namespace, which: str) -> int:
    out = sys.stdout
    try:
        view = read_presence(presence_path(args.config, args.file))
        names = _names_from(args)
    except PresenceReadError as exc:
        print(f"gate-agent {which}: {exc}", file=sys.stderr)
        return exc.code
    buf = io.StringIO()
    if which == "presence":
        print_presence(view, names, buf, as_csv=args.csv)
    else:
        if view["rollcall"] is None:
            print("gate-agent rollcall: " + _("no roll-call yet: the gate takes one when the fire loop "
                                                 "opens (here or at another gate of the site)"), file=sys.stderr)
            return Exit.FAILED
        print_rollcall(view, names, buf, as_csv=args.csv)
    out.write(buf.getvalue())
    return Exit.OK


def _cmd_presence(args: argparse.Namespace) -> int:
    return _run(args, "presence")


def _cmd_rollcall(args: argparse.Namespace) -> int:
    return _run(args, "rollcall")


def add_presence_parsers(subparsers: Any) -> None:
    """`gate-agent presence` and `gate-agent rollcall`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, metavar="FILE",
                        help=_("config file whose service.state_dir is read (default {path})").format(
                            path=DEFAULT_CONFIG))
    common.add_argument("--file", default=None, metavar="FILE", help=_("the presence file itself"))
    common.add_argument("--names", default=None, metavar="FILE",
                        help=_("the school's names file (CSV, mode 0600) to print names beside the ids "
                               "(default {path} when it exists)").format(path=DEFAULT_NAMES))
    common.add_argument("--csv", action="store_true", help=_("as CSV (for a spreadsheet or printing)"))
    p = subparsers.add_parser("presence", parents=[common],
                              help=_("who is inside now (entered this day and not seen leaving)"),
                              description=_("Who is inside now, from the file the service keeps "
                                            "(docs/presence.md): counts and the list."))
    p.set_defaults(func=_cmd_presence)
    r = subparsers.add_parser("rollcall", parents=[common],
                              help=_("the fire roll-call: inside at the alarm, left since, not yet seen leaving"),
                              description=_("The last fire roll-call, from the file the service keeps "
                                            "(docs/presence.md): three lists to print for the evacuation."))
    r.set_defaults(func=_cmd_rollcall)
