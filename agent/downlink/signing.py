"""Ed25519 signatures on commands and access lists (``cryptography``; no hand-written crypto).

What is signed (docs/security.md, docs/contract.md "Signing"): the canonical
JSON of every field of the message except ``sig`` (``agent.contract.canonical_json``:
sorted keys, no spaces, UTF-8). ``key_id`` is one of those fields, so a
signature cannot be moved to another key's name. The gate trusts the keys in
its configuration, a dict ``key_id -> public key``; during a rotation it holds
the old and the new key at once.

Keys on disk and in configs:

- public keys: base64 of the 32 raw bytes (44 characters), or a PEM
  ``PUBLIC KEY`` block;
- private keys: PEM PKCS#8 (``gate-agent keygen`` writes them, mode 0600).

``cryptography`` is imported when a key is used, not with this module: the service
loads its trusted keys at start as ``TrustedKey`` (the 32 raw bytes, checked) and
maps the library (~8 MB resident) only when the first signed message comes.
"""
from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from agent.contract import CONTRACT_VERSION, canonical_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "KeyLoadError",
    "SignatureError",
    "TrustedKey",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
    "make_command",
    "private_key_pem",
    "public_key_b64",
    "sign_acl",
    "sign_command",
    "sign_message",
    "verify",
]

SIG_LEN_B64 = 88  # 64 bytes, base64 with padding


