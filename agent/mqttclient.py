"""Connecting to an MQTT broker: the TLS settings and one paho client factory.

Every MQTT client of the project (the gate's uplink, the reference ingest,
the monitor's regional view, the regional tools, doctor's broker probe) is
made here, the same way: paho-mqtt 2.x with the version-2 callbacks, MQTT 5,
its client id, TLS from a TlsConfig (or a ready SSLContext), and a user
name and password when the broker wants them. What each does with the
client (windows, wills, subscriptions, reconnect policy) stays with it.

paho is imported only when a client is made, so a config check or a tool
that never connects does not load it.
"""
from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BrokerSettingError", "TlsConfig", "new_client", "probe_connect"]


class BrokerSettingError(ValueError):
    """A broker connection setting that cannot be used (TLS files, a bad option); says what to fix."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the broker: the CA that signed its certificate, and for mutual
    TLS the client's own certificate and key. ``server_name`` is the name
    checked in the broker's certificate when it differs from the host
    (connecting by IP address, say)."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client SSLContext; raises BrokerSettingError naming a missing or bad file."""
        for what, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                           ("key_file", self.key_file)):
            if path is not None and not Path(path).is_file():
                raise BrokerSettingError(
                    f"TLS {what} {path!r} does not exist or is not a file; "
                    "fix the path in the uplink's tls settings"
                )
        if (self.cert_file is None) != (self.key_file is None):
            raise BrokerSettingError(
                "TLS client certificate needs both cert_file and key_file (mutual TLS); "
                "set both, or neither for server-only TLS"
            )
        ctx: ssl.SSLContext = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.server_name = self.server_name  # type: ignore[attr-defined]
        try:
            ctx.load_verify_locations(cafile=self.ca_file)
            if self.cert_file is not None:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise BrokerSettingError(
                f"TLS files could not be loaded ({exc}); ca_file must hold PEM CA certificates, "
                "cert_file/key_file a PEM certificate and its matching private key"
            ) from exc
        return ctx


class _NamedContext(ssl.SSLContext):
    """Checks the broker's certificate against ``server_name`` when set
    (paho always passes the host it connects to)."""

    server_name: str | None = None

    def wrap_socket(self, sock, *args, server_hostname=None, **kwargs):  # type: ignore[override]
        return super().wrap_socket(
            sock, *args, server_hostname=self.server_name or server_hostname, **kwargs
        )


def new_client(client_id: str, *, tls: TlsConfig | ssl.SSLContext | None = None,
               username: str | None = None, password: str | None = None) -> Any:
    """A paho MQTT 5 client (version-2 callbacks) with its id, TLS and credentials set; not connected."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls.context() if isinstance(tls, TlsConfig) else tls)
    return client


def probe_connect(host: str, port: int, client_id: str, *, tls: TlsConfig | ssl.SSLContext | None = None,
                  username: str | None = None, password: str | None = None, timeout: float = 5.0) -> int:
    """Connect once with a clean start, and disconnect: the CONNACK reason code (0 accepted, 0x80 and
    above refused). OSError or ssl.SSLError when no connection is made, TimeoutError when no CONNACK
    comes in ``timeout`` s. Doctor's check that the broker takes this gate's identity."""
    got: list[int] = []
    done = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        got.append(int(reason_code.value if hasattr(reason_code, "value") else reason_code))
        done.set()

    def on_disconnect(client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        done.set()  # refused, or closed before a CONNACK

    client = new_client(client_id, tls=tls, username=username, password=password)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect_timeout = timeout
    client.connect(host, port, keepalive=30, clean_start=True)
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"no CONNACK from {host}:{port} in {timeout:g} s")
        if not got:
            raise ConnectionError("the broker closed the connection before answering")
        return got[0]
    finally:
        if got and got[0] < 0x80:
            client.disconnect()
        client.loop_stop()
