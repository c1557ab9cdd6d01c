"""``gate-agent bundle``: everything one gate needs, to copy onto a fresh card.

    gate-agent bundle --site school-17 --gate main-1 --config region.toml \\
        --ca ca.pem --cert school-17_main-1.pem --key school-17_main-1.key \\
        --trusted-key region-2026=region-2026.key.pub [--broker mqtt.region.example:8883] \\
        --out DIR [--no-download] [--python-version 3.11 --python-version 3.13]

Run on the regional side (from a checkout of this repository), once per
gate. DIR gets what goes onto the card's boot partition, as it is::

    DIR/user-data                   cloud-init (Raspberry Pi OS from October 2025): runs the installer
    DIR/gate-agent/README.txt       the technician's steps
    DIR/gate-agent/firstrun.sh      the first-boot installer (bundle/firstrun.sh)
    DIR/gate-agent/boot-config.txt  the board profile's config.txt lines (relays off from power-on)
    DIR/gate-agent/cmdline.txt.append   for Raspberry Pi OS bookworm: the first-boot entry
    DIR/gate-agent/user-data.snippet    the runcmd lines, to add to an Imager-written user-data
    DIR/gate-agent/MANIFEST.sha256  checksums, verified on the board before anything is installed
    DIR/gate-agent/src/gate-agent-VERSION.tar.gz   the agent's source (git archive of HEAD)
    DIR/gate-agent/wheels/          its dependencies for aarch64 (MISSING.txt: what could not be fetched)
    DIR/gate-agent/gate/            agent.toml, ca.pem, gate.pem, gate.key (0600)

The config is the region's template with this gate's site, id, broker,
certificates (relative paths: the same file is checked here and used in
/etc/gate-agent) and trusted keys written in. The keys (``--trusted-key
NAME=KEY``, ``--trusted-keys-file FILE``: see provision.gather_trusted_keys)
go into ``[commands.trusted_keys]`` as base64, each checked to be a real
Ed25519 public key; the gate trusts exactly those (without any, the
template's own). A gate that would trust no key refuses every list and
command, so such a bundle is refused unless ``--no-trusted-keys``. The
certificate must be made out to this gate (CN ``{site}/{gate}``: the broker
knows a gate by it). The config is checked with agent.config before
anything is written, so a bundle that would not start is never made.
The fastpath is compiled on the board by install.sh where gcc is present;
otherwise the pure twin runs and the service says so.

``--no-download`` leaves the wheels out (tests, or a region whose boards
have network): the README says so and the installer fetches them. Binary
wheels (cryptography, cffi, jsonschema-rs) are fetched for manylinux aarch64
and each Python version asked for (Raspberry Pi OS bookworm has 3.11,
trixie 3.13).

Exit codes: 0 made; 1 made, but some wheels could not be fetched (listed);
2 bad input (nothing made).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.i18n import _
from agent.tools.words import config_message

from .provision import (
    ProvisionError,
    add_trusted_key_options,
    check_certificates,
    config_trusts_something,
    gather_trusted_keys,
    no_keys_message,
    parse_broker,
    replace_toml_table,
    set_toml_values,
)

__all__ = [
    "BINARY_PACKAGES",
    "PURE_PACKAGES",
    "BundleError",
    "BundleResult",
    "add_bundle_parser",
    "make_bundle",
]

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "bundle"
# Pure-Python dependencies and the build requirements (pip builds the agent offline on the board).
PURE_PACKAGES = ("paho-mqtt", "pyserial", "gpiozero", "colorzero", "tzdata", "setuptools", "wheel", "Cython")
# Compiled: wheels for the board's platform, where the registry has them.
BINARY_PACKAGES = ("cryptography", "jsonschema-rs")
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
PYTHON_VERSIONS = ("3.11", "3.13")
BOOT_DIR = "/boot/firmware"  # where the boot partition is mounted on bookworm and later
BOOT_CONFIG_FILE = "boot-config.txt"  # in the bundle's gate-agent/: the profile's config.txt lines
EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
# The tree a source archive holds when this is not a git checkout.
SOURCE_PATHS = ("agent", "fastpath", "systemd", "hardware", "examples", "docs", "bundle", "mosquitto",
                "install.sh", "uninstall.sh", "setup.py", "pyproject.toml", "README.md", "Makefile")


class BundleError(ValueError):
    """Input that cannot make a bundle; the message says what to fix."""


@dataclass
class BundleResult:
    out: Path
    files: list[str] = field(default_factory=list)
    missing_wheels: list[str] = field(default_factory=list)
    downloaded: bool = False
    source_note: str = ""
    warnings: list[str] = field(default_factory=list)
    trusted_keys: list[str] = field(default_factory=list)  # the names the gate trusts
    boot_lines: list[str] = field(default_factory=list)  # the profile's config.txt lines


# --------------------------------------------------------------------------- pieces


def _boot_lines(board: Any) -> list[str]:
    """The profile's config.txt lines, checked to be plain lines: firstrun.sh puts them, as
    they are, in a block of its own under [all] on the boot partition."""
    lines = list(getattr(board, "boot_config", ()) or ())
    for line in lines:
        if not line.strip() or any(ord(c) < 32 or ord(c) == 127 for c in line) or line.lstrip().startswith(("[", "#")):
            raise BundleError(_("the board profile {name}'s boot_config line {line!r} is not one config.txt "
                                "setting (no section, comment or control character); fix the profile")
                              .format(name=board.name, line=line))
    return lines


def _boot_config_text(profile: str, lines: list[str]) -> str:
    """gate-agent/boot-config.txt: what firstrun.sh puts into config.txt (after its [all])."""
    head = (f"# profile {profile}: keep every relay off from power-on (hardware/config.txt.snippet)\n"
            if lines else f"# profile {profile} has no boot lines: config.txt is left as it is\n")
    return head + "".join(line.strip() + "\n" for line in lines)


def _legacy_trusted_keys(values: list[str]) -> tuple[list[str], list[str]]:
    """The old --trusted-keys ID=FILE|FILE ...: as --trusted-key and --trusted-keys-file."""
    keys = [v for v in values if "=" in v]
    files = [v for v in values if "=" not in v]
    return keys, files


def _source_archive(repo: Path, dest: Path) -> str:
    """The agent's source as a .tar.gz with one top folder; returns a note on what it holds."""
    prefix = f"gate-agent-{__version__}/"
    if (repo / ".git").exists() and shutil.which("git"):
        res = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar.gz", f"--prefix={prefix}",
                              "-o", str(dest), "HEAD"], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, check=False).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, check=False).stdout.strip()
            note = _("source: git commit {commit}").format(commit=head)
            if dirty:
                note += _(" (uncommitted changes in the checkout are NOT in the bundle)")
            return note
    with tarfile.open(dest, "w:gz") as tar:
        for rel in SOURCE_PATHS:
            p = repo / rel
            if p.exists():
                tar.add(p, arcname=prefix + rel,
                        filter=lambda ti: None if "__pycache__" in ti.name or ti.name.endswith((".so", ".pyc"))
                        else ti)
    return _("source: the files of {dir} (not a git checkout)").format(dir=repo)


