"""``gate-agent bundle``: everything one gate needs, to copy onto a fresh card.

    gate-agent bundle --site school-17 --gate main-1 --config region.toml \\
        --ca ca.pem --cert school-17_main-1.pem --key school-17_main-1.key \\
        --trusted-key region-2026=region-2026.key.pub [--broker mqtt.region.example:8883] \\
        --out DIR [--card BOOTFS] [--no-download] [--python-version 3.11 --python-version 3.13]

Run on the regional side (from a checkout of this repository), once per
gate. DIR gets what goes onto the card's boot partition::

    DIR/gate-agent/README.txt       the technician's steps
    DIR/gate-agent/user-data        cloud-init (Raspberry Pi OS from October 2025): runs the installer;
                                    for a card without a user-data of its own
    DIR/gate-agent/firstrun.sh      the first-boot installer (bundle/firstrun.sh)
    DIR/gate-agent/boot-config.txt  the board profile's config.txt lines (relays off from power-on)
    DIR/gate-agent/cmdline.txt.append   for Raspberry Pi OS bookworm: the first-boot entry
    DIR/gate-agent/user-data.snippet    the runcmd line, to add to an Imager-written user-data
    DIR/gate-agent/MANIFEST.sha256  checksums, verified on the board before anything is installed
    DIR/gate-agent/src/gate-agent-VERSION.tar.gz   the agent's source (git archive of HEAD)
    DIR/gate-agent/wheels/          its dependencies for aarch64 (MISSING.txt: what could not be fetched)
    DIR/gate-agent/gate/            agent.toml, ca.pem, gate.pem, gate.key (0600)

``--card BOOTFS`` (the card's mounted boot partition) also puts the bundle
on the card: gate-agent/ beside config.txt, and the first-boot line merged
into the user-data Raspberry Pi Imager wrote (user, Wi-Fi, SSH are kept; the
original is kept as user-data.gate-agent.bak), or ours when there is none.
A user-data it cannot merge safely is refused with what to do, and nothing
is written to the card. user-data is not at the top of DIR, so copying the
whole of DIR by hand never replaces Imager's.

The config is the region's template with this gate's site, id, broker,
certificates (relative paths: the same file is checked here and used in
/etc/gate-agent) and trusted keys written in. The keys (``--trusted-key
NAME=KEY``, ``--trusted-keys-file FILE``: see trustedkeys.gather_trusted_keys)
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

Some 620 lines on purpose: one command, its steps in order (the source
archive, the wheels, the config, the README, the checksums, the user-data
merge and the card), each a function of this command alone.
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
from agent.exits import Exit
from agent.i18n import _
from agent.tools.words import config_message

from .provision import (
    ProvisionError,
    check_certificates,
    parse_broker,
    replace_toml_table,
    set_toml_values,
)
from .trustedkeys import (
    TrustedKeyError,
    add_trusted_key_options,
    config_trusts_something,
    gather_trusted_keys,
    no_keys_message,
    report_trusted_keys,
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
PURE_PACKAGES = ("paho-mqtt", "pyserial", "gpiozero", "colorzero", "tzdata", "setuptools", "wheel", "Cython",
                 "Babel")
# Compiled: wheels for the board's platform, where the registry has them.
BINARY_PACKAGES = ("cryptography", "jsonschema-rs")
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
PYTHON_VERSIONS = ("3.11", "3.13")
BOOT_DIR = "/boot/firmware"  # where the boot partition is mounted on bookworm and later
BOOT_CONFIG_FILE = "boot-config.txt"  # in the bundle's gate-agent/: the profile's config.txt lines
EXIT_OK = Exit.OK
EXIT_PARTIAL = Exit.FAILED
EXIT_USAGE = Exit.USAGE
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
    hostname: str = ""
    card_notes: list[str] = field(default_factory=list)  # what --card did on the card


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


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # safe.directory: git refuses a checkout owned by another user ("dubious ownership"), e.g.
    # a technician's clone used with sudo, or a copied one. The agent's own code is already
    # running from this checkout, so reading it with git trusts nothing new.
    return subprocess.run(["git", "-c", f"safe.directory={repo}", "-C", str(repo), *args],
                          capture_output=True, text=True, check=False)


def _source_archive(repo: Path, dest: Path) -> str:
    """The agent's source as a .tar.gz with one top folder; returns a note on what it holds."""
    prefix = f"gate-agent-{__version__}/"
    why = _("not a git checkout")
    if (repo / ".git").exists():  # a directory in a clone, a file in a worktree
        if not shutil.which("git"):
            why = _("git is not installed, so the checkout's commit cannot be read")
        else:
            res = _git(repo, "archive", "--format=tar.gz", f"--prefix={prefix}", "-o", str(dest), "HEAD")
            if res.returncode == 0:
                head = _git(repo, "rev-parse", "--short", "HEAD").stdout.strip()
                dirty = _git(repo, "status", "--porcelain", "--untracked-files=no").stdout.strip()
                note = _("source: git commit {commit}").format(commit=head)
                if dirty:
                    note += _(" (uncommitted changes in the checkout are NOT in the bundle)")
                return note
            error = next((line.strip() for line in res.stderr.splitlines() if line.strip()), "?")
            why = _("git could not read the checkout: {error}").format(error=error)
    with tarfile.open(dest, "w:gz") as tar:
        for rel in SOURCE_PATHS:
            p = repo / rel
            if p.exists():
                tar.add(p, arcname=prefix + rel,
                        filter=lambda ti: None if "__pycache__" in ti.name or ti.name.endswith((".so", ".pyc"))
                        else ti)
    return _("source: the files of {dir} as they are ({why})").format(dir=repo, why=why)


