"""The console's HTTPS certificate: the gate's own when a browser can take it, else one of its own.

A gate's certificate is issued for the broker, often for client use only
(extended key usage clientAuth): a browser refuses such a certificate for a
web server, so serving the console with it would give the technician a page
that never opens. ``choose(cert, key, state_dir, bind)`` therefore takes the
gate's certificate only when it is readable and allowed for a server (no
extended key usage, or serverAuth among them), and otherwise makes (once,
kept in ``<state_dir>/console-tls/``, key 0600) a self-signed certificate
for this board: its host name, ``localhost``, 127.0.0.1 and the address the
console is bound to. A browser warns about a self-signed certificate; the
console's log gives its SHA-256 fingerprint, to compare with what the
browser shows before accepting it. A certificate that no longer names the
bound address, or expires within 30 days, is made again.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TLS_DIR", "Chosen", "choose", "fingerprint", "server_usable"]

TLS_DIR = "console-tls"
VALID_DAYS = 3650
RENEW_DAYS = 30


@dataclass(frozen=True)
class Chosen:
    cert: Path
    key: Path
    own: bool  # True: the console's self-signed certificate
    why: str  # why the gate's was not taken (empty when it was)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def server_usable(cert: Path, key: Path) -> str:
    """"" when a browser can take ``cert`` (with ``key``) for a web server, else why not."""
    try:
        c = _load(cert)
        key.read_bytes()
    except (OSError, ValueError) as exc:
        return f"cannot read it ({exc})"
    try:
        usages = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return ""
    if ExtendedKeyUsageOID.SERVER_AUTH in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages:
        return ""
    return "it is issued for a client only (no serverAuth usage): browsers refuse it for a web page"


def fingerprint(cert: Path) -> str:
    """The SHA-256 fingerprint as browsers show it (AA:BB:...)."""
    return ":".join(f"{b:02X}" for b in _load(cert).fingerprint(hashes.SHA256()))


def _names(bind: str) -> tuple[list[str], list[ipaddress._BaseAddress]]:
    dns = sorted({socket.gethostname(), "localhost"} - {""})
    ips = {ipaddress.ip_address("127.0.0.1")}
    try:
        ip = ipaddress.ip_address(bind)
    except ValueError:
        if bind and bind not in dns:
            dns.append(bind)
    else:
        if not ip.is_unspecified:
            ips.add(ip)
    return dns, sorted(ips, key=str)


def _covers(cert: x509.Certificate, dns: list[str], ips: list) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    return (set(dns) <= set(san.get_values_for_type(x509.DNSName))
            and set(ips) <= set(san.get_values_for_type(x509.IPAddress)) and left > dt.timedelta(days=RENEW_DAYS))


def _make(folder: Path, dns: list[str], ips: list) -> tuple[Path, Path]:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else "gate-console"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "gate-agent console")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([*map(x509.DNSName, dns), *map(x509.IPAddress, ips)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    for path, data, mode in (
            (key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), 0o600),
            (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)):
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return cert_path, key_path


def choose(cert: Path | None, key: Path | None, state_dir: Path, bind: str) -> Chosen:
    """The certificate and key to serve with (module doc). OSError when the state
    directory cannot hold the console's own."""
    why = "the gate's config names no certificate"
    if cert is not None and key is not None:
        why = server_usable(cert, key)
        if not why:
            return Chosen(cert, key, False, "")
    folder = state_dir / TLS_DIR
    dns, ips = _names(bind)
    own_cert, own_key = folder / "cert.pem", folder / "key.pem"
    try:
        if own_key.exists() and _covers(_load(own_cert), dns, ips):
            return Chosen(own_cert, own_key, True, why)
    except (OSError, ValueError):
        pass  # unreadable or damaged: made again
    own_cert, own_key = _make(folder, dns, ips)
    return Chosen(own_cert, own_key, True, why)
