"""Shared by the benchmarks: merge a result into bench/results.json.

Every benchmark writes its own key; `write_result` merges under a lock and
replaces the file atomically, so benchmarks may run one after another or at
the same time without losing each other's figures. The machine the figures
were measured on is recorded under "machine".
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def machine_info() -> dict[str, Any]:
    """What the figures depend on: platform, Python, CPU count and model."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                # x86: "model name"; Raspberry Pi: "Model" (the board).
                if line.startswith(("model name", "Model")):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def write_result(key: str, value: dict, path: str | os.PathLike = "bench/results.json") -> Path:
    """Merge `value` under `key` into the results file; returns its path.

    A relative `path` is taken from the repository root, wherever the
    benchmark was started. Other keys are kept; "machine" is refreshed.
    """
    target = Path(path)
    if not target.is_absolute():
        target = ROOT / target
    target.parent.mkdir(parents=True, exist_ok=True)
    # flock on the directory: no extra lock file, and it survives os.replace of the file.
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        data: dict[str, Any] = {}
        if target.exists():
            try:
                data = json.loads(target.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{target} is not valid JSON ({exc}); fix or delete it, then run the "
                    "benchmark again"
                ) from None
            if not isinstance(data, dict):
                raise ValueError(f"{target} does not hold a JSON object; delete it and rerun")
        data[key] = value
        data["machine"] = machine_info()
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        fcntl.flock(dir_fd, fcntl.LOCK_UN)
        os.close(dir_fd)
    return target


if __name__ == "__main__":  # print the machine info
    json.dump(machine_info(), sys.stdout, indent=2)
    print()
