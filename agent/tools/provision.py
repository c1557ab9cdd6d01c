"""``gate-agent provision``: give a board its identity.

    sudo gate-agent provision --site school-17 --gate main-1 --broker mqtt.region.example[:8883] \\
        [--ca ca.pem --cert gate.pem --key gate.key] [--config /etc/gate-agent/agent.toml] \\
        [--trusted-key region-2026=BASE64 ... | --trusted-keys-file keys.toml | --no-trusted-keys]

Writes the site, the gate id, the broker address, the certificate paths and
the region's trusted public keys (``[commands.trusted_keys]``: the board
trusts exactly the keys given; others are commented out) into the config,
keeping everything else in the file and its comments: a
key that is commented out in the installed example (``#host = ...``) is
uncommented in place, so the file stays readable. A missing config is made
from the commented example first. The certificates are copied next to the
config (``ca.pem``, ``gate.pem`` 0644, ``gate.key`` 0600 owned by the service
user: the service reads it, nobody else) unless they are there already; the
config is written atomically, mode 0640 root:gate-agent, the previous one
kept as ``agent.toml.bak``. Then the result is checked with agent.config and
the technician is told what to do next.

Each key is checked (base64 of 32 bytes that are a real Ed25519 public key;
a private key given by mistake is named as such: agent/tools/trustedkeys.py,
which bundle shares). A board that would trust no key refuses every signed
access list and command, so every card: without keys given, the config's own
keys are kept, and when it has none provision refuses unless told
``--no-trusted-keys``.

Exit codes: 0 written and valid; 1 written but the config still has
problems (listed, with their fix); 2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import re
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.exits import Exit
from agent.fileio import write_atomic
from agent.i18n import _
from agent.tools.trustedkeys import (
    TrustedKeyError,
    add_trusted_key_options,
    config_trusts_something,
    gather_trusted_keys,
    no_keys_message,
    report_trusted_keys,
)
from agent.tools.words import config_message

__all__ = [
    "CONFIG_MODE",
    "KEY_MODE",
    "CertInfo",
    "ProvisionError",
    "Result",
    "add_provision_parser",
    "check_certificates",
    "example_config_text",
    "parse_broker",
    "provision",
    "replace_toml_table",
    "service_ids",
    "set_toml_values",
]

SERVICE_USER = "gate-agent"
CONFIG_MODE = 0o640
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
EXIT_OK = Exit.OK
EXIT_INVALID = Exit.FAILED
EXIT_USAGE = Exit.USAGE
DEFAULT_CONFIG = Path("/etc/gate-agent/agent.toml")
EXAMPLE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "examples" / "agent.toml",  # a source checkout
    Path("/usr/share/gate-agent/agent.toml.example"),  # install.sh puts it here
)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_CERT_NAMES = {"ca": "ca.pem", "cert": "gate.pem", "key": "gate.key"}


class ProvisionError(ValueError):
    """Input that cannot be provisioned; the message says what to fix."""


# --------------------------------------------------------------------------- TOML text editing


_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_COMMENTED_HEADER = re.compile(r"^\s*#\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*#?\[")  # a table or array-of-tables header, live or commented


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    raise TypeError(f"cannot write {type(value).__name__} into the config")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _split_comment(rest: str) -> tuple[str, str]:
    """(value, trailing comment with its leading spaces) of what follows "key =";
    a "#" inside a string is not a comment."""
    quote: str | None = None
    i = 0
    while i < len(rest):
        c = rest[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#":
            j = i
            while j > 0 and rest[j - 1] in " \t":
                j -= 1
            return rest[:j], rest[j:]
        i += 1
    return rest.rstrip(), ""


def _region(lines: list[str], header: int) -> tuple[int, int]:
    """Lines after a header up to the next header (live or commented)."""
    end = header + 1
    while end < len(lines) and not _ANY_HEADER.match(lines[end]):
        end += 1
    return header + 1, end


def _find_table(lines: list[str], table: str) -> int:
    """The index of the live header of ``table``: uncomments ``#[table]`` or
    appends the table when the file has neither."""
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m and m.group(1) == table:
            return i
    for i, line in enumerate(lines):
        m = _COMMENTED_HEADER.match(line)
        if m and m.group(1) == table:
            comment = f" {m.group(2)}" if m.group(2) else ""
            lines[i] = f"[{table}]{comment}\n"
            return i
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if lines and lines[-1].strip():
        lines.append("\n")
    lines.append(f"[{table}]\n")
    return len(lines) - 1


def _set_one(lines: list[str], table: str, key: str, value: Any) -> None:
    header = _find_table(lines, table)
    start, end = _region(lines, header)
    kq = re.escape(key) + "|" + re.escape(json.dumps(key))
    live = re.compile(rf"^(\s*)({kq})\s*=(.*)$")
    commented = re.compile(rf"^(\s*)#\s*({kq})\s*=(.*)$")
    new = f"{_toml_key(key)} = {_toml_value(value)}"
    for pattern in (live, commented):
        for i in range(start, end):
            m = pattern.match(lines[i].rstrip("\n"))
            if m:
                _old, comment = _split_comment(m.group(3))
                lines[i] = f"{m.group(1)}{new}{comment}\n"
                return
    lines.insert(header + 1, new + "\n")


def set_toml_values(text: str, updates: list[tuple[str, str, Any]]) -> str:
    """Set ``table.key = value`` for each (table, key, value), keeping the rest
    of the file and its comments. Raises ProvisionError when the result does
    not read back with those values (a file too unusual to edit safely)."""
    lines = text.splitlines(keepends=True)
    for table, key, value in updates:
        _set_one(lines, table, key, value)
    out = "".join(lines)
    try:
        doc = tomllib.loads(out)
    except tomllib.TOMLDecodeError as exc:
        raise ProvisionError(
            _("the config could not be edited safely ({error}); edit it by hand").format(error=exc)
        ) from None
    for table, key, value in updates:
        node: Any = doc
        for part in table.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or node.get(key) != value:
            raise ProvisionError(
                _("the config could not be edited safely ({key} did not take the new value); edit it "
                  "by hand").format(key=f"{table}.{key}"))
    return out


def replace_toml_table(text: str, table: str, values: dict[str, Any]) -> str:
    """Make ``[table]`` hold exactly ``values``: each set where it stands (a commented example
    line is filled in), every other live key of the table commented out in place (so it can be
    seen, and a later run naming it again uncomments it). ProvisionError as set_toml_values."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if not (m and m.group(1) == table):
            continue
        start, end = _region(lines, i)
        for j in range(start, end):
            km = re.match(r'^(\s*)("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*=', lines[j])
            if not km:
                continue
            key = json.loads(km.group(2)) if km.group(2).startswith('"') else km.group(2)
            if key not in values:
                lines[j] = f"{km.group(1)}#{lines[j][len(km.group(1)):]}"
    out = set_toml_values("".join(lines), [(table, k, v) for k, v in values.items()])
    node: Any = tomllib.loads(out)
    for part in table.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if node != values:
        raise ProvisionError(_("the config could not be edited safely ({key} did not take the new value); edit it "
                               "by hand").format(key=table))
    return out


