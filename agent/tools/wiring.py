"""``gate-agent wiring``: the wiring diagram of a board profile, as text or SVG.

The diagram is drawn from the profile's pin map itself (agent/hw/profiles.py),
so it cannot drift from what the agent drives: change a pin in the profile
and the diagram changes with it. No drawing library: the SVG is written by
hand, sorted and free of dates, so the same profile always gives the same
bytes (a diagram can be kept in git and diffed).

    gate-agent wiring                          # the profile named in /etc/gate-agent/agent.toml
    gate-agent wiring --profile pi4-relay4 --svg -o pi4-relay4.svg
    gate-agent wiring --profile ./school17-gate.toml --text

Terminal names are those of a PERCo-class turnstile controller
(hardware/perco.md); other turnstiles name the same inputs alike.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from agent.hw.profiles import Profile, ProfileError, load_profile, power_on_pull
from agent.i18n import _

DEFAULT_CONFIG = Path("/etc/gate-agent/agent.toml")
DEFAULT_PROFILE = "pi4-relay4"  # config.schema.json's default for hardware.profile

# The 40-pin header: physical pin -> BCM GPIO number (the others are power and ground).
PHYS_TO_BCM = {3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24,
               19: 10, 21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 27: 0, 28: 1, 29: 5, 31: 6, 32: 12,
               33: 13, 35: 19, 36: 16, 37: 26, 38: 20, 40: 21}
BCM_TO_PHYS = {b: p for p, b in PHYS_TO_BCM.items()}
POWER = {1: "3V3", 17: "3V3", 2: "5V", 4: "5V", 6: "GND", 9: "GND", 14: "GND", 20: "GND",
         25: "GND", 30: "GND", 34: "GND", 39: "GND"}

# Where each line goes: the turnstile controller's terminal, as printed on a
# PERCo-class board (hardware/perco.md), or the device at the other end.
TERMINALS = {
    "unlock_a": "Unlock A",
    "unlock_b": "Unlock B",
    "stop": "Stop",
    "fire_release": "Fire Alarm",
    "pass_a": "PASS A",
    "pass_b": "PASS B",
    "ready": "Ready",
}


def _far_end(signal: str) -> str:
    """What the far end of a line is, for the lines that do not go to a turnstile terminal."""
    if signal in TERMINALS:
        return TERMINALS[signal]
    other = {
        "fire_loop": _("fire panel loop (NC)"),
        "fire_reset": _("fire-release reset key"),
        "lockdown": _("lockdown key switch"),
        "button_in": _("guard's entry button"),
        "button_out": _("guard's exit button"),
        "tamper": _("enclosure switch"),
    }
    if signal in other:
        return other[signal]
    part = signal.rsplit(".", 1)[-1]
    return {"d0": _("reader D0 (via level shifter)"), "d1": _("reader D1 (via level shifter)"),
            "led": _("reader LED line"), "beeper": _("reader BEEP line")}.get(part, "")


@dataclass(frozen=True)
class Line:
    """One wired line of the profile, as the diagram shows it."""

    signal: str  # unlock_a, pass_b, entry.d0 ...
    bcm: int
    phys: int
    kind: str  # "out", "in", "reader"
    active: str  # "high", "low", "" for reader data lines
    pull: str  # "up", "down", "none", "" for outputs
    far_end: str
    note: str


def wired_lines(profile: Profile) -> list[Line]:
    """Every line of the profile, in header order (physical pin)."""
    out: list[Line] = []

    def add(signal: str, pin: int, kind: str, active: str, pull: str, note: str) -> None:
        out.append(Line(signal, pin, BCM_TO_PHYS.get(pin, 0), kind, active, pull, _far_end(signal), note))

    for name, o in profile.outputs.items():
        add(name, o.pin, "out", "high" if o.active_high else "low", "", o.note)
    for name, i in profile.inputs.items():
        add(name, i.pin, "in", "high" if i.active_high else "low", i.pull, i.note)
    for name, r in profile.readers.items():
        add(f"{name}.d0", r.d0, "reader", "", r.pull, r.note)
        add(f"{name}.d1", r.d1, "reader", "", r.pull, r.note)
        if r.led:
            add(f"{name}.led", r.led.pin, "out", "high" if r.led.active_high else "low", "", r.led.note)
        if r.beeper:
            add(f"{name}.beeper", r.beeper.pin, "out", "high" if r.beeper.active_high else "low", "",
                r.beeper.note)
    return sorted(out, key=lambda ln: (ln.phys, ln.signal))


def _footer(profile: Profile, relay_mode: str | None) -> list[str]:
    gnd = ", ".join(str(p) for p, k in sorted(POWER.items()) if k == "GND")
    lines = [
        _("Ground (GND): header pins {pins}; dry-contact inputs return here. A relay's contacts are dry: "
          "each relay's COM goes to the turnstile's GND, its NO to the terminal").format(pins=gnd),
        _("Power: 5 V on header pins 2 and 4, 3.3 V on pins 1 and 17; inputs take 3.3 V at most"),
    ]
    if profile.boot_config:
        lines.append(_("Boot lines (config.txt): {lines}").format(lines="; ".join(profile.boot_config)))
    outs = [ln for ln in wired_lines(profile) if ln.kind == "out"]
    if outs:
        # The loader refuses a profile whose output is active at power-on; say so where it is wired.
        lines.append(_("Every output is inactive from power-on (pulled {levels}), before the agent runs")
                     .format(levels=", ".join(f"{ln.signal} {power_on_pull(ln.bcm)}" for ln in outs
                                              if ln.signal in TERMINALS)))
    if relay_mode:
        lines.append(_("gate.relay_mode = {mode}: set the turnstile's control mode to {mode} as well "
                       "(hardware/perco.md)").format(mode=relay_mode))
    return lines


def _columns() -> list[str]:
    # Dir: -> the Pi drives the line (an output), <- the Pi reads it (an input).
    return [_("Pin"), "BCM", _("Signal"), _("Dir"), _("Active"), _("Pull"), _("Wire to"), _("Note")]


def _row(ln: Line) -> list[str]:
    kind = "->" if ln.kind == "out" else "<-"  # the Pi drives it / the Pi reads it; no words to translate
    return [str(ln.phys), f"GPIO{ln.bcm}", ln.signal, kind, ln.active or "-", ln.pull or "-", ln.far_end, _(ln.note) if ln.note else ""]


def render_text(profile: Profile, relay_mode: str | None = None) -> str:
    """The wiring as a plain table, in header order, for a terminal or a printout."""
    head = _columns()
    rows = [_row(ln) for ln in wired_lines(profile)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]

    out = [_("Wiring of board profile {name} ({source})").format(name=profile.name, source=profile.source)]
    if profile.description:
        out.append(profile.description)
    out += ["", fmt(head).rstrip(), *(fmt(r).rstrip() for r in rows), ""]
    out += _footer(profile, relay_mode)
    # No control characters from a profile's notes reach the terminal (an ESC could recolour or hide lines).
    return _NOT_XML.sub("?", "\n".join(out) + "\n")


# --- SVG -------------------------------------------------------------------------------------

_COLOURS = {"out": "#c0392b", "in": "#1f5fa8", "reader": "#1e8449", "GND": "#222222",
            "5V": "#d35400", "3V3": "#b7950b", "free": "#bbbbbb"}
_ROW = 22
_CHAR = 7.3  # px per character of 12 px monospace, to size the drawing without measuring text


# XML 1.0 cannot carry most control characters, even escaped; a profile note may hold one.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _t(x: float, y: float, text: str, *, size: int = 12, anchor: str = "start", fill: str = "#000",
       weight: str = "normal") -> str:
    return (f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-weight="{weight}">{escape(_NOT_XML.sub("?", text))}</text>')


def _legend(x: float, y: float) -> list[str]:
    out = []
    for kind, word in (("out", _("output (to a relay or driver)")), ("in", _("input (a contact)")),
                       ("reader", _("reader data (via level shifter)")), ("GND", "GND"),
                       ("free", _("free pin"))):
        out.append(f'<circle cx="{x + 5:.0f}" cy="{y - 4:.0f}" r="5" fill="{_COLOURS[kind]}" stroke="#333"/>')
        out.append(_t(x + 14, y, word, size=11))
        x += 14 + len(word) * 6.7 + 24
    return out


def render_svg(profile: Profile, relay_mode: str | None = None) -> str:
    """The wiring as a standalone SVG: the 40-pin header with each used pin labelled,
    then the same table as the text mode."""
    lines = wired_lines(profile)
    by_phys = {ln.phys: ln for ln in lines}
    label_w = max([len(f"{ln.signal} → {ln.far_end}") for ln in lines] + [20]) * _CHAR + 40
    head_x = 40 + label_w
    head_w = 96
    width_header = head_x * 2 + head_w
    head = _columns()
    rows = [_row(ln) for ln in lines]
    col_w = [max(len(r[i]) for r in [head, *rows]) * _CHAR + 14 for i in range(len(head))]
    footer = _footer(profile, relay_mode)
    width = int(max(width_header, 40 + sum(col_w), 40 + max(len(f) for f in footer) * _CHAR))
    top = 100
    header_h = 20 * _ROW + 16
    table_y = top + header_h + 50
    height = int(table_y + (len(rows) + 1) * _ROW + 30 + len(footer) * _ROW + 20)

    out = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans Mono, Consolas, monospace">'),
        f"<title>{escape(_('Wiring of board profile {name}').format(name=profile.name))}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        _t(20, 30, _("Wiring of board profile {name} ({source})").format(name=profile.name,
                                                                         source=profile.source),
           size=16, weight="bold"),
        _t(20, 50, profile.description or ""),
        *_legend(20, 68),
        (f'<rect x="{head_x}" y="{top}" width="{head_w}" height="{header_h}" rx="6" fill="#f4f4f4" '
         f'stroke="#555"/>'),
        _t(head_x + head_w / 2, top - 8, _("Raspberry Pi 40-pin header"), size=11, anchor="middle"),
    ]
    for phys in range(1, 41):
        row, right = (phys - 1) // 2, phys % 2 == 0
        y = top + 8 + row * _ROW + _ROW / 2
        cx = head_x + (head_w - 16 if right else 16)
        ln = by_phys.get(phys)
        kind = ln.kind if ln else POWER.get(phys, "free")
        colour = _COLOURS[kind]
        out.append(f'<circle cx="{cx:.0f}" cy="{y:.0f}" r="6" fill="{colour}" stroke="#333"/>')
        out.append(_t(head_x + head_w / 2 + (6 if right else -6), y + 4, str(phys), size=9,
                      anchor="start" if right else "end", fill="#555"))
        if ln:
            label = f"GPIO{ln.bcm}  {ln.signal} → {ln.far_end}" if right else \
                f"{ln.signal} → {ln.far_end}  GPIO{ln.bcm}"
        elif phys in POWER:
            label = POWER[phys]
        else:
            label = ""
        if label:
            x_end = cx + (30 if right else -30)
            out.append(f'<line x1="{cx + (6 if right else -6):.0f}" y1="{y:.0f}" x2="{x_end:.0f}" '
                       f'y2="{y:.0f}" stroke="{colour}" stroke-width="2"/>')
            out.append(_t(x_end + (6 if right else -6), y + 4, label, anchor="start" if right else "end",
                          fill=colour, weight="bold" if ln else "normal"))
    # The table: the same rows as the text mode.
    x = 20.0
    xs = []
    for w in col_w:
        xs.append(x)
        x += w
    y = table_y
    for i, cell in enumerate(head):
        out.append(_t(xs[i], y, cell, weight="bold"))
    out.append(f'<line x1="20" y1="{y + 6}" x2="{width - 20}" y2="{y + 6}" stroke="#999"/>')
    for ln, r in zip(lines, rows, strict=True):
        y += _ROW
        for i, cell in enumerate(r):
            out.append(_t(xs[i], y, cell, fill=_COLOURS[ln.kind] if i == 2 else "#000"))
    y += 30
    for f in footer:
        out.append(_t(20, y, f))
        y += _ROW
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- command line ----------------------------------------------------------------------------


def profile_from_config(path: Path) -> tuple[str, str | None]:
    """(hardware.profile, gate.relay_mode) named by a config file, relative paths from its folder.

    Only these two keys are read: a diagram is wanted before the rest of the
    config (certificates, keys) exists, so the whole file is not checked here
    (gate-agent check-config does that).
    """
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    hw = doc.get("hardware", {}) if isinstance(doc.get("hardware"), dict) else {}
    gate = doc.get("gate", {}) if isinstance(doc.get("gate"), dict) else {}
    profile = hw.get("profile", DEFAULT_PROFILE)
    if not isinstance(profile, str) or not profile:
        raise ValueError(_("hardware.profile in {path} is not a profile name or path").format(path=path))
    if profile.endswith(".toml") or "/" in profile:
        profile = str((path.parent / profile).resolve())
    mode = gate.get("relay_mode", "pulse")
    return profile, mode if isinstance(mode, str) else None


def _cmd_wiring(args: argparse.Namespace) -> int:
    relay_mode = None
    name = args.profile
    if name is None:
        cfg = Path(args.config)
        try:
            name, relay_mode = profile_from_config(cfg)
        except FileNotFoundError:
            print(_("gate-agent wiring: {path} does not exist; give --profile NAME (e.g. --profile "
                    "pi4-relay4) or --config FILE").format(path=cfg), file=sys.stderr)
            return 2
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
            print(_("gate-agent wiring: cannot read {path}: {error}").format(path=cfg, error=exc),
                  file=sys.stderr)
            return 2
    try:
        profile = load_profile(name)
    except ProfileError as exc:
        print(f"gate-agent wiring: {exc}", file=sys.stderr)
        return 2
    text = render_svg(profile, relay_mode) if args.svg else render_text(profile, relay_mode)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(_("gate-agent wiring: cannot write {path}: {error}").format(path=args.output, error=exc),
                  file=sys.stderr)
            return 2
        print(_("wrote {path}").format(path=args.output))
    else:
        sys.stdout.write(text)
    return 0


def add_wiring_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``gate-agent wiring`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "wiring",
        help=_("print the wiring diagram of a board profile (text or SVG)"),
        description=_("Draw the wiring from the board profile's pin map: which header pin goes to "
                      "which turnstile terminal, relay or reader line. Without --profile, the profile "
                      "named in the config file is used."),
    )
    p.add_argument("--profile", help=_("board profile name or .toml path, e.g. pi4-relay4"))
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help=_("config file naming the profile (default {path})").format(path=DEFAULT_CONFIG))
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--svg", action="store_true", help=_("an SVG drawing (for printing or a browser)"))
    fmt.add_argument("--text", action="store_true", help=_("a plain-text table (the default)"))
    p.add_argument("-o", "--output", help=_("write to this file instead of the screen"))
    p.set_defaults(func=_cmd_wiring)
    return p

