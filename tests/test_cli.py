"""The gate-agent entry point itself: --version, and a reader that goes away (`| head`)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_the_package_version():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--version"], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"gate-agent {want}"


def _closed_reader(args: list[str]) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reading end is closed before the tool writes: every
    write gets EPIPE, as with `gate-agent ... | head` once head has exited."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    return subprocess.CompletedProcess(args, code, "", err)


def test_a_reader_that_goes_away_ends_the_tool_without_a_traceback():
    scenario = ROOT / "examples" / "scenarios" / "rush.toml"
    for args in (["simulate", "--trace-io", str(scenario)], ["--help"]):
        res = _closed_reader(args)
        assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, (args, res.stderr)
    # The stopped run says so by its exit code, as a tool killed by SIGPIPE would.
    assert _closed_reader(["simulate", "--trace-io", str(scenario)]).returncode == 141
