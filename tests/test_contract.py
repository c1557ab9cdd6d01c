"""The message contract: schemas, validator, topics and vocabularies.

Examples are built the way the agent builds them (make_record, then the
sequence numbering of the journal), so a drift between the record builder and
the schema shows up here. Expected names come from docs/contract.md.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema_rs
import pytest

from agent import contract
from agent.contract import (
    COMMAND_REFUSALS,
    DENIAL_REASONS,
    EVENT_TYPES,
    KINDS,
    MODES,
    READER_ERROR_KINDS,
    ContractError,
    canonical_json,
    check,
    load_schema,
    topics,
    validate,
)
from agent.core.events import Now
from agent.core.records import SequenceSink, make_record

ROOT = Path(__file__).resolve().parent.parent
NOW = Now(mono=8123.4567, wall=1788248700.125, synced=True)  # 2026-09-01T07:45:00.125Z
BOOT = "5f0c1d2e-7a4b-4c3d-9e8f-0a1b2c3d4e5f"
ENVELOPE = ("v", "id", "seq", "ts", "clock_synced", "boot", "mono", "type")

# One or more field sets per event type, as the core and the journal emit them.
EXAMPLES: dict[str, list[dict]] = {
    "access.granted": [
        {
            "reader": "entry",
            "direction": "in",
            "card": 6613779,
            "format": "w26",
            "person": "p-0042",
        },
        {
            "reader": "exit",
            "direction": "out",
            "card": 6613779,
            "format": "w26",
            "person": "p-0042",
            "warning": "antipassback",
        },
        {
            "reader": "entry",
            "direction": "in",
            "card": 9357203,
            "format": "rdm6300",
            "person": None,
            "check": "none",
        },
    ],
    "access.denied": [
        {
            "reader": "exit",
            "direction": "out",
            "card": 6613779,
            "format": "w26",
            "person": "p-0042",
            "reason": reason,
        }
        for reason in DENIAL_REASONS
    ]
    + [
        {
            "reader": "entry",
            "direction": "in",
            "card": 123,
            "format": "w34",
            "person": None,
            "reason": "unknown_card",
        }
    ],
    "passage": [
        {
            "direction": "in",
            "source": "card",
            "person": "p-0042",
            "card": 6613779,
            "after_ms": 1840,
        },
        {"direction": "out", "source": "button", "person": None, "card": None, "after_ms": 2500},
        {"direction": "in", "source": "remote", "person": None, "card": None, "after_ms": 3100},
        {"direction": "out", "source": "free", "person": None, "card": None, "after_ms": None},
    ],
    "passage.timeout": [
        {
            "direction": "in",
            "source": "card",
            "person": "p-0042",
            "card": 6613779,
            "waited_ms": 5000,
        },
        {
            "direction": "out",
            "source": "button",
            "person": None,
            "card": None,
            "waited_ms": 1200,
            "cancelled": "fire",
        },
    ],
    "passage.forced": [{"direction": "in"}],
    "alarm.fire": [{"active": True}, {"active": False}],
    "alarm": [
        {"kind": "tamper", "active": True},
        {"kind": "journal_capacity", "active": True, "detail": "backlog at 81 % of 1000000"},
        {"kind": "acl_missing", "active": False},
    ],
    "mode.changed": [
        dict(**{"from": "normal", "to": "fire", "by": "fire_loop"}),
        dict(**{"from": "fire", "to": "lockdown", "by": "fire_reset"}),
        dict(**{"from": "normal", "to": "entry_only", "by": "command"}),
    ],
    "reader.error": [
        {
            "reader": "entry",
            "kind": kind,
            "detail": "frame rejected",
            "raw": "10110" if kind != "disconnected" else None,
        }
        for kind in READER_ERROR_KINDS
    ],
    "reader.status": [{"reader": "exit", "online": False}],
    "turnstile.fault": [
        {"kind": "ready_lost", "detail": "Ready opened"},
        {"kind": "core", "detail": "unknown reader 'x'"},
    ],
    "turnstile.ready": [{"kind": "ready_restored"}, {"kind": "core_reset"}],
    "acl.applied": [
        {
            "version": "2026-09-01.1",
            "kind": "snapshot",
            "base": None,
            "cards": 1480,
            "people": 1312,
        },
        {
            "version": "2026-09-01.2",
            "kind": "delta",
            "base": "2026-09-01.1",
            "cards": 1481,
            "people": None,
        },
    ],
    "acl.rejected": [
        {
            "version": "2026-09-01.3",
            "code": "invalid",
            "errors": [{"path": "$.people[3].cards[0]", "message": "not a card"}],
        },
        {"version": None, "code": "base_mismatch", "errors": []},
    ],
    "acl.requested": [
        {"reason": "missing", "have": None},
        {"reason": "stale", "have": "2026-09-01.1"},
    ],
    "command.result": [{"request_id": "r-17", "command": "open", "result": "done"}]
    + [
        {"request_id": "r-18", "command": "set_mode", "result": "refused", "reason": r}
        for r in COMMAND_REFUSALS
    ],
    "agent.started": [
        {
            "version": "0.1.0",
            "fastpath": "compiled",
            "acl_version": "2026-09-01.1",
            "mode": "normal",
        },
        {"version": "0.1.0", "fastpath": "pure", "acl_version": None, "mode": "fire"},
    ],
    "journal.recovered": [
        {
            "moved_to": "/var/lib/gate-agent/journal.db.corrupt-1",
            "salvaged": 412,
            "lost": None,
            "old_journal": "k3x9q2aa",
        },
        {
            "moved_to": "/var/lib/gate-agent/journal.db.corrupt-2",
            "salvaged": 0,
            "lost": 3,
            "old_journal": None,
        },
    ],
    "journal.overflow": [{"dropped": 12, "kinds": {"access.granted": 5, "passage": 7}}],
    "rollcall": [
        {"by": "fire_loop", "gate": "gate-1", "count": 2, "inside": ["p-0042", "p-0107"]},
        {"by": "site", "gate": "gate-2", "count": 0, "inside": []},
    ],
    "console.action": [
        {"account": "tech.ivanova", "action": "set_mode", "args": {"mode": "lockdown"}, "result": "done"},
        {"account": "tech", "action": "pulse", "args": {"line": "unlock_a", "seconds": 0.3},
         "result": "refused", "reason": "use_open"},
        {"account": "guard-1", "action": "enroll", "args": {"detail": "started"}, "result": "done"},
    ],
}


def numbered(rtype: str, fields: dict, now: Now = NOW) -> dict:
    """A record as it goes on the wire: built by the core, numbered by a journal."""
    sink = SequenceSink(journal="k3x9q2aa")
    sink.seq = 41  # any seq but the first, so id and seq are checked as a pair
    return sink.commit([make_record(rtype, now, BOOT, **fields)])[0]


def example(rtype: str, i: int = 0) -> dict:
    return numbered(rtype, EXAMPLES[rtype][i])


ALL_EXAMPLES = [(t, i) for t in EXAMPLES for i in range(len(EXAMPLES[t]))]


# --- schemas ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_valid_draft_2020_12(kind):
    schema = load_schema(kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema_rs.meta.validate(schema)  # raises with the reason when not
    assert schema.get("title"), "integrators read the title first"


@pytest.mark.parametrize("kind", KINDS)
def test_docs_schema_is_a_relative_symlink_to_the_packaged_schema(kind):
    link = ROOT / "docs" / "schemas" / f"{kind}.schema.json"
    assert link.is_symlink()
    target = os.readlink(link)
    assert not os.path.isabs(target), "absolute links break in a checkout elsewhere"
    assert link.resolve() == (ROOT / "agent" / "schemas" / f"{kind}.schema.json").resolve()


def test_load_schema_returns_an_independent_copy():
    first = load_schema("event")
    first["properties"].clear()
    assert load_schema("event")["properties"], "a caller's edit must not leak into the validator"


def test_unknown_schema_name_is_refused_with_the_known_names():
    with pytest.raises(ContractError, match="event"):
        load_schema("evnets")
    with pytest.raises(ContractError):
        validate("../pyproject", {})


def test_every_event_type_has_its_own_closed_definition():
    schema = load_schema("event")
    assert tuple(schema["properties"]["type"]["enum"]) == EVENT_TYPES
    assert set(schema["required"]) == set(ENVELOPE)
    for rtype in EVENT_TYPES:
        d = schema["$defs"][rtype]
        assert d["additionalProperties"] is False, rtype
        assert set(ENVELOPE) <= set(d["properties"]), rtype


# --- events: valid ------------------------------------------------------------


def test_examples_cover_every_event_type():
    assert set(EXAMPLES) == set(EVENT_TYPES)


@pytest.mark.parametrize("rtype,i", ALL_EXAMPLES)
def test_event_example_validates(rtype, i):
    rec = example(rtype, i)
    assert validate("event", rec) == []
    check("event", rec)  # and does not raise


def test_record_with_unsynced_clock_and_zero_mono_validates():
    rec = numbered("passage.forced", {"direction": "out"}, Now(mono=0.0, wall=0.0, synced=False))
    assert rec["ts"] == "1970-01-01T00:00:00.000Z"
    assert validate("event", rec) == []


def test_wire_roundtrip_keeps_a_record_valid():
    for rtype, i in ALL_EXAMPLES:
        wire = json.dumps(example(rtype, i), separators=(",", ":")).encode()
        assert validate("event", json.loads(wire)) == [], rtype


# --- events: invalid ----------------------------------------------------------


def errors_at(kind: str, msg: dict, path: str) -> list[str]:
    errs = validate(kind, msg)
    assert errs, f"{msg} should be refused"
    for e in errs:
        assert re.match(r"^\$\S*: .+", e), f"not 'path: message': {e}"
    return [e for e in errs if e.startswith(path + ":")]


@pytest.mark.parametrize("field", ENVELOPE)
def test_record_missing_an_envelope_field_fails_at_that_field(field):
    rec = example("access.granted")
    del rec[field]
    assert errors_at("event", rec, f"$.{field}")


WRONG_TYPES = {
    "v": 2,
    "id": 41,
    "seq": "42",
    "ts": 1788248700.125,
    "clock_synced": "yes",
    "boot": None,
    "mono": "8123.4",
    "type": 7,
}


@pytest.mark.parametrize("field", ENVELOPE)
def test_envelope_field_with_a_wrong_type_fails_at_that_field(field):
    rec = example("passage")
    rec[field] = WRONG_TYPES[field]
    assert errors_at("event", rec, f"$.{field}")


@pytest.mark.parametrize(
    "ts",
    [
        "2026-09-01T07:45:00Z",  # no milliseconds
        "2026-09-01T07:45:00.125+02:00",  # not UTC
        "2026-09-01 07:45:00.125Z",
        "2026-09-31T07:45:00.125Z",  # no such day
    ],
)
def test_timestamp_must_be_utc_rfc3339_with_milliseconds(ts):
    rec = example("alarm.fire")
    rec["ts"] = ts
    assert errors_at("event", rec, "$.ts")


def test_seq_starts_at_one():
    rec = example("alarm.fire")
    rec["seq"], rec["id"] = 0, "k3x9q2aa:0"
    assert errors_at("event", rec, "$.seq")


def test_id_must_name_the_records_own_seq():
    rec = example("alarm.fire")
    rec["id"] = "k3x9q2aa:7"
    assert errors_at("event", rec, "$.id")


def test_id_without_journal_fails():
    rec = example("alarm.fire")
    rec["id"] = str(rec["seq"])
    assert errors_at("event", rec, "$.id")


def test_unknown_type_fails_and_lists_the_known_types():
    rec = example("passage.forced")
    rec["type"] = "passage.sideways"
    errs = errors_at("event", rec, "$.type")
    assert all(t in errs[0] for t in EVENT_TYPES), "the sender needs the whole list to fix it"


def test_unknown_denial_reason_fails():
    rec = example("access.denied")
    rec["reason"] = "too_early"
    errs = errors_at("event", rec, "$.reason")
    assert "outside_schedule" in errs[0]


@pytest.mark.parametrize("rtype", EVENT_TYPES)
def test_extra_field_fails_for_every_type(rtype):
    rec = example(rtype)
    rec["name"] = "Ivan Petrov"  # e.g. personal data sneaking in
    assert errors_at("event", rec, "$.name")


@pytest.mark.parametrize("rtype", EVENT_TYPES)
def test_every_required_field_of_every_type_is_required(rtype):
    schema = load_schema("event")["$defs"][rtype]
    for field in schema["required"]:
        rec = example(rtype)
        del rec[field]
        assert errors_at("event", rec, f"$.{field}"), (rtype, field)


def test_a_field_of_another_type_is_refused():
    rec = example("passage.forced")
    rec["reason"] = "blocked"  # belongs to access.denied
    assert errors_at("event", rec, "$.reason")


@pytest.mark.parametrize(
    "rtype,change,path",
    [
        ("access.granted", {"direction": "up"}, "$.direction"),
        ("access.granted", {"card": -1}, "$.card"),
        ("access.granted", {"card": "0006613779"}, "$.card"),
        ("access.granted", {"warning": "tailgating"}, "$.warning"),
        ("access.granted", {"check": "full"}, "$.check"),
        ("passage", {"source": "guard"}, "$.source"),
        ("passage", {"after_ms": 1.5}, "$.after_ms"),
        ("passage.timeout", {"source": "free"}, "$.source"),
        ("passage.timeout", {"cancelled": "power"}, "$.cancelled"),
        ("alarm", {"kind": "Tamper"}, "$.kind"),
        ("alarm", {"kind": "clock unsynced"}, "$.kind"),
        ("mode.changed", {"to": "panic"}, "$.to"),
        ("mode.changed", {"by": "guard"}, "$.by"),
        ("mode.changed", {"account": "tech"}, "$.by"),  # an account only on a console's change
        ("console.action", {"reason": "fire"}, "$"),  # done carries no reason
        ("console.action", {"reason": "upstairs", "result": "refused"}, "$.reason"),
        ("console.action", {"account": "bad name"}, "$.account"),
        ("console.action", {"args": {"pin": 4}}, "$.args.pin"),
        ("reader.error", {"kind": "noise"}, "$.kind"),
        ("turnstile.fault", {"kind": "jam"}, "$.kind"),
        ("acl.applied", {"kind": "patch"}, "$.kind"),
        ("acl.rejected", {"code": "too_big"}, "$.code"),
        ("acl.requested", {"reason": "bored"}, "$.reason"),
        ("command.result", {"result": "ok"}, "$.result"),
        ("agent.started", {"fastpath": "jit"}, "$.fastpath"),
        ("agent.started", {"mode": "panic"}, "$.mode"),
        ("journal.overflow", {"kinds": {"passage": "7"}}, "$.kinds.passage"),
    ],
)
def test_field_values_outside_the_vocabulary_fail(rtype, change, path):
    rec = {**example(rtype), **change}
    assert errors_at("event", rec, path)


def test_free_passage_has_no_unlock_time():
    rec = example("passage", 3)
    rec["after_ms"] = 900
    assert errors_at("event", rec, "$.after_ms")


def test_button_passage_carries_no_card():
    rec = example("passage", 1)
    rec["card"] = 6613779
    assert errors_at("event", rec, "$.card")


def test_card_passage_names_its_card():
    rec = example("passage", 0)
    rec["card"] = None
    assert errors_at("event", rec, "$.card")


def test_refused_command_result_needs_a_reason_and_done_has_none():
    refused = example("command.result", 1)
    del refused["reason"]
    assert errors_at("event", refused, "$.reason")
    done = {**example("command.result", 0), "reason": "fire"}
    assert validate("event", done)


def test_unknown_refusal_reason_fails():
    rec = {**example("command.result", 1), "reason": "busy"}
    assert errors_at("event", rec, "$.reason")


def test_fire_mode_grant_carries_no_antipassback_warning():
    rec = {**example("access.granted", 2), "warning": "antipassback"}
    assert validate("event", rec)


def test_delta_names_its_base_and_snapshot_has_none():
    delta = {**example("acl.applied", 1), "base": None}
    assert errors_at("event", delta, "$.base")
    snapshot = {**example("acl.applied", 0), "base": "2026-08-31.9"}
    assert errors_at("event", snapshot, "$.base")


def test_acl_rejected_keeps_at_most_50_errors_with_path_and_message():
    rec = example("acl.rejected")
    rec["errors"] = [{"path": f"$.people[{i}]", "message": "bad"} for i in range(51)]
    assert errors_at("event", rec, "$.errors")
    rec["errors"] = [{"path": "$.people[0]"}]
    assert errors_at("event", rec, "$.errors[0].message")


def test_check_raises_with_every_problem():
    rec = example("access.denied")
    rec["reason"] = "late"
    del rec["seq"]
    with pytest.raises(ContractError) as exc:
        check("event", rec)
    assert "$.reason" in str(exc.value) and "$.seq" in str(exc.value)


def test_non_object_message_is_refused():
    assert validate("event", ["not", "a", "record"])
    assert validate("ack", None)


# --- status, telemetry, ack ---------------------------------------------------

ONLINE = {
    "v": 1,
    "state": "online",
    "version": "0.1.0",
    "fastpath": "compiled",
    "acl_version": "2026-09-01.1",
    "started_at": "2026-09-01T05:02:11.480Z",
    "boot": BOOT,
    "journal": "k3x9q2aa",
}
OFFLINE = {"v": 1, "state": "offline", "boot": BOOT, "reason": "will"}
TELEMETRY = {
    "v": 1,
    "ts": "2026-09-01T07:45:00.125Z",
    "boot": BOOT,
    "backlog": 3,
    "oldest_pending_s": 1.2,
    "drain_per_s": 0.5,
    "reader_errors": {"entry": {"parity": 2}, "exit": {}},
    "decision_ms": {"p50": 0.02, "p99": 0.08, "p999": 0.4},
    "clock_synced": True,
    "cpu_temp_c": 51.5,
    "uptime_s": 9768.0,
    "acl_version": "2026-09-01.1",
    "acl_age_s": 3600,
}


@pytest.mark.parametrize(
    "kind,msg",
    [
        ("status", ONLINE),
        ("status", {**ONLINE, "acl_version": None, "fastpath": "pure"}),
        ("status", OFFLINE),
        ("status", {**OFFLINE, "reason": "shutdown"}),
        ("telemetry", TELEMETRY),
        (
            "telemetry",
            {
                **TELEMETRY,
                "backlog": 0,
                "oldest_pending_s": None,
                "cpu_temp_c": None,
                "acl_version": None,
                "acl_age_s": None,
                "decision_ms": {"p50": None, "p99": None, "p999": None},
                "reader_errors": {},
            },
        ),
        ("ack", {"journal": "k3x9q2aa", "upto": 42}),
        ("ack", {"v": 1, "journal": "k3x9q2aa", "upto": 1}),
    ],
)
def test_gate_messages_validate(kind, msg):
    assert validate(kind, msg) == []


@pytest.mark.parametrize(
    "kind,msg,path",
    [
        ("status", {**ONLINE, "state": "sleeping"}, "$.state"),
        ("status", {k: v for k, v in ONLINE.items() if k != "started_at"}, "$.started_at"),
        ("status", {**ONLINE, "started_at": "yesterday"}, "$.started_at"),
        ("status", {**OFFLINE, "version": "0.1.0"}, "$.version"),  # offline carries no birth fields
        ("telemetry", {k: v for k, v in TELEMETRY.items() if k != "backlog"}, "$.backlog"),
        ("telemetry", {**TELEMETRY, "backlog": -1}, "$.backlog"),
        (
            "telemetry",
            {**TELEMETRY, "reader_errors": {"entry": {"static": 1}}},
            "$.reader_errors.entry",
        ),
        (
            "telemetry",
            {**TELEMETRY, "reader_errors": {"entry": {"parity": "2"}}},
            "$.reader_errors.entry.parity",
        ),
        ("telemetry", {**TELEMETRY, "decision_ms": {"p50": 1, "p99": 2}}, "$.decision_ms.p999"),
        ("telemetry", {**TELEMETRY, "load": 0.3}, "$.load"),
        ("ack", {"journal": "k3x9q2aa"}, "$.upto"),
        ("ack", {"journal": "k3x9q2aa", "upto": "42"}, "$.upto"),
        ("ack", {"journal": "k3x9q2aa", "upto": 0}, "$.upto"),
        ("ack", {"journal": "a/b", "upto": 3}, "$.journal"),
        ("ack", {"journal": "k3x9q2aa", "upto": 3, "ids": []}, "$.ids"),
    ],
)
def test_broken_gate_messages_fail_at_the_field(kind, msg, path):
    assert errors_at(kind, msg, path)


def test_ack_journal_is_the_journal_part_of_event_ids():
    rec = example("passage")
    journal, seq = rec["id"].split(":")
    assert validate("ack", {"journal": journal, "upto": int(seq)}) == []


# --- commands and replies -----------------------------------------------------


def signed_cmd(command: str, args: dict, key=None, **over) -> dict:
    """A command signed the way the contract says: Ed25519 over canonical JSON."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = key or Ed25519PrivateKey.generate()
    msg = {
        "v": 1,
        "request_id": "r-17",
        "site": "school-042",
        "gate": "main-1",
        "command": command,
        "args": args,
        "nonce": "6f1c0a9e2b7d4c11",
        "counter": 1017,
        "expires": "2026-09-01T07:46:00Z",
        "key_id": "region-2026a",
        **over,
    }
    msg["sig"] = base64.b64encode(key.sign(canonical_json(msg))).decode("ascii")
    return msg