# --------------------------------------------------------------------------- inputs


def parse_broker(text: str) -> tuple[str, int | None]:
    """HOST, HOST:PORT, [v6]:PORT -> (host, port or None)."""
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None  # a bare IPv6 address or a host name
    if not host or any(c in host for c in " /#+"):
        raise ProvisionError(
            _("broker {value!r} is not HOST or HOST:PORT (e.g. mqtt.region.example:8883)").format(value=text))
    if port is None:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProvisionError(_("broker port {port!r} is not a number from 1 to 65535").format(port=port))
    return host, int(port)


def _check_name(what: str, value: str) -> None:
    if not _NAME.match(value or ""):
        raise ProvisionError(
            _("{what} {value!r} is not allowed: use 1 to 64 letters, digits, '_' or '-' (it becomes "
              "part of the MQTT topics)").format(what=what, value=value))


@dataclass(frozen=True)
class CertInfo:
    subject_cn: str | None
    not_after: datetime


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProvisionError(_("{what} {path} does not exist; give the right path").format(what=what, path=path)) from None
    except OSError as exc:
        raise ProvisionError(_("{what} {path} cannot be read ({error})").format(what=what, path=path, error=exc.strerror)) from None
    if b"-----BEGIN" not in data:
        raise ProvisionError(_("{what} {path} is not a PEM file (it has no -----BEGIN line)").format(what=what, path=path))
    return data


