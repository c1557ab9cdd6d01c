"""Small pieces of text the technician's tools share, translated.

Two kinds: the contract's identifiers as terms (modes, reasons, alarms,
reader errors, io-test's states: ``mode_text`` and the like), and English
messages made elsewhere given back in the user's language
(``config_message``, ``detail_text``, ``scenario_message``,
``ingest_message``): their templates are read from the modules that write
them, so a new message is translated as soon as the catalogue has it.

Some 640 lines on purpose: the four families of messages share one matching
machinery (templates read from source, compiled to patterns, matched part by
part), and every tool takes its terms and its messages from this one place.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.i18n import _


def age_text(seconds: float | None) -> str:
    """An age in the unit a person reads at a glance: 45 s, 12 min, 3.5 h, 2.1 days."""
    if seconds is None:
        return _("none")
    if seconds < 120:
        return _("{n} s").format(n=round(seconds))
    if seconds < 7200:
        return _("{n} min").format(n=round(seconds / 60))
    if seconds < 172800:
        return _("{n} h").format(n=round(seconds / 3600, 1))
    return _("{n} days").format(n=round(seconds / 86400, 1))


# The contract's identifiers (docs/contract.md) as a Russian technician reads
# them, in the terms of access-control manuals (docs/glossary.md). In Russian
# the identifier is kept beside the term, «обычный (normal)», so what the
# screen says can be found in the journal, the contract and a bug report; in
# English the identifier is the word itself and is shown alone.
MODE_TERMS = {
    "normal": "normal mode",
    "entry_only": "entry only",
    "free": "free passage",
    "lockdown": "lockdown",
    "fire": "fire alarm",
}
REASON_TERMS = {
    "lockdown": "gate locked down",
    "wrong_direction": "wrong direction",
    "blocked": "blocked card",
    "unknown_card": "unknown card",
    "not_yet_valid": "card not yet valid",
    "expired": "card expired",
    "holiday": "holiday",
    "outside_schedule": "outside the schedule",
    "exit_restricted": "exit restricted",
    "antipassback": "anti-passback",
    "gate_busy": "turnstile busy",
}
ALARM_TERMS = {
    "fire": "fire alarm",
    "tamper": "tamper",
    "journal_capacity": "journal nearly full",
    "journal_readonly": "SD card read-only",
    "publish_refused": "broker refuses events",
    "clock_unsynced": "clock not synchronised",
    "clock_behind_floor": "clock behind the time floor",
    "expiry_unchecked": "expiry dates not checked",
    "acl_missing": "no access list",
    "acl_stale": "access list out of date",
    "acl_corrupt": "access list damaged",
    "acl_store_failed": "access list not saved",
    "downlink_flood": "command flood",
    "ack_ahead": "server confirmation ahead",
    "broker_dropped": "broker dropped the connection",
    "tls_rejected": "TLS rejected",
    "counters_reset": "counters reset",
    "uplink_config": "uplink settings",
}
READER_ERROR_TERMS = {
    "parity": "parity error",
    "length": "wrong frame length",
    "checksum": "checksum error",
    "glitch": "line noise",
    "garbage": "unreadable data",
    "disconnected": "reader disconnected",
}


# io-test's words for a line's state and level. English shows the identifier
# alone, as the commissioning sheet (hardware/commissioning-en.md) quotes it;
# Russian shows the term with the identifier beside it, «сработал (ASSERTED)».
IO_STATE_TERMS = {
    "ASSERTED": "input asserted",
    "rest": "input at rest",
    "ACTIVE": "output active",
    "inactive": "output inactive",
    "high": "level high",
    "low": "level low",
}


def _term(table: dict[str, str], value: object) -> str:
    """The Russian term with the identifier beside it; English: the identifier."""
    ident = str(value)
    if ident not in table:
        return ident
    word = _(table[ident])
    return ident if word == table[ident] else f"{word} ({ident})"


def mode_text(mode: object) -> str:
    """A gate mode as the screen shows it: «обычный (normal)» / "normal"."""
    return _term(MODE_TERMS, mode)


def reason_text(reason: object) -> str:
    """A denial reason: «заблокированная карта (blocked)» / "blocked"."""
    return _term(REASON_TERMS, reason)


def alarm_text(kind: object) -> str:
    """An alarm kind: «нет списка доступа (acl_missing)» / "acl_missing"; unknown kinds as they are."""
    return _term(ALARM_TERMS, kind)


def io_state_text(word: str) -> str:
    """An io-test state or level: «сработал (ASSERTED)», «низкий (low)» / "ASSERTED", "low"."""
    return _term(IO_STATE_TERMS, word)


def reader_error_text(kind: object) -> str:
    """A reader error kind: «ошибка чётности (parity)» / "parity"."""
    return _term(READER_ERROR_TERMS, kind)


# --------------------------------------------------------------------------- config messages
#
# agent/config.py (with the gate rules of agent/core/gateconfig.py and the
# board profiles of agent/hw/profiles.py) writes its problems in English:
# the service logs them and the log stays English. The people-facing tools
# (check-config, doctor, provision, bundle) show them in the user's language
# through config_message(): every message those modules can produce is found
# in their source (the f-strings handed to errors.append, self.error, bad,
# ConfigError ...), each becomes a msgid whose placeholders are the f-string's
# fields ("{path} does not exist; create it or fix the path"), and a message
# is translated by matching it against those templates. The source stays the
# one place a message is written; tests/test_i18n_tools.py fails when one has
# no translation.

_CONFIG_SOURCES = ("config.py", "core/gateconfig.py", "hw/profiles.py", "core/schemas.py")
_MESSAGE_CALLS = {"append", "error", "bad", "with_hint", "ConfigError", "GateConfigError", "ProfileError",
                  "ProfileNotFound", "ScenarioError"}


def _template_parts(node: Any) -> list[tuple[str, str]] | None:
    """[("lit", text) | ("field", "{expr}")] of a string or f-string node."""
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [("lit", node.value)]
    if not isinstance(node, ast.JoinedStr):
        return None
    parts: list[tuple[str, str]] = []
    for v in node.values:
        if isinstance(v, ast.Constant):
            parts.append(("lit", str(v.value)))
        elif isinstance(v, ast.FormattedValue):
            conv = {-1: "", 115: "!s", 114: "!r", 97: "!a"}[v.conversion]
            spec = ""
            if v.format_spec is not None:
                spec = ":" + "".join(str(x.value) for x in v.format_spec.values if isinstance(x, ast.Constant))
            parts.append(("field", "{" + ast.unparse(v.value) + conv + spec + "}"))
    return parts


def _is_message(parts: list[tuple[str, str]]) -> bool:
    """Words a person reads, not a key path such as "gate.readers.{name}"."""
    text = "".join(t for k, t in parts if k == "lit")
    return " " in text.strip() and len(re.findall(r"[A-Za-z]{2,}", text)) >= 2


def _source_templates(sources: tuple[str, ...] = _CONFIG_SOURCES,
                      calls: frozenset[str] | set[str] = _MESSAGE_CALLS) -> list[list[tuple[str, str]]]:
    import ast

    root = Path(__file__).resolve().parent.parent
    found: list[list[tuple[str, str]]] = []
    for rel in sources:
        try:
            tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            continue  # an install without sources: the messages stay English
        consts = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name) and t.id.isupper()}
        candidates: list[Any] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name in calls:
                    candidates.extend(node.args)
            elif isinstance(node, ast.FunctionDef) and node.name in ("_schema_error", "warnings"):
                candidates.extend(n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value)
        while candidates:
            c = candidates.pop()
            if isinstance(c, (ast.Tuple, ast.List)):
                candidates.extend(c.elts)
            elif isinstance(c, ast.BinOp):
                candidates.extend((c.left, c.right))
            elif isinstance(c, ast.Name) and c.id in consts:
                candidates.append(consts[c.id])
            else:
                parts = _template_parts(c)
                if parts and _is_message(parts) and parts not in found:
                    found.append(parts)
    return found


_templates: list[tuple[str, re.Pattern[str], list[str]]] | None = None
_detail_templates: list[tuple[str, re.Pattern[str], list[str]]] | None = None
# Fields that may be empty or sit right beside another field: what each can hold.
_FIELD_PATTERNS = {
    "{'s' if len(extra) > 1 else ''}": "(s?)",
    "{for_what}": "((?:; allowed here: .*)?)",
    "{': ' + desc if desc else ''}": "((?:: .*)?)",
}


def _schema_texts() -> tuple[list[str], list[str]]:
    """(descriptions, hints) of the config schema: config.py puts them into its messages."""
    from agent.core import schemas

    descriptions: list[str] = []
    hints: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "description" and isinstance(v, str) and v not in descriptions:
                    descriptions.append(v)
                elif k == "x-hint" and isinstance(v, str) and v not in hints:
                    hints.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    try:
        walk(schemas.load("config"))
    except (OSError, ValueError):
        pass
    return descriptions, hints


def config_msgids() -> list[str]:
    """Every config message template, and the schema's descriptions and hints, as msgids."""
    descriptions, hints = _schema_texts()
    return ["".join(t for _k, t in parts) for parts in _source_templates()] + descriptions + hints


