"""docs/design.md, the design document the code cites, stays true to the repository.

The code cites it by section ("docs/design.md#decision-rules") or by principle
("docs/design.md, principle 2"). These tests fail when a cited section or
principle is missing, when one of its links leads nowhere (a file, or a heading
of another page), when a module path it names is not in the repository, when
its module tree misses a top-level directory or package, or when the dependency
rule it states is broken.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

# The sections the citations in the code use (the lead's mapping from the old
# outside brief to this page), and the principles they cite by number.
CITED_ANCHORS = (
    "purpose-and-users",
    "principles",
    "layers-and-modules",
    "threads-and-queues",
    "decision-rules",
    "the-order-of-checks",
    "anti-passback",
    "fire",
    "field-facts",
    "turnstile-control-inputs",
    "fire-alarm-input",
    "wiegand",
    "em-marine-cards-and-the-rdm6300",
    "systemd-units-checked-offline",
    "raspberry-pi",
    "testing-wiegand-on-mock-pins",
    "mqtt-5-acknowledgements",
    "the-contract",
    "where-next",
)
PRINCIPLES = {
    1: "the gate never waits for the network or the disk",
    2: "nothing the gate did is lost",
    3: "safe for people first",
    4: "a pure core",
    5: "the hot path twice",
    6: "privacy by design",
}
TOP_DIRS = ("agent", "fastpath", "systemd", "hardware", "mosquitto", "debian", "scripts", "bench",
            "tests", "docs", "examples", "bundle", "fuzz")
PATH_RE = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP_DIRS) + r")/[\w./-]*)")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[tuple[int, str]]:
    """(level, text) of each Markdown heading outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.+)", line)):
            out.append((len(m.group(1)), m.group(2)))
    return out


def anchors(path: Path) -> set[str]:
    return {slug(text) for _, text in headings(path)}


def repo_files() -> set[str]:
    """Tracked files (git ls-files); a tree without git (an unpacked copy) lists its files."""
    try:
        res = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             check=True)
        files = set(res.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        files = set()
    if not files:
        files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts}
    return files


def in_repo(path: str, files: set[str]) -> bool:
    path = path.rstrip("/.")
    return path in files or any(f.startswith(path + "/") for f in files)


def text_outside_fences(path: Path) -> str:
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return "\n".join(lines)


def section(title: str) -> str:
    text = DESIGN.read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_cited_section_is_a_heading():
    missing = [a for a in CITED_ANCHORS if a not in anchors(DESIGN)]
    assert not missing, f"docs/design.md has no heading for #{', #'.join(missing)}"


def test_the_principles_are_numbered_one_to_six_under_their_heading():
    found = {}
    for line in section("Principles").splitlines():
        if m := re.match(r"### (\d+)\. (.+)", line):
            found[int(m.group(1))] = m.group(2).lower()
    assert sorted(found) == sorted(PRINCIPLES), f"principles found: {found}"
    for n, words in PRINCIPLES.items():
        assert found[n].startswith(words), f"principle {n} is {found[n]!r}, cited as {words!r}"


def test_every_citation_of_the_design_page_in_the_repository_resolves():
    """Code, tests and docs citing a section (docs/design.md#<anchor>) or a principle ("docs/design.md, principle <n>") name what exists."""
    have = anchors(DESIGN)
    problems = []
    for rel in sorted(repo_files()):
        if not rel.endswith((".py", ".pyx", ".md")) or not (ROOT / rel).is_file():
            continue
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"design\.md\)?#([\w-]+)", text):
            if m.group(1) not in have:
                problems.append(f"{rel}: #{m.group(1)} is no heading of docs/design.md")
        for m in re.finditer(r"design\.md\)?,? principles? ((?:\d+(?:, | and )?)+)", text):
            for n in map(int, re.findall(r"\d+", m.group(1))):
                if n not in PRINCIPLES:
                    problems.append(f"{rel}: docs/design.md has no principle {n}")
    assert not problems, "\n".join(problems)


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    problems = []
    for target in LINK_RE.findall(text_outside_fences(DESIGN)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (DESIGN.parent / path).resolve() if path else DESIGN
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} "
                            "does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: {dest.name} has no heading for #{anchor}")
    assert not problems, "\n".join(problems)


def test_every_path_it_names_is_in_the_repository():
    files = repo_files()
    named = set(PATH_RE.findall(DESIGN.read_text(encoding="utf-8")))
    assert len(named) > 60, f"only {len(named)} paths found: the extraction broke"
    missing = sorted(p for p in named if not in_repo(p, files))
    assert not missing, f"docs/design.md names paths that are not in the repository: {missing}"


def test_the_module_tree_names_every_top_level_directory_and_package():
    tree = section("Layers and modules").split("```", 2)[1]
    files = repo_files()
    tops = {f.split("/", 1)[0] for f in files if "/" in f and not f.startswith(".")}
    packages = {str(Path(f).parent) for f in files if f.startswith("agent/") and f.endswith("/__init__.py")}
    names = set(re.findall(r"^\s*(\S+/)\s", tree, re.MULTILINE))
    missing = sorted(d + "/" for d in tops | packages if d + "/" not in names)
    assert not missing, f"the module tree of docs/design.md misses {missing}"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


ADAPTERS = ("agent.hw", "agent.uplink", "agent.downlink")


@pytest.mark.parametrize("package", ADAPTERS)
def test_adapters_never_import_one_another(package):
    """The dependency rule of docs/design.md: hw, uplink and downlink meet only in the service."""
    others = [p for p in ADAPTERS if p != package]
    bad = [f"{path.relative_to(ROOT)} imports {name}"
           for path in sorted((ROOT / package.replace(".", "/")).glob("*.py"))
           for name in sorted(_imports(path))
           if any(name == o or name.startswith(o + ".") for o in others)]
    assert not bad, "\n".join(bad)


def test_the_runtime_imports_only_the_core_and_fastpath_imports_no_agent_module():
    runtime = {n for n in _imports(ROOT / "agent" / "runtime.py") if n.split(".")[0] in ("agent", "fastpath")}
    assert all(n.startswith("agent.core") for n in runtime), runtime
    for path in sorted((ROOT / "fastpath").glob("*.py")):
        assert not any(n.split(".")[0] == "agent" for n in _imports(path)), f"{path.name} imports agent"
    pyx = (ROOT / "fastpath" / "_compiled.pyx").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import|cimport) agent\b", pyx, re.MULTILINE)
