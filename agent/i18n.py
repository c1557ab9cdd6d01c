"""The technician tools speak Russian or English, by the locale.

``_("text")`` returns the Russian text when the locale asks for Russian,
else the English text itself. The language is chosen as GNU gettext does:

1. the locale for messages is the first non-empty of LC_ALL, LC_MESSAGES,
   LANG (the POSIX order; none set means "C");
2. when that locale is not "C" or "POSIX", LANGUAGE (a colon-separated
   priority list, e.g. ``ru:en``) is read first: its first entry in a
   language we have ("ru..." or "en...") decides; entries for languages we
   do not have are skipped, as gettext skips a missing catalogue;
3. else the locale itself: "ru..." is Russian, anything else English.

Plain "C"/"POSIX" ignores LANGUAGE, as GNU gettext does (that locale is
ASCII: Cyrillic would come out as question marks). "C.UTF-8" is not plain
"C": it can show Cyrillic, so LANGUAGE=ru works there (a container's or a
minimal image's usual locale).

Only the people-facing tools translate (every --help, check-config,
provision, doctor, monitor, journal, bundle, enroll, io-test, demo, sim and
the regional tools): logs and event records stay English, so the regional
server and bug reports read one language. ``install_argparse()`` makes
argparse's own words ("usage:", "the following arguments are required")
come from this catalogue too, and ``translate_parser()`` translates the
help texts of a built parser (see their docstrings for why).

The catalogue is ``agent/locale/ru/LC_MESSAGES/gate-agent.po``. A compiled
``gate-agent.mo`` beside it is used when it is at least as new as the .po
(``python -m agent.i18n compile`` writes it, e.g. from a make step);
otherwise the .po is parsed directly at first use, so a checkout or an
install without a compiled catalogue still speaks Russian. No msgfmt, no
build step needed.

Plural forms are avoided on purpose: messages put numbers after a colon
("events: 5"), which reads right in both languages.

    python -m agent.i18n compile    # write the .mo beside each .po
    python -m agent.i18n check      # list msgids used in the tools but missing from the catalogue
"""
from __future__ import annotations

import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DOMAIN",
    "LANGUAGES",
    "LOCALE_DIR",
    "_",
    "catalog",
    "compile_mo",
    "detect_language",
    "gettext",
    "install_argparse",
    "language",
    "missing_msgids",
    "parse_po",
    "parser_msgids",
    "set_language",
    "translate_parser",
    "used_msgids",
]

DOMAIN = "gate-agent"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
LANGUAGES = ("en", "ru")
# The modules whose user-facing strings go through _() (checked by tests/test_i18n.py).
TRANSLATED_MODULES = (
    "agent/tools/provision.py",
    "agent/tools/doctor/__init__.py",
    "agent/tools/doctor/hardware.py",
    "agent/tools/doctor/network.py",
    "agent/tools/doctor/storage.py",
    "agent/tools/monitor.py",
    "agent/tools/journaltool.py",
    "agent/tools/bundle.py",
    "agent/demo.py",
    "agent/tools/words.py",
    "agent/simctl.py",
    "agent/tools/__init__.py",
    "agent/tools/enroll.py",
    "agent/tools/iotest.py",
    "agent/config.py",
    "agent/regional/tools.py",
    "agent/tools/wiring.py",
    "agent/tools/board.py",
    "agent/regional/ingest.py",
)

_language: str | None = None
_catalogs: dict[str, dict[str, str]] = {}


class PoError(ValueError):
    """A .po file that cannot be read; the message names the line."""


def _lang_of(value: str) -> str | None:
    """"ru" or "en" for a locale or LANGUAGE entry naming one of ours, else None."""
    value = value.strip().lower()
    if value.startswith("ru"):
        return "ru"
    if value.startswith("en"):
        return "en"
    return None


def detect_language(env: Mapping[str, str] | None = None) -> str:
    """"ru" when the environment asks for Russian, else "en", in GNU gettext's
    order (the module docstring): LANGUAGE first unless the locale (LC_ALL,
    then LC_MESSAGES, then LANG; the first one set) is "C" or "POSIX"."""
    env = os.environ if env is None else env
    locale = next((env.get(n, "") for n in ("LC_ALL", "LC_MESSAGES", "LANG") if env.get(n, "")), "C")
    if locale not in ("C", "POSIX"):
        for entry in env.get("LANGUAGE", "").split(":"):
            lang = _lang_of(entry)
            if lang is not None:
                return lang
    return _lang_of(locale) or "en"


def language() -> str:
    """The language in use (detected from the environment at first use)."""
    global _language
    if _language is None:
        _language = detect_language()
    return _language


