"""`gate-agent wiring`: the diagram comes from the profile's pin map, names every
pin, follows the profile when it changes, is the same bytes every run, and
reads the profile from the config by default."""
from __future__ import annotations

import inspect
import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent import i18n
from agent.cli import main
from agent.hw.profiles import load_profile
from agent.tools.wiring import BCM_TO_PHYS, POWER, render_svg, render_text, wired_lines

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "hardware" / "profiles"
PROFILES = sorted(p.stem for p in SHIPPED.glob("*.toml"))
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(autouse=True)
def english():
    i18n.set_language("en")
    yield
    i18n.set_language(None)


def svg_texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def every_pin(profile) -> list[tuple[str, int]]:
    """(signal, BCM) of every line of the profile, straight from the profile's own fields."""
    out = [(n, o.pin) for n, o in profile.outputs.items()] + [(n, i.pin) for n, i in profile.inputs.items()]
    for name, r in profile.readers.items():
        out += [(f"{name}.d0", r.d0), (f"{name}.d1", r.d1)]
        out += [(f"{name}.led", r.led.pin)] if r.led else []
        out += [(f"{name}.beeper", r.beeper.pin)] if r.beeper else []
    return out


@pytest.mark.parametrize("name", PROFILES)
def test_the_svg_parses_and_names_every_pin_of_the_profile(name):
    profile = load_profile(name)
    texts = svg_texts(render_svg(profile))
    joined = "\n".join(texts)
    pins = every_pin(profile)
    assert len(pins) == len(profile.pin_uses())
    for signal, bcm in pins:
        # In the header drawing: the signal beside its GPIO, and in the table: its own row.
        assert any(signal in t and f"GPIO{bcm}" in t for t in texts), (signal, bcm)
        assert texts.count(signal) == 1, signal
        assert str(BCM_TO_PHYS[bcm]) in texts
    for terminal in ("Unlock A", "Unlock B", "Stop", "PASS A", "PASS B"):
        assert terminal in joined
    assert texts.count("GND") >= sum(1 for k in POWER.values() if k == "GND")


@pytest.mark.parametrize("name", PROFILES)
def test_the_text_names_every_pin_in_header_order(name):
    profile = load_profile(name)
    text = render_text(profile)
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit() and len(cells) > 2 and cells[1].startswith("GPIO"):
            rows[cells[2]] = (int(cells[0]), int(cells[1][4:]))
    assert rows == {s: (BCM_TO_PHYS[b], b) for s, b in every_pin(profile)}
    physical = [p for p, _ in sorted(rows.values())]
    order = [int(ln.split()[0]) for ln in text.splitlines() if ln[:1].isdigit()]
    assert order == sorted(order) == sorted(physical)
    for line in profile.boot_config:
        assert line in text


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    text = (SHIPPED / "pi4-relay4.toml").read_text()
    assert old in text
    board = tmp_path / "edited.toml"
    board.write_text(text.replace(old, new).replace('name = "pi4-relay4"', 'name = "edited"'))
    return board


def test_the_diagram_follows_a_changed_pin(tmp_path):
    before = load_profile("pi4-relay4")
    # Move the tamper switch from BCM 26 to BCM 8, free in this profile (2/3 are kept for I2C, 14/15 for UART).
    board = _edited(tmp_path, "tamper     = { pin = 26,", "tamper     = { pin = 8,")
    after = load_profile(board)
    assert after.inputs["tamper"].pin == 8
    svg_before, svg_after = render_svg(before), render_svg(after)
    assert svg_before != svg_after
    texts = svg_texts(svg_after)
    assert any("tamper" in t and "GPIO8" in t for t in texts)
    assert not any("tamper" in t and "GPIO26" in t for t in texts)
    row = [ln for ln in render_text(after).splitlines() if " tamper " in ln]
    assert row and row[0].split()[:2] == ["24", "GPIO8"]


def test_the_diagram_follows_a_changed_level_and_note(tmp_path):
    board = _edited(tmp_path, 'note = "relay K3 (IN3) -> turnstile Stop"', 'note = "relay K9 <&> Stop \\"x\\""')
    svg = render_svg(load_profile(board))
    assert 'relay K9 <&> Stop "x"' in svg_texts(svg)  # escaped in the file, read back whole
    assert "relay K9 <&>" not in svg
    # A control character, legal in a TOML string, must not make the drawing unreadable XML.
    board = _edited(tmp_path, 'note = "relay K3 (IN3) -> turnstile Stop"', 'note = "K3\\u0001\\u001b[31m"')
    assert load_profile(board).outputs["stop"].note == "K3\x01\x1b[31m"
    assert "K3??[31m" in svg_texts(render_svg(load_profile(board)))
    assert "K3??[31m" in render_text(load_profile(board)) and "\x1b" not in render_text(load_profile(board))


def test_the_output_is_the_same_bytes_every_run():
    p = load_profile("pi4-relay4")
    assert render_svg(p) == render_svg(load_profile("pi4-relay4"))
    assert render_text(p) == render_text(load_profile("pi4-relay4"))


def test_wired_lines_come_from_the_profile():
    p = load_profile("pi-opto")
    lines = {ln.signal: ln for ln in wired_lines(p)}
    assert lines["unlock_a"].bcm == p.outputs["unlock_a"].pin and lines["unlock_a"].far_end == "Unlock A"
    assert lines["pass_b"].pull == p.inputs["pass_b"].pull
    assert lines["ready"].active == ("high" if p.inputs["ready"].active_high else "low")