class SignatureError(ValueError):
    """A message that is not signed by a trusted key.

    reason: ``unsigned`` (no ``sig`` or ``key_id``) or ``bad_signature``
    (unknown key, malformed or wrong signature); the words of ``command.result``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class KeyLoadError(ValueError):
    """A key that cannot be loaded (bad base64, wrong length, not Ed25519)."""


def _crypto() -> Any:
    """``cryptography``'s pieces this module uses, imported on first use; a missing or
    broken library is a KeyLoadError saying what to install (the gate keeps deciding)."""
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise KeyLoadError(f"the cryptography package does not import ({exc}): signatures cannot be made "
                           "or checked; reinstall the agent (sudo ./install.sh) or "
                           "`pip install cryptography`") from None
    return SimpleNamespace(InvalidSignature=exceptions.InvalidSignature, serialization=serialization,
                           Ed25519PrivateKey=ed25519.Ed25519PrivateKey,
                           Ed25519PublicKey=ed25519.Ed25519PublicKey)


class TrustedKey:
    """A trusted public key as its 32 raw bytes, checked when loaded; the
    ``cryptography`` key is built on the first ``verify`` (see the module doc)."""

    __slots__ = ("_key", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise KeyLoadError(f"public key is {len(raw)} bytes, an Ed25519 key has 32; "
                               "give the 44-character base64 that `gate-agent keygen` prints")
        self.raw = bytes(raw)
        self._key: Any = None

    def public_key(self) -> Ed25519PublicKey:
        if self._key is None:
            self._key = _crypto().Ed25519PublicKey.from_public_bytes(self.raw)
        return self._key

    def verify(self, signature: bytes, data: bytes) -> None:
        """cryptography's InvalidSignature when ``signature`` is not this key's over ``data``."""
        self.public_key().verify(signature, data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"TrustedKey({base64.b64encode(self.raw).decode('ascii')!r})"


# --------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[Ed25519PrivateKey, str]:
    """A new signing key and its public key as base64 (for the gate's trusted keys)."""
    key = _crypto().Ed25519PrivateKey.generate()
    return key, public_key_b64(key.public_key())


def public_key_b64(key: Ed25519PublicKey | Ed25519PrivateKey | TrustedKey) -> str:
    """The raw public key, base64 (44 characters): the form gate configs hold."""
    if isinstance(key, TrustedKey):
        return base64.b64encode(key.raw).decode("ascii")
    c = _crypto()
    if isinstance(key, c.Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(c.serialization.Encoding.Raw, c.serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PEM PKCS#8, unencrypted: protect the file (mode 0600) instead."""
    ser = _crypto().serialization
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _raw_key(text: str) -> bytes | None:
    """The 32 raw bytes when ``text`` is the base64 of an Ed25519 key, else None."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def load_public_key(value: str | bytes | Ed25519PublicKey | TrustedKey) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes, a PEM block, or a
    path (starting with ``/``, ``./`` or ``../``) to a file holding either."""
    if isinstance(value, TrustedKey):
        return value.public_key()
    return _trusted_key(value).public_key() if not _is_key_object(value) else value


def _is_key_object(value: Any) -> bool:
    # Only a value that is neither text nor a TrustedKey can be a cryptography key:
    # the library is imported for that check alone, never for base64 text.
    return not isinstance(value, (str, bytes, TrustedKey)) and isinstance(value, _crypto().Ed25519PublicKey)


def _trusted_key(value: str | bytes | Ed25519PublicKey | TrustedKey) -> TrustedKey:
    """``value`` (as ``load_public_key`` takes it) as a TrustedKey; ``cryptography`` is
    imported only for a PEM block or a cryptography key object."""
    if isinstance(value, TrustedKey):
        return value
    if _is_key_object(value):
        return TrustedKey(_raw_public(value))
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise KeyLoadError(f"a public key must be a string, not {type(value).__name__}")
    text = value.strip()
    # A base64 key may itself start with "/": it is a key when it decodes to 32 bytes.
    if text.startswith(("/", "./", "../")) and _raw_key(text) is None:
        try:
            text = Path(text).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyLoadError(f"cannot read the public key file {value}: {exc}; give the path "
                               "of the .pub file `gate-agent keygen` wrote") from None
    if text.startswith("-----BEGIN"):
        c = _crypto()
        try:
            key = c.serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError) as exc:
            raise KeyLoadError(f"PEM public key does not load ({exc}); paste the whole block") from None
        if not isinstance(key, c.Ed25519PublicKey):
            raise KeyLoadError(f"the PEM key is {type(key).__name__}, not Ed25519; "
                            "make keys with `gate-agent keygen`")
        return TrustedKey(_raw_public(key))
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyLoadError(f"public key {text[:20]!r}... is not base64; give the 44-character "
                        "base64 that `gate-agent keygen` prints, or a PEM block") from None
    return TrustedKey(raw)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    ser = _crypto().serialization
    return key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def load_trusted_keys(keys: Mapping[str, Any]) -> dict[str, TrustedKey]:
    """Parse a config's ``key_id -> public key``; one bad entry raises naming its key_id.
    The keys are checked (base64, 32 bytes, or a PEM Ed25519 block) but ``cryptography``
    is not imported for base64 ones: TrustedKey builds its key on the first verify."""
    if not isinstance(keys, Mapping):
        raise KeyLoadError("trusted keys must be a table key_id -> public key")
    out: dict[str, TrustedKey] = {}
    for key_id, value in keys.items():
        if not isinstance(key_id, str) or not 1 <= len(key_id) <= 64:
            raise KeyLoadError(f"trusted key id {key_id!r} must be a string of 1 to 64 characters")
        try:
            out[key_id] = _trusted_key(value)
        except KeyLoadError as exc:
            raise KeyLoadError(f"trusted key {key_id!r}: {exc}") from None
    return out


def load_private_key(source: str | os.PathLike | bytes) -> Ed25519PrivateKey:
    """A signing key from a PEM file path, or PEM bytes."""
    if isinstance(source, bytes):
        data, where = source, "the PEM data"
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyLoadError(f"cannot read the private key {path}: {exc.strerror}; "
                            "make one with `gate-agent keygen FILE`") from None
        where = str(path)
    c = _crypto()
    try:
        key = c.serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyLoadError(f"{where} is not an unencrypted PEM private key ({exc}); "
                        "make one with `gate-agent keygen FILE`") from None
    if not isinstance(key, c.Ed25519PrivateKey):
        raise KeyLoadError(f"{where} holds a {type(key).__name__}, not an Ed25519 key; "
                        "make one with `gate-agent keygen FILE`")
    return key


# --------------------------------------------------------------------------- signing


def sign_message(private_key: Ed25519PrivateKey, fields: Mapping[str, Any]) -> dict:
    """``fields`` (which must hold its ``key_id``) plus ``sig`` over their canonical JSON."""
    msg = {k: v for k, v in fields.items() if k != "sig"}
    if not isinstance(msg.get("key_id"), str) or not msg["key_id"]:
        raise ValueError("the message needs its key_id before it is signed (key_id is signed too)")
    msg["sig"] = base64.b64encode(private_key.sign(canonical_json(msg))).decode("ascii")
    return msg


def sign_command(private_key: Ed25519PrivateKey, fields: Mapping[str, Any]) -> dict:
    """A signed command: ``fields`` as made by ``make_command`` (or by hand), with ``sig``."""
    return sign_message(private_key, fields)


def rfc3339_s(epoch_s: float) -> str:
    """UTC RFC 3339 to the second: ``2026-09-01T07:46:00Z``."""
    return datetime.fromtimestamp(int(epoch_s), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_command(
    site: str,
    gate: str,
    command: str,
    args: Mapping[str, Any] | None = None,
    *,
    key_id: str,
    counter: int,
    now: float,
    ttl_s: float = 20.0,
    request_id: str | None = None,
    nonce: str | None = None,
) -> dict:
    """The unsigned fields of a command (contract v1) issued at ``now`` (``issued_at``,
    which raises the gate's time floor) that expires ``ttl_s`` after it. ``now`` must
    be the sender's synchronised clock: a gate refuses a command from its future."""
    import secrets  # the sending side's: the gate's start does not import it (hashlib, OpenSSL)

    expires = datetime.fromtimestamp(now, tz=UTC) + timedelta(seconds=ttl_s)
    return {
        "v": CONTRACT_VERSION,
        "request_id": request_id or f"r-{secrets.token_hex(8)}",
        "site": site,
        "gate": gate,
        "command": command,
        "args": dict(args or {}),
        "nonce": nonce or secrets.token_hex(12),
        "counter": int(counter),
        "issued_at": rfc3339_s(now),
        "expires": rfc3339_s(expires.timestamp()),
        "key_id": key_id,
    }


def sign_acl(
    private_key: Ed25519PrivateKey,
    document: Mapping[str, Any],
    *,
    key_id: str,
    site: str,
    counter: int,
    gate: str | None = None,
    issued_at: float | None = None,
) -> dict:
    """An access list in its signed envelope (docs/security.md, "Signed access lists").

    ``{"v": 1, "site", "gate" (absent: any gate of the site), "counter",
    "issued_at" (when given: epoch seconds of the signer's synchronised clock;
    it raises the gate's time floor), "key_id", "list": {...}, "sig"}``;
    ``sig`` covers all of it but itself, the whole list included.
    """
    env: dict[str, Any] = {"v": CONTRACT_VERSION, "site": site, "counter": int(counter),
                           "key_id": key_id, "list": dict(document)}
    if gate is not None:
        env["gate"] = gate
    if issued_at is not None:
        env["issued_at"] = rfc3339_s(issued_at)
    return sign_message(private_key, env)


# --------------------------------------------------------------------------- verifying


def verify(msg: Mapping[str, Any], trusted_keys: Mapping[str, Any]) -> str:
    """The ``key_id`` whose trusted key signed ``msg``; else raise SignatureError.

    ``trusted_keys``: key_id -> Ed25519PublicKey (or anything ``load_public_key``
    takes). The signed bytes are re-derived from the parsed message, so the
    sender's spacing and key order do not matter.
    """
    if not isinstance(msg, Mapping):
        raise SignatureError("unsigned", "the message is not an object, so it carries no signature")
    sig, key_id = msg.get("sig"), msg.get("key_id")
    if sig is None or key_id is None:
        missing = " and ".join(n for n, v in (("sig", sig), ("key_id", key_id)) if v is None)
        raise SignatureError("unsigned", f"no {missing}: the gate acts only on signed messages")
    if not isinstance(key_id, str) or key_id not in trusted_keys:
        shown = key_id if isinstance(key_id, str) else type(key_id).__name__
        raise SignatureError("bad_signature", f"key_id {str(shown)[:64]!r} is not one of the keys "
                             "this gate trusts; add its public key to the gate's config or sign "
                             "with a trusted key")
    if not isinstance(sig, str) or len(sig) != SIG_LEN_B64:
        raise SignatureError("bad_signature", "sig must be the 88-character base64 of a 64-byte "
                             "Ed25519 signature")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("bad_signature", "sig is not valid base64") from None
    try:
        key = load_public_key(trusted_keys[key_id])
        data = canonical_json(dict(msg))
        invalid = _crypto().InvalidSignature
    except (KeyLoadError, TypeError, ValueError) as exc:
        raise SignatureError("bad_signature", f"cannot check the signature: {exc}") from None
    try:
        key.verify(raw, data)
    except invalid:
        raise SignatureError("bad_signature", f"the signature does not match the message for "
                             f"key {key_id!r}: forged or altered in transit") from None
    return key_id