@pytest.mark.parametrize(
    "command,args",
    [
        ("open", {"direction": "in"}),
        ("open", {"direction": "out"}),
        *[("set_mode", {"mode": m}) for m in MODES if m != "fire"],
        ("fire_reset", {}),
        ("status", {}),
        ("acl_snapshot", {}),
    ],
)
def test_every_command_validates(command, args):
    assert validate("cmd", signed_cmd(command, args)) == []


@pytest.mark.parametrize(
    "command,args,over,path",
    [
        ("open", {}, {}, "$.args.direction"),
        ("open", {"direction": "sideways"}, {}, "$.args.direction"),
        ("set_mode", {"mode": "fire"}, {}, "$.args.mode"),  # fire comes only from the loop
        ("status", {"verbose": True}, {}, "$.args"),
        ("reboot", {}, {}, "$.command"),
        ("open", {"direction": "in"}, {"site": "school/042"}, "$.site"),
        ("open", {"direction": "in"}, {"gate": "+"}, "$.gate"),
        ("open", {"direction": "in"}, {"counter": 0}, "$.counter"),
        ("open", {"direction": "in"}, {"expires": "soon"}, "$.expires"),
        ("open", {"direction": "in"}, {"v": 2}, "$.v"),
        ("open", {"direction": "in"}, {"retain": True}, "$.retain"),
    ],
)
def test_broken_commands_fail_at_the_field(command, args, over, path):
    assert errors_at("cmd", signed_cmd(command, args, **over), path)