def _compile(templates: list[list[tuple[str, str]]]) -> list[tuple[str, re.Pattern[str], list[str]]]:
    out = []
    for parts in templates:
        fields = [t for k, t in parts if k == "field"]
        pattern = "".join(re.escape(t) if k == "lit" else _FIELD_PATTERNS.get(t, "(.+?)") for k, t in parts)
        literal = sum(len(t) for k, t in parts if k == "lit")
        out.append((literal, "".join(t for _k, t in parts), re.compile(pattern, re.DOTALL), fields))
    # The most specific first: "{msg} ({hint})" must not take a message a longer template fits.
    out.sort(key=lambda x: -x[0])
    return [(msgid, rx, fields) for _lit, msgid, rx, fields in out]


def _compiled_templates() -> list[tuple[str, re.Pattern[str], list[str]]]:
    global _templates
    if _templates is None:
        _templates = _compile(_source_templates())
    return _templates


def _match(message: str, templates: list[tuple[str, re.Pattern[str], list[str]]], depth: int,
           part: Callable[[str, int], str] | None = None) -> str:
    """The message translated by the first template it fits; else as it is. part: how a
    field's text is translated (default: as a config message or phrase)."""
    for msgid, rx, fields in templates:
        m = rx.fullmatch(message)
        if m is None:
            continue
        ru = _(msgid)
        if ru == msgid:
            return message
        for field, value in zip(fields, m.groups()):
            # A field only for English grammar ({'s' if ...}) may be left out of the Russian.
            ru = ru.replace(field, (part or _config_part)(value, depth + 1), 1)
        return ru
    return message


