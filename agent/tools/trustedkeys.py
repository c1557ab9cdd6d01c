"""The region's public keys a board trusts: read, checked, reported
(``gate-agent provision`` and ``gate-agent bundle``).

A key comes as ``--trusted-key NAME=KEY`` (base64, or the path of keygen's
``.pub`` or a PEM public key) or in a ``--trusted-keys-file`` (keygen's
``.pub``, a PEM, ``NAME = "KEY"`` lines, a copied ``[commands.trusted_keys]``
table, or plain ``NAME=KEY`` lines); ``gather_trusted_keys`` gives every one
checked, NAME -> base64. Each is checked to be a real Ed25519 public key (a
private key given by mistake is named as such), so a wrong key is named at
the bench, not after every list pushed to the gate is refused. Writing them
into the config is the caller's (``provision.replace_toml_table``).

Errors are ``TrustedKeyError``; the message says what to fix.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import re
import tomllib
from pathlib import Path
from typing import Any

from agent.i18n import _

__all__ = [
    "KEY_NAME",
    "TrustedKeyError",
    "add_trusted_key_options",
    "config_trusts_something",
    "ed25519_point_problem",
    "gather_trusted_keys",
    "no_keys_message",
    "read_trusted_keys_file",
    "report_trusted_keys",
    "trusted_key_arg",
]


class TrustedKeyError(ValueError):
    """A trusted key (or its file) that cannot be used; the message says what to fix."""


# The region signs access lists and commands with Ed25519 (docs/security.md); a gate takes
# them only when it trusts the signing key. A board without a trusted key refuses every list
# and command, so provision and bundle ask for the region's keys and check each one here:
# not only its length but that its 32 bytes are a point of the curve (RFC 8032, 5.1.3) of
# more than small order, so a mistyped key or a key of another kind is named now, not after
# every list pushed to the gate is refused as ``bad_signature``.

KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _edwards_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Twisted Edwards addition (a = -1), complete: no case needs special handling."""
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, -1, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P
    return x3, y3


def ed25519_point_problem(raw: bytes) -> str | None:
    """Why 32 bytes are not a usable Ed25519 public key, or None when they are."""
    if len(raw) != 32:
        return _("it has {n} bytes; an Ed25519 public key has 32").format(n=len(raw))
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return _("it is not a point of the Ed25519 curve (not in canonical form)")
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P or (x == 0 and sign):
        return _("it is not a point of the Ed25519 curve: a mistyped or damaged key, or a key of another kind")
    if x & 1 != sign:
        x = _P - x
    point = (x, y)
    for _i in range(3):  # times 8: the identity only for the few points of small order
        point = _edwards_add(point, point)
    if point == (0, 1):
        return _("it is a point of small order, which any signature could match: not a real key")
    return None


