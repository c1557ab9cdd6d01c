"""Doctor's checks of the way out: the clock (certificates and records need it)
and the broker (name, TCP, TLS with the gate's certificate, MQTT).
"""
from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path

from agent.i18n import _
from agent.mqttclient import probe_connect
from agent.tools.doctor.base import (
    CERT_WARN_DAYS,
    FAIL,
    MIN_SANE_YEAR,
    NET_TIMEOUT_S,
    OK,
    SKIP,
    WARN,
    Check,
    _days,
)


def _connack_hint(code: int) -> str:
    """What an MQTT 5 CONNACK refusal means, in the technician's words."""
    hints = {
        0x84: _("the broker does not speak MQTT 5; update it"),
        0x85: _("client id refused"),
        0x86: _("bad user name or password"),
        0x87: _("not authorised: the certificate or user is not allowed on this broker"),
        0x88: _("server unavailable"),
        0x89: _("server busy"),
        0x8A: _("banned"),
        0x8C: _("bad authentication method"),
    }
    return hints.get(code, "")


class NetworkChecks:
    """clock, broker (mixed into Doctor)."""

    def check_clock(self) -> Check:
        now = self.env.wall()
        year = datetime.fromtimestamp(now, tz=UTC).year
        self.clock_ok = self.env.clock_synced()
        shown = datetime.fromtimestamp(now).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        if year < MIN_SANE_YEAR:
            return Check(FAIL, "clock", _("the clock says {time}: certainly wrong").format(time=shown), (
                _("connect the network (NTP sets it) or set it: sudo date -s 'YYYY-MM-DD HH:MM'; without "
                  "a right clock TLS fails and schedules go wrong; a Pi 4 has no battery clock: fit an RTC"),))
        if self.clock_ok is None:
            return Check(WARN, "clock", _("{time}; cannot tell whether it is synchronised").format(time=shown),
                         (_("check with: timedatectl"),))
        if not self.clock_ok:
            return Check(WARN, "clock", _("{time}; NOT synchronised").format(time=shown), (
                _("records are marked clock_synced=false and the alarm clock_unsynced is raised; the gate "
                  "still decides"),
                _("check the network and NTP: timedatectl timesync-status; a Pi 4 after a power cut "
                  "without network has only the time saved at shutdown"),
            ))
        return Check(OK, "clock", _("{time}, synchronised").format(time=shown))

    # -- broker --------------------------------------------------------------------

    def check_broker(self) -> Check:
        if self.cfg is None:
            return Check(SKIP, "broker", _("not checked: the config is not valid"))
        m = self.cfg.mqtt
        if not m.enabled:
            return Check(WARN, "broker", _("no mqtt.host: the agent runs offline, events stay in the journal"),
                         (_("set it: sudo gate-agent provision --site S --gate G --broker HOST ..."),))
        where = f"{m.host}:{m.port}"
        hints: list[str] = []
        cert_note = ""
        status = OK
        if m.tls is not None and m.tls.cert_file:
            status, cert_note, more = self._cert_days(m.tls.cert_file)
            hints.extend(more)
        try:
            infos = socket.getaddrinfo(m.host, m.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return Check(FAIL, "broker", _("{where}: the name does not resolve ({error})").format(where=where, error=exc),
                         (_("check mqtt.host and the board's DNS (cat /etc/resolv.conf)"),))
        sock = None
        ctx = None
        try:
            family, kind, proto, _canon, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(NET_TIMEOUT_S)
            try:
                sock.connect(addr)
            except OSError as exc:
                return Check(FAIL, "broker", _("{where}: cannot connect ({error})").format(
                    where=where, error=exc.strerror or exc), (
                    _("check the network cable, the school's firewall (port {port} outbound) and "
                      "mqtt.port").format(port=m.port),))
            if m.tls is not None:
                try:
                    ctx = m.tls.to_uplink().context()
                    sock = ctx.wrap_socket(sock, server_hostname=m.tls.server_name or m.host)
                except ssl.SSLCertVerificationError as exc:
                    more = [_("the broker's certificate was refused: {reason}").format(reason=exc.verify_message)]
                    if self.clock_ok is False or "not yet valid" in str(exc) or "expired" in str(exc):
                        more.append(_("a wrong clock makes valid certificates look expired or not yet valid: "
                                      "fix the clock first (see clock)"))
                    more.append(_("check mqtt.tls.ca_file (the region's CA) and mqtt.tls.server_name"))
                    return Check(FAIL, "broker", _("{where}: TLS failed").format(where=where), (*more, *hints))
                except (ssl.SSLError, OSError) as exc:
                    return Check(FAIL, "broker", _("{where}: TLS failed ({error})").format(where=where, error=exc), (
                        _("the broker refused this gate's certificate, or it is not a TLS port: check "
                          "mqtt.tls.cert_file/key_file and mqtt.port"), *hints))
            if self.service_running and m.tls is not None and m.tls.cert_file:
                # The broker binds the client id to the certificate (docs/security.md): an MQTT
                # CONNECT with this gate's certificate would take over the running agent's own
                # session. The TLS handshake above proved the certificate; the agent says the rest.
                return self._broker_from_service(where, status, cert_note, hints)
            client_id = f"{self.cfg.mqtt.client_id or f'gate-{self.cfg.site}-{self.cfg.gate_id}'}-doctor"
            sock.close()  # the network and TLS answered; now MQTT itself, with the project's one client
            sock = None
            try:
                # With site events the broker keeps a session for this gate: resumed and left
                # as it was, never started afresh (that would drop the events queued for it).
                code = probe_connect(m.host, m.port, client_id[:64], tls=ctx, username=m.username,
                                     password=m.password, timeout=NET_TIMEOUT_S,
                                     keep_session_s=m.session_expiry_s if m.site_events else None)
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                return Check(FAIL, "broker", _("{where}: no MQTT answer ({error})").format(where=where, error=exc), (
                    _("the broker closed the connection: it may refuse this certificate (revoked?) or "
                      "this is not an MQTT port"), *hints))
        finally:
            if sock is not None:
                sock.close()
        if code >= 0x80:
            return Check(FAIL, "broker", _("{where}: the broker refused the connection (0x{code:02X} {why})")
                         .format(where=where, code=code, why=_connack_hint(code)), (
                _("ask the regional office to check this gate's certificate or account"), *hints))
        tls_text = "TLS" if m.tls is not None else _("no TLS")
        summary = _("{where}: connected ({tls}), MQTT accepted").format(where=where, tls=tls_text) + cert_note
        if m.tls is None:
            status = WARN if status == OK else status
            hints.append(_("without TLS events and commands cross the network in clear: set [mqtt.tls]"))
        return Check(status, "broker", summary, tuple(hints))

    def _broker_from_service(self, where: str, status: str, cert_note: str, hints: list[str]) -> Check:
        text = self.env.service_status() or ""
        state = next((part.split(None, 1)[1] for part in text.split(";")
                      if part.strip().startswith("broker ")), "").strip()
        words = {"connected": _("connected"), "disconnected": _("disconnected"), "starting": _("starting")}
        summary = _("{where}: TLS accepted; the running agent reports the broker {state} (not connecting "
                    "a second time with its certificate)").format(
            where=where, state=words.get(state, state or "?")) + cert_note
        if state.startswith("connected"):
            return Check(status, "broker", summary, tuple(hints))
        return Check(FAIL, "broker", summary, (
            _("the agent does not hold its broker session: journalctl -u gate-agent -n 50 says why"), *hints))

    def _cert_days(self, cert_file: str) -> tuple[str, str, list[str]]:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            crt = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        except (OSError, ValueError) as exc:
            return FAIL, "", [_("cannot read the certificate {path}: {error}").format(path=cert_file, error=exc)]
        left = _days(crt.not_valid_after_utc.timestamp() - self.env.wall())
        cns = crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else "?"
        hints = []
        status = OK
        if cn != f"{self.cfg.site}/{self.cfg.gate_id}":
            status = WARN
            hints.append(_("the certificate is made out to {cn!r}, but this gate is {ident!r}: the broker will "
                           "refuse this gate's topics").format(cn=cn, ident=f"{self.cfg.site}/{self.cfg.gate_id}"))
        if left <= 0:
            return FAIL, _("; certificate EXPIRED"), [
                _("the certificate expired on {date}: ask the regional office for a new one and install it with "
                  "gate-agent provision").format(date=crt.not_valid_after_utc.date().isoformat())]
        if left < CERT_WARN_DAYS:
            status = WARN
            hints.append(_("the certificate expires on {date}: ask the regional office for a new one")
                         .format(date=crt.not_valid_after_utc.date().isoformat()))
        return status, _("; certificate {cn}: days left: {days}").format(cn=cn, days=int(left)), hints

    # -- disk, journal -------------------------------------------------------------