def download_wheels(dest: Path, python_versions: tuple[str, ...] = PYTHON_VERSIONS) -> list[str]:
    """pip download every dependency for aarch64 into dest; returns what could not be fetched."""
    missing: list[str] = []
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--dest", str(dest), "--only-binary=:all:", "--implementation", "cp"]
    for plat in PLATFORMS:
        base += ["--platform", plat]
    for version in python_versions:
        for pkg in (*PURE_PACKAGES, *BINARY_PACKAGES):
            res = subprocess.run([*base, "--python-version", version, pkg], capture_output=True, text=True,
                                 check=False)
            if res.returncode != 0:
                why = (res.stderr.strip().splitlines() or ["?"])[-1]
                missing.append(f"{pkg} (Python {version}): {why}")
    return missing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _readme(site: str, gate: str, result: BundleResult) -> str:
    if result.downloaded and not result.missing_wheels:
        wheels = _("wheels/ holds every dependency: no network is needed to install.")
    elif result.downloaded:
        wheels = _("wheels/ lacks some dependencies (wheels/MISSING.txt): the board needs network to fetch "
                   "them from PyPI during the install.")
    else:
        wheels = _("The bundle holds no wheels (made with --no-download): the board needs network during the "
                   "install to fetch the dependencies from PyPI.")
    steps = _(
        "gate-agent bundle for gate {site}/{gate}\n"
        "\n"
        "1. Write Raspberry Pi OS Lite (64-bit) to the card (Raspberry Pi Imager).\n"
        "2. Open the card's boot partition (\"bootfs\") on the laptop and copy EVERYTHING from this bundle's\n"
        "   folder onto it: the folder gate-agent/ and the file user-data (next to config.txt).\n"
        "   - Raspberry Pi OS from October 2025 (trixie): user-data starts the installer. If Imager already\n"
        "     wrote a user-data (user, Wi-Fi, SSH), keep it and add the lines of gate-agent/user-data.snippet\n"
        "     at its end instead of replacing it.\n"
        "   - Raspberry Pi OS bookworm: open cmdline.txt and add the text of gate-agent/cmdline.txt.append\n"
        "     at the end of its only line (same line, one space before).\n"
        "3. Put the card into the gate's Raspberry Pi, connect the network if there is one, power on.\n"
        "   The first start takes several minutes (bookworm reboots once by itself).\n"
        "4. Check: sudo gate-agent doctor (over SSH or a keyboard). From a laptop: gate-agent/firstrun.log on\n"
        "   the boot partition tells what happened; the folder gate-agent/gate/ (the private key) is gone.\n"
        "\n"
        "{wheels}\n"
        "{source}\n"
        "The agent's fastpath is compiled on the board when gcc and python3-dev are there (install.sh\n"
        "installs them when the network is up); otherwise the slower pure-Python twin runs and says so.\n"
        "The card holds this gate's private key until the first start: keep it safe until then.\n"
    ).format(site=site, gate=gate, wheels=wheels, source=result.source_note)
    if result.boot_lines:
        steps += _(
            "At the first start the installer also writes the board profile's line into config.txt ({lines}):\n"
            "the relays stay off from power-on. The original is kept as config.txt.gate-agent.bak; the firmware\n"
            "reads the line from the next start on.\n").format(lines="; ".join(result.boot_lines))
    return steps