def check_certificates(ca: Path | None, cert: Path | None, key: Path | None) -> CertInfo | None:
    """Read the files and check they belong together; ProvisionError when not."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    if (cert is None) != (key is None):
        raise ProvisionError(_("give --cert and --key together (the gate's certificate and its private key)"))
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(_read_pem(ca, "--ca"))
        except ValueError as exc:
            raise ProvisionError(_("--ca {path} holds no certificate ({error})").format(path=ca, error=exc)) from None
    if cert is None or key is None:
        return None
    try:
        crt = x509.load_pem_x509_certificate(_read_pem(cert, "--cert"))
    except ValueError as exc:
        raise ProvisionError(_("--cert {path} is not a certificate ({error})").format(path=cert, error=exc)) from None
    try:
        private = serialization.load_pem_private_key(_read_pem(key, "--key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisionError(
            _("--key {path} is not an unencrypted private key ({error}); the service cannot type a "
              "passphrase").format(path=key, error=exc)) from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != crt.public_key().public_bytes(*raw):
        raise ProvisionError(
            _("--key {key} does not belong to --cert {cert}: give the key made with that certificate")
            .format(key=key, cert=cert))
    cns = crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertInfo(str(cns[0].value) if cns else None, crt.not_valid_after_utc)


# --------------------------------------------------------------------------- files


def example_config_text() -> str:
    """The commented example config (what install.sh puts in /etc/gate-agent)."""
    for p in EXAMPLE_CANDIDATES:
        if p.is_file():
            return p.read_text(encoding="utf-8")
    # Neither a checkout nor an install: a minimal file; check-config fills the defaults.
    return "# gate-agent configuration (docs/configuration.md)\n"


def service_ids(user: str = SERVICE_USER) -> tuple[int | None, int | None]:
    """(uid, gid) of the service user and group, None where they do not exist."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = None
    try:
        gid = grp.getgrnam(user).gr_gid
    except KeyError:
        gid = None
    return uid, gid


def _own(path: Path, uid: int | None, gid: int | None) -> None:
    """chown when running as root; an ordinary user keeps its own files (staging, tests)."""
    if os.geteuid() != 0:
        return
    os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


def _install_file(src: Path, dest: Path, mode: int, uid: int | None, gid: int | None) -> None:
    if src.resolve() != dest.resolve():
        write_atomic(dest, src.read_bytes(), mode=mode, uid=uid, gid=gid)
    else:
        os.chmod(dest, mode)
        _own(dest, uid, gid)


# --------------------------------------------------------------------------- provisioning


@dataclass
class Result:
    config: Path
    written: list[str]
    problems: list[tuple[str, str]]
    warnings: list[str]
    cert: CertInfo | None
    trusted_keys: list[str] = field(default_factory=list)  # the names the board trusts now
    removed_keys: list[str] = field(default_factory=list)  # trusted before, commented out now