@pytest.mark.parametrize(
    "field", ["request_id", "nonce", "counter", "expires", "key_id", "sig", "site", "gate"]
)
def test_command_without_a_signed_field_fails(field):
    msg = signed_cmd("status", {})
    del msg[field]
    assert errors_at("cmd", msg, f"$.{field}")


def test_issued_at_is_an_optional_signed_rfc3339_time():
    assert validate("cmd", signed_cmd("status", {}, issued_at="2026-09-01T07:45:40Z")) == []
    assert validate("cmd", signed_cmd("status", {})) == []  # optional in contract v1
    assert errors_at("cmd", signed_cmd("status", {}, issued_at="a minute ago"), "$.issued_at")


def test_the_signed_list_envelope_has_a_schema_that_sign_acl_meets():
    import jsonschema_rs

    from agent.downlink.signing import generate_keypair, sign_acl

    schema = load_schema("acl")
    envelope_schema = {**schema, "$ref": "#/$defs/envelope"}
    del envelope_schema["oneOf"]
    check_envelope = jsonschema_rs.validator_for(envelope_schema, validate_formats=True)
    key, _ = generate_keypair()
    doc = {"kind": "snapshot", "version": "v1"}
    envelope = sign_acl(key, doc, key_id="region-2026a", site="school-17", gate="main",
                        counter=7, issued_at=1_788_300_000)
    assert envelope["issued_at"] == "2026-09-01T22:00:00Z"
    assert list(check_envelope.iter_errors(envelope)) == []
    assert list(check_envelope.iter_errors({**envelope, "extra": 1}))
    assert list(check_envelope.iter_errors({**envelope, "issued_at": "soon"}))
    assert validate("acl", envelope)  # an envelope is not itself a list