FIRSTRUN_ITEM = f"[bash, {BOOT_DIR}/gate-agent/firstrun.sh]"


def _top_key(line: str, key: str) -> bool:
    return line.startswith(f"{key}:") and (line[len(key) + 1:len(key) + 2] in ("", " ", "\t", "\r"))


def merge_user_data(existing: str, hostname: str) -> tuple[str, list[str]]:
    """A card's user-data (Raspberry Pi Imager's: user, Wi-Fi, SSH) with gate-agent's
    first-boot line added to its runcmd; returns (text, notes). Everything else is kept as
    written (a text edit, not a YAML rewrite). BundleError when it cannot be merged safely."""
    notes: list[str] = []
    if "gate-agent/firstrun.sh" in existing:
        return existing, [_("the card's user-data already starts gate-agent's installer: left as it is")]
    nl = "\r\n" if "\r\n" in existing else "\n"
    lines = existing.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    if first != "#cloud-config":
        raise BundleError(_("the card's user-data does not start with #cloud-config, so it cannot be merged "
                            "safely; add the line of gate-agent/user-data.snippet to it by hand, or remove it "
                            "if it is not needed"))
    runcmd = [i for i, ln in enumerate(lines) if _top_key(ln, "runcmd")]
    if len(runcmd) > 1:
        raise BundleError(_("the card's user-data has runcmd twice; keep one, then run again"))
    item = f"- {FIRSTRUN_ITEM}"
    if runcmd:
        at = runcmd[0]
        rest = lines[at].split(":", 1)[1].strip()
        if rest and not rest.startswith("#"):
            raise BundleError(_("the card's user-data writes runcmd on one line ({line!r}); add the line of "
                                "gate-agent/user-data.snippet to it by hand").format(line=lines[at].strip()))
        end = at + 1  # the block: indented lines, list items, blank lines and comments below the key
        last = at
        indent = "  "
        seen_item = False
        while end < len(lines):
            ln = lines[end]
            if ln.strip() and not (ln[0] in " \t-" or ln.lstrip().startswith("#")):
                break
            if ln.strip() and not ln.lstrip().startswith("#"):
                last = end
                if not seen_item and ln.lstrip().startswith("-"):
                    indent = ln[:len(ln) - len(ln.lstrip())]
                    seen_item = True
            end += 1
        lines.insert(last + 1, indent + item)
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["runcmd:", "  " + item]
    if not any(_top_key(ln, "hostname") for ln in lines):
        lines.insert(lines.index(next(ln for ln in lines if ln.strip() == "#cloud-config")) + 1,
                     f"hostname: {hostname}")
    else:
        notes.append(_("the card's user-data names the board's host name itself: kept"))
    notes.insert(0, _("the card's user-data (Raspberry Pi Imager's: user, Wi-Fi, SSH) is kept; gate-agent's "
                      "first-boot line is added to its runcmd"))
    return nl.join(lines) + nl, notes


def _looks_like_boot_partition(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("config.txt", "cmdline.txt"))


def put_on_card(bundle: Path, card: Path, hostname: str) -> list[str]:
    """Put a made bundle onto a card's mounted boot partition: gate-agent/ beside config.txt,
    the first-boot line merged into the card's user-data (see merge_user_data). Returns
    notes; BundleError (nothing written) when the folder is no boot partition or its
    user-data cannot be merged."""
    card = Path(card)
    if not card.is_dir() or not _looks_like_boot_partition(card):
        raise BundleError(_("--card {path} is not a card's boot partition (no config.txt or cmdline.txt in it): "
                            "give the folder where the card's bootfs is mounted, e.g. /media/$USER/bootfs")
                          .format(path=card))
    ours = (bundle / "gate-agent" / "user-data").read_text(encoding="utf-8")
    target = card / "user-data"
    notes: list[str] = []
    merged = None
    if target.exists():
        try:
            existing = target.read_bytes().decode("utf-8")  # as written: its line ends kept
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(_("the card's user-data cannot be read ({error}); nothing was written to the card")
                              .format(error=exc)) from None
        merged, notes = merge_user_data(existing, hostname)
    try:
        tmp = card / ".gate-agent.new"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle / "gate-agent", tmp)
        shutil.rmtree(card / "gate-agent", ignore_errors=True)
        os.replace(tmp, card / "gate-agent")
        new = ours if merged is None else merged
        if merged is None:
            notes.append(_("the card had no user-data: gate-agent's is written"))
        elif merged != existing:
            backup = card / "user-data.gate-agent.bak"
            if not backup.exists():
                _write(backup, existing)
        if merged is None or merged != existing:
            # Whole or not at all: a card pulled out mid-write keeps the old user-data.
            _write(card / ".user-data.new", new)
            os.replace(card / ".user-data.new", target)
    except OSError as exc:
        raise BundleError(_("cannot write to the card {path} ({error}): is it mounted writable and not full?")
                          .format(path=card, error=exc.strerror or exc)) from None
    return notes


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