# --- the command --------------------------------------------------------------------------------


def test_cli_svg_to_stdout_and_to_a_file(tmp_path, capsys):
    assert main(["wiring", "--profile", "pi4-relay4", "--svg"]) == 0
    out = capsys.readouterr().out
    svg_texts(out)
    target = tmp_path / "w.svg"
    assert main(["wiring", "--profile", "pi4-relay4", "--svg", "-o", str(target)]) == 0
    assert target.read_text() == out
    assert main(["wiring", "--profile", "pi4-relay4", "--text"]) == 0
    assert "unlock_a" in capsys.readouterr().out


def test_cli_reads_the_profile_and_relay_mode_from_the_config(tmp_path, capsys):
    board = _edited(tmp_path, "tamper     = { pin = 26,", "tamper     = { pin = 8,")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[site]\nid = "s"\ngate = "g"\n[gate]\nrelay_mode = "potential"\n'
                   f'[hardware]\nprofile = "{board.name}"\n')
    assert main(["wiring", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "edited" in out and "GPIO8" in out
    assert "gate.relay_mode = potential" in out
    # A config naming no profile: the default board.
    cfg.write_text('[site]\nid = "s"\ngate = "g"\n')
    assert main(["wiring", "--config", str(cfg)]) == 0
    assert "pi4-relay4" in capsys.readouterr().out


def test_cli_bad_input_is_a_plain_error_exit_2(tmp_path, capsys):
    assert main(["wiring", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "give --profile" in capsys.readouterr().err
    assert main(["wiring", "--profile", "pi9-laser"]) == 2
    err = capsys.readouterr().err
    assert "pi9-laser" in err and "pi4-relay4" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[hardware\n")
    assert main(["wiring", "--config", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
    broken = _edited(tmp_path, "stop         = { pin = 6,", "stop         = { pin = 4,")
    assert main(["wiring", "--profile", str(broken)]) == 2
    assert "BCM 4 is already used by outputs.unlock_a" in capsys.readouterr().err
    assert main(["wiring", "--profile", "pi4-relay4", "-o", str(tmp_path / "no" / "dir" / "w.svg")]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["wiring", "--svg", "--text"])


def test_russian_headings_and_every_message_translated(capsys):
    used = i18n.used_msgids([ROOT / "agent" / "tools" / "wiring.py"])
    assert len(used) > 20
    missing = [m for m in used if m not in i18n.catalog("ru")]
    assert missing == []
    i18n.set_language("ru")
    assert main(["wiring", "--profile", "pi4-relay4", "--text"]) == 0
    out = capsys.readouterr().out
    assert "Схема подключения" in out
    assert "Unlock A" in out  # terminal names stay as printed on the controller board


# --- the wiring pages and the sign-off sheets ---------------------------------------------------

SHEETS = [ROOT / "hardware" / "commissioning-en.md", ROOT / "hardware" / "commissioning-ru.md"]
PAGES = [ROOT / "hardware" / "perco.md", ROOT / "hardware" / "profiles.md", *SHEETS]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target}"
        if anchor:
            headings = [_anchor(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.MULTILINE)]
            assert anchor in headings, f"{page.name}: {target} (headings: {headings})"


def test_the_sheets_list_every_doctor_check():
    from agent.tools.doctor import Doctor

    names = re.findall(r"self\.check_(\w+)", inspect.getsource(Doctor.run))
    assert "boot" in names and len(names) >= 10
    for sheet in SHEETS:
        row = next(ln for ln in sheet.read_text().splitlines() if ln.startswith("| config |"))
        assert [c.strip() for c in row.strip("|").split("|")] == names, sheet.name


@pytest.mark.parametrize("sheet", SHEETS, ids=lambda p: p.name)
def test_every_io_test_command_on_the_sheets_runs(sheet):
    """Each `command` the sheet asks for at the io-test prompt is one io-test accepts,
    run against the shipped relay profile on mock pins."""
    from gpiozero.pins.mock import MockFactory

    from agent.tools.iotest import run_iotest

    text = sheet.read_text()
    section = text[text.index("## 6."): text.index("## 7.")]
    commands = []
    for cell in re.findall(r"`([^`]+)`", section):
        if cell.split()[0] in ("pulse", "on", "off", "show", "wait", "all"):
            commands.append(cell)
    assert len(commands) >= 10
    for extra in ("exit.led", "exit.beeper"):  # "and the same for exit"
        commands.append(f"pulse {extra} 0.1")
    out = io.StringIO()
    assert run_iotest("pi4-relay4", factory=MockFactory(), commands=commands, out=out, err=out) == 0, out.getvalue()


def test_the_two_sheets_have_the_same_steps():
    """The Russian sheet is the English one translated: the same sections, checkboxes, commands."""
    en, ru = (s.read_text() for s in SHEETS)
    assert en.count("☐") == ru.count("☐")
    assert len(re.findall(r"^## ", en, re.MULTILINE)) == len(re.findall(r"^## ", ru, re.MULTILINE))
    code = [set(re.findall(r"`([^`]+)`", t)) for t in (en, ru)]
    assert code[0] == code[1]


def test_the_perco_page_names_every_turnstile_terminal_the_diagram_uses():
    from agent.tools.wiring import TERMINALS

    text = (ROOT / "hardware" / "perco.md").read_text()
    for signal, terminal in TERMINALS.items():
        assert f"`{signal}`" in text and f"**{terminal}**" in text, signal
    assert "relay_mode" in text and "confirm on site" in text
