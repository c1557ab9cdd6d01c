"""The JSON Schemas of agent/schemas/: loaded once, validated with, and their errors in plain words.

Every part of the agent that checks a document against one of its schemas
(the config, a board profile, a scenario, a contract message, an access list
and its compact header) takes the schema, its validator and the words for
what is wrong from here, so a technician, a server integrator and a CI log
read one form of message: the key, what it holds, what is allowed.

``problem(err, name)`` turns one ``jsonschema_rs`` error into a ``Problem``:
the path parts into the document (keys and list indexes) and the message.
Missing and unknown keys are reported at the key itself, which is where the
reader has to look. Each caller writes the path in the notation its audience
reads: a TOML key path ("mqtt.tls.ca_file", ``key_path``) for the config and
the profiles, a JSON pointer (``json_pointer``) for the access list, a
JSONPath for the contract, step and line for a scenario.

Pure: the schemas are package data read through importlib.resources (no
other I/O); ``jsonschema_rs`` is imported when a validator is first built,
so importing this module (and agent.config) stays light.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

__all__ = [
    "Problem",
    "SchemaNotFound",
    "json_pointer",
    "key_path",
    "load",
    "names",
    "node",
    "problem",
    "validator",
]

_SUFFIX = ".schema.json"
_NAME = re.compile(r"[a-z][a-z0-9-]*")


class SchemaNotFound(ValueError):
    """No schema of that name in agent/schemas/."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document: where (keys and indexes) and what, in plain words."""

    parts: tuple[str | int, ...]
    message: str


# --------------------------------------------------------------------------- loading


