"""agent/core/schemas.py: every schema's one home, and one form of words for what is wrong."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from agent.core import schemas

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"
SHIPPED = sorted(p.name.removesuffix(".schema.json") for p in (AGENT / "schemas").glob("*.schema.json"))


def said(name: str, doc: object, **kw: object) -> dict[str, str]:
    """{TOML key path: message} of every error of ``doc`` against schema ``name``."""
    out = {}
    for err in schemas.validator(name).iter_errors(doc):
        p = schemas.problem(err, name, doc=doc, **kw)
        out[schemas.key_path(p.parts)] = p.message
    return out


def profile() -> dict:
    return tomllib.loads((ROOT / "hardware" / "profiles" / "pi4-relay4.toml").read_text())


# --------------------------------------------------------------------------- loading


def test_every_shipped_schema_is_named_loads_and_compiles():
    assert schemas.names() == tuple(SHIPPED) and len(SHIPPED) >= 10
    for name in SHIPPED:
        schema = schemas.load(name)
        assert schema["$schema"].endswith("2020-12/schema"), name
        v = schemas.validator(name)
        assert v is schemas.validator(name), f"{name}: the validator is built once"
        v.is_valid({})  # compiled: it answers (whatever the answer)
        schemas.validator(name, formats=True).is_valid({})


def test_load_gives_a_fresh_copy_and_the_validator_does_not_see_edits():
    first = schemas.load("config")
    first["properties"].clear()
    first["required"] = ["nothing"]
    assert schemas.load("config")["properties"]
    assert "site" in said("config", {})


@pytest.mark.parametrize("bad", ["evnets", "../pyproject", "Config", "", None])
def test_an_unknown_or_malformed_name_is_refused_with_the_known_names(bad):
    with pytest.raises(schemas.SchemaNotFound, match="config"):
        schemas.load(bad)
    with pytest.raises(schemas.SchemaNotFound):
        schemas.validator(bad)


def test_a_part_of_a_schema_is_validated_alone():
    snapshot = schemas.validator("acl", part="snapshot")
    errs = [list(e.instance_path) for e in snapshot.iter_errors({"kind": "snapshot", "people": [{"id": "p"}]})]
    assert [] in errs and ["people", 0] in errs  # into the kind's fields, not "matches neither"
    with pytest.raises(schemas.SchemaNotFound, match="nothing"):
        schemas.validator("acl", part="nothing")


def test_formats_are_asserted_only_when_asked():
    doc = {"type": "agent.started", "ts": "2026-02-30T10:00:00.000Z"}  # the shape, not a date
    plain = {tuple(e.instance_path) for e in schemas.validator("event").iter_errors(doc)}
    strict = {tuple(e.instance_path): e for e in schemas.validator("event", formats=True).iter_errors(doc)}
    assert ("ts",) not in plain and ("ts",) in strict
    p = schemas.problem(strict[("ts",)], "event")
    assert p.parts == ("ts",) and '"2026-02-30T10:00:00.000Z" is not allowed; wanted: ' in p.message
    assert "RFC 3339" in p.message


# --------------------------------------------------------------------------- the one form of words


def test_required_names_the_key_at_its_own_path_with_what_it_holds():
    cfg = said("config", {})
    assert cfg["site"].startswith("missing; it is required: Who this gate is")
    prof = profile()
    del prof["outputs"]["unlock_a"]["active"]
    # The description behind a $ref is found too.
    assert said("profile", prof) == {"outputs.unlock_a.active": "missing; it is required: "
                                     "The pin level while the line is active."}


def test_an_unknown_key_is_reported_at_the_key_with_every_allowed_key_and_the_callers_hint():
    prof = profile()
    prof["outputs"]["unlock_a"]["colour"] = "red"
    assert said("profile", prof, unknown_hint="see hardware/profiles.md") == {
        "outputs.unlock_a.colour": 'unknown key "colour"; allowed here: "active", "note", "pin" '
                                   "(see hardware/profiles.md)"}
    cfg = said("config", {"site": {"id": "s", "gate": "g", "colour": 1, "size": 2}})
    assert cfg["site"].startswith('unknown keys "colour", "size"; allowed here: ')
    assert '"gate"' in cfg["site"] and '"id"' in cfg["site"]


def test_an_enum_lists_every_option_even_a_long_one():
    from agent.contract import DENIAL_REASONS

    errs = [e for e in schemas.validator("event").iter_errors({"type": "access.denied", "reason": "late"})
            if list(e.instance_path) == ["reason"]]
    assert errs and "other candidates" in errs[0].message  # jsonschema_rs's own words cut the list
    p = schemas.problem(errs[0], "event")
    assert len(DENIAL_REASONS) > 5
    assert p.message == '"late" is not allowed; allowed: ' + ", ".join(f'"{r}"' for r in DENIAL_REASONS)
    prof = profile()
    prof["outputs"]["stop"]["active"] = "mid"
    assert said("profile", prof)["outputs.stop.active"] == '"mid" is not allowed; allowed: "high", "low"'


def test_a_wrong_type_says_the_wanted_type_in_words():
    prof = profile()
    prof["inputs"]["pass_a"]["pin"] = "17"
    prof["description"] = 5
    assert said("profile", prof) == {"inputs.pass_a.pin": '"17" is not a whole number',
                                     "description": "5 is not a string"}
    assert said("config", {"site": {"id": "s", "gate": "g"}, "gate": {"pulse_s": "x"}})["gate.pulse_s"] \
        == '"x" is not a number'


def test_minimum_and_maximum_name_the_limit_and_the_schemas_hint():
    prof = profile()
    prof["outputs"]["unlock_a"]["pin"] = 40
    prof["outputs"]["unlock_b"]["pin"] = 1
    got = said("profile", prof)
    assert got["outputs.unlock_a.pin"] == "40 is above 27" and got["outputs.unlock_b.pin"] == "1 is below 2"
    cfg = said("config", {"gate": {"pulse_s": 0.05, "wait_s": 99}})
    assert cfg["gate.pulse_s"] == "0.05 is below 0.1 (the turnstile needs at least 100 ms)"
    assert cfg["gate.wait_s"].startswith("99 is above 60 (")


def test_a_secret_value_is_never_quoted():
    cfg = said("config", {"mqtt": {"password": 918273645}}, secrets=[("mqtt", "password")])
    assert cfg["mqtt.password"] == "(hidden) is not a string"
    # Any schema, any path the caller names.
    prof = profile()
    prof["name"] = 918273645
    assert said("profile", prof, secrets=[("name",)]) == {"name": "(hidden) is not a string"}
    assert "918273645" in said("profile", prof)["name"]  # not named secret: quoted as usual


def test_a_key_that_does_not_apply_to_an_entrys_type_says_to_remove_it():
    doc = {"hardware": {"readers": [{"name": "e", "type": "rdm6300", "port": "/dev/ttyS0", "format": 26}]}}
    got = said("config", doc)
    assert got["hardware.readers[0].format"] == "format does not apply to a reader of type rdm6300; remove it"


def test_every_caller_speaks_the_same_words_in_its_own_notation(tmp_path):
    """The same mistake, an unknown key and a wrong type, through four callers."""
    from agent.contract import validate
    from agent.core.acl import AccessList, AclRejected
    from agent.downlink.aclwire import header_errors
    from agent.simulator import ScenarioError, scenario_from_dict

    assert '$.colour: unknown key "colour"; allowed here: "journal", "upto", "v"' in \
        "\n".join(validate("ack", {"v": 1, "journal": "j", "upto": 1, "colour": 1}))
    bad = header_errors({"kind": "image", "version": "1", "encoding": "zlib", "bytes": "x", "size": 4096,
                         "sha256": "0" * 64})
    assert [(e.path, e.message) for e in bad] == [("/list/bytes", '"x" is not a whole number')]
    with pytest.raises(AclRejected) as exc:
        AccessList.from_snapshot({"kind": "snapshot", "version": 5, "timezone": "Asia/Tomsk", "people": []})
    assert ("/version", "5 is not a string") in [(e.path, e.message) for e in exc.value.errors]
    with pytest.raises(ScenarioError) as sexc:
        scenario_from_dict({"start": "2026-09-01T07:30:00+07:00", "steps": [{"at": "+1", "walk": "x"}]})
    assert 'step 1, walk: "x" is not a number' in sexc.value.problems


def test_the_access_list_keeps_its_own_words_first():
    from agent.core.acl import AccessList, AclRejected

    doc = {"kind": "snapshot", "version": "1", "timezone": "Asia/Tomsk",
           "people": [{"id": "p", "cards": ["zz"], "groups": [], "name": "Ivan"}]}
    with pytest.raises(AclRejected) as exc:
        AccessList.from_snapshot(doc)
    words = {e.path: e.message for e in exc.value.errors}
    assert words["/people/0/cards/0"].startswith('"zz" is not a card string')
    assert "no names, photos or biometrics" in words["/people/0"]


def test_a_forged_document_gets_a_bounded_message_on_one_line():
    keys = {f"k{i}\nforged: line": i for i in range(5000)}
    got = said("ack", {"v": 1, "journal": "j", "upto": 1, **keys})
    assert list(got) == [""]
    msg = got[""]
    assert "\n" not in msg and msg.count('"k') == 10 and "+4990" in msg and len(msg) < 1000


def test_a_wording_slip_falls_back_to_the_validators_own_words():
    from types import SimpleNamespace

    class Minimum:  # a kind without the limit the words need
        pass

    err = SimpleNamespace(instance_path=["gate", "pulse_s"], schema_path=["properties", "gate", "minimum"],
                          kind=Minimum(), instance=0.05, message="0.05 is less than the minimum of 0.1")
    assert schemas.problem(err, "config") == schemas.Problem(("gate", "pulse_s"), err.message)


# --------------------------------------------------------------------------- one home


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("path", sorted(AGENT.rglob("*.py")), ids=lambda p: str(p.relative_to(AGENT)))
def test_only_the_schemas_module_reads_a_schema_or_builds_a_validator(path):
    if path == AGENT / "core" / "schemas.py":
        return
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert "jsonschema_rs" not in {a.name.split(".")[0] for a in node.names}, (
                f"{path}:{node.lineno}: validate through agent.core.schemas.validator(name)")
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "jsonschema_rs", f"{path}:{node.lineno}"
    for s in _code_strings(tree):
        v = s.value
        assert not (v == "schemas" or v.startswith("schemas/") or v.endswith(".schema.json")), (
            f"{path}:{s.lineno}: {v!r}: read a schema through agent.core.schemas.load(name)")


def test_the_purity_check_sees_a_second_loader():
    """The check above is able to fail: both ways of loading today's main had are caught."""
    code = ('from importlib import resources\nimport jsonschema_rs\n'
            'def v():\n    """Reads agent/schemas/x.schema.json."""\n'
            '    t = (resources.files("agent") / "schemas" / "acl.schema.json").read_text()\n'
            '    return jsonschema_rs.validator_for(t)\n')
    tree = ast.parse(code)
    assert any(isinstance(n, ast.Import) and n.names[0].name == "jsonschema_rs" for n in ast.walk(tree))
    assert sorted(s.value for s in _code_strings(tree)) == ["acl.schema.json", "agent", "schemas"]