def config_message(message: str, _depth: int = 0) -> str:
    """A message of agent/config.py in the user's language (English: as it is)."""
    from agent.i18n import catalog, language

    if language() == "en" or _depth > 3:
        return message
    whole = catalog(language()).get(message)
    if whole is not None:
        return whole
    # A template that holds the hint itself (gateconfig's wait_s) first, then with_hint(): "msg (hint)".
    matched = _match(message, _compiled_templates(), _depth)
    if matched != message:
        return matched
    for hint in sorted(_schema_texts()[1], key=len, reverse=True):
        if message.endswith(f" ({hint})") and len(message) > len(hint) + 3:
            return f"{config_message(message[:-len(hint) - 3], _depth + 1)} ({_(hint)})"
    return message


# Pieces config.py builds apart and puts into a message ("; allowed here: a, b").
_PREFIXES = ("; allowed here: ", ": ")


def _config_part(value: str, depth: int) -> str:
    """A field's text: a message or known phrase translated, else as it is (a path, a value)."""
    for prefix in _PREFIXES:
        if value.startswith(prefix) and len(value) > len(prefix):
            return _(prefix) + config_message(value[len(prefix):], depth)
    return config_message(value, depth)


def config_error_text(exc: Any) -> str:
    """A ConfigError for a person: every problem, in the user's language
    (English: the error's own text, as the service logs it)."""
    from agent.i18n import language

    if language() == "en":
        return str(exc)
    lines = [f"  - {path}: {config_message(msg)}" if path else f"  - {config_message(msg)}"
             for path, msg in exc.errors]
    head = _("config {source}: problems: {n}; fix these:").format(source=exc.source, n=len(exc.errors))
    return "\n".join([head, *lines])


