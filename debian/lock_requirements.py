#!/usr/bin/env python3
"""Pin the Python packages the Debian package bundles, with their hashes.

    .venv/bin/python debian/lock_requirements.py        # rewrites debian/requirements*.txt

Resolves pyproject.toml's dependencies (and the osdp extra) and its build
requirements to exact versions, downloads every wheel a Debian 12 board can use
(CPython 3.11, glibc 2.36, x86_64 and aarch64) straight from PyPI, and writes
each pin with the sha256 of every such file. The package build then installs
from those files only (`pip --require-hashes --no-index`): the same versions
on every architecture and every build, and a file that does not match its
hash is refused. Run it after changing a dependency in pyproject.toml, or to
take newer versions; commit both files. Needs network access to PyPI.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
ARCHES = ("x86_64", "aarch64")
# Debian 12's glibc is 2.36: any manylinux tag up to it runs there.
GLIBC_MINOR = range(36, 16, -1)
EXTRAS = ("osdp",)  # optional extras the package carries (OSDP readers)


def platforms(arch: str) -> list[str]:
    tags = [f"manylinux_2_{m}_{arch}" for m in GLIBC_MINOR]
    return [*tags, f"manylinux2014_{arch}"]


def pip_download(dest: Path, reqs: list[str], arch: str, deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "--isolated", "download", "--quiet", "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp",
           "--abi", "cp311", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in platforms(arch):
        cmd += ["--platform", p]
    if not deps:
        cmd.append("--no-deps")
    subprocess.run(cmd + reqs, check=True)


def name_version(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def lock(top_level: list[str], out: Path, header: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp, ARCHES[0])
        pip_download(first, top_level, ARCHES[0], deps=True)
        pins = sorted({name_version(w) for w in first.glob("*.whl")})
        for arch in ARCHES[1:]:
            pip_download(Path(tmp, arch), [f"{n}=={v}" for n, v in pins], arch, deps=False)
        files: dict[tuple[str, str], set[str]] = {}
        for wheel in Path(tmp).glob("*/*.whl"):
            files.setdefault(name_version(wheel), set()).add(
                hashlib.sha256(wheel.read_bytes()).hexdigest())
    lines = [header]
    for (name, version), hashes in sorted(files.items()):
        lines.append(f"{name}=={version} \\")
        lines += [f"    --hash=sha256:{h}" for h in sorted(hashes)]
        lines[-len(hashes):-1] = [line + " \\" for line in lines[-len(hashes):-1]]
    out.write_text("\n".join(lines) + "\n")
    print(f"{out.relative_to(TOP)}: {len(files)} packages")


def main() -> int:
    project = tomllib.loads((TOP / "pyproject.toml").read_text())
    runtime = list(project["project"]["dependencies"])
    for extra in EXTRAS:
        runtime += project["project"]["optional-dependencies"][extra]
    build = list(project["build-system"]["requires"])
    note = ("# Written by debian/lock_requirements.py from pyproject.toml: do not edit by hand.\n"
            "# Every wheel for CPython 3.11 on Debian 12 (x86_64, aarch64), with its sha256.")
    lock(runtime, HERE / "requirements.txt", note + "\n# What /opt/gate-agent/venv holds.")
    lock(build, HERE / "requirements-build.txt", note + "\n# What builds the agent's wheel.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