def _user_data_warning() -> str:
    return _("IMPORTANT: user-data. Raspberry Pi OS from October 2025 starts the installer from the card's "
             "user-data. If Raspberry Pi Imager set a user, Wi-Fi or SSH, the card already has a user-data: do "
             "NOT replace it. Best: gate-agent bundle ... --card BOOTFS merges it. By hand: add the line of "
             "gate-agent/user-data.snippet inside its runcmd:. A card without user-data: copy gate-agent/user-data "
             "next to config.txt.")


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
        "2. Open the card's boot partition (\"bootfs\") on the laptop and copy the folder gate-agent/ onto it\n"
        "   (next to config.txt); or make the bundle with --card BOOTFS, which does this and step 2a.\n"
        "   a) Raspberry Pi OS from October 2025 (trixie): user-data starts the installer. If the card has a\n"
        "     user-data (Imager writes one for a user, Wi-Fi, SSH), do not replace it: add the line of\n"
        "     gate-agent/user-data.snippet inside its runcmd: list. Else copy gate-agent/user-data next to config.txt.\n"
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
    # First, where it cannot be missed: the one step that can lose the technician's own settings.
    steps = _user_data_warning() + "\n\n" + steps
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

    trusted_keys: name -> base64 (checked: trustedkeys.gather_trusted_keys); the gate trusts
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
    if Path(out).is_dir() and _looks_like_boot_partition(Path(out)):
        raise BundleError(_("--out {path} is a card's boot partition: it would be replaced whole. Give an empty "
                            "folder for --out, and --card {path} to put the bundle on the card")
                          .format(path=out))
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
        # Not at the top of the bundle: copying the bundle onto a card must never replace the
        # user-data Imager wrote (user, Wi-Fi, SSH). --card merges; README says the rest.
        _write(ga / "user-data", user_data)
        _write(ga / "user-data.snippet", _(
            "# Add the line below to the card's user-data, inside its runcmd: list (a second runcmd:\n"
            "# would replace Imager's). With no runcmd: in the file, add both lines at its end.\n")
            + f"runcmd:\n  - {FIRSTRUN_ITEM}\n")
        result.hostname = name
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
    except (ProvisionError, TrustedKeyError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(_("{prog}: no bundle was made").format(prog=prog), file=sys.stderr)
        return EXIT_USAGE
    except BundleError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(_("{prog}: no bundle was made").format(prog=prog), file=sys.stderr)
        return EXIT_USAGE
    if args.card:
        try:
            res.card_notes = put_on_card(res.out, Path(args.card), res.hostname)
        except BundleError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            print(_("{prog}: the bundle is in {out}, but nothing was written to the card").format(
                prog=prog, out=res.out), file=sys.stderr)
            return EXIT_USAGE
    code = _report(args, res)
    if args.card:
        print(_("on the card {card}:").format(card=args.card))
        for note in res.card_notes:
            print(f"  - {note}")
    else:
        # Last, on its own, where it is read: the step that can lose Imager's settings.
        print(_("warning: {text}").format(text=_user_data_warning()), file=sys.stderr)
    return code


def _report(args: argparse.Namespace, res: BundleResult) -> int:
    print(_("bundle for {site}/{gate} in {out}: files: {n}").format(site=args.site, gate=args.gate, out=res.out,
                                                                   n=len(res.files)))
    print(res.source_note)
    report_trusted_keys(res.trusted_keys)
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
    p.add_argument("--card", metavar="BOOTFS",
                   help=_("also put the bundle on this card's mounted boot partition, merging the user-data "
                          "Raspberry Pi Imager wrote"))
    p.add_argument("--no-download", action="store_true", help=_("no wheels: the board fetches them during the install"))
    p.add_argument("--python-version", action="append", metavar="X.Y",
                   help=_("the board's Python for the wheels (default 3.11 and 3.13; repeat for more)"))
    p.add_argument("--hostname", help=_("the board's host name (default gate-SITE-GATE)"))
    p.set_defaults(func=_cmd_bundle)
    return p
