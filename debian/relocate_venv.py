#!/usr/bin/env python3
"""Make a virtual environment built in the package tree run from its final path.

    relocate_venv.py STAGED FINAL [--system-site-packages] [--forbid PATH ...]

pip and venv write the path they ran in (debian/gate-agent/opt/gate-agent/venv)
into the scripts' shebangs, the activate scripts, pyvenv.cfg's `command` and
direct_url.json. This rewrites each to FINAL (/opt/gate-agent/venv), updates
the RECORD lines of the files it changed (so `pip check`/`pip show -f` stay
right), and then fails, naming the files, if any file under STAGED still holds
the staged path or a --forbid path (the source tree): a package that works on
the build machine only is caught here, not on a board.

--system-site-packages sets include-system-site-packages = true in pyvenv.cfg
after the build: the board's python3-lgpio (Raspberry Pi OS) is then
importable, while the build itself installed every package into the venv.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import sys
from pathlib import Path


def record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def fix_records(venv: Path, changed: dict[Path, bytes | None]) -> None:
    """Rewrite RECORD rows of changed files (None: the file was removed)."""
    for record in venv.glob("lib/python3*/site-packages/*.dist-info/RECORD"):
        site = record.parent.parent
        rows = list(csv.reader(io.StringIO(record.read_text())))
        out, touched = [], False
        for row in rows:
            path = (site / row[0]).resolve() if row else None
            if path is not None and path in changed:
                touched = True
                data = changed[path]
                if data is None:
                    continue
                row = [row[0], record_hash(data), str(len(data))]
            out.append(row)
        if touched:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(out)
            record.write_text(buf.getvalue())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("staged", type=Path)
    ap.add_argument("final")
    ap.add_argument("--system-site-packages", action="store_true")
    ap.add_argument("--forbid", action="append", default=[])
    args = ap.parse_args(argv)
    venv = args.staged.resolve()
    old, new = str(venv).encode(), args.final.encode()
    changed: dict[Path, bytes | None] = {}

    for script in sorted((venv / "bin").iterdir()):
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        if old in data:
            data = data.replace(old, new)
            script.write_bytes(data)
            changed[script.resolve()] = data

    # A wheel installed from a file records where that file was; it says nothing on a board.
    for direct in venv.glob("lib/python3*/site-packages/*.dist-info/direct_url.json"):
        changed[direct.resolve()] = None
        direct.unlink()

    cfg = venv / "pyvenv.cfg"
    lines = []
    for line in cfg.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "command":
            continue  # the build's command line, build path included; venv needs it not
        if key == "include-system-site-packages":
            line = f"include-system-site-packages = {'true' if args.system_site_packages else 'false'}"
        lines.append(line)
    cfg.write_text("\n".join(lines) + "\n")

    fix_records(venv, changed)

    forbidden = [old] + [p.encode() for p in args.forbid]
    leaks = []
    for path in sorted(venv.rglob("*")):
        if path.is_symlink():
            target = str(path.readlink()).encode()
            if any(f in target for f in forbidden):
                leaks.append(path)
        elif path.is_file() and any(f in path.read_bytes() for f in forbidden):
            leaks.append(path)
    if leaks:
        for path in leaks:
            print(f"relocate_venv: {path.relative_to(venv)} still names the build path", file=sys.stderr)
        return 1
    print(f"relocate_venv: {venv} -> {args.final}: {len(changed)} files rewritten, no build path left")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