def test_signature_must_be_base64_of_64_bytes():
    msg = signed_cmd("status", {})
    msg["sig"] = base64.b64encode(b"\0" * 32).decode()
    assert errors_at("cmd", msg, "$.sig")


def test_canonical_json_is_sorted_compact_utf8_and_leaves_out_sig():
    msg = {"b": 1, "a": {"z": "ü", "y": [1, 2]}, "sig": "x"}
    assert canonical_json(msg) == '{"a":{"y":[1,2],"z":"ü"},"b":1}'.encode()


def test_signature_verifies_after_the_wire_roundtrip():
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    msg = signed_cmd("open", {"direction": "out"}, key=key)
    wire = json.dumps(msg, indent=1, ensure_ascii=True)  # any spacing or escaping on the wire
    received = json.loads(wire)
    key.public_key().verify(base64.b64decode(received["sig"]), canonical_json(received))
    tampered = {**received, "args": {"direction": "in"}}
    with pytest.raises(InvalidSignature):
        key.public_key().verify(base64.b64decode(tampered["sig"]), canonical_json(tampered))


@pytest.mark.parametrize(
    "reply",
    [
        {"v": 1, "request_id": "r-17", "command": "open", "result": "done"},
        {
            "v": 1,
            "request_id": "r-18",
            "command": "status",
            "result": "done",
            "data": {"mode": "normal", "backlog": 0},
        },
        *[
            {
                "v": 1,
                "request_id": "r-19",
                "command": "set_mode",
                "result": "refused",
                "reason": r,
                "detail": "why",
            }
            for r in COMMAND_REFUSALS
        ],
        {
            "v": 1,
            "request_id": "",
            "command": "",
            "result": "refused",
            "reason": "invalid",
            "detail": "not JSON",
        },
    ],
)
def test_replies_validate(reply):
    assert validate("cmd-reply", reply) == []


