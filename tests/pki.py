"""A test CA made with ``cryptography``, and mosquitto running the repository's
mutual-TLS configuration (mosquitto/gate-broker.conf + mosquitto/acl.conf +
the plugin mosquitto/gate_acl.c).

``TestCA`` issues a server certificate for 127.0.0.1/localhost, client
certificates (CN = MQTT username), and a CRL. ``GateBroker`` copies the
repository's broker config with only the machine-specific lines rewritten
(listener ports, file paths) and what Debian's mosquitto.conf would add
(log file, persistence, here off) plus the run-as user, so the tests
exercise the shipped config, ACL and plugin, not a look-alike. Its ``port``
is the gates' listener (8883 as shipped), ``services_port`` the regional
services' one (8884), ``ports`` every listener.

The plugin is built with ``make broker-plugin``; where it cannot be built
the broker tests skip, saying why, or fail under GATE_REQUIRE_COMPILED=1
(CI), so that a broken build never passes unnoticed.

Fixtures: ``pki`` (a CA with gate A, gate B, the server, the ingest, a
site broker's bridge and a revoked gate certificate) and ``gate_broker``
(mosquitto with that CA).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.broker import Mosquitto, free_port, mosquitto_path

ROOT = Path(__file__).resolve().parent.parent
BROKER_CONF = ROOT / "mosquitto" / "gate-broker.conf"
BROKER_ACL = ROOT / "mosquitto" / "acl.conf"
BROKER_PLUGIN = ROOT / "mosquitto" / "gate_acl.so"
GATES_PORT, SERVICES_PORT = 8883, 8884  # the shipped listeners

SITE = "school-17"
GATE_A, GATE_B = "main", "side"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


@dataclass(frozen=True)
class Identity:
    """A certificate and its key on disk."""

    name: str  # the CN
    cert: Path
    key: Path
    serial: int

    def tls(self, ca: Path):
        """An uplink TlsConfig presenting this identity."""
        from agent.mqttclient import TlsConfig

        return TlsConfig(str(ca), str(self.cert), str(self.key))


class TestCA:
    """A throwaway certificate authority (ECDSA P-256: quick to make)."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, name: str = "Test Region CA") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.folder / "ca.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.crl_path = self.folder / "ca.crl"
        self.revoked: list[int] = []
        self.write_crl()

    def issue(self, cn: str, *, server: bool = False, common_names: list[str] | None = None) -> Identity:
        """A certificate for CN ``cn``; ``common_names`` gives the subject's CNs instead (none, two)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        serial = x509.random_serial_number()
        names = [cn] if common_names is None else common_names
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Region")]
        subject += [x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", cn)
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return Identity(cn, cert_path, key_path, serial)

    def revoke(self, identity: Identity) -> None:
        self.revoked.append(identity.serial)
        self.write_crl()

    def write_crl(self) -> None:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=1))
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build())
        crl = builder.sign(self.key, hashes.SHA256())
        self.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


@dataclass
class Pki:
    ca: TestCA
    server_cert: Identity  # the broker's own certificate
    gate_a: Identity
    gate_b: Identity
    regional: Identity  # CN regional-server
    ingest: Identity  # CN regional-ingest
    revoked: Identity  # a gate certificate listed in the CRL
    bridge: Identity  # CN {site}/site-broker: a site broker's bridge (mosquitto/site-broker.conf)

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_path


def make_pki(folder: Path) -> Pki:
    ca = TestCA(folder)
    pki = Pki(
        ca=ca,
        server_cert=ca.issue("localhost", server=True),
        gate_a=ca.issue(f"{SITE}/{GATE_A}"),
        gate_b=ca.issue(f"{SITE}/{GATE_B}"),
        regional=ca.issue("regional-server"),
        ingest=ca.issue("regional-ingest"),
        revoked=ca.issue(f"{SITE}/stolen"),
        bridge=ca.issue(f"{SITE}/site-broker"),
    )
    ca.revoke(pki.revoked)
    return pki


def build_plugin() -> Path:
    """mosquitto/gate_acl.so, (re)built by the Makefile; skips or fails (CI) where it cannot be."""
    source = BROKER_PLUGIN.with_name("gate_acl.c")
    # The workers of a parallel run (pytest-xdist) each come here: one compiles at a time, so
    # no broker loads a plugin another worker's compiler is still writing. The lock is on the
    # source (read-only is enough for flock), so nothing new appears in the tree.
    with open(source, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = subprocess.run(["make", "--no-print-directory", "broker-plugin"], check=False,
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            ok, why = done.returncode == 0, (done.stdout + done.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, why = False, str(exc)
    # A failed build may leave an older plugin behind: never test that one.
    if not ok or not BROKER_PLUGIN.exists() or BROKER_PLUGIN.stat().st_mtime < source.stat().st_mtime:
        message = (f"the broker plugin {BROKER_PLUGIN.name} was not built ({why}); install "
                   "mosquitto-dev, libmosquitto-dev and libssl-dev (scripts/setup-system.sh) "
                   "and run `make broker-plugin`")
        if os.environ.get("GATE_REQUIRE_COMPILED", "") in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return BROKER_PLUGIN


def shipped_paths(pki: Pki, workdir: Path, plugin: Path) -> dict[str, str]:
    """The lines of a shipped broker config that name files, as this test machine has them
    (the broker's certificate and CRL, the ACL, the plugin), by their first word."""
    return {
        "cafile": f"cafile {pki.ca.cert_path}",
        "certfile": f"certfile {pki.server_cert.cert}",
        "keyfile": f"keyfile {pki.server_cert.key}",
        "crlfile": f"crlfile {pki.ca.crl_path}",
        "acl_file": f"acl_file {workdir / 'acl.conf'}",
        "plugin": f"plugin {plugin}",
        "plugin_opt_acl_file": f"plugin_opt_acl_file {workdir / 'acl.conf'}",
    }


def render_broker_conf(pki: Pki, workdir: Path, ports: dict[int, int], plugin: Path, *,
                       standalone: bool = True, persistence: bool = False) -> str:
    """mosquitto/gate-broker.conf with this machine's paths and ports; every other line as shipped.

    ports maps each shipped listener port to the port it gets here. standalone: add what
    Debian's mosquitto.conf would (the log file, persistence), for a broker run on this file alone;
    persistence: on (sessions and queues survive a restart), as Debian's file has it, or off.
    """
    replace = shipped_paths(pki, workdir, plugin)
    seen: set[str] = set()
    listeners: list[int] = []
    out = []
    for line in BROKER_CONF.read_text().splitlines():
        word = line.split(" ", 1)[0] if line and not line.startswith("#") else ""
        if word == "listener":
            shipped = int(line.split()[1])
            assert shipped in ports, f"mosquitto/gate-broker.conf has a listener {shipped} the tests do not know"
            listeners.append(shipped)
            out.append(f"listener {ports[shipped]} 127.0.0.1")
        elif word in replace:
            seen.add(word)
            out.append(replace[word])
        else:
            out.append(line)
    missing = set(replace) - seen
    assert not missing, f"mosquitto/gate-broker.conf lacks {sorted(missing)}"
    assert sorted(listeners) == sorted(ports), f"listeners {listeners}, expected {sorted(ports)}"
    # What Debian's mosquitto.conf, which includes the shipped file, would set; and run as
    # root, mosquitto would switch to user "mosquitto", which cannot read the test files.
    if standalone:
        out = [f"log_dest file {workdir / 'mosquitto.log'}", f"persistence {str(persistence).lower()}",
               f"persistence_location {workdir}/", *out, f"user {getpass.getuser()}"]
    out.append("log_type information")
    return "\n".join(out) + "\n"


class GateBroker(Mosquitto):
    """mosquitto with the repository's mutual-TLS config, ACL and plugin (see render_broker_conf).

    acl: the ACL file's text (default: mosquitto/acl.conf as shipped). plugin: the built
    gate_acl.so (default: built now, see broker_plugin). persistence: see render_broker_conf.
    """

    def __init__(self, workdir: Path, pki: Pki, *, port: int | None = None, acl: str | None = None,
                 plugin: Path | None = None, persistence: bool = False) -> None:
        plugin = plugin or broker_plugin()
        super().__init__(workdir, port=port)
        self.pki = pki
        self.services_port = free_port()
        self.ports = {GATES_PORT: self.port, SERVICES_PORT: self.services_port}
        self.acl_file = self.workdir / "acl.conf"
        self.acl_file.write_text(BROKER_ACL.read_text() if acl is None else acl)
        self.conf_path.write_text(render_broker_conf(pki, self.workdir, self.ports, plugin,
                                                     persistence=persistence))

    def start(self, timeout: float = 10.0) -> GateBroker:
        super().start(timeout)  # waits for the gates' listener only
        deadline = time.monotonic() + timeout
        for port in self.ports.values():  # mosquitto opens them one after the other
            while True:
                try:
                    socket.create_connection((self.host, port), timeout=0.5).close()
                    break
                except OSError:
                    if not self.running or time.monotonic() > deadline:
                        raise RuntimeError(f"mosquitto did not open its listener {port}: "
                                           f"{self._log_tail()}") from None
                    time.sleep(0.02)
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


_built: list[Path] = []  # make runs once per session


def broker_plugin() -> Path:
    """The built plugin; skips the test where mosquitto or the plugin is missing (fails in CI)."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); broker tests skipped")
    if not _built:
        _built.append(build_plugin())
    return _built[0]


@pytest.fixture
def gate_broker(pki: Pki, tmp_path: Path) -> Iterator[GateBroker]:
    b = GateBroker(tmp_path / "gate-broker", pki).start()
    yield b
    b.stop()


def mqtt_client(broker: Mosquitto, identity: Identity | None, ca: Path, *, client_id: str | None = None):
    """A paho MQTT 5 client configured for mutual TLS as ``identity`` (None: no certificate)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                    client_id=client_id or f"t-{identity.name.replace('/', '-') if identity else 'anon'}")
    c.tls_set_context(tls_context(identity, ca))
    return c


def tls_context(identity: Identity | None, ca: Path) -> ssl.SSLContext:
    """A client's TLS context trusting ``ca`` and presenting ``identity`` (None: no certificate)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    return ctx