def set_language(lang: str | None) -> None:
    """Force "ru" or "en"; None: detect again from the environment at next use."""
    global _language
    if lang is not None and lang not in LANGUAGES:
        raise ValueError(f"language {lang!r}: allowed {', '.join(LANGUAGES)}")
    _language = lang


# --------------------------------------------------------------------------- .po


def _unquote(text: str, where: str) -> str:
    text = text.strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise PoError(f"{where}: expected a quoted string, got {text[:40]!r}")
    body = text[1:-1]
    out: list[str] = []
    i = 0
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(escapes.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_po(text: str, source: str = "<po>") -> dict[str, str]:
    """msgid -> msgstr of a .po file's translated, non-fuzzy entries (the header
    entry, msgid "", is left out). Multi-line strings and C escapes are read;
    plural entries are not used by this project and are refused."""
    out: dict[str, str] = {}
    entry: dict[str, list[str]] = {}
    field: str | None = None
    fuzzy = False

    def flush() -> None:
        nonlocal entry, field, fuzzy
        if "msgid" in entry and "msgstr" in entry:
            msgid, msgstr = "".join(entry["msgid"]), "".join(entry["msgstr"])
            if msgid and msgstr and not fuzzy:
                out[msgid] = msgstr
        entry, field, fuzzy = {}, None, False

    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{source}:{n}"
        if not line:
            flush()
            continue
        if line.startswith("#"):
            if "msgid" in entry and "msgstr" in entry:
                flush()
            if line.startswith("#,") and "fuzzy" in line:
                fuzzy = True
            continue
        if line.startswith(("msgid_plural", "msgstr[")):
            raise PoError(f"{where}: plural entries are not used here; rephrase with a colon")
        if line.startswith("msgctxt"):
            raise PoError(f"{where}: msgctxt is not used here")
        if line.startswith("msgid "):
            if "msgstr" in entry:
                flush()
            field = "msgid"
            entry["msgid"] = [_unquote(line[6:], where)]
        elif line.startswith("msgstr "):
            if "msgid" not in entry:
                raise PoError(f"{where}: msgstr without a msgid before it")
            field = "msgstr"
            entry["msgstr"] = [_unquote(line[7:], where)]
        elif line.startswith('"'):
            if field is None:
                raise PoError(f"{where}: a string continues nothing")
            entry[field].append(_unquote(line, where))
        else:
            raise PoError(f"{where}: cannot read {line[:40]!r}; fix the .po syntax")
    flush()
    return out


def compile_mo(messages: Mapping[str, str]) -> bytes:
    """A GNU .mo file (what msgfmt writes) holding ``messages``; the header
    entry declares UTF-8 so gettext decodes it."""
    items = dict(messages)
    items[""] = "Content-Type: text/plain; charset=UTF-8\n"
    keys = sorted(items)
    ids = [k.encode("utf-8") for k in keys]
    strs = [items[k].encode("utf-8") for k in keys]
    n = len(keys)
    header = 7 * 4
    ids_table = header
    strs_table = ids_table + n * 8
    data_start = strs_table + n * 8
    offsets_ids, offsets_strs = [], []
    blob = b""
    for b in ids:
        offsets_ids.append((len(b), data_start + len(blob)))
        blob += b + b"\0"
    for b in strs:
        offsets_strs.append((len(b), data_start + len(blob)))
        blob += b + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, ids_table, strs_table, 0, 0)
    for length, off in offsets_ids:
        out += struct.pack("<2I", length, off)
    for length, off in offsets_strs:
        out += struct.pack("<2I", length, off)
    return out + blob


def _paths(lang: str) -> tuple[Path, Path]:
    folder = LOCALE_DIR / lang / "LC_MESSAGES"
    return folder / f"{DOMAIN}.po", folder / f"{DOMAIN}.mo"


def catalog(lang: str) -> dict[str, str]:
    """msgid -> translation for a language ({} for English or a missing catalogue)."""
    if lang in _catalogs:
        return _catalogs[lang]
    messages: dict[str, str] = {}
    po, mo = _paths(lang)
    try:
        po_mtime = po.stat().st_mtime if po.exists() else None
        if mo.exists() and (po_mtime is None or mo.stat().st_mtime >= po_mtime):
            import gettext as _gettext  # only when a catalogue is read (English needs none)

            with mo.open("rb") as f:
                trans = _gettext.GNUTranslations(f)
            messages = {k: v for k, v in trans._catalog.items() if isinstance(k, str) and k}  # type: ignore[attr-defined]
        elif po_mtime is not None:
            messages = parse_po(po.read_text(encoding="utf-8"), str(po))
    except (OSError, PoError, UnicodeDecodeError) as exc:
        # A broken catalogue must never stop a tool: speak English and say why once.
        print(f"gate-agent: translations for {lang} not loaded ({exc}); using English", file=sys.stderr)
        messages = {}
    _catalogs[lang] = messages
    return messages


