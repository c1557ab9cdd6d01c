"""Connecting to an MQTT broker: the TLS settings and one paho client factory.

Every MQTT client of the project (the gate's uplink, the reference ingest,
the monitor's regional view, the regional tools, doctor's broker probe) is
made here, the same way: paho-mqtt 2.x with the version-2 callbacks, MQTT 5,
its client id, TLS from a TlsConfig (or a ready SSLContext), and a user
name and password when the broker wants them. What each does with the
client (windows, wills, subscriptions, reconnect policy) stays with it.

paho is imported only when a client is made, so a config check or a tool
that never connects does not load it.

One change to how paho reads a big PUBLISH (``_install_big_publish``): paho
2.2 slices the packet it received four times and more (the topic, the packet
id, each property) before the payload reaches the callback, each slice a copy
of the whole payload made with the interpreter lock held. For a 15 MB access
list that is some 20 ms on this x86 machine, several times that on a Pi,
during which the gate thread decides no card. A packet of 1 MiB or more is
decoded here instead, the payload handed over as the very buffer paho read it
into (a bytearray, its head dropped in place): no copy at all.
"""
from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BIG_PUBLISH_BYTES", "BrokerSettingError", "TlsConfig", "new_client", "probe_connect"]

BIG_PUBLISH_BYTES = 1 << 20  # a PUBLISH this big reaches on_message uncopied (a bytearray)


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

    _install_big_publish()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls.context() if isinstance(tls, TlsConfig) else tls)
    return client


def probe_connect(host: str, port: int, client_id: str, *, tls: TlsConfig | ssl.SSLContext | None = None,
                  username: str | None = None, password: str | None = None, timeout: float = 5.0,
                  keep_session_s: int | None = None) -> int:
    """Connect once, and disconnect: the CONNACK reason code (0 accepted, 0x80 and above refused).
    OSError or ssl.SSLError when no connection is made, TimeoutError when no CONNACK comes in
    ``timeout`` s. Doctor's check that the broker takes this gate's identity.

    With a clean start, unless ``keep_session_s``: then the session the broker keeps for the gate
    (mqtt.site_events; the broker names the client after the certificate, so this is the gate's
    own session) is resumed with the same expiry and left as it was. One queued message at most
    comes (Receive Maximum 1) and is never acknowledged, so the broker sends it to the gate
    again; a clean start would have thrown the session and its queue away."""
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
    props = None
    if keep_session_s is not None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client.manual_ack_set(True)  # nothing received is acknowledged: it stays the gate's
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = int(keep_session_s)
        props.ReceiveMaximum = 1
    client.connect(host, port, keepalive=30, clean_start=keep_session_s is None, properties=props)
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


_PUBLISH_FIELDS = ("dup", "qos", "retain", "topic", "mid", "properties", "payload")


def _install_big_publish() -> bool:
    """Have paho decode a PUBLISH of BIG_PUBLISH_BYTES or more without copying its
    payload (see the module docstring); True when in place. Only where paho's
    decoder is the one this was written against (paho 2.2's ``_packet``, its
    PublishPacket fields); any other paho is left exactly as it is."""
    try:
        from paho.mqtt import _packet
        from paho.mqtt.enums import MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties, VariableByteIntegers
    except ImportError:
        return False
    original = getattr(_packet, "decode_publish", None)
    if original is None or getattr(_packet.PublishPacket, "_fields", None) != _PUBLISH_FIELDS:
        return False
    if getattr(original, "big_publish", False):
        return True

    def decode_publish(header: int, packet: Any, protocol: Any) -> Any:
        if not isinstance(packet, bytearray) or len(packet) < BIG_PUBLISH_BYTES:
            return original(header, packet, protocol)
        qos = (header & 0x06) >> 1
        with memoryview(packet) as mv:
            slen = int.from_bytes(mv[0:2], "big")
            topic = bytes(mv[2:2 + slen])
            pos = 2 + slen
            mid = 0
            if qos > 0:
                mid = int.from_bytes(mv[pos:pos + 2], "big")
                pos += 2
            properties = None
            if protocol == MQTTProtocolVersion.MQTTv5:
                head = bytes(mv[pos:pos + 4])  # the properties' length, 1 to 4 bytes
                length, size = VariableByteIntegers.decode(head)
                properties = Properties(PacketTypes.PUBLISH)
                _, used = properties.unpack(bytes(mv[pos:pos + size + length]))
                pos += used
        if pos > len(packet) or (protocol != MQTTProtocolVersion.MQTTv5 and not topic):
            return original(header, packet, protocol)  # malformed: paho says so its own way
        del packet[:pos]  # a bytearray drops its head by moving its start: no copy
        return _packet.PublishPacket(dup=bool(header & 0x08), qos=qos, retain=bool(header & 0x01),
                                     topic=topic, mid=mid, properties=properties, payload=packet)

    decode_publish.big_publish = True  # type: ignore[attr-defined]
    decode_publish.paho = original  # type: ignore[attr-defined]  # paho's own, for the tests
    _packet.decode_publish = decode_publish
    return True