def provision(config: Path, *, site: str, gate: str, broker: str, ca: Path | None = None,
              cert: Path | None = None, key: Path | None = None, user: str = SERVICE_USER,
              now: datetime | None = None, trusted_keys: dict[str, str] | None = None,
              no_trusted_keys: bool = False) -> Result:
    """Write the identity into ``config`` and check it; ProvisionError for bad input
    (then nothing is written).

    trusted_keys (name -> base64, see gather_trusted_keys): the board trusts exactly these
    afterwards (others in the config are commented out). None or empty keeps the config's
    keys; a board that then trusts none (and does not take unsigned lists) is refused unless
    no_trusted_keys."""
    if trusted_keys and no_trusted_keys:
        raise ProvisionError(_("give the trusted keys or --no-trusted-keys, not both"))
    _check_name("--site", site)
    _check_name("--gate", gate)
    host, port = parse_broker(broker)
    info = check_certificates(ca, cert, key)
    now = now or datetime.now(UTC)
    warnings: list[str] = []
    if info is not None:
        days = (info.not_after - now).total_seconds() / 86400
        if days <= 0:
            raise ProvisionError(
                _("--cert expired on {date}: ask the regional office for a new certificate")
                .format(date=info.not_after.date().isoformat()))
        if days < 30:
            warnings.append(_("the certificate expires in {days} days ({date}): ask for a new one soon")
                            .format(days=int(days), date=info.not_after.date().isoformat()))
        if info.subject_cn is not None and info.subject_cn != f"{site}/{gate}":
            warnings.append(
                _("the certificate is made out to {cn!r}, but this gate is {ident!r}: the broker will "
                  "refuse this gate's topics; check --site and --gate, or get the right certificate")
                .format(cn=info.subject_cn, ident=f"{site}/{gate}"))

    config = Path(config)
    folder = config.parent
    uid, gid = service_ids(user)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = config.read_text(encoding="utf-8") if config.exists() else example_config_text()
    except OSError as exc:
        raise ProvisionError(
            _("cannot use {path} ({error}); run with sudo").format(path=config, error=exc.strerror)) from None

    if cert is not None and ca is None:
        try:
            has_ca = bool(tomllib.loads(text).get("mqtt", {}).get("tls", {}).get("ca_file"))
        except (tomllib.TOMLDecodeError, AttributeError):
            has_ca = False
        if not has_ca:
            raise ProvisionError(_("give --ca too: TLS needs the region's CA certificate to trust the broker"))
    updates: list[tuple[str, str, Any]] = [("site", "id", site), ("site", "gate", gate), ("mqtt", "host", host)]
    if port is not None:
        updates.append(("mqtt", "port", port))
    files = {"ca": ca, "cert": cert, "key": key}
    targets = {what: folder / _CERT_NAMES[what] for what, src in files.items() if src is not None}
    for what, target in targets.items():
        # The service reads paths in a config relative to that config's folder: a config given
        # by a relative path (prov/agent.toml) must name its files by bare name, not "prov/ca.pem"
        # (which would mean prov/prov/ca.pem). An absolute config keeps absolute paths.
        written_as = str(target) if folder.is_absolute() else _CERT_NAMES[what]
        updates.append(("mqtt.tls", f"{what}_file", written_as))
    before = _trusted_names(text)
    if trusted_keys:
        text = replace_toml_table(text, "commands.trusted_keys", dict(trusted_keys))
    elif not config_trusts_something(text) and not no_trusted_keys:
        raise ProvisionError(no_keys_message())
    new_text = set_toml_values(text, updates)
    after = _trusted_names(new_text)

    written: list[str] = []
    try:
        for what, target in targets.items():
            src = files[what]
            assert src is not None
            if what == "key":
                _install_file(src, target, KEY_MODE, uid, gid)  # the service user reads it, nobody else
            else:
                _install_file(src, target, PUBLIC_MODE, None, None)
            written.append(str(target))
        if config.exists():
            write_atomic(config.with_name(config.name + ".bak"), config.read_bytes(), mode=CONFIG_MODE, uid=0, gid=gid)
        write_atomic(config, new_text.encode("utf-8"), mode=CONFIG_MODE, uid=0, gid=gid)
        written.append(str(config))
    except OSError as exc:
        raise ProvisionError(
            _("cannot write {path} ({error}); run with sudo").format(path=exc.filename or folder,
                                                                      error=exc.strerror)) from None

    from agent.config import ConfigError, load_config

    problems: list[tuple[str, str]] = []
    try:
        cfg = load_config(config)
        warnings.extend(config_message(w) for w in cfg.warnings())  # in the user's language
    except ConfigError as exc:
        problems = [(where, config_message(msg)) for where, msg in exc.errors]
    return Result(config, written, problems, warnings, info, after, [k for k in before if k not in after])


