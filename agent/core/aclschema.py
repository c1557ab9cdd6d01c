"""The access list's refusals, its JSON Schema and its JSON: what a list must look like.

A document is taken whole or refused whole: ``AclRejected`` lists every
error found (up to MAX_ERRORS), each with the JSON pointer of the bad field
and what to do, so the server fixes them all in one go. The schema is
agent/schemas/acl.schema.json, loaded, validated and its errors put in words
by agent/core/schemas.py; the list's own words for its fields (what a card,
a date, a name must look like) come first here. JSON deeper than MAX_DEPTH
is refused before any recursive code sees it. Pure: no I/O beyond reading the packaged schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import schemas

MAX_ERRORS = 1000  # errors kept per refusal; a broken million-card list must not flood memory
_SHOWN_IN_STR = 10  # errors quoted by str(AclRejected)
# The acl.rejected record (agent/schemas/event.schema.json) carries at most 50 errors, each
# path and message at most 1,000 characters; the messages are written to fit in 900.
MAX_REPORTED_ERRORS = 50
_RECORD_TEXT = 1000
_MAX_MESSAGE = 900
# Containers inside containers: a signed list is 6 deep (envelope, list, schedules, a
# schedule, week, a day's ranges). Deeper is an attack on the recursive parts (the JSON
# encoder, the schema validator that stops at 255), refused before any of them runs.
MAX_DEPTH = 32


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class AclError:
    """One thing wrong with a document: the JSON pointer of the field and what to do."""

    path: str  # JSON pointer into the document, e.g. "/people/17/cards/0"; "" is the whole document
    message: str

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.message}"


class AclRejected(ValueError):
    """A document refused whole. ``code``: "invalid" or "base_mismatch"."""

    def __init__(
        self, errors: list[AclError], code: str = "invalid", total: int | None = None
    ) -> None:
        self.errors = list(errors)
        self.code = code
        self.total = len(self.errors) if total is None else total  # errors found, kept or not
        shown = "; ".join(str(e) for e in self.errors[:_SHOWN_IN_STR])
        more = self.total - min(len(self.errors), _SHOWN_IN_STR)
        tail = f"; and {more} more" if more > 0 else ""
        noun = "error" if self.total == 1 else "errors"
        super().__init__(f"access list refused ({code}), {self.total} {noun}: {shown}{tail}")

    def record_fields(self, version: object) -> dict:
        """The fields of the ``acl.rejected`` record for this refusal (the contract
        keeps at most MAX_REPORTED_ERRORS errors, paths and messages of at most 1,000
        characters)."""
        errors = [{"path": (e.path or "/")[:_RECORD_TEXT], "message": e.message[:_RECORD_TEXT]}
                  for e in self.errors[:MAX_REPORTED_ERRORS]]
        if not errors:
            errors = [{"path": "/", "message": str(self)[:_RECORD_TEXT]}]
        ok_version = isinstance(version, str) and 1 <= len(version) <= 128
        return {"version": version if ok_version else None, "code": self.code, "errors": errors}


class _Errors:
    """Collects errors, keeping the first MAX_ERRORS and counting the rest."""

    def __init__(self) -> None:
        self.items: list[AclError] = []
        self.total = 0
        self.schema_paths: set[str] = set()  # a field the schema refused gets no second error

    def add_schema(self, path: str, message: str) -> None:
        self.schema_paths.add(path)
        self._keep(path, message)

    def add(self, path: str, message: str) -> None:
        if path not in self.schema_paths:
            self._keep(path, message)

    def _keep(self, path: str, message: str) -> None:
        self.total += 1
        if len(self.items) < MAX_ERRORS:
            if len(message) > _MAX_MESSAGE:
                message = message[: _MAX_MESSAGE - 3] + "..."
            self.items.append(AclError(path, message))

    def __bool__(self) -> bool:
        return self.total > 0

    def raise_if_any(self, code: str = "invalid") -> None:
        if self.total:
            raise AclRejected(self.items, code, self.total)


def _ptr(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901) from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _short(value: Any) -> str:
    """A value quoted for a message, cut short (a message must stay readable)."""
    text = (
        json.dumps(value, ensure_ascii=False)
        if not isinstance(value, (dict, list))
        else type(value).__name__
    )
    return text if len(text) <= 60 else text[:57] + '..."'


# --------------------------------------------------------------------------- schema


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of snapshots and deltas (a fresh copy)."""
    return schemas.load("acl")


def _validator(kind: str | None) -> Any:
    """A validator for one kind, so errors point into that kind's fields
    (a oneOf failure alone would only say "matches neither")."""
    return schemas.validator("acl", part=kind)


