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

The catalogue is ``agent/locale/ru/LC_MESSAGES/gate-agent.po``. The package
build compiles it with Babel into ``gate-agent.mo`` beside it (setup.py's
build_py: pip, ``make build``, the Debian package; the .mo is not in git),
and the tools read that .mo with the standard library's ``gettext``. A
missing .mo means English, said once on stderr. Babel is needed to build
and for the upkeep below, never to run.

Plural forms are avoided on purpose: messages put numbers after a colon
("events: 5"), which reads right in both languages.

    python -m agent.i18n check      # list msgids used in the tools but missing from the catalogue
"""
from __future__ import annotations

import os
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
    "detect_language",
    "gettext",
    "install_argparse",
    "language",
    "missing_msgids",
    "parser_msgids",
    "po_messages",
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
    "agent/tools/trustedkeys.py",
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
    "agent/tools/presence.py",
    "agent/console/__init__.py",
    "agent/console/accounts.py",
    "agent/console/words.py",
)

_language: str | None = None
_catalogs: dict[str, dict[str, str]] = {}


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


# --------------------------------------------------------------------------- catalogue


def _paths(lang: str) -> tuple[Path, Path]:
    folder = LOCALE_DIR / lang / "LC_MESSAGES"
    return folder / f"{DOMAIN}.po", folder / f"{DOMAIN}.mo"


def catalog(lang: str) -> dict[str, str]:
    """msgid -> translation for a language, from its compiled .mo ({} for
    English or a missing catalogue)."""
    if lang in _catalogs:
        return _catalogs[lang]
    import gettext as _gettext  # only when a catalogue is read (English needs none)

    messages: dict[str, str] = {}
    try:
        trans = _gettext.translation(DOMAIN, localedir=LOCALE_DIR, languages=[lang])
        # The whole table, not one lookup at a time: words.py asks whether a msgid is
        # translated at all, which gettext() cannot say when a translation equals its msgid.
        raw = getattr(trans, "_catalog", {})
        messages = {k: v for k, v in raw.items() if isinstance(k, str) and k}
    except FileNotFoundError:
        # An install or a checkout that skipped the build step: speak English and say why once.
        print(f"gate-agent: no compiled {lang} catalogue ({_paths(lang)[1]}); using English. "
              "In a checkout, run make build", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - a truncated .mo raises struct.error, a bad one OSError
        # A broken catalogue must never stop a tool: speak English and say why once.
        print(f"gate-agent: translations for {lang} not loaded ({exc}); using English", file=sys.stderr)
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
    our domain there would change every other library's lookups too. argparse instead resolves the module globals ``_``
    and ``ngettext`` at each call, so pointing those two names at our own
    lookup translates "usage:", "options:", "the following arguments are
    required: %s" ... from the msgids in our .po (the "argparse" block), with
    our language rules (LANGUAGE, C ignoring it). Call it before the
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


def po_messages(path: Path) -> dict[str, str]:
    """msgid -> msgstr of a .po's translated, non-fuzzy entries, read with Babel
    (upkeep and tests: the tools themselves read the compiled .mo)."""
    try:
        from babel.messages.pofile import read_po
    except ImportError as exc:
        raise RuntimeError("reading a .po needs Babel: pip install Babel (make build installs it)") from exc
    with Path(path).open("rb") as f:
        parsed = read_po(f, abort_invalid=True)
    return {m.id: m.string for m in parsed
            if isinstance(m.id, str) and m.id and isinstance(m.string, str) and m.string and not m.fuzzy}


def missing_msgids(lang: str = "ru") -> dict[str, list[str]]:
    """msgids used in the tools that the catalogue (the .po) does not translate."""
    po, _mo = _paths(lang)
    have = po_messages(po) if po.exists() else {}
    return {m: where for m, where in used_msgids().items() if m not in have}


def _po_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["check"]:
        missing = missing_msgids("ru")
        for msgid, where in missing.items():
            print(f"#: {' '.join(where)}\nmsgid {_po_quote(msgid)}\nmsgstr \"\"\n")
        return 1 if missing else 0
    print("usage: python -m agent.i18n check   (the .mo is compiled by the package build: make build)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
