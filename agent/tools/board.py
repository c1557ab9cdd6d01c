"""What the bench tools (io-test, enroll) need from the board's own config.

A technician runs ``gate-agent io-test`` and ``gate-agent enroll`` on the
board as the docs write them: the hardware profile, the pin factory, the
readers (Wiegand, serial, OSDP) and the site's key width come from
``/etc/gate-agent/agent.toml`` (or ``--config FILE``), so nothing has to be
typed twice and nothing can disagree with what the service will use.

The wiring is checked before the board is provisioned (docs/operations.md,
section 2, comes before ``provision``): a config whose site, broker or
trusted keys are still empty is fine here. Only the parts the tools use
must be valid: [hardware] (profile, pin factory, readers), [gate.readers]
and site.key_width. Those are checked by agent.config's own code, so the
tools and the service can never read the same file two ways.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import DEFAULT_PATH
from agent.i18n import _

__all__ = ["DEFAULT_PATH", "Board", "BoardConfigError", "read_board"]

# The key paths whose problems make the config unusable for the bench tools.
_NEEDED = ("hardware", "gate.readers", "site.key_width")


class BoardConfigError(ValueError):
    """The board's config cannot give the tools what they need; the message is one
    line saying what is wrong and what to do (fix it, --config, or --profile)."""


@dataclass(frozen=True)
class Board:
    """The hardware part of a board's config."""

    source: str
    profile: Any  # agent.hw.profiles.Profile
    pin_factory: str
    key_width: int
    readers: tuple[Any, ...]  # agent.config.ReaderSettings


def _needed(path: str) -> bool:
    return path in ("", "top level") or any(
        path == p or path.startswith((p + ".", p + "[")) for p in _NEEDED
    )


def _unusable(path: Path, what: str) -> BoardConfigError:
    return BoardConfigError(
        _("{what}; give the board's config with --config FILE, or the hardware profile with "
          "--profile NAME (e.g. pi4-relay4)").format(what=what)
    )


def read_board(path: str | os.PathLike[str] = DEFAULT_PATH) -> Board:
    """The board's profile, pin factory, readers and key width from its config file.

    Raises BoardConfigError (one line: what is wrong, what to do) when the file
    is missing, unreadable, not TOML, or its hardware part is invalid.
    """
    # agent.config's checks, section by section, so the tools read the file exactly
    # as the service does; the sections a bench tool does not use are not required.
    from agent.config import (
        _Checks,
        _expand,
        _fill_defaults,
        _readers,
        _schema_error,
        _validator,
        schema,
    )

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _unusable(p, _("{path} does not exist").format(path=p)) from None
    except PermissionError:
        raise BoardConfigError(
            _("{path} cannot be read (no permission): run the tool with sudo, or give --config FILE "
              "or --profile NAME").format(path=p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _unusable(p, _("{path} cannot be read ({error})").format(path=p, error=exc)) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _unusable(p, _("{path} is not valid TOML ({error})").format(path=p, error=exc)) from None
    errors: list[tuple[str, str]] = []
    doc = _expand(dict(doc), [], os.environ, errors)
    root = schema()
    _fill_defaults(root, doc, root)
    bad: set[str] = set()
    for err in _validator().iter_errors(doc):
        item = _schema_error(err, doc)
        errors.append(item)
        bad.add(item[0] or "top level")
    checks = _Checks(doc, p.resolve().parent, errors, bad)
    board = checks.profile()
    readers = None
    if not ({"top level", "hardware", "hardware.readers", "gate", "gate.readers"} & bad
            or checks.broken("gate.readers")):
        readers = _readers(doc, board, p.resolve().parent, errors,
                           skip=lambda i: checks.broken(f"hardware.readers[{i}]"))
    problems = [(k, m) for k, m in errors if _needed(k)]
    if problems or board is None or readers is None:
        if not problems:  # cannot happen without an error listed; say something true anyway
            problems = [("hardware", _("the hardware section is incomplete"))]
        key, msg = problems[0]
        more = len(problems) - 1
        what = f"{p}: {key + ': ' if key else ''}{msg}"
        if more:
            what += " " + _("(and {n} more: gate-agent check-config {path})").format(n=more, path=p)
        raise _unusable(p, what)
    hw = doc["hardware"]
    site = doc.get("site")
    # An unprovisioned board has no [site] yet: the schema's default key width then.
    key_width = site.get("key_width", 24) if isinstance(site, dict) else 24
    return Board(source=str(p), profile=board, pin_factory=hw["pin_factory"],
                 key_width=key_width, readers=tuple(readers))


def factory_name(configured: str | None) -> str:
    """The agent.tools pin factory for a config's hardware.pin_factory ("auto" is lgpio on a Pi)."""
    return "mock" if configured == "mock" else "lgpio"


def board_or_none(path: str | os.PathLike[str]) -> Board | None:
    """The board's config when it can be used, else None: for a tool given its hardware
    explicitly (--profile, --serial, --wiegand), which still takes the config's pin factory
    and key width when there is one."""
    try:
        return read_board(path)
    except BoardConfigError:
        return None
