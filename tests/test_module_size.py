"""Modules sized to one job (issue 13, item 4): every module of agent/ and
fastpath/ opens with a docstring saying what it is for, and one over
``LIMIT`` lines says in that docstring how big it is and why ("Some 720
lines on purpose: one state machine ...").

The size must be stated as a figure ("720 lines", "1,450 lines") so that a
module which keeps growing is caught again: past half as much again as the
largest figure its docstring states, the statement is stale and the module
is listed until someone restates it (or splits the module).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "fastpath")
LIMIT = 600  # the "~500 lines", with room for the odd helper
STALE = 1.5  # a module this many times its stated size must restate it
SIZE = re.compile(r"\b(\d{1,3}(?:,\d{3})+|\d{3,})\s+lines\b")


_PYX_DOCSTRING = re.compile(r'\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*(?:"""(.*?)"""|\'\'\'(.*?)\'\'\')', re.DOTALL)


def modules() -> list[Path]:
    """Every Python and Cython source of the two packages (not generated C, not caches)."""
    found = []
    for package in PACKAGES:
        for pattern in ("*.py", "*.pyx"):
            found += [p for p in (ROOT / package).rglob(pattern) if "__pycache__" not in p.parts]
    return sorted(found)


def docstring(path: Path) -> str | None:
    """The module's docstring: ast for Python; for Cython, the string literal
    that opens the file (after comment lines such as ``# cython:`` directives)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".pyx":
        m = _PYX_DOCSTRING.match(text)
        return (m.group(1) if m.group(1) is not None else m.group(2)).strip() if m else None
    return ast.get_docstring(ast.parse(text, filename=str(path)))


def stated_sizes(doc: str) -> list[int]:
    """Every "NNN lines" / "N,NNN lines" figure in a docstring (line breaks allowed between)."""
    return [int(n.replace(",", "")) for n in SIZE.findall(doc)]


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_packages_have_modules_of_both_kinds():
    names = {rel(p) for p in modules()}
    assert "agent/core/turnstile.py" in names and "fastpath/_compiled.pyx" in names


def test_every_module_opens_with_what_it_is_for():
    missing = [rel(p) for p in modules() if not (docstring(p) or "").strip()]
    assert not missing, "these modules do not open with a docstring saying what they are for: " \
        + ", ".join(missing)


def test_every_module_over_the_limit_states_its_size_and_why():
    offenders = []
    for path in modules():
        n = lines(path)
        if n <= LIMIT:
            continue
        sizes = stated_sizes(docstring(path) or "")
        if not sizes:
            offenders.append(f"{rel(path)} ({n:,} lines): no size stated")
        elif n > STALE * max(sizes):
            offenders.append(f"{rel(path)} ({n:,} lines): states {max(sizes):,}, restate it")
    assert not offenders, (
        f"modules over {LIMIT} lines must say in their docstring how big they are and why "
        f'("Some 720 lines on purpose: one state machine ..."), or be split where they do '
        "two jobs:\n  " + "\n  ".join(offenders))


def test_the_size_check_reads_figures_the_way_docstrings_write_them():
    assert stated_sizes("one class of some\n1,400 lines on purpose") == [1400]
    assert stated_sizes("Some 720 lines on purpose") == [720]
    assert stated_sizes("a 26-bit frame, 3 lines of output, 12 lines") == []
    assert docstring(ROOT / "fastpath" / "_compiled.pyx").startswith("The compiled fastpath twin")