# Messages for schema failures, by the $defs entry that failed: what is wanted.
_WANTED = {
    "card": 'a card string: "100,60179" (facility,card), "0006613779" (10-digit EM-Marine print) '
    'or "hex:0A008EC793" (UID in hex)',
    "date": "a date YYYY-MM-DD (local date in the list's time zone)",
    "datetime": 'an RFC 3339 date-time with offset, e.g. "2026-09-01T07:00:00+07:00"',
    "date_or_datetime": 'a date YYYY-MM-DD or an RFC 3339 date-time with offset, e.g. "2026-09-01" '
    'or "2026-09-01T08:00:00+07:00"',
    "time_range": 'a time range "HH:MM-HH:MM" (24-hour, end exclusive, "24:00" allowed as end)',
    "name": "a name of letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)",
    "id": "a pseudonymous id of letters, digits, '_', '.', ':', '-' (at most 64)",
    "timezone": 'an IANA time zone name such as "Asia/Tomsk"',
    "key_width": "an integer key width from 24 to 64",
    "version": "a non-empty version string (at most 128 characters)",
}


def _schema_problem(err: Any) -> tuple[str, str]:
    """(JSON pointer, message) of one schema error: the list's own words where it has
    them (what a card, a date, a name must look like; no names or photos), else the
    words every schema's errors are said in (agent/core/schemas.py)."""
    sp = list(err.schema_path)
    keyword = sp[-1] if sp else ""
    where = sp[1] if len(sp) >= 2 and sp[0] == "$defs" else None
    path = _ptr(*err.instance_path)
    if keyword == "additionalProperties" and isinstance(err.instance, dict):
        allowed = _allowed_fields(sp[:-1])
        extra = err.message.split("(", 1)[-1].rstrip(")") if "(" in err.message else err.message
        msg = f"unknown field(s): {extra}; allowed here: {', '.join(allowed)}"
        if where in ("person", "guest"):
            msg += (
                " (the list holds pseudonymous ids and cards only: no names, photos or biometrics)"
            )
        return path, msg
    if keyword in ("pattern", "anyOf") and where in _WANTED:
        return path, f"{_short(err.instance)} is not {_WANTED[where]}"
    if keyword == "anyOf" and where == "group":
        return path, f"{_short(err.instance)} is not a schedule name or null"
    if keyword == "const" and sp[-2:] == ["kind", "const"]:
        return path, f'{_short(err.instance)}: "kind" must be "snapshot" or "delta"'
    p = schemas.problem(err, "acl")
    return _ptr(*p.parts), p.message


def _allowed_fields(def_path: list) -> list[str]:
    return sorted(schemas.node("acl", def_path).get("properties", {}))


def _check_schema(doc: Any, errors: _Errors) -> str | None:
    """Schema errors into `errors`; returns the document's kind when it has a known one."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in ("snapshot", "delta"):
        if not isinstance(doc, dict):
            errors.add("", f"an access list is a JSON object, not {type(doc).__name__}")
        else:
            errors.add("/kind", f'"kind" must be "snapshot" or "delta", got {_short(kind)}')
        return None
    try:
        for err in _validator(kind).iter_errors(doc):
            if len(errors.items) < MAX_ERRORS:
                errors.add_schema(*_schema_problem(err))
            else:  # count it, skip building its message
                errors.schema_paths.add(_ptr(*err.instance_path))
                errors.total += 1
    except (ValueError, RecursionError) as exc:
        # jsonschema_rs stops at 255 levels ("Recursion limit reached"): a document built
        # in code, since parse_acl_json refuses anything deeper than MAX_DEPTH.
        deep = isinstance(exc, RecursionError) or "ecursion" in str(exc)
        why = (f"nested too deep (a list nests 6 levels, this gate reads at most {MAX_DEPTH})"
               if deep else "send plain JSON values")
        errors.add("", f"cannot be checked ({str(exc)[:200]}): {why}")
        return None
    return kind


# --------------------------------------------------------------------------- JSON


def nesting_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when JSON-made ``value`` nests dicts and lists more than ``limit`` deep.

    Level by level, no recursion (a million-card list takes about 0.6 s here,
    against 4 s to parse it)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    d, lst = dict, list
    while level:
        depth += 1
        if depth > limit:
            return True
        deeper: list = []
        keep = deeper.append
        for node in level:
            for item in node.values() if node.__class__ is d else node:
                cls = item.__class__
                if cls is d or cls is lst:
                    keep(item)
        level = deeper
    return False


def parse_acl_json(data: bytes | str) -> dict:
    """The document in `data`, or AclRejected("invalid") saying where the JSON breaks
    (or that it nests deeper than MAX_DEPTH)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AclRejected(
                [AclError("", f"not UTF-8 text (byte {exc.start}); send the list as UTF-8 JSON")]
            ) from None

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    too_deep = AclRejected(
        [AclError("", f"nested more than {MAX_DEPTH} levels deep (a signed list nests 6): "
                      "send the snapshot or delta of docs/access-list.md")]
    )
    try:
        doc = json.loads(data, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise AclRejected(
            [AclError("", f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")]
        ) from None
    except ValueError as exc:
        raise AclRejected([AclError("", f"not valid JSON: {exc}")]) from None
    except RecursionError:
        raise too_deep from None
    if not isinstance(doc, dict):
        raise AclRejected(
            [AclError("", f"an access list is a JSON object, not {type(doc).__name__}")]
        )
    if nesting_exceeds(doc):
        raise too_deep
    return doc