def error_text(exc: BaseException) -> str:
    """An error for a person: a config's or a board profile's problems in the
    user's language (see config_message); any other error as it is."""
    from agent.i18n import language

    if language() == "en" or not isinstance(getattr(exc, "errors", None), list):
        return str(exc)
    from agent.config import ConfigError
    from agent.hw.profiles import ProfileError

    if isinstance(exc, ConfigError):
        return config_error_text(exc)
    if isinstance(exc, ProfileError):
        head = _("hardware profile {source}: problems: {n}; fix these:").format(source=exc.source, n=len(exc.errors))
        return "\n".join([head, *(f"  - {config_message(e)}" for e in exc.errors)])
    return str(exc)


# --------------------------------------------------------------------------- record details
#
# An event record's "detail" (alarm, reader.error, acl.applied ...) is English
# in the journal and on the wire: the contract's data. Where a tool shows a
# record to a person (monitor, journal tail), detail_text() puts the detail
# into the user's language by the same template matching, the templates being
# the texts the agent passes as detail= / "detail": in its source.


def _detail_values(node: Any, func: Any, funcs: dict[str, list[Any]], consts: dict[str, Any],
                   parents: dict[int, Any], depth: int = 0) -> list[Any]:
    """The string nodes a detail value can come from. A detail is often assembled
    before it is passed (``text = f"downlink flood, ..."; ... "detail": text[:N]``,
    ``self._alarm(True, f"backlog {stored} of {cap}")`` into ``detail=detail``), so
    a name is followed to what its function assigns to it and, for a parameter, to
    what the module's calls of that function pass; a slice to what it slices; a
    ``TABLE.get(x)`` to the values of a module-level dict."""
    import ast

    if depth > 4:
        return []
    if isinstance(node, ast.IfExp):
        return [*_detail_values(node.body, func, funcs, consts, parents, depth + 1),
                *_detail_values(node.orelse, func, funcs, consts, parents, depth + 1)]
    if isinstance(node, ast.Subscript):
        return _detail_values(node.value, func, funcs, consts, parents, depth + 1)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name) and isinstance(consts.get(node.func.value.id), ast.Dict)):
        return [v for v in consts[node.func.value.id].values if v is not None]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        # An attribute the detail was kept in (``self._blocked = reason``): what the module assigns to it.
        return [v for value in consts.get(f"self.{node.attr}", [])
                for v in _detail_values(value, parents.get(id(value)), funcs, consts, parents, depth + 1)]
    if not isinstance(node, ast.Name) or func is None:
        return [node]
    out: list[Any] = []
    for n in ast.walk(func):
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in n.targets):
            out.extend(_detail_values(n.value, func, funcs, consts, parents, depth + 1))
    params = [a.arg for a in func.args.args]
    if node.id in params:
        index = params.index(node.id) - (1 if params[:1] == ["self"] else 0)
        for call_func in funcs.get(func.name, []):
            for call in ast.walk(call_func):
                if not isinstance(call, ast.Call):
                    continue
                f = call.func
                if (f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else "") != func.name:
                    continue
                args = [k.value for k in call.keywords if k.arg == node.id]
                if 0 <= index < len(call.args):
                    args.append(call.args[index])
                for a in args:
                    out.extend(_detail_values(a, call_func, funcs, consts, parents, depth + 1))
    if not out and isinstance(consts.get(node.id), ast.Constant):  # a module's constant (READ_ONLY)
        out.append(consts[node.id])
    return out


def _detail_source_templates() -> list[list[tuple[str, str]]]:
    import ast

    root = Path(__file__).resolve().parent.parent
    found: list[list[tuple[str, str]]] = []
    for path in sorted(root.rglob("*.py")):
        if "tools" in path.relative_to(root).parts[:1]:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        consts: dict[str, Any] = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                                  for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        consts.setdefault(f"self.{t.attr}", []).append(n.value)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        # The function each node is in (the innermost), and every function of the module by the
        # name it calls (a parameter's values are what the callers pass).
        parents: dict[int, Any] = {}
        for fn in functions:
            for n in ast.walk(fn):
                parents[id(n)] = fn  # inner functions come later in the walk and win
        callers: dict[str, list[Any]] = {}
        for fn in functions:
            for n in ast.walk(fn):
                if isinstance(n, ast.Call):
                    f = n.func
                    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                    if name and fn not in callers.setdefault(name, []):
                        callers[name].append(fn)
        for node in ast.walk(tree):
            values: list[Any] = []
            if isinstance(node, ast.keyword) and node.arg == "detail":
                values.append(node.value)
            elif isinstance(node, ast.Dict):
                values.extend(v for k, v in zip(node.keys, node.values)
                              if isinstance(k, ast.Constant) and k.value == "detail")
            for v in values:
                for c in _detail_values(v, parents.get(id(v)), callers, consts, parents):
                    parts = _template_parts(c)
                    if parts and _is_message(parts) and parts not in found:
                        found.append(parts)
    return found