@pytest.mark.parametrize(
    "reply,path",
    [
        ({"v": 1, "request_id": "r", "command": "open", "result": "refused"}, "$.reason"),
        (
            {"v": 1, "request_id": "r", "command": "open", "result": "refused", "reason": "nope"},
            "$.reason",
        ),
        ({"v": 1, "request_id": "r", "command": "open", "result": "maybe"}, "$.result"),
        ({"v": 1, "command": "open", "result": "done"}, "$.request_id"),
        ({"v": 1, "request_id": "r", "command": "open", "result": "done", "extra": 1}, "$.extra"),
    ],
)
def test_broken_replies_fail_at_the_field(reply, path):
    assert errors_at("cmd-reply", reply, path)


def test_done_reply_has_no_reason():
    assert validate(
        "cmd-reply",
        {"v": 1, "request_id": "r", "command": "open", "result": "done", "reason": "fire"},
    )


# --- topics -------------------------------------------------------------------


def test_topics_of_a_gate():
    assert topics("school-042", "main_1") == {
        "events": "gate/v1/school-042/main_1/events",
        "status": "gate/v1/school-042/main_1/status",
        "telemetry": "gate/v1/school-042/main_1/telemetry",
        "acl": "gate/v1/school-042/main_1/acl",
        "cmd": "gate/v1/school-042/main_1/cmd",
        "ack": "gate/v1/school-042/main_1/ack",
    }
    assert contract.TOPIC_ROOT == "gate/v1"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "main 1", "x" * 65, None])
