"""The console's accounts: a small JSON file of names, roles and scrypt hashes.

    {"version": 1, "accounts": {"ivanova": {"role": "guard", "hash": "scrypt$16384$8$1$<salt>$<key>",
                                            "created": "2026-09-01T07:00:00Z"}}}

The file (default ``<state_dir>/console-accounts.json``) is written atomically
with mode 0600 (agent/fileio.py): it holds password hashes. Each hash keeps its
own salt and scrypt parameters, so the parameters can be raised later without
invalidating old accounts. Standard library only (hashlib.scrypt): nothing to
build on the board.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from agent.core.events import CONSOLE_ACCOUNT
from agent.fileio import write_atomic
from agent.i18n import _

__all__ = ["ROLES", "Account", "AccountError", "Accounts", "hash_password", "verify_password"]

ROLES = ("guard", "technician")
MIN_PASSWORD = 4  # the demo's "demo"; docs/console.md asks for a long one
MAX_PASSWORD = 1024  # scrypt of a megabyte would be a way to burn the board's CPU
# scrypt: 16 MB and about 0.1 s on a Raspberry Pi 4 per check (OWASP's minimum is N=2^17 with
# r=8 at 128 MB: too much beside the gate; 2^14 is scrypt's own interactive-login figure).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
MAX_FILE_BYTES = 1 << 20


class AccountError(ValueError):
    """An account or the accounts file cannot be used; the message says what to do."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _maxmem(n: int, r: int, p: int) -> int:
    # What OpenSSL's scrypt needs (128*r*p for B, 128*r*(N+2) for V) and a little room.
    return 128 * r * (n + p + 2) + (1 << 16)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$key`` for a password (a fresh 16-byte salt each time)."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether a password matches a stored hash (constant-time comparison); False for a
    hash this code cannot read."""
    try:
        kind, n, r, p, salt, key = stored.split("$")
        n_, r_, p_ = int(n), int(r), int(p)
        if kind != "scrypt" or not (1 < n_ <= 1 << 18 and 0 < r_ <= 16 and 0 < p_ <= 4):
            return False
        want = base64.b64decode(key)
        got = hashlib.scrypt(password.encode("utf-8", "surrogatepass")[:MAX_PASSWORD * 4],
                             salt=base64.b64decode(salt), n=n_, r=r_, p=p_,
                             maxmem=_maxmem(n_, r_, p_), dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# A hash nobody's password matches, checked for an unknown account so that the answer
# takes as long as for a known one (no telling which names exist by the time it takes).
_DUMMY = hash_password(secrets.token_hex(8))


class Account:
    __slots__ = ("created", "hash", "name", "role")

    def __init__(self, name: str, role: str, hash_: str, created: str) -> None:
        self.name, self.role, self.hash, self.created = name, role, hash_, created

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "hash": self.hash, "created": self.created}


def check_name(name: str) -> str:
    if not CONSOLE_ACCOUNT.fullmatch(name or ""):  # what the agent's socket accepts as `account`
        raise AccountError(_("account name {name!r}: use 1..64 of the letters A-Z a-z, digits and . _ @ -").format(name=name))
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(_("the password is too short: at least {n} characters (better 12 or more)").format(n=MIN_PASSWORD))
    if len(password) > MAX_PASSWORD:
        raise AccountError(_("the password is too long: at most {n} characters").format(n=MAX_PASSWORD))
    return password


class Accounts:
    """The accounts file; ``load()`` reads it again (the console re-reads it when it changes,
    so `user del` takes effect without a restart)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.accounts: dict[str, Account] = {}
        self._stamp: tuple[int, int] | None = None

    def load(self) -> Accounts:
        """Read the file (a missing file: no accounts). AccountError for one that cannot be used."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.accounts, self._stamp = {}, None
            return self
        except OSError as exc:
            raise AccountError(_("cannot read {path} ({error}); run as the gate-agent user or with sudo").format(path=self.path, error=exc)) from None
        if st.st_size > MAX_FILE_BYTES:
            raise AccountError(_("{path} is over 1 MB: it is not an accounts file; move it away").format(path=self.path))
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            accounts = {}
            for name, a in doc["accounts"].items():
                if a["role"] not in ROLES:
                    raise ValueError(f"account {name!r} has the role {a['role']!r}")
                accounts[check_name(name)] = Account(name, a["role"], str(a["hash"]), str(a.get("created", "")))
        except PermissionError:
            raise AccountError(_("cannot read {path} (permission denied): run as the gate-agent user "
                                 "(sudo -u gate-agent ...) or with sudo").format(path=self.path)) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AccountError(_("{path} is not a console accounts file ({error}); fix it or move it away "
                                 "and add the accounts again (gate-agent console user add)").format(path=self.path, error=exc)) from None
        self.accounts, self._stamp = accounts, (st.st_mtime_ns, st.st_size)
        return self

    def reload_if_changed(self) -> None:
        """Read the file again when it changed on disk (cheap: one stat)."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            try:
                self.load()
            except AccountError:
                pass  # keep what was read last; `serve` said so at start if it was never readable

    def save(self) -> None:
        doc = {"version": 1, "accounts": {n: a.to_dict() for n, a in sorted(self.accounts.items())}}
        # Owned like its folder (the state directory, the service user's) even when root writes it.
        try:
            st = os.stat(self.path.parent)
            uid, gid = st.st_uid, st.st_gid
        except OSError:
            uid = gid = None
        write_atomic(self.path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"), mode=0o600, uid=uid, gid=gid)
        self.load()

    def add(self, name: str, role: str, password: str, **params: Any) -> Account:
        check_name(name)
        if role not in ROLES:
            raise AccountError(_("role {role!r}: use one of {roles}").format(role=role, roles=", ".join(ROLES)))
        if name in self.accounts:
            raise AccountError(_("account {name!r} exists already; change its password with "
                                 "gate-agent console user passwd {name}").format(name=name))
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        acc = Account(name, role, hash_password(check_password(password), **params), created)
        self.accounts[name] = acc
        self.save()
        return acc

    def set_password(self, name: str, password: str, **params: Any) -> None:
        if name not in self.accounts:
            raise AccountError(_("no account {name!r}; see gate-agent console user list").format(name=name))
        self.accounts[name].hash = hash_password(check_password(password), **params)
        self.save()

    def remove(self, name: str) -> None:
        if name not in self.accounts:
            raise AccountError(_("no account {name!r}; see gate-agent console user list").format(name=name))
        del self.accounts[name]
        self.save()

    def check(self, name: str, password: str) -> Account | None:
        """The account when the password is right, else None (as slow for an unknown name)."""
        acc = self.accounts.get(name)
        if acc is None or len(password) > MAX_PASSWORD:
            verify_password(password[:MAX_PASSWORD], _DUMMY)
            return None
        return acc if verify_password(password, acc.hash) else None