def _b64_32(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _key_problem_text(name: str, where: str, why: str) -> TrustedKeyError:
    return TrustedKeyError(
        _("trusted key {name} ({where}): {why}; give the public key gate-agent keygen printed (base64, 44 "
          "characters ending in '=') or its .pub file").format(name=name, where=where, why=why))


def _key_from_pem(name: str, path: Path, data: bytes) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if b"PRIVATE KEY" in data:
        raise TrustedKeyError(
            _("trusted key {name}: {path} is a PRIVATE key; give its public half (the {path}.pub that gate-agent "
              "keygen wrote, or the line it printed): a signing key never goes on a gate")
            .format(name=name, path=path))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise _key_problem_text(name, str(path), str(exc)) from None
    if not isinstance(key, Ed25519PublicKey):
        raise _key_problem_text(name, str(path), _("it holds a {kind}, not an Ed25519 key").format(
            kind=type(key).__name__.lstrip("_")))
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _checked_key(name, str(path), raw)


def _checked_key(name: str, where: str, raw: bytes) -> str:
    why = ed25519_point_problem(raw)
    if why is not None:
        raise _key_problem_text(name, where, why)
    return base64.b64encode(raw).decode("ascii")


def _check_key_name(name: str, where: str) -> None:
    if not KEY_NAME.match(name):
        raise TrustedKeyError(
            _("trusted key name {name!r} ({where}) is not usable: 1 to 64 letters, digits, '.', '_' or '-' (the "
              "--key-id the region signs with)").format(name=name, where=where))


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TrustedKeyError(_("{what} {path} does not exist; give the right path").format(what=what, path=path)) from None
    except IsADirectoryError:
        raise TrustedKeyError(_("{what} {path} is a folder, not a file").format(what=what, path=path)) from None
    except OSError as exc:
        raise TrustedKeyError(_("{what} {path} cannot be read ({error})").format(
            what=what, path=path, error=exc.strerror)) from None
    if len(data) > 64 * 1024:
        raise TrustedKeyError(_("{what} {path} is too large for a list of public keys").format(what=what, path=path))
    return data


def _key_value(name: str, value: str, where: str, base: Path | None = None) -> str:
    """A key given as base64, or as the path of a file holding it (keygen's .pub, or PEM)."""
    raw = _b64_32(value)
    if raw is not None:  # base64 may hold "/": a value that decodes to 32 bytes is a key, not a path
        return _checked_key(name, where, raw)
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not value.strip() or not path.is_file():
        raise _key_problem_text(name, where, _("{value!r} is neither an Ed25519 public key in base64 nor a file")
                                .format(value=value[:200]))
    data = _read_key_file(path, _("trusted key {name}").format(name=name))
    if b"-----BEGIN" in data:
        return _key_from_pem(name, path, data)
    text = data.decode("ascii", errors="replace").strip()
    raw = _b64_32(text)
    if raw is None:
        raise _key_problem_text(name, str(path), _("it does not hold one base64 key of 32 bytes"))
    return _checked_key(name, str(path), raw)


def trusted_key_arg(spec: str) -> tuple[str, str]:
    """``NAME=BASE64`` or ``NAME=FILE`` (a --trusted-key) -> (name, base64 of the 32 raw bytes)."""
    name, sep, value = spec.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value or _b64_32(spec) is not None:  # a bare key ends in "=" too
        raise TrustedKeyError(
            _("--trusted-key {spec!r}: give NAME=KEY, e.g. region-2026=<the base64 gate-agent keygen printed>")
            .format(spec=spec[:60]))
    _check_key_name(name, "--trusted-key")
    return name, _key_value(name, value, f"--trusted-key {name}")


def _name_from_file(path: Path) -> str:
    name = path.name
    for suffix in (".pub", ".pem", ".key"):
        name = name.removesuffix(suffix)
    return name


def read_trusted_keys_file(path: Path) -> dict[str, str]:
    """The keys of a --trusted-keys-file: NAME -> base64.

    Accepted: the ``.pub`` file ``gate-agent keygen`` writes (one base64 key; the name is the
    file's, ``region-2026.key.pub`` -> ``region-2026``) or a PEM public key, named the same way;
    a TOML file of ``NAME = "KEY"`` lines (the line keygen prints), also as a
    ``[commands.trusted_keys]`` table copied from a gate's config; or plain ``NAME=KEY`` lines.
    ``#`` starts a comment. A KEY may be a file path, relative to this file's folder."""
    path = Path(path)
    what = "--trusted-keys-file"
    data = _read_key_file(path, what)
    if b"-----BEGIN" in data:
        name = _name_from_file(path)
        _check_key_name(name, f"{what} {path}")
        return {name: _key_from_pem(name, path, data)}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TrustedKeyError(_("{what} {path} is not a text file").format(what=what, path=path)) from None
    meaningful = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(meaningful) == 1 and _b64_32(meaningful[0]) is not None:  # keygen's NAME.key.pub
        name = _name_from_file(path)
        _check_key_name(name, f"{what} {path}")
        return {name: _checked_key(name, str(path), _b64_32(meaningful[0]) or b"")}
    entries: list[tuple[str, str, str]] = []  # name, value, where
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        doc = None
    if doc is not None:
        table: Any = doc
        for part in ("commands", "trusted_keys"):
            if isinstance(table, dict) and isinstance(table.get(part), dict):
                table = table[part]
        for name, value in table.items():
            if not isinstance(value, str):
                raise TrustedKeyError(
                    _("{what} {path}: {name} is not NAME = \"KEY\" (a table? give the keys one per line)")
                    .format(what=what, path=path, name=name))
            entries.append((name, value, f"{path}"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            name, value = name.strip().strip("\"'"), value.strip().strip("\"'")
            if not sep or not name or not value:
                raise TrustedKeyError(_("{what} {path} line {n}: {line!r} is not NAME=KEY").format(
                    what=what, path=path, n=n, line=line[:60]))
            entries.append((name, value, f"{path} line {n}"))
    if not entries:
        # A commented line stays a comment (a key taken out of service is commented out), even the
        # one keygen prints after "# ": say so rather than guess.
        raise TrustedKeyError(_("{what} {path} holds no key (a line starting with # is a comment: copy the line "
                               "gate-agent keygen printed without its '# ')").format(what=what, path=path))
    keys: dict[str, str] = {}
    for name, value, where in entries:
        _check_key_name(name, where)
        if name in keys:
            raise TrustedKeyError(_("{what} {path}: the name {name} is given twice").format(
                what=what, path=path, name=name))
        keys[name] = _key_value(name, value, where, base=path.parent)
    return keys


def gather_trusted_keys(keys: list[str] | tuple[str, ...] = (),
                        files: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Every --trusted-key NAME=KEY and --trusted-keys-file FILE, checked: NAME -> base64.
    One name given twice with two different keys is an error; the same key twice is not."""
    out: dict[str, str] = {}

    def add(name: str, b64: str) -> None:
        if out.get(name, b64) != b64:
            raise TrustedKeyError(_("trusted key {name} is given twice, with two different keys: keep one")
                                 .format(name=name))
        out[name] = b64

    for spec in keys:
        add(*trusted_key_arg(spec))
    for f in files:
        for name, b64 in read_trusted_keys_file(Path(f)).items():
            add(name, b64)
    return out


def config_trusts_something(text: str) -> bool:
    """Whether a config (its text) could take a list: a trusted key, or unsigned lists (a lab)."""
    try:
        commands = tomllib.loads(text).get("commands", {})
    except tomllib.TOMLDecodeError:
        return False
    if not isinstance(commands, dict):
        return False
    keys = commands.get("trusted_keys", {})
    return bool(keys) or commands.get("allow_unsigned") is True


def report_trusted_keys(names: list[str] | tuple[str, ...]) -> None:
    """What provision and bundle print about the keys the board will trust (or a warning)."""
    if names:
        print(_("trusted keys (access lists and commands signed with them are taken): {names}").format(
            names=", ".join(names)))
    else:
        print(_("warning: {text}").format(text=_("no trusted key (--no-trusted-keys): every access list and "
                                                 "command will be refused until keys are added")))


def no_keys_message() -> str:
    """Why a board without a trusted key is refused, and the two ways on."""
    return _("no trusted key: this board would refuse every access list and command, so every card too. Give "
             "the region's public keys (the regional office has them): --trusted-key NAME=KEY (the line "
             "gate-agent keygen printed, or its .pub file) or --trusted-keys-file FILE. To make the board "
             "without them anyway (a bench board; keys added later to [commands.trusted_keys]), give "
             "--no-trusted-keys")


def add_trusted_key_options(p: argparse.ArgumentParser) -> None:
    """--trusted-key, --trusted-keys-file, --no-trusted-keys (provision and bundle)."""
    p.add_argument("--trusted-key", action="append", metavar="NAME=KEY",
                   help=_("a public key of the region that signs access lists and commands: NAME is its "
                          "--key-id, KEY the base64 gate-agent keygen printed or its .pub file (repeat for a "
                          "rotation); the board trusts exactly the keys given"))
    p.add_argument("--trusted-keys-file", action="append", metavar="FILE",
                   help=_("the region's public keys from a file: lines NAME = \"KEY\" (as gate-agent keygen "
                          "prints them; a [commands.trusted_keys] table works too) or NAME=KEY, or one .pub "
                          "file of gate-agent keygen (named after the file)"))
    p.add_argument("--no-trusted-keys", action="store_true",
                   help=_("make the board even though it trusts no key: it refuses every access list and "
                          "command until keys are added"))