def test_topic_levels_with_separators_or_wildcards_are_refused(bad):
    with pytest.raises(ValueError, match="configuration"):
        topics(bad, "g1")
    with pytest.raises(ContractError, match="gate"):
        topics("s1", bad)


# --- vocabularies -------------------------------------------------------------


def test_vocabularies_agree_with_fastpath_codes():
    from fastpath import codes

    assert codes.RESULTS[0] == "granted"
    assert tuple(codes.RESULTS[1:]) == DENIAL_REASONS
    assert tuple(codes.MODES) == MODES
    assert tuple(codes.DIRECTIONS) == contract.DIRECTIONS
    # The codes are numbered in check order; the contract lists reasons in that order.
    assert [codes.RESULTS.index(r) for r in DENIAL_REASONS] == sorted(
        [
            codes.LOCKDOWN_DENIED,
            codes.WRONG_DIRECTION,
            codes.BLOCKED,
            codes.UNKNOWN_CARD,
            codes.NOT_YET_VALID,
            codes.EXPIRED,
            codes.HOLIDAY,
            codes.OUTSIDE_SCHEDULE,
            codes.EXIT_RESTRICTED,
            codes.ANTIPASSBACK,
            codes.GATE_BUSY,
        ]
    )


def test_vocabularies_agree_with_the_schemas():
    event = load_schema("event")["$defs"]
    assert tuple(event["access.denied"]["properties"]["reason"]["enum"]) == DENIAL_REASONS
    assert tuple(event["mode"]["enum"]) == MODES
    assert tuple(event["reader.error"]["properties"]["kind"]["enum"]) == READER_ERROR_KINDS
    assert tuple(event["command.result"]["properties"]["reason"]["enum"]) == COMMAND_REFUSALS
    reply = load_schema("cmd-reply")["properties"]
    assert tuple(reply["reason"]["enum"]) == COMMAND_REFUSALS
    assert tuple(load_schema("cmd")["properties"]["command"]["enum"]) == contract.COMMANDS
    tele = load_schema("telemetry")["properties"]["reader_errors"]["additionalProperties"]
    assert tuple(tele["propertyNames"]["enum"]) == READER_ERROR_KINDS


