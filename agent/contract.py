"""The message contract with the regional server: topics, vocabularies, schemas.

The names here are fixed by the server (docs/contract.md is the prose; the
JSON Schemas in agent/schemas/ are the letter). Import-light on purpose: the
standard library, and jsonschema_rs only when something is validated, so the
simulator, the CLI and the uplink can import the topic helpers cheaply. The
schemas, their validators and the words of a broken message come from
agent/core/schemas.py; the locations here are JSONPath ("$.errors[3]").

The denial reasons, modes and directions are ``fastpath.codes``'s (the
fastpath numbers them); the other vocabularies are written out here, and a
test checks them against the schemas.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent import CONTRACT_VERSION  # one number for the records and the contract
from agent.core import schemas
from fastpath import codes

__all__ = [
    "COMMANDS",
    "COMMAND_REFUSALS",
    "CONTRACT_VERSION",
    "DENIAL_REASONS",
    "DIRECTIONS",
    "EVENT_TYPES",
    "KINDS",
    "MODES",
    "READER_ERROR_KINDS",
    "TOPIC_ROOT",
    "ContractError",
    "canonical_json",
    "check",
    "load_schema",
    "topics",
    "validate",
]

TOPIC_ROOT = "gate/v1"

EVENT_TYPES: tuple[str, ...] = (
    "access.granted",
    "access.denied",
    "passage",
    "passage.timeout",
    "passage.forced",
    "alarm.fire",
    "alarm",
    "mode.changed",
    "reader.error",
    "reader.status",
    "turnstile.fault",
    "turnstile.ready",
    "acl.applied",
    "acl.rejected",
    "acl.requested",
    "command.result",
    "agent.started",
    "journal.recovered",
    "journal.overflow",
    "rollcall",
    "console.action",
)

# One vocabulary with the fastpath: its integer codes are numbered in the order
# the checks run (docs/design.md#the-order-of-checks), so the first failing check
# names the reason and the order is part of the contract.
DENIAL_REASONS: tuple[str, ...] = codes.RESULTS[1:]
MODES: tuple[str, ...] = codes.MODES
DIRECTIONS: tuple[str, ...] = codes.DIRECTIONS
READER_ERROR_KINDS: tuple[str, ...] = (
    "parity",
    "length",
    "checksum",
    "glitch",
    "garbage",
    "disconnected",
)
COMMANDS: tuple[str, ...] = ("open", "set_mode", "fire_reset", "status", "acl_snapshot")
COMMAND_REFUSALS: tuple[str, ...] = (
    "bad_signature",
    "replayed",
    "expired",
    "misaddressed",
    "unsigned",
    "invalid",
    "fire",
)

# Message kinds with a schema of this module (agent/schemas/{kind}.schema.json).
# validate() also accepts any other schema shipped there, e.g. "acl".
KINDS: tuple[str, ...] = ("event", "status", "telemetry", "ack", "cmd", "cmd-reply")

# Topic levels must not contain MQTT separators or wildcards, or a gate could
# publish into (or subscribe to) another gate's topics.
_LEVEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ContractError(ValueError):
    """A message or a name that breaks the contract."""


def topics(site: str, gate: str) -> dict[str, str]:
    """The six topics of one gate: events, status, telemetry, acl, cmd, ack."""
    for what, value in (("site", site), ("gate", gate)):
        if not isinstance(value, str) or not _LEVEL.fullmatch(value):
            raise ContractError(
                f"{what} {value!r} cannot be an MQTT topic level: use 1 to 64 letters, digits, "
                "'_' or '-' (no '/', '+', '#' or spaces); fix it in the gate's configuration"
            )
    base = f"{TOPIC_ROOT}/{site}/{gate}"
    return {
        name: f"{base}/{name}" for name in ("events", "status", "telemetry", "acl", "cmd", "ack")
    }


def load_schema(name: str) -> dict:
    """The JSON Schema ``agent/schemas/{name}.schema.json`` as a fresh dict."""
    try:
        return schemas.load(name)
    except schemas.SchemaNotFound as exc:
        raise ContractError(str(exc)) from None


def _validator(kind: str) -> Any:
    # Formats are asserted (date-time): timestamps must be real dates, not just the right shape.
    try:
        return schemas.validator(kind, formats=True)  # built once per kind
    except schemas.SchemaNotFound as exc:
        raise ContractError(str(exc)) from None


def _path(parts: Any) -> str:
    """A JSONPath-like location, e.g. ``$.errors[3].path`` or ``$.kinds['access.denied']``."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}"
        else:
            out += "[" + json.dumps(part) + "]"
    return out


# Said after a key the contract does not have: the sender's code adds a field the server does not know.
_UNKNOWN_KEY = "not in the contract; remove it"


def _describe(err: Any, kind: str) -> str:
    """One "path: message" line for one jsonschema_rs error, in the words of
    agent/core/schemas.py (a missing or unknown key is reported at the key itself)."""
    p = schemas.problem(err, kind, doc=None, unknown_hint=_UNKNOWN_KEY)
    return f"{_path(p.parts)}: {p.message}"


def validate(kind: str, msg: Any) -> list[str]:
    """Check one message against its schema; an empty list means valid.

    kind: "event", "status", "telemetry", "ack", "cmd", "cmd-reply" (or
    another schema in agent/schemas, such as "acl"). Each problem is one
    "path: message" string, e.g. ``$.reason: "late" is not allowed; allowed: "lockdown", ...``.
    """
    errors: list[str] = []
    for err in _validator(kind).iter_errors(msg):
        errors.append(_describe(err, kind))
    if kind == "event" and isinstance(msg, dict):
        # Not expressible in JSON Schema: the id must name this record's seq.
        rid, seq = msg.get("id"), msg.get("seq")
        seq_ok = isinstance(seq, int) and not isinstance(seq, bool)
        if isinstance(rid, str) and seq_ok and not rid.endswith(f":{seq}"):
            errors.append(f"$.id: {rid!r} must be '{{journal}}:{seq}', ending in this record's seq")
    return errors


def check(kind: str, msg: Any) -> None:
    """Raise ContractError listing every problem when ``msg`` breaks the contract."""
    errors = validate(kind, msg)
    if errors:
        raise ContractError(f"{kind} message breaks the contract: " + "; ".join(errors))


def canonical_json(msg: dict) -> bytes:
    """The bytes a command's ``sig`` signs: every field but ``sig``, sorted keys,
    no spaces, UTF-8 (non-ASCII kept as is, not escaped)."""
    body = {k: v for k, v in msg.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )
