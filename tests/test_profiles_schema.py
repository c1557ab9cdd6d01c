"""The board-profile format: its JSON Schema, the parser agreeing with it, plain
words for every problem at once, and check-config reading a custom profile."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import jsonschema_rs
import pytest

from agent.cli import main
from agent.hw.profiles import (
    ProfileError,
    available_profiles,
    load_profile,
    parse_profile,
    profile_schema,
    schema_problems,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "hardware" / "profiles"


def shipped_doc(name: str = "pi4-relay4") -> dict:
    return tomllib.loads((SHIPPED / f"{name}.toml").read_text())


def test_the_schema_is_valid_draft_2020_12_and_titled():
    schema = profile_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema_rs.meta.validate(schema)
    assert schema.get("title")


def test_the_docs_copy_is_the_packaged_schema():
    link = ROOT / "docs" / "schemas" / "profile.schema.json"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (ROOT / "agent" / "schemas" / "profile.schema.json").resolve()
    assert link.read_bytes() == (ROOT / "agent" / "schemas" / "profile.schema.json").read_bytes()


@pytest.mark.parametrize("name", sorted(p.stem for p in SHIPPED.glob("*.toml")))
def test_every_shipped_profile_meets_the_schema(name):
    assert schema_problems(shipped_doc(name)) == []


def test_the_schema_names_every_line_the_parser_knows():
    from agent.hw.profiles import INPUT_LINES, OUTPUT_LINES, REQUIRED_INPUTS, REQUIRED_OUTPUTS

    props = profile_schema()["properties"]
    assert set(props["outputs"]["properties"]) == set(OUTPUT_LINES)
    assert set(props["inputs"]["properties"]) == set(INPUT_LINES)
    assert set(props["outputs"]["required"]) == set(REQUIRED_OUTPUTS)
    assert set(props["inputs"]["required"]) == set(REQUIRED_INPUTS)


def _broken(path: tuple, value) -> dict:
    doc = shipped_doc()
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


# One fault each: the schema and the parser must both refuse it, naming the same place.
FAULTS = [
    (("outputs", "stop"), KeyError, "outputs.stop"),
    (("inputs", "pass_b"), KeyError, "inputs.pass_b"),
    (("outputs", "unlock_a", "pin"), 28, "outputs.unlock_a"),
    (("outputs", "unlock_a", "pin"), 1, "outputs.unlock_a"),
    (("outputs", "unlock_a", "pin"), True, "outputs.unlock_a"),
    (("outputs", "unlock_a", "active"), "lo", "outputs.unlock_a"),
    (("inputs", "ready", "pull"), "sideways", "inputs.ready"),
    (("inputs", "ready", "bounce_ms"), 5000, "inputs.ready"),
    (("inputs", "ready", "colour"), "red", "inputs.ready"),
    (("inputs", "doorbell"), {"pin": 3, "active": "low"}, "inputs.doorbell"),
    (("outputs", "siren"), {"pin": 3, "active": "low"}, "outputs.siren"),
    (("readers", "entry", "d1"), KeyError, "readers.entry"),
    (("readers", "bad name!"), {"d0": 2, "d1": 3}, "readers"),
    (("boot_config",), "gpio=4=op,dh", "boot_config"),
    (("name",), "", "name"),
    (("colour",), "red", "colour"),
]


@pytest.mark.parametrize("path,value,where", FAULTS, ids=[f[2] + "=" + repr(f[1]) for f in FAULTS])
def test_the_parser_and_the_schema_refuse_the_same_faults(path, value, where):
    doc = _broken(path, value)
    assert any(p.startswith(where) for p, _ in schema_problems(doc)), schema_problems(doc)
    with pytest.raises(ProfileError) as exc:
        parse_profile(doc, "t.toml")
    assert any(where in e for e in exc.value.errors), exc.value.errors


def test_what_only_the_schema_catches_is_still_reported_in_plain_words():
    """A note or description that is not text: the parser would take str() of it."""
    doc = shipped_doc()
    doc["description"] = 5
    doc["outputs"]["stop"]["note"] = ["relay", "K3"]
    with pytest.raises(ProfileError) as exc:
        parse_profile(doc, "t.toml")
    text = "\n".join(exc.value.errors)
    assert "description: 5 is not a string" in text
    assert "outputs.stop.note: list is not a string" in text


def test_every_problem_at_once_and_each_only_once():
    doc = shipped_doc()
    doc["colour"] = "red"
    doc["outputs"]["unlock_a"]["pin"] = 40
    doc["inputs"]["pass_b"]["active"] = "sideways"
    del doc["outputs"]["stop"]
    doc["readers"]["exit"]["d0"] = 17  # also used by pass_a
    doc["description"] = 7
    with pytest.raises(ProfileError) as exc:
        parse_profile(doc, "t.toml")
    errors = exc.value.errors
    for where in ("colour", "outputs.unlock_a", "inputs.pass_b", "outputs.stop",
                  "readers.exit.d0", "description"):
        assert sum(e.startswith(where) or f"unknown key '{where}'" in e for e in errors) == 1, (where, errors)
    assert len(errors) == 6


def test_a_toml_date_is_a_plain_error_not_a_crash(tmp_path):
    board = tmp_path / "dated.toml"
    board.write_text((SHIPPED / "pi4-relay4.toml").read_text().replace(
        'name = "pi4-relay4"', 'name = "dated"\nwritten = 2026-12-05'))
    with pytest.raises(ProfileError) as exc:
        load_profile(board)
    assert any(e.startswith("top level: unknown key 'written'") for e in exc.value.errors)


def test_a_custom_profile_by_path_is_found_and_checked(tmp_path):
    doc = shipped_doc()
    text = (SHIPPED / "pi4-relay4.toml").read_text().replace('name = "pi4-relay4"', 'name = "school17-gate"')
    board = tmp_path / "school17-gate.toml"
    board.write_text(text)
    assert load_profile(board).name == "school17-gate"
    assert load_profile(board).outputs["stop"].pin == doc["outputs"]["stop"]["pin"]
    # By name through $GATE_PROFILE_DIR, as the site's own profiles are.
    os.environ["GATE_PROFILE_DIR"] = str(tmp_path)
    try:
        assert "school17-gate" in available_profiles()
        assert load_profile("school17-gate").source == str(board)
    finally:
        del os.environ["GATE_PROFILE_DIR"]


def _config(tmp_path: Path, profile: str) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[site]\nid = "school17"\ngate = "main-1"\n[hardware]\npin_factory = "mock"\n'
                   f'profile = "{profile}"\n')
    return cfg


def test_check_config_lists_every_problem_of_a_custom_profile(tmp_path, capsys):
    text = (SHIPPED / "pi4-relay4.toml").read_text()
    text = text.replace('name = "pi4-relay4"', 'name = "custom"')
    text = text.replace('stop         = { pin = 6, active = "low"', 'stop         = { pin = 6, active = "lo"')
    text = text.replace("pass_b     = { pin = 27,", "pass_b     = { pin = 17,")  # pass_a's pin
    text += "\n[misc]\nx = 1\n"
    (tmp_path / "boards").mkdir()
    (tmp_path / "boards" / "custom.toml").write_text(text)
    # A relative path is taken from the config file's own directory.
    rc = main(["check-config", str(_config(tmp_path, "boards/custom.toml"))])
    err = capsys.readouterr().err
    assert rc == 2
    assert "outputs.stop: active = 'lo'" in err
    assert "inputs.pass_b: BCM 17 is already used by inputs.pass_a" in err
    assert "unknown key 'misc'" in err
    assert err.count("hardware.profile") >= 3


def test_check_config_accepts_a_good_custom_profile(tmp_path, capsys):
    text = (SHIPPED / "pi-opto.toml").read_text().replace('name = "pi-opto"', 'name = "custom"')
    (tmp_path / "custom.toml").write_text(text)
    rc = main(["check-config", str(_config(tmp_path, "custom.toml"))])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("OK:")
    assert str(tmp_path / "custom.toml") in out


def test_the_worked_example_in_the_docs_is_a_valid_profile(tmp_path):
    """hardware/profiles.md's custom example, taken from the page itself."""
    page = (ROOT / "hardware" / "profiles.md").read_text()
    start = page.index("```toml\n# school17-gate.toml")
    body = page[start + len("```toml\n"): page.index("```", start + 7)]
    board = tmp_path / "school17-gate.toml"
    board.write_text(body)
    p = load_profile(board)
    assert p.name == "school17-gate"
    assert schema_problems(tomllib.loads(body)) == []
    # The page's broken variant gives exactly the errors the page shows.
    bad_start = page.index("```toml\n# broken.toml")
    bad = page[bad_start + len("```toml\n"): page.index("```", bad_start + 7)]
    (tmp_path / "broken.toml").write_text(bad)
    with pytest.raises(ProfileError) as exc:
        load_profile(tmp_path / "broken.toml")
    shown = page[page.index("```text\nhardware profile"):]
    shown = shown[len("```text\n"): shown.index("```", 8)]
    for e in exc.value.errors:
        assert f"  - {e}" in shown, e


def test_the_worked_example_config_passes_check_config(tmp_path, capsys):
    """The page's profile and its config snippet together: check-config says OK."""
    page = (ROOT / "hardware" / "profiles.md").read_text()
    start = page.index("```toml\n# school17-gate.toml")
    (tmp_path / "school17-gate.toml").write_text(page[start + 8: page.index("```", start + 7)])
    snippet_start = page.index("```toml\n[gate]")
    snippet = page[snippet_start + 8: page.index("```", snippet_start + 7)]
    snippet = snippet.replace('profile = "school17-gate"', 'profile = "school17-gate.toml"\npin_factory = "mock"')
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[site]\nid = "school17"\ngate = "main-1"\n' + snippet)
    rc = main(["check-config", str(cfg)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert '"wait_s": 8.0' in captured.out
