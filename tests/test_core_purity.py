"""The core stays pure: no threads, clocks, GPIO, sockets or third-party I/O."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "agent" / "core"
ALLOWED_TOP = {
    "__future__", "array", "bisect", "calendar", "collections", "dataclasses", "datetime",
    "enum", "functools", "importlib", "itertools", "json", "math", "operator", "re", "typing",
    "zoneinfo", "fastpath", "agent", "jsonschema_rs", "heapq", "types", "string", "hashlib",
    "copy", "abc", "numbers", "struct", "binascii",
}
FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic"), ("datetime", "now"), ("datetime", "utcnow"),
                   ("date", "today"), ("time", "sleep")}


# Pure modules outside the core, held to the same rules: the uplink's delivery window (sans-I/O).
PURE_ELSEWHERE = [CORE.parent / "uplink" / "window.py"]


def core_files():
    return sorted(p for p in CORE.glob("*.py")) + PURE_ELSEWHERE


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_core_module_imports_only_pure_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            assert top in ALLOWED_TOP, f"{path.name} imports {name}: the core may not do I/O"
            assert not name.startswith("agent.") or name.startswith("agent.core") or name == "agent", (
                f"{path.name} imports {name}: the core must not import adapters"
            )


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_core_module_reads_no_clock(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            assert (owner_name, node.func.attr) not in FORBIDDEN_CALLS, (
                f"{path.name}:{node.lineno} calls {owner_name}.{node.func.attr}: the caller gives the core its time"
            )


# Dependencies go one way: the technician's tools use the adapters and the config, never the
# service that wires them (a tool must run, and say what is wrong, where the service cannot start).
AGENT = CORE.parent
ONE_WAY = [
    (sorted((AGENT / "tools").glob("*.py")), "agent.service"),
    # check-config and every tool read the config: it must not pull in the uplink (nor paho).
    ([AGENT / "config.py"], "agent.uplink"),
    ([AGENT / "config.py"], "paho"),
    # The uplink carries records; what the agent runs on is the service's to tell it.
    (sorted((AGENT / "uplink").glob("*.py")), "fastpath"),
    # The gate (its service and its board's tools) runs without the regional side.
    (sorted([*(AGENT / "core").glob("*.py"), *(AGENT / "hw").glob("*.py"), *(AGENT / "uplink").glob("*.py"),
             *(AGENT / "downlink").glob("*.py"), *(AGENT / "tools").rglob("*.py"), AGENT / "runtime.py",
             AGENT / "service.py", AGENT / "config.py"]), "agent.regional"),
]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize(("paths", "forbidden"), ONE_WAY,
                         ids=[f"{p[0].parent.name}/{p[0].name}-{f}" for p, f in ONE_WAY])
def test_dependencies_go_one_way(paths, forbidden):
    assert paths, "no module found: the layout changed"
    bad = [f"{p.relative_to(AGENT.parent)}:{line} imports {name}" for p in paths for line, name in _imports(p)
           if name == forbidden or name.startswith(forbidden + ".")]
    assert not bad, f"these must not import {forbidden}:\n" + "\n".join(bad)


def test_the_one_way_check_sees_a_function_level_import(tmp_path):
    mod = tmp_path / "tool.py"
    mod.write_text("def f():\n    from agent.service import make_pin_factory\n    return make_pin_factory\n")
    assert (2, "agent.service") in _imports(mod)


def test_every_exit_code_constant_is_one_of_the_shared_codes():
    """One set of exit codes (agent.exits.Exit): a module's EXIT_* name is an alias of one, never
    a bare number that could drift from what cli.py and the docs say."""
    import importlib

    from agent.exits import Exit

    found = 0
    for path in sorted(AGENT.rglob("*.py")):
        text = path.read_text()
        if "EXIT_" not in text:
            continue
        module = importlib.import_module(".".join(path.relative_to(AGENT.parent).with_suffix("").parts))
        for name in dir(module):
            if name.startswith("EXIT_"):
                found += 1
                assert isinstance(getattr(module, name), Exit), f"{module.__name__}.{name} is not an agent.exits.Exit"
    assert found >= 20