def detail_msgids() -> list[str]:
    """Every record detail the agent writes, as its msgid."""
    return ["".join(t for _k, t in parts) for parts in _detail_source_templates()]


def detail_text(detail: str) -> str:
    """A record's detail in the user's language (English, or a detail no
    template fits: as it is)."""
    from agent.i18n import language

    global _detail_templates
    if language() == "en":
        return detail
    if _detail_templates is None:
        _detail_templates = _compile(_detail_source_templates())
    return _detail(detail, 0)


def _detail(text: str, depth: int) -> str:
    """A detail, or a field of one (a detail inside a detail: "{earlier alarm}: writable again")."""
    assert _detail_templates is not None
    if depth > 3:
        return text
    ru = _match(text, _detail_templates, depth, _detail)
    return ru if ru != text else _config_part(text, depth)


# --------------------------------------------------------------------------- scenario messages
#
# agent/simulator.py writes a broken scenario's problems and an unmet
# expectation in English (the simulator is a library and CI reads it); the
# `gate-agent simulate` command shows them in the user's language by the same
# template matching as config_message, the templates being the simulator's
# own f-strings. Each problem starts with where it is, "step 3 (line 14), at"
# or "/gate"; that place is translated apart.

_SCENARIO_SOURCES = ("simulator.py", "simsite.py", "core/cards.py")  # a step's card: parse_card_string's CardFormatError
_scenario_templates: list[tuple[str, re.Pattern[str], list[str]]] | None = None
_PLACE = re.compile(r"(step|expect) (\d+)(?: \(line (\d+)\))?(?:, (\S+))?")


# The scenario schema's problems are in agent/core/schemas.py's words (translated as
# config messages); what it leaves in jsonschema_rs's own words, as templates.
SCHEMA_MESSAGES = (
    "{value} does not match {pattern}",
    "{value} is not one of {allowed}",
    "{value} is greater than the maximum of {limit}",
    "{value} is less than the minimum of {limit}",
    "{value} is not of type {kind}",
    "{key} is a required property",
    "Additional properties are not allowed ({keys} was unexpected)",
    "Additional properties are not allowed ({keys} were unexpected)",
    "{value} is less than or equal to the minimum of {limit}",
    "{value} is greater than or equal to the maximum of {limit}",
    "{value} has less than {n} item",
    "{value} has less than {n} items",
    "{value} has more than {n} item",
    "{value} has more than {n} items",
    "{value} has less than {n} properties",
    "{value} is shorter than {n} characters",
    "{value} is not valid under any of the schemas listed in the 'anyOf' keyword",
    "{value} was expected",
)
# A step's `at` that passes the schema's pattern but not Python's date parsing
# (datetime.fromisoformat): its usual words, and the card forms cards.py names.
PARSE_MESSAGES = (
    "can't subtract offset-naive and offset-aware datetimes",
    "Invalid isoformat string: {value}",
    "month must be in 1..12",
    "day is out of range for month",
    "hour must be in 0..23",
    "minute must be in 0..59",
    "second must be in 0..59",
    "year {value} is out of range",
)


def _scenario_source_templates() -> list[list[tuple[str, str]]]:
    schema = [[("field" if t.startswith("{") else "lit", t) for t in re.split(r"(\{[a-z]+\})", m) if t]
              for m in SCHEMA_MESSAGES + PARSE_MESSAGES]
    return _source_templates(_SCENARIO_SOURCES, _MESSAGE_CALLS | {"CardFormatError"}) + schema