# --- docs ---------------------------------------------------------------------

DOC = ROOT / "docs" / "contract.md"


def doc_examples() -> list[tuple[str, dict]]:
    """Every ```json block in docs/contract.md, with the kind named just before it."""
    text = DOC.read_text()
    blocks = re.findall(r"<!-- example: ([a-z-]+) -->\s*```json\n(.*?)```", text, re.DOTALL)
    return [(kind, json.loads(body)) for kind, body in blocks]


def test_every_example_in_the_docs_validates():
    examples = doc_examples()
    assert examples, "docs/contract.md has no tagged examples"
    for kind, msg in examples:
        assert validate(kind, msg) == [], (kind, msg)
    documented = {msg["type"] for kind, msg in examples if kind == "event"}
    assert documented == set(EVENT_TYPES), "each event type needs an example in the docs"
    assert {kind for kind, _ in examples} >= set(KINDS)


def test_every_json_block_in_the_docs_is_tagged():
    text = DOC.read_text()
    assert text.count("```json") == len(doc_examples()), (
        "tag each ```json block with <!-- example: KIND -->"
    )


def test_docs_name_every_word_of_the_vocabularies():
    text = DOC.read_text()
    for word in (
        *DENIAL_REASONS,
        *MODES,
        *READER_ERROR_KINDS,
        *COMMAND_REFUSALS,
        *contract.COMMANDS,
    ):
        assert f"`{word}`" in text, word
    for rtype in EVENT_TYPES:
        assert f"### {rtype}\n" in text, rtype


def test_docs_list_denial_reasons_in_check_order():
    text = DOC.read_text()
    rows = re.findall(r"^\| (\d+) \| `([a-z_]+)` \|", text, re.MULTILINE)
    assert [reason for _, reason in rows] == list(DENIAL_REASONS)
    assert [int(n) for n, _ in rows] == list(range(1, len(DENIAL_REASONS) + 1))


def test_docs_command_example_carries_a_real_signature():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = DOC.read_text()
    pub = re.search(r"public key, raw and base64, is\s+`([A-Za-z0-9+/=]+)`", text).group(1)
    (cmd,) = [msg for kind, msg in doc_examples() if kind == "cmd"]
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(pub))
    key.verify(base64.b64decode(cmd["sig"]), canonical_json(cmd))  # raises when it does not verify


def test_docs_link_every_schema():
    text = DOC.read_text()
    for kind in KINDS:
        assert f"schemas/{kind}.schema.json" in text, kind


# --- packaging ----------------------------------------------------------------