# --------------------------------------------------------------------------- the bundle


def make_bundle(*, site: str, gate: str, config: Path, out: Path, ca: Path, cert: Path, key: Path,
                trusted_keys: Mapping[str, str] | None = None, no_trusted_keys: bool = False,
                broker: str | None = None, download: bool = True,
                python_versions: tuple[str, ...] = PYTHON_VERSIONS, repo: Path = REPO,
                hostname: str | None = None) -> BundleResult:
    """Make the bundle in ``out``; BundleError for bad input (then ``out`` is not touched).

    trusted_keys: name -> base64 (checked: provision.gather_trusted_keys); the gate trusts
    exactly these. None or empty: the template's own keys; a gate that would trust none is
    refused unless no_trusted_keys."""
    if trusted_keys and no_trusted_keys:
        raise BundleError(_("give the trusted keys or --no-trusted-keys, not both"))
    from agent.contract import ContractError, topics

    try:
        topics(site, gate)
    except ContractError as exc:
        raise BundleError(str(exc)) from None
    try:
        info = check_certificates(ca, cert, key)
        host_port = parse_broker(broker) if broker else None
        template = config.read_text(encoding="utf-8")
    except ProvisionError as exc:
        raise BundleError(str(exc)) from None
    except OSError as exc:
        raise BundleError(_("config template {path} cannot be read ({error})").format(
            path=config, error=exc.strerror)) from None
    if not (TEMPLATES / "firstrun.sh").is_file():
        raise BundleError(_("bundle/firstrun.sh is missing: run gate-agent bundle from the source tree"))

    # The broker knows a gate by its certificate's CN, "{site}/{gate}" (docs/security.md): a card made
    # with another gate's certificate would connect, then be refused every topic of its own.
    if info is None or info.subject_cn != f"{site}/{gate}":
        cn = info.subject_cn if info is not None else None
        raise BundleError(
            _("--cert {path} is made out to {cn}, but this gate is {ident}: the broker would refuse this gate's "
              "topics. Give this gate's certificate (CN {ident}), or check --site and --gate")
            .format(path=cert, cn=repr(cn) if cn else _("no CN"), ident=f"{site}/{gate}"))

    result = BundleResult(out=out)

    updates: list[tuple[str, str, Any]] = [("site", "id", site), ("site", "gate", gate),
                                           ("mqtt.tls", "ca_file", "ca.pem"),
                                           ("mqtt.tls", "cert_file", "gate.pem"),
                                           ("mqtt.tls", "key_file", "gate.key")]
    if host_port is not None:
        updates.insert(2, ("mqtt", "host", host_port[0]))
        if host_port[1] is not None:
            updates.insert(3, ("mqtt", "port", host_port[1]))
    try:
        if trusted_keys:
            template = replace_toml_table(template, "commands.trusted_keys", dict(trusted_keys))
        elif not config_trusts_something(template) and not no_trusted_keys:
            raise BundleError(no_keys_message())
        text = set_toml_values(template, updates)
    except ProvisionError as exc:
        raise BundleError(str(exc)) from None
    result.trusted_keys = list(tomllib.loads(text).get("commands", {}).get("trusted_keys", {}))

    # Built in a temporary folder beside out and checked whole before it takes out's place.
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        ga = stage / "gate-agent"
        gate_dir = ga / "gate"
        gate_dir.mkdir(parents=True, mode=0o700)
        os.chmod(gate_dir, 0o700)  # a private key lives here until the first boot
        _write(gate_dir / "agent.toml", text, 0o600)
        _write(gate_dir / "ca.pem", ca.read_bytes())
        _write(gate_dir / "gate.pem", cert.read_bytes())
        _write(gate_dir / "gate.key", key.read_bytes(), 0o600)

        from agent.config import ConfigError, load_config

        try:
            cfg = load_config(gate_dir / "agent.toml")
        except ConfigError as exc:
            lines = "\n".join(f"  - {w}: {config_message(m)}" if w else f"  - {config_message(m)}" for w, m in exc.errors)
            raise BundleError(_("the gate's config would not start; fix the template {path} (or the options):\n"
                                "{lines}").format(path=config, lines=lines)) from None

        (ga / "src").mkdir()
        result.source_note = _source_archive(repo, ga / "src" / f"gate-agent-{__version__}.tar.gz")
        wheels = ga / "wheels"
        wheels.mkdir()
        if download:
            result.downloaded = True
            result.missing_wheels = download_wheels(wheels, python_versions)
            if result.missing_wheels:
                _write(wheels / "MISSING.txt", "\n".join(result.missing_wheels) + "\n")
        else:
            _write(wheels / "MISSING.txt", _("made with --no-download: every dependency comes from the network "
                                             "during the install") + "\n")

        board = cfg.hardware.board
        result.boot_lines = _boot_lines(board)
        _write(ga / BOOT_CONFIG_FILE, _boot_config_text(board.name, result.boot_lines))
        shutil.copyfile(TEMPLATES / "firstrun.sh", ga / "firstrun.sh")
        os.chmod(ga / "firstrun.sh", 0o755)
        name = hostname or f"gate-{site}-{gate}"[:63]
        user_data = ((TEMPLATES / "user-data.template").read_text(encoding="utf-8")
                     .replace("{{SITE}}", site).replace("{{GATE}}", gate).replace("{{HOSTNAME}}", name))
        _write(stage / "user-data", user_data)
        _write(ga / "user-data.snippet", f"runcmd:\n  - [bash, {BOOT_DIR}/gate-agent/firstrun.sh]\n")
        _write(ga / "cmdline.txt.append",
               f" systemd.run={BOOT_DIR}/gate-agent/firstrun.sh systemd.run_success_action=reboot "
               "systemd.unit=kernel-command-line.target\n")
        _write(ga / "README.txt", _readme(site, gate, result))

        manifest = []
        for p in sorted(ga.rglob("*")):
            if p.is_file() and p.name != "MANIFEST.sha256":
                manifest.append(f"{_sha256(p)}  {p.relative_to(ga).as_posix()}")
        _write(ga / "MANIFEST.sha256", "\n".join(manifest) + "\n")

        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
        os.chmod(out, 0o700)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    result.files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return result