def scenario_msgids() -> list[str]:
    """Every message template of the simulator (and the schema's usual ones), as its msgid."""
    from agent.core.cards import ACCEPTED_FORMS

    return ["".join(t for _k, t in parts) for parts in _scenario_source_templates()] + [ACCEPTED_FORMS]


def _place_text(place: str) -> str:
    """ "step 3 (line 14), card" -> «шаг 3 (строка 14), card»; a key path stays as it is."""
    m = _PLACE.fullmatch(place)
    if m is None:
        return place
    kind, n, line, key = m.groups()
    text = (_("step {n}") if kind == "step" else _("expectation {n}")).format(n=n)
    if line:
        text += " " + _("(line {line})").format(line=line)
    return text + (f", {key}" if key else "")


def scenario_message(message: str) -> str:
    """A problem of a scenario, or an unmet expectation, in the user's language
    (English, or a message no template fits: as it is)."""
    from agent.i18n import language

    global _scenario_templates
    if language() == "en":
        return message
    if _scenario_templates is None:
        _scenario_templates = _compile(_scenario_source_templates())
    head, *more = message.split("\n")
    place, sep, rest = head.partition(": ")
    if not (sep and (_PLACE.fullmatch(place) or place.startswith("/"))):
        place, rest = "", head
    ru = _match(head, _scenario_templates, 0)
    if place and (ru == head or not ru.startswith(place + ": ")):
        # No template of the whole fits with the place as its first field ("{where}: {exc}",
        # a schema message): the message after the place is translated on its own.
        # The schema's words are the config's (agent/core/schemas.py): translated as a config message.
        said = _match(rest, _scenario_templates, 0)
        ru = f"{place}: {said if said != rest else config_message(rest)}"
    if place and ru.startswith(place + ": "):
        ru = _place_text(place) + ru[len(place):]
    gate = _GATE_HEAD.fullmatch(ru[len(_place_text(place)) + 2:] if place else ru)
    if gate is not None:  # "/gate: " + a GateConfigError: its head, then "  - name: message" lines
        ru = ru[:len(ru) - len(gate.group(0))] + _("gate settings: problems: {n}; fix these:").format(n=gate.group(1))
    for line in more:
        name, sep, msg = line.partition(": ")
        ru += "\n  " + (f"{name}: {config_message(msg)}" if sep else line)  # under its problem
    return ru


_GATE_HEAD = re.compile(r"invalid gate config \((\d+) problem\(s\)\); fix these settings:")


# --------------------------------------------------------------------------- ingest, simulate --pretty
#
# The ingest's database and connection errors (agent/regional/store.py
# StoreError, the Ingest's ValueError) are English: the service logs them.
# `gate-agent ingest` prints them to the person at the terminal in their
# language by the same template matching; the database's or the OS's own
# words inside a message ({exc}) stay as given.

_INGEST_SOURCES = ("regional/store.py", "regional/ingest.py")
_INGEST_CALLS = frozenset({"StoreError", "IngestError", "ValueError"})
_ingest_templates: list[tuple[str, re.Pattern[str], list[str]]] | None = None


def ingest_msgids() -> list[str]:
    """Every message template of the ingest's store and its checks, as its msgid."""
    return ["".join(t for _k, t in parts) for parts in _source_templates(_INGEST_SOURCES, _INGEST_CALLS)]


def ingest_message(message: str) -> str:
    """An ingest database or connection error in the user's language (English,
    or a message no template fits: as it is)."""
    from agent.i18n import language

    global _ingest_templates
    if language() == "en":
        return message
    if _ingest_templates is None:
        _ingest_templates = _compile(_source_templates(_INGEST_SOURCES, _INGEST_CALLS))
    return _match(message, _ingest_templates, 0, lambda value, _depth: _(value))


# `gate-agent simulate --pretty`: the words of its trace lines (the identifiers,
# record types and key=value fields stay as the contract writes them).
FEEDBACK_TERMS = {
    "granted": "access granted",
    "denied": "access denied",
    "error": "read error",
}


def pretty_words() -> dict[str, str]:
    """The words simulator.format_pretty puts in its io trace lines, translated."""
    words = {"ON": _("ON"), "off": _("off"), "feedback": _("reader signal")}
    words.update({k: _term(FEEDBACK_TERMS, k) for k in FEEDBACK_TERMS})
    return words