def test_importing_the_contract_stays_light():
    code = (
        "import sys, agent.contract as c; c.topics('s', 'g'); "
        "assert 'jsonschema_rs' not in sys.modules, 'imported eagerly'; "
        "c.validate('ack', {'journal': 'j', 'upto': 1}); assert 'jsonschema_rs' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_validator_is_not_changed_by_callers():
    msg = example("passage")
    before = copy.deepcopy(msg)
    validate("event", msg)
    assert msg == before


def test_a_manual_open_is_a_grant_with_a_source_and_no_card():
    manual = numbered("access.granted", {"reader": None, "direction": "in", "card": None, "format": None,
                                         "person": None, "source": "button"})
    assert contract.validate("event", manual) == []
    with_card = dict(manual, card=6613779)
    assert any(e.startswith("$.card") for e in contract.validate("event", with_card))
    with_person = dict(manual, person="p-0001")
    assert any(e.startswith("$.person") for e in contract.validate("event", with_person))
    unknown_source = dict(manual, source="card")
    assert any(e.startswith("$.source") for e in contract.validate("event", unknown_source))


def test_a_card_grant_needs_its_reader_card_and_format():
    card = numbered("access.granted", {"reader": "entry", "direction": "in", "card": 6613779,
                                       "format": "w26", "person": "p-0001"})
    assert contract.validate("event", card) == []
    for field in ("reader", "card", "format"):
        errors = contract.validate("event", dict(card, **{field: None}))
        assert any(e.startswith(f"$.{field}") for e in errors), (field, errors)


def _alarm_kinds_in_code() -> dict[str, str]:
    """Every alarm kind the agent's code can emit -> where, found in the source: a "kind" in a
    dict handed with "alarm" (Report("alarm", {...}), return "alarm", {...}), kind= in a call
    with "alarm" (make_record("alarm", ..., kind=...)), the first argument of an _alarm(...)
    call, the kind default of a def _alarm, and strings returned by an alarm-kind function."""
    import ast

    root = Path(__file__).resolve().parents[1] / "agent"
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                  and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                  for t in n.targets if isinstance(t, ast.Name)}

        def value(node: ast.AST, consts: dict[str, str] = consts) -> str | None:
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                return node.value
            if isinstance(node, ast.Name):
                return consts.get(node.id)
            return None

        def add(node: ast.AST, v: str | None, path: Path = path) -> None:
            if v:
                found.setdefault(v, f"{path.relative_to(root.parent)}:{node.lineno}")

        def is_alarm(node: ast.AST) -> bool:
            return isinstance(node, ast.Constant) and node.value == "alarm"

        for node in ast.walk(tree):
            if isinstance(node, (ast.Call, ast.Tuple)):
                items = node.args if isinstance(node, ast.Call) else node.elts
                if any(is_alarm(a) for a in items):
                    for a in items:
                        if isinstance(a, ast.Dict):
                            for k, v in zip(a.keys, a.values, strict=True):
                                if k is not None and value(k) == "kind":
                                    add(v, value(v))
                    if isinstance(node, ast.Call):
                        for kw in node.keywords:
                            if kw.arg == "kind":
                                add(kw.value, value(kw.value))
            if isinstance(node, ast.Call) and node.args:
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name.endswith("_alarm") and not name.endswith("uplink_alarm"):
                    add(node.args[0], value(node.args[0]))
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_alarm"):
                args = node.args.args[len(node.args.args) - len(node.args.defaults):]
                for a, d in zip(args, node.args.defaults, strict=True):
                    if a.arg == "kind":
                        add(d, value(d))
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kind") and "alarm" in (
                    ast.get_docstring(node) or "") + node.name + ast.unparse(node):
                for r in ast.walk(node):
                    if isinstance(r, ast.Return) and r.value is not None:
                        for c in ast.walk(r.value):
                            add(c, value(c) if isinstance(c, ast.Constant) else None)
    return found


def test_every_alarm_kind_the_agent_raises_is_listed_in_the_contract():
    kinds = _alarm_kinds_in_code()
    # The scan itself finds the kinds of every way the code raises one.
    assert {"tamper", "broker_dropped", "tls_rejected", "expiry_unchecked", "journal_capacity",
            "journal_readonly", "downlink_flood", "uplink_config", "acl_missing"} <= set(kinds), kinds
    doc = (Path(__file__).resolve().parents[1] / "docs" / "contract.md").read_text(encoding="utf-8")
    section = doc.split("### alarm\n", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    missing = {k: where for k, where in kinds.items() if k not in listed}
    assert not missing, f"alarm kinds raised in the code but not listed in docs/contract.md: {missing}"


def test_the_readme_names_every_docs_page():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    unnamed = [p.relative_to(root).as_posix() for p in sorted((root / "docs").glob("*.md"))
               if p.relative_to(root).as_posix() not in readme]
    assert not unnamed, f"docs pages the README does not name: {unnamed}"