def gettext(message: str) -> str:
    """The message in the language in use (English: the message itself)."""
    lang = language()
    if lang == "en":
        return message
    return catalog(lang).get(message, message)


_ = gettext


def ngettext(singular: str, plural: str, n: int) -> str:
    """For argparse's few plural messages: the catalogue holds each English form
    as its own msgid, translated with a number-after-colon wording that reads
    right for any n (this project uses no plural forms, see above)."""
    return gettext(singular if n == 1 else plural)


# --------------------------------------------------------------------------- argparse


def install_argparse() -> None:
    """Make argparse speak through this catalogue.

    Python ships no translation of argparse, and argparse looks its words up
    through ``gettext.gettext`` in the process-wide default domain, so binding
    a gettext domain would need a compiled .mo and would change every other
    library's lookups too. argparse instead resolves the module globals ``_``
    and ``ngettext`` at each call, so pointing those two names at our own
    lookup translates "usage:", "options:", "the following arguments are
    required: %s" ... from the msgids in our .po (the "argparse" block), with
    our language rules (LANGUAGE, .po without a build). Call it before the
    parsers are built: "options" and "show this help message and exit" are
    looked up when a parser is made. Idempotent."""
    import argparse

    argparse._ = gettext  # type: ignore[attr-defined]
    argparse.ngettext = ngettext  # type: ignore[attr-defined]


def _parser_texts(parser: Any, seen: set[int] | None = None):
    """(object, attribute, text) for every description, epilog, group title and
    help text of a parser and its subparsers, each parser once."""
    import argparse

    seen = set() if seen is None else seen
    if id(parser) in seen:
        return
    seen.add(id(parser))
    for attr in ("description", "epilog"):
        yield parser, attr, getattr(parser, attr, None)
    for group in parser._action_groups:
        yield group, "title", group.title
        yield group, "description", group.description
    for action in parser._actions:
        if action.help is not argparse.SUPPRESS:
            yield action, "help", action.help
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield choice, "help", choice.help
            for sub in action.choices.values():
                yield from _parser_texts(sub, seen)


def translate_parser(parser: Any) -> Any:
    """Translate, in place, every help text of a built parser and its subparsers.

    The help strings are written in English where each tool defines its
    options (a module stays readable and merges stay easy); this walks the
    finished tree once, so a new option is translated as soon as the .po has
    its msgid (tests/test_i18n_tools.py fails on one that has none). A text
    already translated is not a msgid and stays as it is. Returns the parser."""
    if language() == "en":
        return parser
    for obj, attr, text in list(_parser_texts(parser)):
        if isinstance(text, str) and text:
            setattr(obj, attr, gettext(text))
    return parser


def parser_msgids(parser: Any) -> list[str]:
    """Every help text of a built parser (for the catalogue check)."""
    import argparse

    out = []
    for _obj, _attr, text in _parser_texts(parser):
        if isinstance(text, str) and text and text is not argparse.SUPPRESS and text not in out:
            out.append(text)
    return out


# --------------------------------------------------------------------------- upkeep


def used_msgids(paths: list[Path] | None = None) -> dict[str, list[str]]:
    """Every literal ``_("...")`` in the translated modules: msgid -> places."""
    import ast  # upkeep (tests, the catalogue's checks), never the service's start

    root = Path(__file__).resolve().parent.parent
    out: dict[str, list[str]] = {}
    for p in paths or [root / m for m in TRANSLATED_MODULES]:
        if not p.exists():
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"), str(p))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                out.setdefault(node.args[0].value, []).append(f"{p.name}:{node.lineno}")
    return out


def missing_msgids(lang: str = "ru") -> dict[str, list[str]]:
    """msgids used in the tools that the catalogue does not translate."""
    po, _mo = _paths(lang)
    have = parse_po(po.read_text(encoding="utf-8"), str(po)) if po.exists() else {}
    return {m: where for m, where in used_msgids().items() if m not in have}


def _po_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["compile"]:
        for lang in LANGUAGES:
            po, mo = _paths(lang)
            if po.exists():
                mo.write_bytes(compile_mo(parse_po(po.read_text(encoding="utf-8"), str(po))))
                print(f"wrote {mo}")
        return 0
    if args[:1] == ["check"]:
        missing = missing_msgids("ru")
        for msgid, where in missing.items():
            print(f"#: {' '.join(where)}\nmsgid {_po_quote(msgid)}\nmsgstr \"\"\n")
        return 1 if missing else 0
    print("usage: python -m agent.i18n compile | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
