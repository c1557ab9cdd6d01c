"""The console beside the demo (``make run``): two demo accounts and a console process.

    from agent.console.demo import start_demo_console
    proc = start_demo_console(work / "agent.toml", 8080)   # http://127.0.0.1:8080, demo/demo, guard/guard
    ...
    proc.terminate(); proc.wait(5)

Accounts: ``demo``/``demo`` (technician) and ``guard``/``guard`` (guard), in
``<state_dir>/console-accounts.json`` of the demo's config. Plain HTTP on
127.0.0.1: a demo, not a gate on a school network.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.console import ACCOUNTS_FILE, console_paths
from agent.console.accounts import Accounts

__all__ = ["DEMO_ACCOUNTS", "start_demo_console"]

DEMO_ACCOUNTS = (("demo", "technician", "demo"), ("guard", "guard", "guard"))


def start_demo_console(config_path: str | os.PathLike[str], port: int, *, bind: str = "127.0.0.1",
                       log: int | None = subprocess.DEVNULL) -> subprocess.Popen:
    """Write the demo accounts (again, if there) and start ``gate-agent console serve`` for the
    demo's config; the caller stops the process. ``log``: where its stderr goes."""
    paths = console_paths(str(config_path))
    state_dir = Path(paths["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    accounts = Accounts(state_dir / ACCOUNTS_FILE).load()
    for name, role, password in DEMO_ACCOUNTS:
        if name in accounts.accounts:
            accounts.remove(name)
        accounts.add(name, role, password)
    cmd = [sys.executable, "-m", "agent.cli", "console", "serve", "--config", str(config_path),
           "--bind", bind, "--port", str(int(port)), "--no-tls"]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