def names() -> tuple[str, ...]:
    """Every schema shipped in agent/schemas/ ("acl", "config", "event", ...), sorted."""
    folder = resources.files("agent").joinpath("schemas")
    return tuple(sorted(p.name[: -len(_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_SUFFIX)))


@cache
def _text(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SchemaNotFound(f"schema name {name!r} is not valid: use one of {', '.join(names())}")
    try:
        return resources.files("agent").joinpath("schemas", f"{name}{_SUFFIX}").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaNotFound(f"no schema named {name!r} in agent/schemas; known: {', '.join(names())}") from None


@cache
def _parsed(name: str) -> dict:
    """The schema, parsed once, for looking things up (never handed out: callers get load())."""
    return json.loads(_text(name))


def load(name: str) -> dict:
    """The JSON Schema ``agent/schemas/{name}.schema.json`` as a fresh dict (the caller may edit it)."""
    return json.loads(_text(name))


@cache
def validator(name: str, *, formats: bool = False, part: str | None = None) -> Any:
    """The (cached) jsonschema_rs validator of schema ``name``.

    formats: assert "format" (date-time must be a real date, not just the shape).
    part: validate against ``$defs[part]`` alone rather than the schema's own
    root (the access list picks its kind first, so errors point into that
    kind's fields and not at a "oneOf" that "matches neither")."""
    import jsonschema_rs  # when something is validated, not when this module is imported (~9 MB)

    schema = load(name)
    if part is not None:
        if part not in schema.get("$defs", {}):
            raise SchemaNotFound(f"schema {name!r} has no $defs entry {part!r}")
        for key in ("oneOf", "anyOf"):
            schema.pop(key, None)
        schema["$ref"] = f"#/$defs/{part}"
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=formats)


# --------------------------------------------------------------------------- paths


def key_path(parts: Collection[Any]) -> str:
    """A TOML key path: ``hardware.readers[0].port``; "" for the whole document."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def json_pointer(parts: Collection[Any]) -> str:
    """A JSON pointer (RFC 6901): ``/people/17/cards/0``; "" for the whole document."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


# --------------------------------------------------------------------------- words


def _resolve(root: dict, ref: str) -> Any:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _node(root: dict, path: list[Any]) -> dict:
    """The schema node a schema path leads to, following $ref."""
    node: Any = root
    for part in path:
        if isinstance(node, dict) and "$ref" in node and part not in node:
            node = _resolve(root, node["$ref"])
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return {}
    if isinstance(node, dict) and "$ref" in node:
        node = {**_resolve(root, node["$ref"]), **{k: v for k, v in node.items() if k != "$ref"}}
    return node if isinstance(node, dict) else {}


def node(name: str, schema_path: Collection[Any]) -> dict:
    """The node of schema ``name`` at ``schema_path`` (a jsonschema_rs error's, or its
    parent's), $ref followed; {} when there is none. Read-only: a shared copy."""
    return _node(_parsed(name), list(schema_path))


def _show(value: Any) -> str:
    """A value quoted for a message, cut short (a message must stay readable)."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + '..."'


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _get(doc: Any, parts: list[Any]) -> Any:
    node = doc
    for p in parts:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return None
    return node


_NAMED = 10  # unknown keys named in one message
_TYPE_NAMES = {"string": "a string", "integer": "a whole number", "number": "a number",
               "boolean": "true or false", "object": "a table", "array": "a list", "null": "null"}
# What each "format" the schemas use wants, in words (asserted where the caller asks for formats).
_FORMATS = {
    "date-time": 'an RFC 3339 date-time with offset, e.g. "2026-09-01T07:30:00+07:00"',
    "date": "a date YYYY-MM-DD",
    "uri": "a URI",
}


def problem(err: Any, name: str, *, doc: Any = None, secrets: Collection[tuple[str | int, ...]] = (),
            unknown_hint: str | None = None) -> Problem:
    """One jsonschema_rs error of schema ``name`` in plain words.

    doc: the document validated (names the type an entry has when a key does
    not apply to it). secrets: paths whose values are never quoted.
    unknown_hint: said after an unknown key ("see hardware/profiles.md").
    The schema's own ``x-hint`` of a field is said after a value it refuses,
    and the ``description`` of a missing key after "missing"."""
    try:
        parts, message = _schema_error(err, _parsed(name), doc, secrets, unknown_hint)
    except Exception:  # noqa: BLE001 - a wording slip must not hide the problem: say it in jsonschema_rs's words
        return Problem(tuple(err.instance_path), err.message)
    return Problem(tuple(parts), message)


def _schema_error(err: Any, root: dict, doc: Any, secrets: Collection[tuple[str | int, ...]],
                  unknown_hint: str | None) -> tuple[list[Any], str]:
    # The returned f-strings are the msgids of the Russian catalogue (agent/tools/words.py
    # finds them here): change one and translate it again in agent/locale.
    ipath = list(err.instance_path)
    spath = list(err.schema_path)
    kind = type(err.kind).__name__
    secret = tuple(ipath) in {tuple(s) for s in secrets}
    value = "(hidden)" if secret else _show(err.instance)
    node = _node(root, spath[:-1])
    hint = node.get("x-hint")

    def with_hint(msg: str) -> str:
        return f"{msg} ({hint})" if hint else msg

    if kind == "AdditionalProperties":
        # Names in quotes: values shown as they are, in any language the message is put in.
        allowed = [_show(k) for k in sorted(node.get("properties", {}))]
        unexpected = [str(k) for k in getattr(err.kind, "unexpected", [])] or ["?"]
        # A forged message may carry thousands of keys: the first few named, the rest counted.
        extra = [_show(k) for k in unexpected[:_NAMED]] + (
            [f"+{len(unexpected) - _NAMED}"] if len(unexpected) > _NAMED else [])
        for_what = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        hint = unknown_hint
        if len(extra) == 1:
            return [*ipath, unexpected[0]], with_hint(f"unknown key {extra[0]}{for_what}")
        return ipath, with_hint(f"unknown keys {', '.join(extra)}{for_what}")
    if kind == "Required":
        prop = getattr(err.kind, "property", None)
        prop = str(prop) if prop is not None else "?"
        desc = ""
        for cut in range(len(spath) - 1, -1, -1):  # the nearest schema that describes it
            desc = _node(root, [*spath[:cut], "properties", prop]).get("description", "")
            if desc:
                break
        return [*ipath, prop], f"missing; it is required{': ' + desc if desc else ''}"
    if kind == "FalseSchema":
        what = ipath[-1] if ipath else "?"
        parent = _get(doc, ipath[:-1])
        rtype = parent.get("type") if isinstance(parent, dict) else None
        if isinstance(rtype, str) and len(ipath) >= 3 and isinstance(ipath[-2], int):
            # An entry of a list whose type decides its keys ("readers" -> "a reader of type rdm6300").
            noun = str(ipath[-3]).removesuffix("s")
            return ipath, f"{what} does not apply to a {noun} of type {rtype}; remove it"
        return ipath, f"{what} does not apply here; remove it"
    if kind == "Minimum":
        return ipath, with_hint(f"{value} is below {_fmt_num(err.kind.limit)}")
    if kind == "ExclusiveMinimum":
        return ipath, with_hint(f"{value} must be more than {_fmt_num(err.kind.limit)}")
    if kind == "Maximum":
        return ipath, with_hint(f"{value} is above {_fmt_num(err.kind.limit)}")
    if kind == "ExclusiveMaximum":
        return ipath, with_hint(f"{value} must be less than {_fmt_num(err.kind.limit)}")
    if kind == "Enum":
        # Every option, however many: jsonschema_rs's own message abbreviates a long list
        # ("or 9 other candidates") and the sender needs the whole vocabulary.
        options = ", ".join(_show(o) for o in getattr(err.kind, "options", None) or node.get("enum", []))
        return ipath, with_hint(f"{value} is not allowed; allowed: {options}")
    if kind == "Constant":
        return ipath, with_hint(f"{value} is not allowed; allowed: {_show(node.get('const'))}")
    if kind == "Type":
        wanted = node.get("type")
        wanted = [wanted] if isinstance(wanted, str) else (wanted or [])
        names = " or ".join(_TYPE_NAMES.get(t, t) for t in wanted) or "another type"
        return ipath, f"{value} is not {names}"
    if kind == "PropertyNames":
        return ipath, with_hint(f"name {value} is not allowed")
    if kind in ("Pattern", "Format", "AnyOf", "OneOfNotValid"):
        if hint or secret:
            return ipath, with_hint(f"{value} is not allowed")
        # No hint written for it: what the field holds, in the schema's words.
        wanted = _FORMATS.get(node.get("format", "")) if kind == "Format" else None
        wanted = wanted or node.get("description")
        if wanted:
            return ipath, f"{value} is not allowed; wanted: {wanted}"
        return ipath, err.message
    if kind == "MinLength":
        if err.kind.limit <= 1:
            return ipath, "must not be empty"
        return ipath, f"{value} is shorter than {err.kind.limit} characters"
    if kind == "MaxLength":
        return ipath, f"{value} is longer than {err.kind.limit} characters"
    if kind == "MinProperties":
        desc = node.get("description")
        if err.kind.limit <= 1:
            return ipath, "must not be empty" + (f": {desc}" if desc else "")
        return ipath, f"needs at least {err.kind.limit} keys" + (f": {desc}" if desc else "")
    if kind == "MinItems":
        if err.kind.limit <= 1:
            return ipath, "must not be empty"
        return ipath, f"needs at least {err.kind.limit} entries"
    if kind == "MaxItems":
        return ipath, f"holds more than {err.kind.limit} entries; at most {err.kind.limit} are allowed"
    if kind == "UniqueItems":
        return ipath, "lists the same entry twice; list each once"
    if secret:
        return ipath, "is not valid (value hidden)"
    return ipath, err.message