def _trusted_names(text: str) -> list[str]:
    try:
        keys = tomllib.loads(text).get("commands", {}).get("trusted_keys", {})
    except (tomllib.TOMLDecodeError, AttributeError):
        return []
    return list(keys) if isinstance(keys, dict) else []


# --------------------------------------------------------------------------- CLI


def _cmd_provision(args: argparse.Namespace) -> int:
    prog = "gate-agent provision"
    try:
        keys = gather_trusted_keys(args.trusted_key or [], args.trusted_keys_file or [])
        res = provision(Path(args.config), site=args.site, gate=args.gate, broker=args.broker,
                        ca=Path(args.ca) if args.ca else None, cert=Path(args.cert) if args.cert else None,
                        key=Path(args.key) if args.key else None, trusted_keys=keys,
                        no_trusted_keys=args.no_trusted_keys)
    except (ProvisionError, TrustedKeyError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(_("{prog}: nothing was written").format(prog=prog), file=sys.stderr)
        return EXIT_USAGE
    for path in res.written:
        print(_("written: {path}").format(path=path))
    if res.cert is not None:
        print(_("certificate: {cn}, valid until {date}").format(
            cn=res.cert.subject_cn or "?", date=res.cert.not_after.date().isoformat()))
    report_trusted_keys(res.trusted_keys)
    if res.removed_keys:
        print(_("no longer trusted (commented out in the config): {names}").format(names=", ".join(res.removed_keys)))
    for w in res.warnings:
        print(_("warning: {text}").format(text=w))
    if res.problems:
        print(_("the config {path} still has problems; fix these and check again with "
                "gate-agent check-config {path}:").format(path=res.config), file=sys.stderr)
        for where, msg in res.problems:
            print(f"  - {where}: {msg}" if where else f"  - {msg}", file=sys.stderr)
        return EXIT_INVALID
    print(_("OK: the config is valid. Next:"))
    print(_("  1. sudo systemctl restart gate-agent   (starts the agent with this identity)"))
    print(_("  2. sudo gate-agent doctor              (checks wiring, broker, clock, disk)"))
    return EXIT_OK


def add_provision_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``provision`` (func: args -> exit code) to a ``gate-agent`` subparsers object."""
    p = subparsers.add_parser(
        "provision",
        help=_("write this gate's site, id, broker and certificates into the config"),
        description=_("Write the site, the gate id, the broker address and the certificate paths into "
                      "the config, keeping its other settings and comments; copy the certificates next "
                      "to it with safe modes; check the result. Exit codes: 0 valid, 1 written but "
                      "still invalid, 2 bad input (nothing written)."),
    )
    p.add_argument("--site", required=True, help=_("the school's id from the regional server"))
    p.add_argument("--gate", required=True, help=_("this turnstile's id within the school"))
    p.add_argument("--broker", required=True, metavar="HOST[:PORT]", help=_("the regional MQTT broker"))
    p.add_argument("--ca", metavar="FILE", help=_("the region's CA certificate (PEM)"))
    p.add_argument("--cert", metavar="FILE", help=_("this gate's certificate (PEM)"))
    p.add_argument("--key", metavar="FILE", help=_("this gate's private key (PEM)"))
    add_trusted_key_options(p)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE",
                   help=_("config file (default {path})").format(path=DEFAULT_CONFIG))
    p.set_defaults(func=_cmd_provision)
    return p