# --------------------------------------------------------------------------- CLI


def _cmd_bundle(args: argparse.Namespace) -> int:
    prog = "gate-agent bundle"
    legacy_keys, legacy_files = _legacy_trusted_keys(args.trusted_keys or [])
    try:
        keys = gather_trusted_keys([*(args.trusted_key or []), *legacy_keys],
                                   [*(args.trusted_keys_file or []), *legacy_files])
        res = make_bundle(site=args.site, gate=args.gate, config=Path(args.config), out=Path(args.out),
                          ca=Path(args.ca), cert=Path(args.cert), key=Path(args.key),
                          trusted_keys=keys, no_trusted_keys=args.no_trusted_keys, broker=args.broker,
                          download=not args.no_download,
                          python_versions=tuple(args.python_version or PYTHON_VERSIONS),
                          hostname=args.hostname)
    except ProvisionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(_("{prog}: no bundle was made").format(prog=prog), file=sys.stderr)
        return EXIT_USAGE
    except BundleError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(_("{prog}: no bundle was made").format(prog=prog), file=sys.stderr)
        return EXIT_USAGE
    print(_("bundle for {site}/{gate} in {out}: files: {n}").format(site=args.site, gate=args.gate, out=res.out,
                                                                   n=len(res.files)))
    print(res.source_note)
    if res.trusted_keys:
        print(_("trusted keys (access lists and commands signed with them are taken): {names}").format(
            names=", ".join(res.trusted_keys)))
    else:
        print(_("warning: {text}").format(text=_("no trusted key (--no-trusted-keys): every access list and "
                                                 "command will be refused until keys are added")))
    if res.boot_lines:
        print(_("first boot adds to config.txt (relays off from power-on): {lines}").format(
            lines="; ".join(res.boot_lines)))
    for w in res.warnings:
        print(_("warning: {text}").format(text=w))
    print(_("it holds this gate's private key: keep it safe, delete it once the card is written"))
    if not res.downloaded:
        print(_("no wheels (--no-download): the board needs network during the install"))
        return EXIT_OK
    if res.missing_wheels:
        print(_("some wheels could not be fetched; the board fetches them from the network during the install:"),
              file=sys.stderr)
        for m in res.missing_wheels:
            print(f"  - {m}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def add_bundle_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bundle`` (func: args -> exit code) to a ``gate-agent`` subparsers object."""
    p = subparsers.add_parser(
        "bundle",
        help=_("make one gate's bundle for a fresh card: agent, wheels, installer, config, certificates, keys"),
        description=_("Make the files to copy onto a freshly written Raspberry Pi OS card for one gate; the "
                      "card installs the agent at its first start (docs/operations.md). Exit codes: 0 made, "
                      "1 made without some wheels, 2 bad input."),
    )
    p.add_argument("--site", required=True, help=_("the school's id"))
    p.add_argument("--gate", required=True, help=_("the gate's id within the school"))
    p.add_argument("--config", required=True, metavar="FILE", help=_("the region's config template (TOML)"))
    p.add_argument("--ca", required=True, metavar="FILE", help=_("the region's CA certificate (PEM)"))
    p.add_argument("--cert", required=True, metavar="FILE", help=_("this gate's certificate (PEM)"))
    p.add_argument("--key", required=True, metavar="FILE", help=_("this gate's private key (PEM)"))
    add_trusted_key_options(p)
    # The first form of this option (ID=FILE or FILE, several after one flag): still taken.
    p.add_argument("--trusted-keys", nargs="+", metavar="ID=FILE", help=argparse.SUPPRESS)
    p.add_argument("--broker", metavar="HOST[:PORT]", help=_("the broker, when the template does not name it"))
    p.add_argument("--out", required=True, metavar="DIR", help=_("where to make the bundle (replaced if present)"))
    p.add_argument("--no-download", action="store_true", help=_("no wheels: the board fetches them during the install"))
    p.add_argument("--python-version", action="append", metavar="X.Y",
                   help=_("the board's Python for the wheels (default 3.11 and 3.13; repeat for more)"))
    p.add_argument("--hostname", help=_("the board's host name (default gate-SITE-GATE)"))
    p.set_defaults(func=_cmd_bundle)
    return p
